// CPU kernels of gradharmony (included by harmonize_cpu.cpp once per instruction set, inside
// namespace gradharmony::GH_CPU_NS; GH_F16C selects the F16C half-precision conversions).
// See harmonize_cpu.cpp for the design.
// No include guard: deliberately included more than once.

namespace GH_CPU_NS {

// Row k of sample b restricted to [d0, d0 + n), as acc_t values (converted into buf if needed).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* row, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)n;
    (void)buf;
    return row;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* __restrict u = reinterpret_cast<const uint16_t*>(row);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      const uint32_t bits = static_cast<uint32_t>(u[d]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      buf[d] = f;
    }
    return buf;
  } else {
#if GH_F16C
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      const uint16_t* u = reinterpret_cast<const uint16_t*>(row);
      int64_t d = 0;
      for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + d))));
      for (; d < n; ++d) buf[d] = static_cast<acc_t>(row[d]);
      return buf;
    }
#endif
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<acc_t>(row[d]);
    return buf;
  }
}

// sum_d a[d] b[d] with kLanes independent partial sums (no loop-carried latency chain).
constexpr int kLanes = 32;
template <typename acc_t>
inline acc_t dot_tile(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) s[l] += a[d + l] * b[d + l];
  }
  acc_t t = 0;
  for (; d < n; ++d) t += a[d] * b[d];
  for (int l = 0; l < kLanes; l += 2) t += s[l] + s[l + 1];
  return t;
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

// o[0:n] (+)= sum_k w_k row_k of the loaded tile: overwrite when first, else accumulate.
// Register-blocked: kCombLanes columns are summed over all K rows before one store.
constexpr int kCombLanes = 16;
constexpr int kPrefetch = 512;  // elements ahead (prefetching past a row end is harmless)
template <typename acc_t>
inline void combine_acc_tile(int64_t K, int64_t n, const acc_t* w, const Scratch<acc_t>& s,
                             acc_t* __restrict o, bool first) {
  const acc_t* const* __restrict rows = s.ptr.data();
  int64_t d = 0;
  for (; d + kCombLanes <= n; d += kCombLanes) {
    acc_t a[kCombLanes];
    const acc_t w0 = w[0];
    const acc_t* __restrict r0 = rows[0] + d;
    __builtin_prefetch(r0 + kPrefetch);
#pragma omp simd
    for (int l = 0; l < kCombLanes; ++l) a[l] = w0 * r0[l];
    for (int64_t k = 1; k < K; ++k) {
      const acc_t wk = w[k];
      const acc_t* __restrict r = rows[k] + d;
      __builtin_prefetch(r + kPrefetch);
#pragma omp simd
      for (int l = 0; l < kCombLanes; ++l) a[l] += wk * r[l];
    }
    if (first) {
#pragma omp simd
      for (int l = 0; l < kCombLanes; ++l) o[d + l] = a[l];
    } else {
#pragma omp simd
      for (int l = 0; l < kCombLanes; ++l) o[d + l] += a[l];
    }
  }
  for (; d < n; ++d) {
    acc_t a = w[0] * rows[0][d];
    for (int64_t k = 1; k < K; ++k) a += w[k] * rows[k][d];
    o[d] = first ? a : o[d] + a;
  }
}

template <typename acc_t>
inline void combine_tile(int64_t K, int64_t n, const acc_t* w, const Scratch<acc_t>& s,
                         acc_t* __restrict o) {
  combine_acc_tile(K, n, w, s, o, true);
}

template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* __restrict src, int64_t n, scalar_t* __restrict dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // round to nearest even, NaN -> quiet NaN (as c10::BFloat16)
    uint16_t* __restrict u = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      uint32_t bits;
      std::memcpy(&bits, &src[d], sizeof bits);
      const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      u[d] = src[d] != src[d] ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
    }
    return;
  }
#if GH_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    uint16_t* u = reinterpret_cast<uint16_t*>(dst);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u + d),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
    for (; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d]);
    return;
  }
#endif
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

