// CUDA kernels of gradharmony::{gram, combine, fused} (no torch includes: compile-checkable
// and testable standalone with nvcc, see cuda_selftest.cu).
//
// G: (B, K, D) contiguous; scalar_t in {float, double, __half, __nv_bfloat16}; acc_t = float
// (double for double). Loads are 16-byte vectors when every row is 16-byte aligned.
//
// Small D (D <= kSmallMaxD): ONE launch, fused_small_kernel: a block per sample does gram (warp
//   shuffle + shared-memory block reduction), the K x K solve (one thread per row of C), and the
//   combine while G_b is hot in L2. reduction "sum": each block owns a D-sized shared-memory
//   accumulator over the samples it visits, then atomically adds it into a zeroed (D,) buffer.
// Large D: gram_partial_kernel over (sample, D-chunk) -> solve_kernel (one thread per sample,
//   deterministic sum of the chunk partials) -> combine kernel streaming D.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "harmonize_solve.h"

namespace gradharmony {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSmallMaxBytes = 32768;  // shared accumulator of the small fused kernel (sum mode)

template <typename acc_t>
constexpr int64_t small_max_d() {
  return kSmallMaxBytes / sizeof(acc_t);  // 8192 for float accumulation
}

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double x) { return x; }

template <typename scalar_t>
struct VecWidth {
  static constexpr int N = 16 / sizeof(scalar_t);
};

// v[0:N] = p[0:N] as acc_t; p is 16-byte aligned.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&v)[VecWidth<scalar_t>::N]) {
  constexpr int N = VecWidth<scalar_t>::N;
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = to_acc(e[i]);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&v)[VecWidth<scalar_t>::N]) {
  constexpr int N = VecWidth<scalar_t>::N;
  uint4 raw;
  scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_acc<scalar_t>(v[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum p[0:P] over the block; the totals land in out[0:P] (shared), visible to all threads.
// red: shared scratch of kWarps * P. Contains two __syncthreads.
template <typename acc_t, int P>
__device__ __forceinline__ void block_sum(acc_t (&p)[P], acc_t* red, acc_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < P; ++q) {
    const acc_t s = warp_sum(p[q]);
    if (lane == 0) red[warp * P + q] = s;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < P; q += blockDim.x) {
    acc_t s = acc_t(0);
    for (int wi = 0; wi < kWarps; ++wi) s += red[wi * P + q];
    out[q] = s;
  }
  __syncthreads();
}

// p[pairs (k <= l), k-major] += sum over d in [d0, d1) of G_b[k, d] G_b[l, d], per thread.
template <typename scalar_t, typename acc_t, int K>
__device__ __forceinline__ void gram_accumulate(const scalar_t* __restrict__ Gb, int64_t D,
                                                int64_t d0, int64_t d1, bool vec,
                                                acc_t (&p)[K * (K + 1) / 2]) {
  constexpr int N = VecWidth<scalar_t>::N;
  if (vec) {  // d0 and d1 - d0 are multiples of N except maybe at the row end
    const int64_t nv = (d1 - d0) / N;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      acc_t v[K][N];
#pragma unroll
      for (int k = 0; k < K; ++k) load_vec<scalar_t, acc_t>(Gb + k * D + d0 + i * N, v[k]);
      int q = 0;
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int l = k; l < K; ++l, ++q)
#pragma unroll
          for (int e = 0; e < N; ++e) p[q] += v[k][e] * v[l][e];
    }
    d0 += nv * N;  // scalar tail below
  }
  for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    acc_t v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = to_acc(Gb[k * D + d]);
    int q = 0;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int l = k; l < K; ++l, ++q) p[q] += v[k] * v[l];
  }
}

// Pair sums (k <= l, k-major) -> symmetric K x K matrix.
template <typename acc_t>
__device__ __forceinline__ void unpack_pairs(const acc_t* pairs, int K, acc_t* M) {
  int q = 0;
  for (int k = 0; k < K; ++k)
    for (int l = k; l < K; ++l, ++q) {
      M[k * K + l] = pairs[q];
      M[l * K + k] = pairs[q];
    }
}

// ------------------------------------------------------------------ small D: one launch

