// CPU kernels of gradharmony::{gram, combine, fused}.
//
// G: (B, K, D) contiguous; float32 / float64 / float16 / bfloat16 in, float32 (float64 for
// float64) accumulation. Work is tiled over D in tiles of kTile columns so that the K rows of a
// tile stay in L1: half-precision tiles are converted once into a small per-task buffer and
// every inner loop is a unit-stride `omp simd` loop. No (B, K, D) temporary is allocated.
//
// fused, many samples: one task per block of samples; per sample, gram over all tiles, solve in
// registers, then combine while G_b is still in cache (reduction "sum": one D-sized partial
// buffer per task, added up at the end).
// fused, few samples with large D: gram split over D (partial Gram matrices per task), solve,
// then combine split over D.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "harmonize_common.h"

namespace gradharmony {
namespace {

constexpr int64_t kTile = 1024;             // columns per tile
constexpr int64_t kSplitDMin = 1 << 15;     // split one sample over D only above K*D of this
constexpr int64_t kGrainElems = 1 << 15;    // minimum elements per parallel task

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Row k of sample b restricted to [d0, d0 + n), as acc_t values (converted into buf if needed).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* row, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)n;
    (void)buf;
    return row;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<acc_t>(row[d]);
    return buf;
  }
}

template <typename acc_t>
inline acc_t dot_tile(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Per-task scratch: K row tiles (acc_t) and one output tile.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> rows, out;
  std::vector<const acc_t*> ptr;
  explicit Scratch(int64_t K) : rows(K * kTile), out(kTile), ptr(K) {}
};

// Load the K rows of sample Gb (K x D) at columns [d0, d0 + n) into s.ptr.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* Gb, int64_t K, int64_t D, int64_t d0, int64_t n,
                      Scratch<acc_t>& s) {
  for (int64_t k = 0; k < K; ++k)
    s.ptr[k] = load_row<scalar_t, acc_t>(Gb + k * D + d0, n, s.rows.data() + k * kTile);
}

// Mpart (K*K, upper triangle + diagonal) += Gram matrix of the loaded tile.
template <typename acc_t>
inline void gram_tile(int64_t K, int64_t n, const Scratch<acc_t>& s, double* Mpart) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = k; l < K; ++l) Mpart[k * K + l] += dot_tile(s.ptr[k], s.ptr[l], n);
}

// s.out[0:n] = sum_k w_k row_k of the loaded tile.
template <typename acc_t>
inline void combine_tile(int64_t K, int64_t n, const acc_t* w, Scratch<acc_t>& s) {
  acc_t* __restrict o = s.out.data();
  const acc_t w0 = w[0];
  const acc_t* __restrict r0 = s.ptr[0];
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) o[d] = w0 * r0[d];
  for (int64_t k = 1; k < K; ++k) {
    const acc_t wk = w[k];
    const acc_t* __restrict r = s.ptr[k];
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) o[d] += wk * r[d];
  }
}

template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* __restrict src, int64_t n, scalar_t* __restrict dst) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

template <typename acc_t>
inline void add_tile(const acc_t* __restrict src, int64_t n, acc_t* __restrict dst, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] += src[d];
  }
}

// Full upper-triangle double partial -> symmetric acc_t matrix.
template <typename acc_t>
inline void finish_gram(const double* Mpart, int64_t K, acc_t* M) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = k; l < K; ++l) {
      const acc_t v = static_cast<acc_t>(Mpart[k * K + l]);
      M[k * K + l] = v;
      M[l * K + k] = v;
    }
}

// Gram matrix of one sample over columns [d0, d1).
template <typename scalar_t, typename acc_t>
inline void gram_range(const scalar_t* Gb, int64_t K, int64_t D, int64_t d0, int64_t d1,
                       Scratch<acc_t>& s, double* Mpart) {
  for (int64_t a = d0; a < d1; a += kTile) {
    const int64_t n = std::min(kTile, d1 - a);
    load_tile(Gb, K, D, a, n, s);
    gram_tile(K, n, s, Mpart);
  }
}

inline int64_t num_tasks(int64_t work_items, int64_t total_elems) {
  const int64_t by_size = std::max<int64_t>(1, total_elems / kGrainElems);
  return std::max<int64_t>(1, std::min<int64_t>({work_items, (int64_t)at::get_num_threads(), by_size}));
}

// ---------------------------------------------------------------------------------- gram