#if GH_F16C
// float only, AVX: o[0:n] = sum_k w_k row_k with non-temporal stores (the output is not read back
// soon; saves the read-for-ownership of every output line). Same arithmetic as combine_acc_tile.
inline void combine_stream_f32(int64_t K, int64_t n, const float* w, const Scratch<float>& s,
                               float* o) {
  const float* const* rows = s.ptr.data();
  int64_t d = 0;
  auto scalar_at = [&](int64_t e) {
    float a = w[0] * rows[0][e];
    for (int64_t k = 1; k < K; ++k) a += w[k] * rows[k][e];
    o[e] = a;
  };
  for (; d < n && (reinterpret_cast<uintptr_t>(o + d) & 31u); ++d) scalar_at(d);
  for (; d + 16 <= n; d += 16) {
    const __m256 w0 = _mm256_set1_ps(w[0]);
    __builtin_prefetch(rows[0] + d + kPrefetch);
    __m256 a0 = _mm256_mul_ps(w0, _mm256_loadu_ps(rows[0] + d));
    __m256 a1 = _mm256_mul_ps(w0, _mm256_loadu_ps(rows[0] + d + 8));
    for (int64_t k = 1; k < K; ++k) {
      const __m256 wk = _mm256_set1_ps(w[k]);
      __builtin_prefetch(rows[k] + d + kPrefetch);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(wk, _mm256_loadu_ps(rows[k] + d)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(wk, _mm256_loadu_ps(rows[k] + d + 8)));
    }
    _mm256_stream_ps(o + d, a0);
    _mm256_stream_ps(o + d + 8, a1);
  }
  for (; d < n; ++d) scalar_at(d);
}
#endif

// Make non-temporal stores of this thread visible before the parallel region ends.
inline void stream_fence() {
#if GH_F16C
  _mm_sfence();
#endif
}

// dst[0:n] = sum_k w_k row_k of the loaded tile, written straight into dst when it has the
// accumulation type (streaming stores when `stream`), else through s.out.
template <typename scalar_t, typename acc_t>
inline void combine_into(int64_t K, int64_t n, const acc_t* w, Scratch<acc_t>& s, scalar_t* dst,
                         bool stream = false) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
#if GH_F16C
    if constexpr (std::is_same_v<acc_t, float>) {
      if (stream) return combine_stream_f32(K, n, w, s, dst);
    }
#endif
    (void)stream;
    combine_tile(K, n, w, s, dst);
  } else {
    (void)stream;
    combine_tile(K, n, w, s, s.out.data());
    store_tile(s.out.data(), n, dst);
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
    // pull the next tile of every row towards L2 while this one is reduced (the hardware
    // prefetcher alone keeps too few of K interleaved streams in flight)
    const int64_t nn = std::min(kTile, d1 - a - n);
    if (nn > 0) {
      for (int64_t k = 0; k < K; ++k) {
        const char* p = reinterpret_cast<const char*>(Gb + k * D + a + n);
        const int64_t bytes = nn * static_cast<int64_t>(sizeof(scalar_t));
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
      }
    }
    gram_tile(K, n, s, Mpart);
  }
}

// o[d] = sum over tasks t of partial[t * D + d] (reduction "sum": the per-task D-sized
// partials, added up in task order, parallel over columns).
template <typename scalar_t, typename acc_t>
inline void sum_partials(const acc_t* partial, int64_t tasks, int64_t D, scalar_t* o) {
  const int64_t grain = std::max<int64_t>(64, kGrainElems / tasks);
  at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      acc_t v = partial[d];
      for (int64_t t = 1; t < tasks; ++t) v += partial[t * D + d];
      o[d] = static_cast<scalar_t>(v);
    }
  });
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
  int64_t cb = B >= 4 * T ? kTile : (D + 4 * T - 1) / (4 * T);
  cb = std::min<int64_t>(kTile, std::max<int64_t>(64, (cb + 63) / 64 * 64));
  const int64_t nblk = (D + cb - 1) / cb;
  if (reduction == kNone) {
    const bool stream = B * D * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / (K * cb));
    at::parallel_for(0, B * nblk, grain, [&](int64_t i0, int64_t i1) {
      Scratch<acc_t> s(K);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nblk, d0 = (i % nblk) * cb, n = std::min(cb, D - d0);
        load_tile(g + b * K * D, K, D, d0, n, s);
        combine_into(K, n, wp + b * K, s, o + b * D + d0, stream);
      }
      stream_fence();
    });
    return;
  }
  if (D * static_cast<int64_t>(sizeof(acc_t)) <= kSumRowBytes) {
    // sum, short rows: G streamed in memory order by blocks of samples, each block summing into
    // its own D-sized partial (the output itself for one float/double block).
    const int64_t tasks = num_tasks(B, B * K * D);
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const bool direct = same && tasks == 1;
    std::vector<acc_t> partial(direct ? 0 : tasks * D);
    acc_t* pbase = direct ? reinterpret_cast<acc_t*>(o) : partial.data();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      Scratch<acc_t> s(K);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b0 = B * t / tasks, b1 = B * (t + 1) / tasks;
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t d0 = 0; d0 < D; d0 += kTile) {
            const int64_t n = std::min(kTile, D - d0);
            load_tile(g + b * K * D, K, D, d0, n, s);
            combine_acc_tile(K, n, wp + b * K, s, pbase + t * D + d0, b == b0);
          }
      }
    });
    if (!direct) sum_partials(partial.data(), tasks, D, o);
    return;
  }
  // sum, long rows: column blocks of up to kSumBlock columns (long streams per row), each summed over all
  // samples in a block-sized accumulator; G is read once, no atomics, no D-sized buffers.
  int64_t sb = (D + 2 * T - 1) / (2 * T);
  sb = std::min<int64_t>(kSumBlock, std::max<int64_t>(64, (sb + 63) / 64 * 64));
  const int64_t nsb = (D + sb - 1) / sb;
  at::parallel_for(0, nsb, 1, [&](int64_t j0, int64_t j1) {
    Scratch<acc_t> s(K);
    std::vector<acc_t> acc_buf(std::is_same_v<scalar_t, acc_t> ? 0 : sb);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t d0 = j * sb, n = std::min(sb, D - d0);
      acc_t* acc = nullptr;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        acc = o + d0;  // accumulate in the output itself
      } else {
        acc = acc_buf.data();
      }
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t a = 0; a < n; a += kTile) {
          const int64_t m = std::min(kTile, n - a);
          load_tile(g + b * K * D, K, D, d0 + a, m, s);
          combine_acc_tile(K, m, wp + b * K, s, acc + a, b == 0);
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) store_tile(acc, n, o + d0);
    }
  });
}

