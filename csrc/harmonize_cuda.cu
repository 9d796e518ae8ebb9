// CUDA ops gradharmony::{gram, combine, solve, fused} (kernels: harmonize_kernels.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "harmonize_common.h"
#include "harmonize_kernels.cuh"

namespace gradharmony {
namespace {

using namespace gradharmony::cuda;

// torch storage type -> CUDA type
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

inline int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

#define GH_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

// K as a compile-time constant (1..kMaxFusedK).
#define GH_DISPATCH_K(K, ...)                                   \
  switch (K) {                                                  \
    case 1: { constexpr int KC = 1; __VA_ARGS__(); break; }     \
    case 2: { constexpr int KC = 2; __VA_ARGS__(); break; }     \
    case 3: { constexpr int KC = 3; __VA_ARGS__(); break; }     \
    case 4: { constexpr int KC = 4; __VA_ARGS__(); break; }     \
    case 5: { constexpr int KC = 5; __VA_ARGS__(); break; }     \
    case 6: { constexpr int KC = 6; __VA_ARGS__(); break; }     \
    case 7: { constexpr int KC = 7; __VA_ARGS__(); break; }     \
    case 8: { constexpr int KC = 8; __VA_ARGS__(); break; }     \
    default: TORCH_CHECK(false, "gradharmony: K out of range: ", K); \
  }

// Chunking of D for the large path: about 4 blocks per SM in total, each chunk a multiple of
// the vector width and at least 2 * kThreads vectors long.
template <typename scalar_t>
inline int64_t gram_chunk(int64_t B, int64_t D) {
  constexpr int N = VecWidth<scalar_t>::N;
  const int64_t want = std::max<int64_t>(1, (4 * num_sms() + B - 1) / std::max<int64_t>(1, B));
  const int64_t min_chunk = 2 * kThreads * N;
  int64_t chunk = std::max<int64_t>(min_chunk, (D + want - 1) / want);
  chunk = (chunk + N - 1) / N * N;
  return chunk;
}

// Gram partials (B, nchunks, P) for the large path.
template <typename scalar_t>
at::Tensor gram_partials(const at::Tensor& G, int64_t& nchunks) {
  using cuda_t = typename CudaType<scalar_t>::type;
  using acc_t = acc_of<scalar_t>;
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  const int64_t P = K * (K + 1) / 2;
  const int64_t chunk = gram_chunk<cuda_t>(B, std::max<int64_t>(D, 1));
  nchunks = std::max<int64_t>(1, (D + chunk - 1) / chunk);
  at::Tensor part = at::empty({B, nchunks, P}, G.options().dtype(acc_type(G.scalar_type())));
  auto stream = at::cuda::getCurrentCUDAStream();
  const cuda_t* g = reinterpret_cast<const cuda_t*>(G.data_ptr<scalar_t>());
  if (K <= kMaxFusedK) {
    GH_DISPATCH_K(K, [&] {
      gram_partial_kernel<cuda_t, acc_t, KC><<<B * nchunks, kThreads, 0, stream>>>(
          g, D, chunk, nchunks, part.data_ptr<acc_t>());
    });
  } else {
    gram_partial_pair_kernel<cuda_t, acc_t><<<B * P * nchunks, kThreads, 0, stream>>>(
        g, (int)K, D, chunk, nchunks, part.data_ptr<acc_t>());
  }
  GH_CHECK_LAUNCH();
  return part;
}

template <typename scalar_t>
void combine_launch(const at::Tensor& G, const at::Tensor& w, int64_t reduction, at::Tensor& out) {
  using cuda_t = typename CudaType<scalar_t>::type;
  using acc_t = acc_of<scalar_t>;
  constexpr int N = VecWidth<cuda_t>::N;
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  const cuda_t* g = reinterpret_cast<const cuda_t*>(G.data_ptr<scalar_t>());
  cuda_t* o = reinterpret_cast<cuda_t*>(out.data_ptr<scalar_t>());
  if (B == 0 || D == 0) {
    if (reduction == kReduceSum) out.zero_();
    return;
  }
  if (reduction == kNone) {
    const int64_t span = (int64_t)kThreads * N * kItems;
    const int64_t nblk = (D + span - 1) / span;
    combine_none_kernel<cuda_t, acc_t><<<B * nblk, kThreads, 0, stream>>>(
        g, w.data_ptr<acc_t>(), (int)K, D, nblk, o);
    GH_CHECK_LAUNCH();
    return;
  }
  const bool vec = D % N == 0 && aligned16(g) && aligned16(o);
  const int64_t cols = (int64_t)kThreads * (vec ? N : 1);
  const int64_t nblk = (D + cols - 1) / cols;
  const int64_t ngroups = std::min<int64_t>(B, std::max<int64_t>(1, 2 * num_sms() / nblk));
  if (ngroups == 1) {
    combine_sum_kernel<cuda_t, acc_t><<<nblk, kThreads, 0, stream>>>(
        g, w.data_ptr<acc_t>(), B, (int)K, D, nblk, 1, vec, o, nullptr);
    GH_CHECK_LAUNCH();
    return;
  }
  at::Tensor acc = at::zeros({D}, G.options().dtype(acc_type(G.scalar_type())));
  combine_sum_kernel<cuda_t, acc_t><<<nblk * ngroups, kThreads, 0, stream>>>(
      g, w.data_ptr<acc_t>(), B, (int)K, D, nblk, ngroups, vec, o, acc.data_ptr<acc_t>());
  GH_CHECK_LAUNCH();
  out.copy_(acc);
}

at::Tensor gram_cuda(const at::Tensor& G_in) {
  check_G(G_in, "gram");
  const c10::cuda::CUDAGuard guard(G_in.device());
  const at::Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1);
  at::Tensor M = at::zeros({B, K, K}, G.options().dtype(acc_type(G.scalar_type())));
  if (B == 0 || K == 0 || G.size(2) == 0) return M;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_gram_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    int64_t nchunks = 1;
    at::Tensor part = gram_partials<scalar_t>(G, nchunks);
    solve_kernel<acc_t><<<(B + 127) / 128, 128, 0, at::cuda::getCurrentCUDAStream()>>>(
        part.data_ptr<acc_t>(), B, (int)K, nchunks, -1, nullptr, nullptr,
        M.data_ptr<acc_t>(), nullptr, nullptr, nullptr);
    GH_CHECK_LAUNCH();
  });
  return M;
}

