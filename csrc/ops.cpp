// Operator schemas of the gradharmony extension (kernels: harmonize_cpu.cpp, harmonize_cuda.cu).
//
//   gradharmony::gram(Tensor G) -> Tensor                         M = G G^T per sample
//   gradharmony::combine(Tensor G, Tensor w, int reduction)        out_b = w_b^T G_b (0: none, 1: sum)
//   gradharmony::solve(Tensor G, int method, Tensor? order, Tensor? target) -> (M, cos, w, phi)
//                                                                  gram + per-sample solve
//   gradharmony::fused(Tensor G, int method, Tensor? order, Tensor? target,
//                      int reduction) -> (out, M, cos, w, phi)      gram + solve + combine
//
// Semantics: gradharmony/engine/reference.py. phi is an empty (0,) tensor unless method == 2.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gradharmony, m) {
  m.def("gram(Tensor G) -> Tensor");
  m.def("combine(Tensor G, Tensor w, int reduction) -> Tensor");
  m.def("solve(Tensor G, int method, Tensor? order, Tensor? target) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused(Tensor G, int method, Tensor? order, Tensor? target, int reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import gradharmony._C` (prebuilt by setup.py) only has to load this library: the ops
// register themselves in torch.ops.gradharmony. The module itself is empty.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
