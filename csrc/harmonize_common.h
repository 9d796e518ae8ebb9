// Input checks and output allocation shared by the CPU and CUDA ops (torch-dependent).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <type_traits>

#include "harmonize_solve.h"

namespace gradharmony {

// The accumulation type: float64 for float64 gradients, float32 otherwise (as a ScalarType for
// allocations, as a C++ type for the kernels). Python: gradharmony/kernels/spec.py, acc_dtype.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline void check_G(const at::Tensor& G, const char* op) {
  TORCH_CHECK(G.dim() == 3, "gradharmony::", op, ": G must be (B, K, D), got shape ", G.sizes());
  const auto t = G.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "gradharmony::", op, ": unsupported dtype ", t,
              " (float32, float64, float16, bfloat16)");
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kNone || reduction == kReduceSum, "gradharmony::", op,
              ": reduction must be 0 (none) or 1 (sum), got ", reduction);
}

// Optional inputs of solve / fused, converted to what the kernels read: order int64 (B, K, K),
// target acc (K, K), both contiguous on G's device.
struct SolveInputs {
  at::Tensor order, target;  // undefined when absent
};

inline SolveInputs prepare_solve(const at::Tensor& G, int64_t method,
                                 const c10::optional<at::Tensor>& order,
                                 const c10::optional<at::Tensor>& target, const char* op) {
  check_G(G, op);
  TORCH_CHECK(method == kSum || method == kPCGrad || method == kGradVac, "gradharmony::", op,
              ": unknown method id ", method, " (0 sum, 1 pcgrad, 2 gradvac)");
  const int64_t B = G.size(0), K = G.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxFusedK, "gradharmony::", op, ": K must be in [1, ", kMaxFusedK,
              "], got ", K);
  const auto acc = acc_type(G.scalar_type());
  SolveInputs in;
  if (order.has_value() && order->defined() && method != kSum) {
    TORCH_CHECK(order->dim() == 3 && order->size(0) == B && order->size(1) == K &&
                    order->size(2) == K,
                "gradharmony::", op, ": order must be (B, K, K) = (", B, ", ", K, ", ", K,
                "), got ", order->sizes());
    TORCH_CHECK(!at::isFloatingType(order->scalar_type()) && !order->is_complex(),
                "gradharmony::", op, ": order must be an integer tensor");
    in.order = order->to(G.device(), at::kLong).contiguous();
  }
  if (method == kGradVac) {
    TORCH_CHECK(target.has_value() && target->defined(), "gradharmony::", op,
                ": gradvac needs a (K, K) target matrix");
    TORCH_CHECK(target->dim() == 2 && target->size(0) == K && target->size(1) == K,
                "gradharmony::", op, ": target must be (K, K), got ", target->sizes());
    in.target = target->to(G.device(), acc).contiguous();
  }
  return in;
}

// The outputs of the per-sample solve, allocated in the accumulation type: M, cos (B, K, K),
// w (B, K), phi (B, K, K) for gradvac, else an empty (0,) tensor.
struct SolveOutputs {
  at::Tensor M, cos, w, phi;
};

inline SolveOutputs alloc_solve_outputs(const at::Tensor& G, int64_t method) {
  const int64_t B = G.size(0), K = G.size(1);
  const auto aopt = G.options().dtype(acc_type(G.scalar_type()));
  return {at::empty({B, K, K}, aopt), at::empty({B, K, K}, aopt), at::empty({B, K}, aopt),
          method == kGradVac ? at::empty({B, K, K}, aopt) : at::empty({0}, aopt)};
}

}  // namespace gradharmony