at::Tensor combine_cuda(const at::Tensor& G_in, const at::Tensor& w_in, int64_t reduction) {
  check_G(G_in, "combine");
  check_reduction(reduction, "combine");
  const c10::cuda::CUDAGuard guard(G_in.device());
  const at::Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) == B && w_in.size(1) == K,
              "gradharmony::combine: w must be (B, K) = (", B, ", ", K, "), got ", w_in.sizes());
  const at::Tensor w = w_in.to(G.device(), acc_type(G.scalar_type())).contiguous();
  at::Tensor out = reduction == kNone ? at::empty({B, D}, G.options()) : at::empty({D}, G.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_combine_cuda",
                                  [&] { combine_launch<scalar_t>(G, w, reduction, out); });
  return out;
}

// gram partials -> solve (one thread per sample), no combine: G is read once.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve_cuda(
    const at::Tensor& G_in, int64_t method, const c10::optional<at::Tensor>& order,
    const c10::optional<at::Tensor>& target) {
  const c10::cuda::CUDAGuard guard(G_in.device());
  const at::Tensor G = G_in.contiguous();
  const SolveInputs in = prepare_solve(G, method, order, target, "solve");
  const int64_t B = G.size(0), K = G.size(1);
  SolveOutputs r = alloc_solve_outputs(G, method);
  if (B == 0) return {r.M, r.cos, r.w, r.phi};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_solve_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    int64_t nchunks = 1;
    at::Tensor part = gram_partials<scalar_t>(G, nchunks);
    solve_kernel<acc_t><<<(B + 127) / 128, 128, 0, at::cuda::getCurrentCUDAStream()>>>(
        part.data_ptr<acc_t>(), B, (int)K, nchunks, (int)method,
        in.order.defined() ? in.order.data_ptr<int64_t>() : nullptr,
        in.target.defined() ? in.target.data_ptr<acc_t>() : nullptr, r.M.data_ptr<acc_t>(),
        r.cos.data_ptr<acc_t>(), r.w.data_ptr<acc_t>(),
        method == kGradVac ? r.phi.data_ptr<acc_t>() : nullptr);
    GH_CHECK_LAUNCH();
  });
  return {r.M, r.cos, r.w, r.phi};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cuda(
    const at::Tensor& G_in, int64_t method, const c10::optional<at::Tensor>& order,
    const c10::optional<at::Tensor>& target, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(G_in.device());
  const at::Tensor G = G_in.contiguous();
  check_reduction(reduction, "fused");
  const SolveInputs in = prepare_solve(G, method, order, target, "fused");
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  const auto aopt = G.options().dtype(acc_type(G.scalar_type()));
  SolveOutputs r = alloc_solve_outputs(G, method);
  at::Tensor &M = r.M, &cos = r.cos, &w = r.w, &phi = r.phi;
  at::Tensor out = reduction == kNone ? at::empty({B, D}, G.options()) : at::zeros({D}, G.options());
  if (B == 0) return {out, M, cos, w, phi};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_fused_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = acc_of<scalar_t>;
    const cuda_t* g = reinterpret_cast<const cuda_t*>(G.data_ptr<scalar_t>());
    const int64_t* op = in.order.defined() ? in.order.data_ptr<int64_t>() : nullptr;
    const acc_t* tp = in.target.defined() ? in.target.data_ptr<acc_t>() : nullptr;
    acc_t* pp = method == kGradVac ? phi.data_ptr<acc_t>() : nullptr;
    if (D <= small_max_d<acc_t>()) {
      // one launch: gram + solve + combine per sample
      const bool sum = reduction == kReduceSum;
      at::Tensor acc;
      acc_t* acc_ptr = nullptr;
      if (sum) {
        if (std::is_same_v<scalar_t, acc_t>) {
          acc_ptr = reinterpret_cast<acc_t*>(out.data_ptr<scalar_t>());  // zeroed above
        } else {
          acc = at::zeros({D}, aopt);
          acc_ptr = acc.data_ptr<acc_t>();
        }
      }
      // sum: a few samples per block (fewer D-sized atomic flushes), still >= one block per SM
      const int64_t sms = num_sms();
      const int64_t grid =
          sum ? std::min<int64_t>({B, 4 * sms, std::max<int64_t>(sms, (B + 3) / 4)}) : B;
      const size_t smem = sum ? D * sizeof(acc_t) : 0;
      GH_DISPATCH_K(K, [&] {
        fused_small_kernel<cuda_t, acc_t, KC><<<grid, kThreads, smem, stream>>>(
            g, B, D, (int)method, op, tp, M.data_ptr<acc_t>(), cos.data_ptr<acc_t>(),
            w.data_ptr<acc_t>(), pp, sum ? nullptr : reinterpret_cast<cuda_t*>(out.data_ptr<scalar_t>()),
            acc_ptr);
      });
      GH_CHECK_LAUNCH();
      if (sum && acc.defined()) out.copy_(acc);
      return;
    }
    // large D: gram partials -> solve -> combine
    int64_t nchunks = 1;
    at::Tensor part = gram_partials<scalar_t>(G, nchunks);
    solve_kernel<acc_t><<<(B + 127) / 128, 128, 0, stream>>>(
        part.data_ptr<acc_t>(), B, (int)K, nchunks, (int)method, op, tp, M.data_ptr<acc_t>(),
        cos.data_ptr<acc_t>(), w.data_ptr<acc_t>(), pp);
    GH_CHECK_LAUNCH();
    combine_launch<scalar_t>(G, w, reduction, out);
  });
  return {out, M, cos, w, phi};
}

}  // namespace
}  // namespace gradharmony

TORCH_LIBRARY_IMPL(gradharmony, CUDA, m) {
  m.impl("gram", &gradharmony::gram_cuda);
  m.impl("combine", &gradharmony::combine_cuda);
  m.impl("solve", &gradharmony::solve_cuda);
  m.impl("fused", &gradharmony::fused_cuda);
}