template <typename scalar_t>
void gram_kernel(const at::Tensor& G, at::Tensor& M) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  const scalar_t* g = G.data_ptr<scalar_t>();
  acc_t* m = M.data_ptr<acc_t>();
  const int64_t T = at::get_num_threads();
  if (B >= T || K * D < kSplitDMin) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, K * D));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      Scratch<acc_t> s(K);
      std::vector<double> part(K * K);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(part.begin(), part.end(), 0.0);
        gram_range<scalar_t, acc_t>(g + b * K * D, K, D, 0, D, s, part.data());
        finish_gram(part.data(), K, m + b * K * K);
      }
    });
    return;
  }
  // Few samples, long rows: split D into tasks, each with its own partial Gram matrices.
  const int64_t ntiles = (D + kTile - 1) / kTile;
  const int64_t tasks = std::min<int64_t>(T, ntiles);
  std::vector<double> part(tasks * B * K * K, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<acc_t> s(K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t d0 = std::min(D, (ntiles * t / tasks) * kTile);
      const int64_t d1 = std::min(D, (ntiles * (t + 1) / tasks) * kTile);
      for (int64_t b = 0; b < B; ++b)
        gram_range<scalar_t, acc_t>(g + b * K * D, K, D, d0, d1, s, part.data() + (t * B + b) * K * K);
    }
  });
  std::vector<double> tot(K * K);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(tot.begin(), tot.end(), 0.0);
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t i = 0; i < K * K; ++i) tot[i] += part[(t * B + b) * K * K + i];
    finish_gram(tot.data(), K, m + b * K * K);
  }
}

// ------------------------------------------------------------------------------- combine

// out = w^T G with w (B, K) acc_t; reduction none -> out (B, D), sum -> out (D,). Parallel over
// column blocks (and samples for "none"): G is read once.
template <typename scalar_t>
void combine_kernel(const at::Tensor& G, const at::Tensor& w, int64_t reduction, at::Tensor& out) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  const scalar_t* g = G.data_ptr<scalar_t>();
  const acc_t* wp = w.data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  if (B == 0 || D == 0) {
    if (reduction == kReduceSum) out.zero_();
    return;
  }
  const int64_t T = at::get_num_threads();
  // column block: a multiple of 64, at most kTile, small enough to give every thread work
  int64_t cb = (D + 4 * T - 1) / (4 * T);
  cb = std::min<int64_t>(kTile, std::max<int64_t>(64, (cb + 63) / 64 * 64));
  const int64_t nblk = (D + cb - 1) / cb;
  if (reduction == kNone) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / (K * cb));
    at::parallel_for(0, B * nblk, grain, [&](int64_t i0, int64_t i1) {
      Scratch<acc_t> s(K);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nblk, d0 = (i % nblk) * cb, n = std::min(cb, D - d0);
        load_tile(g + b * K * D, K, D, d0, n, s);
        combine_tile(K, n, wp + b * K, s);
        store_tile(s.out.data(), n, o + b * D + d0);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, B * K * cb));
  at::parallel_for(0, nblk, grain, [&](int64_t j0, int64_t j1) {
    Scratch<acc_t> s(K);
    std::vector<acc_t> acc(cb);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t d0 = j * cb, n = std::min(cb, D - d0);
      for (int64_t b = 0; b < B; ++b) {
        load_tile(g + b * K * D, K, D, d0, n, s);
        combine_tile(K, n, wp + b * K, s);
        add_tile(s.out.data(), n, acc.data(), b == 0);
      }
      store_tile(acc.data(), n, o + d0);
    }
  });
}

// --------------------------------------------------------------------------------- fused

