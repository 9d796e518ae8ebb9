// CPU kernels of gradharmony::{gram, combine, solve, fused}.
//
// G: (B, K, D) contiguous; float32 / float64 / float16 / bfloat16 in, float32 (float64 for
// float64) accumulation. Work is tiled over D in tiles of kTile columns so that the K rows of a
// tile stay in L1: half-precision tiles are converted once into a small per-task buffer, every
// inner loop is a unit-stride loop with independent partial sums, and the K interleaved row
// streams are software-prefetched. No (B, K, D) temporary is allocated.
//
// solve: the Gram pass of gram, then one K x K solve per sample (no combine).
// fused, many samples: one task per block of samples; per sample, gram over all tiles, solve in
// registers, then combine while G_b is still in cache (reduction "sum": one D-sized partial
// buffer per task, added up at the end).
// fused, few samples with large D: gram split over D (partial Gram matrices per task), solve,
// then combine split over D.
//
// The kernels (harmonize_cpu_impl.h) are compiled twice: for baseline x86-64 and, on x86-64 with
// GCC/Clang, for AVX2+FMA+F16C, picked at run time (no -march flag needed; set
// GRADHARMONY_CPU_ISA=baseline to force the portable build).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GH_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#else
#define GH_HAVE_AVX2_BUILD 0
#endif

#include "harmonize_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace gradharmony {
namespace {

constexpr int64_t kTile = 1024;           // columns per tile
constexpr int64_t kSumRowBytes = 1 << 18; // combine(sum): rows up to this size use per-task partials
constexpr int64_t kSumBlock = 65536;      // columns per block of combine(reduction=sum)
constexpr int64_t kSplitDMin = 1 << 15;   // split one sample over D only above K*D of this
constexpr int64_t kGrainElems = 1 << 15;  // minimum elements per parallel task
constexpr int64_t kStreamBytes = 1 << 21; // outputs this large are written with streaming stores

#define GH_CPU_NS baseline
#define GH_F16C 0
#include "harmonize_cpu_impl.h"
#undef GH_CPU_NS
#undef GH_F16C

#if GH_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
#define GH_CPU_NS avx2
#define GH_F16C 1
#include "harmonize_cpu_impl.h"
#undef GH_CPU_NS
#undef GH_F16C
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

// AVX2 kernels when the CPU has AVX2, FMA and F16C, unless GRADHARMONY_CPU_ISA=baseline.
inline bool use_avx2() {
#if GH_HAVE_AVX2_BUILD
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  const char* isa = std::getenv("GRADHARMONY_CPU_ISA");
  return has && !(isa && std::strcmp(isa, "baseline") == 0);
#else
  return false;
#endif
}

#if GH_HAVE_AVX2_BUILD
#define GH_CPU_CALL(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define GH_CPU_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif

// A large output is a fresh allocation that malloc maps from the kernel, and its first write
// faults it in 4 KiB at a time: at parameter level that costs more than the kernel itself
// (64 x 2 x 2^18 float32 on a 2-core x86-64: 25 ms per call with 4 KiB pages, 10 ms with
// huge pages). Ask for transparent huge pages on it before the kernel writes it (a hint: no
// effect where THP is off, or already "always"). What PyTorch's THP_MEM_ALLOC_ENABLE=1 does
// for every allocation, here for the outputs of this op only. Only whole pages inside the
// output are advised; the hint is a property of the address range, so it outlives the tensor:
// where malloc served the output from its heap (sizes under glibc's dynamic mmap threshold, at
// most 32 MiB) later allocations reusing that range are THP-eligible too (values unaffected).
constexpr int64_t kHugePageAdviseBytes = 8 << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kHugePageAdviseBytes) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + page - 1) & ~(page - 1), hi = (p + bytes) & ~(page - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// ------------------------------------------------------------------------------ op entry

at::Tensor gram_cpu(const at::Tensor& G_in) {
  check_G(G_in, "gram");
  const at::Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1);
  at::Tensor M = at::zeros({B, K, K}, G.options().dtype(acc_type(G.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_gram_cpu",
                                  [&] { GH_CPU_CALL(gram_kernel<scalar_t>, G, M); });
  return M;
}

at::Tensor combine_cpu(const at::Tensor& G_in, const at::Tensor& w_in, int64_t reduction) {
  check_G(G_in, "combine");
  check_reduction(reduction, "combine");
  const at::Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) == B && w_in.size(1) == K,
              "gradharmony::combine: w must be (B, K) = (", B, ", ", K, "), got ", w_in.sizes());
  const at::Tensor w = w_in.to(G.device(), acc_type(G.scalar_type())).contiguous();
  at::Tensor out = reduction == kNone ? at::empty({B, D}, G.options()) : at::empty({D}, G.options());
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(),
                                  "gradharmony_combine_cpu",
                                  [&] { GH_CPU_CALL(combine_kernel<scalar_t>, G, w, reduction, out); });
  return out;
}

// order entries outside [0, K) would index out of bounds in the solve (one host check: CPU).
inline void check_order_range(const SolveInputs& in, int64_t K, const char* op) {
  if (in.order.defined() && in.order.numel() > 0) {
    TORCH_CHECK(in.order.min().item<int64_t>() >= 0 && in.order.max().item<int64_t>() < K,
                "gradharmony::", op, ": order entries must be in [0, K)");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve_cpu(
    const at::Tensor& G_in, int64_t method, const c10::optional<at::Tensor>& order,
    const c10::optional<at::Tensor>& target) {
  const at::Tensor G = G_in.contiguous();
  const SolveInputs in = prepare_solve(G, method, order, target, "solve");
  check_order_range(in, G.size(1), "solve");
  SolveOutputs r = alloc_solve_outputs(G, method);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_solve_cpu",
      [&] { GH_CPU_CALL(solve_kernel<scalar_t>, G, method, in, r.M, r.cos, r.w, r.phi); });
  return {r.M, r.cos, r.w, r.phi};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& G_in, int64_t method, const c10::optional<at::Tensor>& order,
    const c10::optional<at::Tensor>& target, int64_t reduction) {
  const at::Tensor G = G_in.contiguous();
  check_reduction(reduction, "fused");
  const SolveInputs in = prepare_solve(G, method, order, target, "fused");
  check_order_range(in, G.size(1), "fused");
  const int64_t B = G.size(0), D = G.size(2);
  SolveOutputs r = alloc_solve_outputs(G, method);
  at::Tensor out = reduction == kNone ? at::empty({B, D}, G.options()) : at::empty({D}, G.options());
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_fused_cpu", [&] {
        GH_CPU_CALL(fused_kernel<scalar_t>, G, method, in, reduction, out, r.M, r.cos, r.w, r.phi);
      });
  return {out, r.M, r.cos, r.w, r.phi};
}

}  // namespace
}  // namespace gradharmony

TORCH_LIBRARY_IMPL(gradharmony, CPU, m) {
  m.impl("gram", &gradharmony::gram_cpu);
  m.impl("combine", &gradharmony::combine_cpu);
  m.impl("solve", &gradharmony::solve_cpu);
  m.impl("fused", &gradharmony::fused_cpu);
}
