// Input checks and output allocation shared by the CPU and CUDA ops (torch-dependent).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "harmonize_solve.h"

namespace gradharmony {

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

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

// Optional inputs of fused, converted to what the kernels read: order int64 (B, K, K),
// target acc (K, K), sample_weight acc (B,), all contiguous on G's device.
struct FusedInputs {
  at::Tensor order, target, sample_weight;  // undefined when absent
};

inline FusedInputs prepare_fused(const at::Tensor& G, int64_t method,
                                 const c10::optional<at::Tensor>& order,
                                 const c10::optional<at::Tensor>& target,
                                 const c10::optional<at::Tensor>& sample_weight, int64_t reduction) {
  check_G(G, "fused");
  check_reduction(reduction, "fused");
  TORCH_CHECK(method == kSum || method == kPCGrad || method == kGradVac,
              "gradharmony::fused: unknown method id ", method, " (0 sum, 1 pcgrad, 2 gradvac)");
  const int64_t B = G.size(0), K = G.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxFusedK, "gradharmony::fused: K must be in [1, ", kMaxFusedK,
              "], got ", K);
  const auto acc = acc_type(G.scalar_type());
  FusedInputs in;
  if (order.has_value() && order->defined() && method != kSum) {
    TORCH_CHECK(order->dim() == 3 && order->size(0) == B && order->size(1) == K &&
                    order->size(2) == K,
                "gradharmony::fused: order must be (B, K, K) = (", B, ", ", K, ", ", K,
                "), got ", order->sizes());
    TORCH_CHECK(!at::isFloatingType(order->scalar_type()) && !order->is_complex(),
                "gradharmony::fused: order must be an integer tensor");
    in.order = order->to(G.device(), at::kLong).contiguous();
  }
  if (method == kGradVac) {
    TORCH_CHECK(target.has_value() && target->defined(),
                "gradharmony::fused: gradvac needs a (K, K) target matrix");
    TORCH_CHECK(target->dim() == 2 && target->size(0) == K && target->size(1) == K,
                "gradharmony::fused: target must be (K, K), got ", target->sizes());
    in.target = target->to(G.device(), acc).contiguous();
  }
  if (sample_weight.has_value() && sample_weight->defined()) {
    TORCH_CHECK(sample_weight->numel() == B, "gradharmony::fused: sample_weight must be (B,) = (",
                B, ",), got ", sample_weight->sizes());
    in.sample_weight = sample_weight->to(G.device(), acc).reshape({B}).contiguous();
  }
  return in;
}

}  // namespace gradharmony