// Grid: reduction none -> B blocks; sum -> any number of blocks (grid-stride over samples).
// out: (B, D) scalar_t for none; out_acc: zeroed (D,) acc_t for sum (nullptr for none).
// Dynamic shared memory (sum only): D * sizeof(acc_t).
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads)
fused_small_kernel(const scalar_t* __restrict__ G, int64_t B, int64_t D, int method,
                   const int64_t* __restrict__ order, const acc_t* __restrict__ target,
                   acc_t* __restrict__ Mo, acc_t* __restrict__ coso,
                   acc_t* __restrict__ wo, acc_t* __restrict__ phio, scalar_t* __restrict__ out,
                   acc_t* __restrict__ out_acc) {
  constexpr int P = K * (K + 1) / 2;
  constexpr int N = VecWidth<scalar_t>::N;
  __shared__ acc_t red[kWarps * P];
  __shared__ acc_t pairs[P];
  __shared__ acc_t Ms[K * K];
  __shared__ acc_t Cs[K * K];
  __shared__ acc_t ws[K];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sacc = reinterpret_cast<acc_t*>(smem_raw);
  const bool sum = out_acc != nullptr;
  const bool vec = (D % N == 0) && (reinterpret_cast<uintptr_t>(G) % 16 == 0) &&
                   (sum || reinterpret_cast<uintptr_t>(out) % 16 == 0);
  if (sum)
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) sacc[d] = acc_t(0);

  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const scalar_t* Gb = G + b * K * D;
    acc_t p[P];
#pragma unroll
    for (int q = 0; q < P; ++q) p[q] = acc_t(0);
    gram_accumulate<scalar_t, acc_t, K>(Gb, D, 0, D, vec, p);
    block_sum<acc_t, P>(p, red, pairs);

    // solve: Ms, then one thread per row of C (rows are independent), cos in parallel
    if (threadIdx.x == 0) unpack_pairs(pairs, K, Ms);
    __syncthreads();
    const int64_t* ob = order ? order + b * K * K : nullptr;
    if (threadIdx.x < K) {
      acc_t phi_row[K];
      solve_row(Ms, K, method, ob, target, (int)threadIdx.x, Cs + threadIdx.x * K, phi_row);
      if (method == kGradVac)
        for (int j = 0; j < K; ++j) phio[(b * K + threadIdx.x) * K + j] = phi_row[j];
    }
    if (threadIdx.x >= 32 && threadIdx.x < 32 + K * K) {
      const int idx = threadIdx.x - 32, k = idx / K, j = idx % K;
      const acc_t dk = gh_sqrt(clamp_min0(Ms[k * K + k])), dj = gh_sqrt(clamp_min0(Ms[j * K + j]));
      coso[b * K * K + idx] = clamp_unit(safe_div(Ms[idx], dk * dj));
      Mo[b * K * K + idx] = Ms[idx];
    }
    __syncthreads();
    if (threadIdx.x < K) {
      const acc_t wk = weight_from_rows(Cs, K, (int)threadIdx.x);
      ws[threadIdx.x] = wk;
      wo[b * K + threadIdx.x] = wk;
    }
    __syncthreads();

    // combine (G_b again, from L2)
    acc_t wl[K];
#pragma unroll
    for (int k = 0; k < K; ++k) wl[k] = ws[k];
    int64_t d_tail = 0;
    if (vec) {
      const int64_t nv = D / N;
      for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        acc_t o[N], v[N];
        load_vec<scalar_t, acc_t>(Gb + i * N, v);
#pragma unroll
        for (int e = 0; e < N; ++e) o[e] = wl[0] * v[e];
#pragma unroll
        for (int k = 1; k < K; ++k) {
          load_vec<scalar_t, acc_t>(Gb + k * D + i * N, v);
#pragma unroll
          for (int e = 0; e < N; ++e) o[e] += wl[k] * v[e];
        }
        if (sum) {
#pragma unroll
          for (int e = 0; e < N; ++e) sacc[i * N + e] += o[e];
        } else {
          store_vec<scalar_t, acc_t>(out + b * D + i * N, o);
        }
      }
      d_tail = nv * N;
    }
    for (int64_t d = d_tail + threadIdx.x; d < D; d += blockDim.x) {
      acc_t o = wl[0] * to_acc(Gb[d]);
#pragma unroll
      for (int k = 1; k < K; ++k) o += wl[k] * to_acc(Gb[k * D + d]);
      if (sum)
        sacc[d] += o;
      else
        out[b * D + d] = from_acc<scalar_t>(o);
    }
    __syncthreads();  // red / pairs / Ms / Cs / ws (and sacc, read below) are reused
  }
  if (sum && blockIdx.x < B) {
    // blocks start at different offsets so that they do not queue on the same addresses
    const int64_t rot = (blockIdx.x * (int64_t)kThreads) % (D > 0 ? D : 1);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      int64_t d = i + rot;
      d = d >= D ? d - D : d;
      atomicAdd(out_acc + d, sacc[d]);
    }
  }
}

