// Standalone check of harmonize_kernels.cuh without torch: nvcc -std=c++17 -arch=sm_90
// -I csrc csrc/cuda_selftest.cu -o /tmp/gh_selftest && /tmp/gh_selftest
// Compiling it (-c) instantiates every kernel for every dtype and K; running it on a GPU compares
// the small (one-launch) and large (three-launch) paths with a float64 host computation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "harmonize_kernels.cuh"

using namespace gradharmony;
using namespace gradharmony::cuda;

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

template <typename T> double host_to_float(T x) { return (double)x; }
template <> double host_to_float<__half>(__half x) { return __half2float(x); }
template <> double host_to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T host_from_float(float x) { return (T)x; }
template <> __half host_from_float<__half>(float x) { return __float2half(x); }
template <> __nv_bfloat16 host_from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Returns the number of failures.
template <typename scalar_t, int K>
int run_case(int64_t B, int64_t D, int method, int reduction, bool large, double tol) {
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  std::mt19937 rng(1234 + B * 7 + D + K * 31 + method);
  std::normal_distribution<float> nd;
  std::vector<scalar_t> hG(B * K * D);
  for (auto& x : hG) x = host_from_float<scalar_t>(nd(rng));
  std::vector<int64_t> hO(B * K * K);
  for (int64_t b = 0; b < B; ++b)
    for (int i = 0; i < K; ++i) {
      for (int t = 0; t < K; ++t) hO[(b * K + i) * K + t] = t;
      std::shuffle(hO.begin() + (b * K + i) * K, hO.begin() + (b * K + i + 1) * K, rng);
    }
  std::vector<acc_t> hT(K * K);
  for (auto& x : hT) x = acc_t(0.1);
  // host oracle in double
  std::vector<double> Mref(B * K * K), wref(B * K), outref(reduction ? D : B * D, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < K; ++l) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d)
          s += (double)host_to_float(hG[(b * K + k) * D + d]) * host_to_float(hG[(b * K + l) * D + d]);
        Mref[(b * K + k) * K + l] = s;
      }
    double cosb[K * K], phib[K * K], tgt[K * K];
    for (int i = 0; i < K * K; ++i) tgt[i] = hT[i];
    solve_sample<double>(&Mref[b * K * K], K, method, &hO[b * K * K], tgt, cosb, &wref[b * K], phib);
    for (int64_t d = 0; d < D; ++d) {
      double o = 0;
      for (int k = 0; k < K; ++k) o += wref[b * K + k] * host_to_float(hG[(b * K + k) * D + d]);
      if (reduction) outref[d] += o; else outref[b * D + d] = o;
    }
  }
  scalar_t *dG, *dout;
  int64_t* dO;
  acc_t *dT, *dM, *dcos, *dw, *dphi, *dacc, *dpart;
  CK(cudaMalloc(&dG, hG.size() * sizeof(scalar_t)));
  CK(cudaMalloc(&dO, hO.size() * sizeof(int64_t)));
  CK(cudaMalloc(&dT, hT.size() * sizeof(acc_t)));
  CK(cudaMalloc(&dM, B * K * K * sizeof(acc_t)));
  CK(cudaMalloc(&dcos, B * K * K * sizeof(acc_t)));
  CK(cudaMalloc(&dphi, B * K * K * sizeof(acc_t)));
  CK(cudaMalloc(&dw, B * K * sizeof(acc_t)));
  CK(cudaMalloc(&dout, B * D * sizeof(scalar_t)));
  CK(cudaMalloc(&dacc, D * sizeof(acc_t)));
  CK(cudaMemcpy(dG, hG.data(), hG.size() * sizeof(scalar_t), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dO, hO.data(), hO.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dT, hT.data(), hT.size() * sizeof(acc_t), cudaMemcpyHostToDevice));
  CK(cudaMemset(dacc, 0, D * sizeof(acc_t)));
  constexpr int N = VecWidth<scalar_t>::N;
  if (!large) {
    const int64_t grid = reduction ? (B < 64 ? B : 64) : B;
    fused_small_kernel<scalar_t, acc_t, K><<<grid, kThreads, reduction ? D * sizeof(acc_t) : 0>>>(
        dG, B, D, method, dO, dT, dM, dcos, dw, dphi, reduction ? nullptr : dout,
        reduction ? dacc : nullptr);
  } else {
    const int64_t chunk = ((D + 3) / 4 + N - 1) / N * N, nch = (D + chunk - 1) / chunk;
    CK(cudaMalloc(&dpart, B * nch * (K * (K + 1) / 2) * sizeof(acc_t)));
    gram_partial_kernel<scalar_t, acc_t, K><<<B * nch, kThreads>>>(dG, D, chunk, nch, dpart);
    solve_kernel<acc_t><<<(B + 127) / 128, 128>>>(dpart, B, K, nch, method, dO, dT, dM, dcos, dw, dphi);
    if (reduction) {
      const bool vec = D % N == 0;
      const int64_t nblk = (D + kThreads * (vec ? N : 1) - 1) / (kThreads * (vec ? N : 1));
      combine_sum_kernel<scalar_t, acc_t><<<nblk * 2, kThreads>>>(dG, dw, B, K, D, nblk, 2, vec, dout, dacc);
    } else {
      const int64_t nblk = (D + kThreads * N * kItems - 1) / (kThreads * N * kItems);
      combine_none_kernel<scalar_t, acc_t><<<B * nblk, kThreads>>>(dG, dw, K, D, nblk, dout);
    }
    CK(cudaFree(dpart));
  }
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<acc_t> hM(B * K * K), hw(B * K), hacc(D);
  std::vector<scalar_t> hout(B * D);
  CK(cudaMemcpy(hM.data(), dM, hM.size() * sizeof(acc_t), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hw.data(), dw, hw.size() * sizeof(acc_t), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hout.data(), dout, hout.size() * sizeof(scalar_t), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hacc.data(), dacc, hacc.size() * sizeof(acc_t), cudaMemcpyDeviceToHost));
  double eM = 0, ew = 0, eo = 0, so = 0;
  for (size_t i = 0; i < hM.size(); ++i) eM = std::max(eM, std::abs(hM[i] - Mref[i]) / (double)D);
  for (size_t i = 0; i < hw.size(); ++i) ew = std::max(ew, std::abs(hw[i] - wref[i]));
  for (size_t i = 0; i < outref.size(); ++i) {
    const double v = reduction ? (double)hacc[i] : (double)host_to_float(hout[i]);
    eo = std::max(eo, std::abs(v - outref[i]));
    so = std::max(so, std::abs(outref[i]));
  }
  eo /= std::max(1.0, so);
  const bool ok = eM < tol && ew < 10 * tol && eo < 10 * tol;
  std::printf("%s %-5s K=%d B=%lld D=%lld method=%d red=%d: M %.2e w %.2e out %.2e\n",
              ok ? "ok  " : "FAIL", large ? "large" : "small", K, (long long)B, (long long)D, method,
              reduction, eM, ew, eo);
  cudaFree(dG); cudaFree(dO); cudaFree(dT); cudaFree(dM); cudaFree(dcos); cudaFree(dphi);
  cudaFree(dw); cudaFree(dout); cudaFree(dacc);
  return ok ? 0 : 1;
}

template <typename scalar_t>
int run_dtype(double tol) {
  int f = 0;
  for (int method = 0; method < 3; ++method)
    for (int red = 0; red < 2; ++red)
      for (int large = 0; large < 2; ++large) {
        f += run_case<scalar_t, 2>(37, 4099, method, red, large, tol);
        f += run_case<scalar_t, 3>(5, 1000, method, red, large, tol);
        f += run_case<scalar_t, 8>(3, 4096, method, red, large, tol);
        f += run_case<scalar_t, 5>(2, 7, method, red, large, tol);
      }
  return f;
}

int main() {
  int f = run_dtype<float>(1e-4) + run_dtype<double>(1e-9) + run_dtype<__half>(1e-2) +
          run_dtype<__nv_bfloat16>(5e-2);
  std::printf(f ? "%d FAILED\n" : "all passed\n", f);
  return f ? 1 : 0;
}