template <typename scalar_t>
void fused_kernel(const at::Tensor& G, int64_t method, const FusedInputs& in, int64_t reduction,
                  at::Tensor& out, at::Tensor& M, at::Tensor& cos, at::Tensor& w,
                  at::Tensor& phi) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  const scalar_t* g = G.data_ptr<scalar_t>();
  acc_t* mp = M.data_ptr<acc_t>();
  acc_t* cp = cos.data_ptr<acc_t>();
  acc_t* wp = w.data_ptr<acc_t>();
  acc_t* pp = method == kGradVac ? phi.data_ptr<acc_t>() : nullptr;
  const int64_t* op = in.order.defined() ? in.order.data_ptr<int64_t>() : nullptr;
  const acc_t* tp = in.target.defined() ? in.target.data_ptr<acc_t>() : nullptr;
  const acc_t* sp = in.sample_weight.defined() ? in.sample_weight.data_ptr<acc_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();
  const int Ki = static_cast<int>(K);

  auto solve_b = [&](int64_t b) {
    solve_sample<acc_t>(mp + b * K * K, Ki, static_cast<int>(method), op ? op + b * K * K : nullptr,
                        tp, sp ? sp[b] : acc_t(1), cp + b * K * K, wp + b * K,
                        pp ? pp + b * K * K : nullptr);
  };

  const int64_t T = at::get_num_threads();
  if (B < T && K * D >= kSplitDMin) {
    // Few samples, long rows: gram split over D, solve, combine split over D (G read twice).
    gram_kernel<scalar_t>(G, M);
    for (int64_t b = 0; b < B; ++b) solve_b(b);
    combine_kernel<scalar_t>(G, w, reduction, out);
    return;
  }
  if (B == 0) {
    if (reduction == kReduceSum) out.zero_();
    return;
  }

  // One pass: per sample gram -> solve -> combine while G_b is in cache.
  const int64_t tasks = num_tasks(B, B * K * D);
  const bool sum = reduction == kReduceSum;
  std::vector<acc_t> partial(sum ? tasks * D : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<acc_t> s(K);
    std::vector<double> part(K * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = B * t / tasks, b1 = B * (t + 1) / tasks;
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* Gb = g + b * K * D;
        std::fill(part.begin(), part.end(), 0.0);
        const bool one_tile = D <= kTile;
        gram_range<scalar_t, acc_t>(Gb, K, D, 0, D, s, part.data());
        finish_gram(part.data(), K, mp + b * K * K);
        solve_b(b);
        for (int64_t d0 = 0; d0 < D; d0 += kTile) {
          const int64_t n = std::min(kTile, D - d0);
          if (!one_tile) load_tile(Gb, K, D, d0, n, s);  // a single tile is still loaded
          combine_tile(K, n, wp + b * K, s);
          if (sum)
            add_tile(s.out.data(), n, partial.data() + t * D + d0, b == b0);
          else
            store_tile(s.out.data(), n, o + b * D + d0);
        }
      }
    }
  });
  if (sum) {
    const int64_t grain = std::max<int64_t>(64, kGrainElems / tasks);
    at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) {
        acc_t v = partial[d];
        for (int64_t t = 1; t < tasks; ++t) v += partial[t * D + d];
        o[d] = static_cast<scalar_t>(v);
      }
    });
  }
}

// ------------------------------------------------------------------------------ op entry

at::Tensor gram_cpu(const at::Tensor& G_in) {
  check_G(G_in, "gram");
  const at::Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1);
  at::Tensor M = at::zeros({B, K, K}, G.options().dtype(acc_type(G.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_gram_cpu",
                                  [&] { gram_kernel<scalar_t>(G, M); });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(),
                                  "gradharmony_combine_cpu",
                                  [&] { combine_kernel<scalar_t>(G, w, reduction, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& G_in, int64_t method, const c10::optional<at::Tensor>& order,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& sample_weight,
    int64_t reduction) {
  const at::Tensor G = G_in.contiguous();
  FusedInputs in = prepare_fused(G, method, order, target, sample_weight, reduction);
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  if (in.order.defined() && in.order.numel() > 0) {
    TORCH_CHECK(in.order.min().item<int64_t>() >= 0 && in.order.max().item<int64_t>() < K,
                "gradharmony::fused: order entries must be in [0, K)");
  }
  const auto aopt = G.options().dtype(acc_type(G.scalar_type()));
  at::Tensor M = at::empty({B, K, K}, aopt);
  at::Tensor cos = at::empty({B, K, K}, aopt);
  at::Tensor w = at::empty({B, K}, aopt);
  at::Tensor phi = method == kGradVac ? at::empty({B, K, K}, aopt) : at::empty({0}, aopt);
  at::Tensor out = reduction == kNone ? at::empty({B, D}, G.options()) : at::empty({D}, G.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "gradharmony_fused_cpu",
      [&] { fused_kernel<scalar_t>(G, method, in, reduction, out, M, cos, w, phi); });
  return {out, M, cos, w, phi};
}

}  // namespace
}  // namespace gradharmony

TORCH_LIBRARY_IMPL(gradharmony, CPU, m) {
  m.impl("gram", &gradharmony::gram_cpu);
  m.impl("combine", &gradharmony::combine_cpu);
  m.impl("fused", &gradharmony::fused_cpu);
}