// ------------------------------------------------------------------- large D: 3 launches

// Grid: B * nchunks blocks (block x: sample x / nchunks, chunk x % nchunks). part: (B, nchunks,
// P) acc_t, every entry written. chunk is a multiple of the vector width.
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads)
gram_partial_kernel(const scalar_t* __restrict__ G, int64_t D, int64_t chunk, int64_t nchunks,
                    acc_t* __restrict__ part) {
  constexpr int P = K * (K + 1) / 2;
  constexpr int N = VecWidth<scalar_t>::N;
  __shared__ acc_t red[kWarps * P];
  __shared__ acc_t pairs[P];
  const int64_t b = blockIdx.x / nchunks, c = blockIdx.x % nchunks;
  const int64_t d0 = c * chunk, d1 = d0 + chunk < D ? d0 + chunk : D;
  const bool vec = (D % N == 0) && (reinterpret_cast<uintptr_t>(G) % 16 == 0);
  acc_t p[P];
#pragma unroll
  for (int q = 0; q < P; ++q) p[q] = acc_t(0);
  gram_accumulate<scalar_t, acc_t, K>(G + b * K * D, D, d0, d1, vec, p);
  block_sum<acc_t, P>(p, red, pairs);
  for (int q = threadIdx.x; q < P; q += blockDim.x) part[blockIdx.x * P + q] = pairs[q];
}

// Any K (the standalone gram op for K > kMaxFusedK): grid B * P * nchunks, one pair per block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gram_partial_pair_kernel(const scalar_t* __restrict__ G, int K, int64_t D, int64_t chunk,
                         int64_t nchunks, acc_t* __restrict__ part) {
  __shared__ acc_t red[kWarps];
  __shared__ acc_t tot[1];
  const int P = K * (K + 1) / 2;
  const int64_t c = blockIdx.x % nchunks;
  const int64_t bq = blockIdx.x / nchunks;
  const int64_t b = bq / P;
  int q = (int)(bq % P), k = 0;
  while (q >= K - k) q -= K - k++;  // pair index -> (k, l)
  const int l = k + q;
  const scalar_t* gk = G + (b * K + k) * D;
  const scalar_t* gl = G + (b * K + l) * D;
  const int64_t d0 = c * chunk, d1 = d0 + chunk < D ? d0 + chunk : D;
  acc_t s[1] = {acc_t(0)};
  for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) s[0] += to_acc(gk[d]) * to_acc(gl[d]);
  block_sum<acc_t, 1>(s, red, tot);
  if (threadIdx.x == 0) part[(b * nchunks + c) * P + (bq % P)] = tot[0];
}

// One thread per sample: M = sum of the chunk partials (in double), then (method >= 0) the
// solve. method < 0: M only (the gram op; any K).
template <typename acc_t>
__global__ void solve_kernel(const acc_t* __restrict__ part, int64_t B, int K, int64_t nchunks,
                             int method, const int64_t* __restrict__ order,
                             const acc_t* __restrict__ target,
                             acc_t* __restrict__ Mo, acc_t* __restrict__ coso,
                             acc_t* __restrict__ wo, acc_t* __restrict__ phio) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int P = K * (K + 1) / 2;
  acc_t* M = Mo + b * K * K;
  int q = 0;
  for (int k = 0; k < K; ++k)
    for (int l = k; l < K; ++l, ++q) {
      double s = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) s += (double)part[(b * nchunks + c) * P + q];
      M[k * K + l] = (acc_t)s;
      M[l * K + k] = (acc_t)s;
    }
  if (method < 0) return;
  acc_t Ml[kMaxFusedK * kMaxFusedK];
  for (int i = 0; i < K * K; ++i) Ml[i] = M[i];
  solve_sample<acc_t>(Ml, K, method, order ? order + b * K * K : nullptr, target,
                      coso + b * K * K, wo + b * K,
                      phio ? phio + b * K * K : nullptr);
}

