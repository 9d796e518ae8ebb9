// Per-sample solve shared by the CPU and CUDA kernels: M (K x K) -> cos, w, phi.
//
// Mirrors gradharmony/engine/reference.py (cosine, pcgrad_weights, gradvac_weights)
// operation by operation, in the accumulation type T (float, or double for float64 G):
// guarded divisions (a zero-norm gradient has cosine 0 and is never projected onto),
// the per-sample visiting order order[i][t] (entries equal to i are skipped),
// cosines clamped to [-1, 1]. Header-only, no torch includes, usable from nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GH_HD __host__ __device__ __forceinline__
#else
#define GH_HD inline
#endif

namespace gradharmony {

// Largest K of the fused / solve kernels. The Python side reads this value from here
// (gradharmony/kernels/spec.py, FUSED_MAX_K; tests/kernels/test_spec.py checks both agree).
constexpr int kMaxFusedK = 8;

enum Method : int { kSum = 0, kPCGrad = 1, kGradVac = 2 };
enum Reduction : int { kNone = 0, kReduceSum = 1 };

GH_HD float gh_sqrt(float x) { return sqrtf(x); }
GH_HD double gh_sqrt(double x) { return sqrt(x); }

// num / den where den > 0, else 0 (reference._safe_div).
template <typename T>
GH_HD T safe_div(T num, T den) {
  return den > T(0) ? num / den : T(0);
}

// clamp to [-1, 1]; NaN propagates like torch.clamp.
template <typename T>
GH_HD T clamp_unit(T x) {
  return x < T(-1) ? T(-1) : (x > T(1) ? T(1) : x);
}

// clamp_min(x, 0) (NaN propagates like torch.clamp_min).
template <typename T>
GH_HD T clamp_min0(T x) {
  return x < T(0) ? T(0) : x;
}

// cos[k][j] = M[k][j] / (sqrt(M[k][k]) sqrt(M[j][j])), 0 where the denominator is 0.
template <typename T>
GH_HD void cosine_matrix(const T* M, int K, T* cos) {
  T d[kMaxFusedK];
  for (int k = 0; k < K; ++k) d[k] = gh_sqrt(clamp_min0(M[k * K + k]));
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < K; ++j) cos[k * K + j] = clamp_unit(safe_div(M[k * K + j], d[k] * d[j]));
}

// The visiting order entry t of loss i (identity order when order is null).
GH_HD int visit(const int64_t* order, int K, int i, int t) {
  return order ? static_cast<int>(order[i * K + t]) : t;
}

// PCGrad in Gram form, row i: C_i = e_i; for j in order[i] (j != i): dot = C_i . M_j; if
// dot < 0 and M_jj > 0: C_ij -= dot / M_jj. Rows are independent; w = sum_i C_i.
// Out-of-range j are skipped (the engine validates orders; the CPU op also checks them).
template <typename T>
GH_HD void pcgrad_row(const T* M, int K, const int64_t* order, int i, T* Ci) {
  for (int k = 0; k < K; ++k) Ci[k] = i == k ? T(1) : T(0);
  for (int t = 0; t < K; ++t) {
    const int j = visit(order, K, i, t);
    if (j == i || j < 0 || j >= K) continue;
    T dot = T(0);
    for (int k = 0; k < K; ++k) dot += Ci[k] * M[j * K + k];
    const T Mjj = M[j * K + j];
    if (dot < T(0) && Mjj > T(0)) Ci[j] += -(dot / Mjj);
  }
}

// GradVac in Gram form (reference.gradvac_weights), row i. phi_i[j] = cosine seen at the visit
// of j by i (0 on the diagonal and for unvisited j). target: K x K in T.
template <typename T>
GH_HD void gradvac_row(const T* M, int K, const int64_t* order, const T* target, int i, T* Ci,
                       T* phi_i) {
  for (int k = 0; k < K; ++k) {
    Ci[k] = i == k ? T(1) : T(0);
    phi_i[k] = T(0);
  }
  T cG[kMaxFusedK];  // g'_i . g_l for all l
  for (int l = 0; l < K; ++l) {
    T s = T(0);
    for (int k = 0; k < K; ++k) s += Ci[k] * M[k * K + l];
    cG[l] = s;
  }
  for (int t = 0; t < K; ++t) {
    const int j = visit(order, K, i, t);
    if (j < 0 || j >= K) continue;
    const bool valid = j != i;
    const T dot = cG[j];
    T nn = T(0);
    for (int k = 0; k < K; ++k) nn += cG[k] * Ci[k];
    const T norm_i = gh_sqrt(clamp_min0(nn));
    const T norm_j = gh_sqrt(clamp_min0(M[j * K + j]));
    const T p = clamp_unit(safe_div(dot, norm_i * norm_j));
    const T tgt = target[i * K + j];
    if (valid && p < tgt && norm_j > T(0) && norm_i > T(0)) {
      const T s_phi = gh_sqrt(clamp_min0(T(1) - p * p));
      const T s_tgt = gh_sqrt(clamp_min0(T(1) - tgt * tgt));
      const T coef = safe_div(norm_i * (tgt * s_phi - p * s_tgt), norm_j * s_tgt);
      Ci[j] += coef;
      for (int l = 0; l < K; ++l) cG[l] += coef * M[j * K + l];
    }
    if (valid) phi_i[j] = p;
  }
}

// Row i of the coefficient matrix C of `method` (phi_i written for gradvac only).
template <typename T>
GH_HD void solve_row(const T* M, int K, int method, const int64_t* order, const T* target, int i,
                     T* Ci, T* phi_i) {
  if (method == kPCGrad) {
    pcgrad_row(M, K, order, i, Ci);
  } else if (method == kGradVac) {
    gradvac_row(M, K, order, target, i, Ci, phi_i);
  } else {
    for (int k = 0; k < K; ++k) Ci[k] = i == k ? T(1) : T(0);
  }
}

// w_k = sum_i C_ik, summed in order i = 0..K-1. C: K x K row-major.
template <typename T>
GH_HD T weight_from_rows(const T* C, int K, int k) {
  T s = T(0);
  for (int i = 0; i < K; ++i) s += C[i * K + k];
  return s;
}

// The whole per-sample solve: cos (K*K), w (K), phi (K*K, gradvac only; may be null otherwise).
// K <= kMaxFusedK.
template <typename T>
GH_HD void solve_sample(const T* M, int K, int method, const int64_t* order, const T* target,
                        T* cos, T* w, T* phi) {
  cosine_matrix(M, K, cos);
  T C[kMaxFusedK * kMaxFusedK];
  T phi_dummy[kMaxFusedK];
  for (int i = 0; i < K; ++i)
    solve_row(M, K, method, order, target, i, C + i * K,
              method == kGradVac ? phi + i * K : phi_dummy);
  for (int k = 0; k < K; ++k) w[k] = weight_from_rows(C, K, k);
}

}  // namespace gradharmony