// --------------------------------------------------------------------------- solve, fused

// The per-sample solve of sample b on its Gram matrix M_b (already in M): cos, w, phi.
template <typename acc_t>
inline void solve_one(int64_t b, int64_t K, int64_t method, const SolveInputs& in, acc_t* mp,
                      acc_t* cp, acc_t* wp, acc_t* pp) {
  const int64_t* op = in.order.defined() ? in.order.data_ptr<int64_t>() : nullptr;
  const acc_t* tp = in.target.defined() ? in.target.data_ptr<acc_t>() : nullptr;
  solve_sample<acc_t>(mp + b * K * K, static_cast<int>(K), static_cast<int>(method),
                      op ? op + b * K * K : nullptr, tp, cp + b * K * K, wp + b * K,
                      pp ? pp + b * K * K : nullptr);
}

// gram -> per-sample solve, no combine: G is read once (the Gram pass of gram_kernel), then
// one K x K solve per sample in parallel over samples.
template <typename scalar_t>
void solve_kernel(const at::Tensor& G, int64_t method, const SolveInputs& in, at::Tensor& M,
                  at::Tensor& cos, at::Tensor& w, at::Tensor& phi) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = G.size(0), K = G.size(1);
  gram_kernel<scalar_t>(G, M);
  acc_t* mp = M.data_ptr<acc_t>();
  acc_t* cp = cos.data_ptr<acc_t>();
  acc_t* wp = w.data_ptr<acc_t>();
  acc_t* pp = method == kGradVac ? phi.data_ptr<acc_t>() : nullptr;
  // a solve is ~K^3 flops: a few hundred samples per task
  at::parallel_for(0, B, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) solve_one<acc_t>(b, K, method, in, mp, cp, wp, pp);
  });
}

template <typename scalar_t>
void fused_kernel(const at::Tensor& G, int64_t method, const SolveInputs& in, int64_t reduction,
                  at::Tensor& out, at::Tensor& M, at::Tensor& cos, at::Tensor& w,
                  at::Tensor& phi) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = G.size(0), K = G.size(1), D = G.size(2);
  const scalar_t* g = G.data_ptr<scalar_t>();
  acc_t* mp = M.data_ptr<acc_t>();
  acc_t* cp = cos.data_ptr<acc_t>();
  acc_t* wp = w.data_ptr<acc_t>();
  acc_t* pp = method == kGradVac ? phi.data_ptr<acc_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();

  auto solve_b = [&](int64_t b) { solve_one<acc_t>(b, K, method, in, mp, cp, wp, pp); };

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
  const bool stream = !sum && B * D * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  // reduction sum: one D-sized partial per task (the output itself for one float/double task)
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const bool direct = sum && same && tasks == 1;
  std::vector<acc_t> partial(sum && !direct ? tasks * D : 0);
  acc_t* pbase = direct ? reinterpret_cast<acc_t*>(o) : partial.data();
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
          if (sum) {
            combine_acc_tile(K, n, wp + b * K, s, pbase + t * D + d0, b == b0);
          } else {
            combine_into(K, n, wp + b * K, s, o + b * D + d0, stream);
          }
        }
      }
    }
    stream_fence();
  });
  if (sum && !direct) sum_partials(partial.data(), tasks, D, o);
}

}  // namespace GH_CPU_NS