// reduction none: out[b, d] = sum_k w[b, k] G[b, k, d]. Grid: B * nblk blocks, each covering
// kThreads * N * kItems columns of one sample.
constexpr int kItems = 4;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
combine_none_kernel(const scalar_t* __restrict__ G, const acc_t* __restrict__ w, int K, int64_t D,
                    int64_t nblk, scalar_t* __restrict__ out) {
  constexpr int N = VecWidth<scalar_t>::N;
  const int64_t b = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t span = (int64_t)kThreads * N * kItems;
  const int64_t d0 = blk * span, d1 = d0 + span < D ? d0 + span : D;
  const scalar_t* Gb = G + b * K * D;
  const acc_t* wb = w + b * K;
  const bool vec = (D % N == 0) && (reinterpret_cast<uintptr_t>(G) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  if (vec) {
    for (int64_t d = d0 + threadIdx.x * N; d < d1; d += (int64_t)blockDim.x * N) {
      acc_t o[N], v[N];
      for (int e = 0; e < N; ++e) o[e] = acc_t(0);
      for (int k = 0; k < K; ++k) {
        const acc_t wk = wb[k];
        load_vec<scalar_t, acc_t>(Gb + k * D + d, v);
#pragma unroll
        for (int e = 0; e < N; ++e) o[e] = k == 0 ? wk * v[e] : o[e] + wk * v[e];
      }
      store_vec<scalar_t, acc_t>(out + b * D + d, o);
    }
  } else {
    for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
      acc_t o = wb[0] * to_acc(Gb[d]);
      for (int k = 1; k < K; ++k) o += wb[k] * to_acc(Gb[k * D + d]);
      out[b * D + d] = from_acc<scalar_t>(o);
    }
  }
}

// reduction sum: grid (nblk column blocks of kThreads * (vec ? N : 1) columns) x (ngroups sample
// groups); vec: G rows (and out) 16-byte aligned, decided by the host.
// ngroups == 1: out[d] = sum_b sum_k w[b, k] G[b, k, d] written directly (out_acc null);
// else each group atomically adds its partial sum into the zeroed acc_t buffer out_acc.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
combine_sum_kernel(const scalar_t* __restrict__ G, const acc_t* __restrict__ w, int64_t B, int K,
                   int64_t D, int64_t nblk, int64_t ngroups, bool vec, scalar_t* __restrict__ out,
                   acc_t* __restrict__ out_acc) {
  constexpr int N = VecWidth<scalar_t>::N;
  const int64_t blk = blockIdx.x % nblk, g = blockIdx.x / nblk;
  const int64_t b0 = B * g / ngroups, b1 = B * (g + 1) / ngroups;
  const int64_t d = (blk * kThreads + threadIdx.x) * (vec ? N : 1);
  if (vec) {
    if (d >= D) return;
    acc_t o[N], v[N];
    for (int e = 0; e < N; ++e) o[e] = acc_t(0);
    for (int64_t b = b0; b < b1; ++b)
      for (int k = 0; k < K; ++k) {
        const acc_t wk = w[b * K + k];
        load_vec<scalar_t, acc_t>(G + (b * K + k) * D + d, v);
#pragma unroll
        for (int e = 0; e < N; ++e) o[e] += wk * v[e];
      }
    if (out_acc) {
      for (int e = 0; e < N; ++e) atomicAdd(out_acc + d + e, o[e]);
    } else {
      store_vec<scalar_t, acc_t>(out + d, o);
    }
  } else {
    if (d >= D) return;
    acc_t o = acc_t(0);
    for (int64_t b = b0; b < b1; ++b)
      for (int k = 0; k < K; ++k) o += w[b * K + k] * to_acc(G[(b * K + k) * D + d]);
    if (out_acc)
      atomicAdd(out_acc + d, o);
    else
      out[d] = from_acc<scalar_t>(o);
  }
}

}  // namespace cuda
}  // namespace gradharmony
