// Host-side argument checks of the torch.ops.allocmoe operators, shared by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda). Everything here looks only at shapes, dtypes,
// devices and scalar arguments, never at tensor data, so it costs no device sync and is always
// on. Data-dependent checks (non-finite logits, ids out of range) belong to each backend (see
// validation.h and docs/OPS.md).
//
// Header-only and free of CPU-only code: include it from .cpp and .cu files alike.
// Every failure is a c10::Error (RuntimeError in Python) whose message names the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/check.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

namespace allocmoe {

// ---------------------------------------------------------------------------------------------
// route
// ---------------------------------------------------------------------------------------------

// How router logits become gate probabilities p and selection scores c (docs/OPS.md, step 1).
enum class Scoring {
  kSoftmax,       // p = c = softmax(logits)
  kSoftmaxGroup,  // as kSoftmax, restricted to the topk_group groups with the largest max(c)
  kSigmoidGroup,  // p = sigmoid(logits), c = p + correction_bias; group score = sum of top-2 c
  kTopkSoftmax,   // p = c = softmax(logits); kept weights always renormalised (GPT-OSS)
};

inline bool is_group_scoring(Scoring s) { return s == Scoring::kSoftmaxGroup || s == Scoring::kSigmoidGroup; }

inline Scoring parse_scoring(std::string_view scoring) {
  if (scoring == "softmax") return Scoring::kSoftmax;
  if (scoring == "softmax_group") return Scoring::kSoftmaxGroup;
  if (scoring == "sigmoid_group") return Scoring::kSigmoidGroup;
  if (scoring == "topk_softmax") return Scoring::kTopkSoftmax;
  ALLOCMOE_CHECK(false, "allocmoe.route: unknown scoring '", std::string(scoring),
              "' (expected softmax, softmax_group, sigmoid_group or topk_softmax)");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks every argument of route and returns the parsed scoring. Group arguments are only
// checked (and used) by the group scorings, so a config's n_group/topk_group may be passed
// through unchanged for the other scorings.
inline Scoring check_route_args(const at::Tensor& router_logits, int64_t top_k, double budget, int64_t k_base,
                                std::string_view scoring_name, const std::optional<at::Tensor>& correction_bias,
                                int64_t n_group, int64_t topk_group) {
  const Scoring scoring = parse_scoring(scoring_name);
  ALLOCMOE_CHECK(router_logits.dim() == 2, "allocmoe.route: router_logits must be 2-D [T, E], got ",
              router_logits.dim(), "-D");
  ALLOCMOE_CHECK(is_supported_float(router_logits.scalar_type()),
              "allocmoe.route: router_logits must be float32, bfloat16 or float16, got ",
              router_logits.scalar_type());
  const int64_t E = router_logits.size(1);
  ALLOCMOE_CHECK(top_k >= 1 && top_k <= E, "allocmoe.route: top_k must be in [1, E=", E, "], got ", top_k);
  ALLOCMOE_CHECK(k_base >= 0 && k_base <= top_k, "allocmoe.route: k_base must be in [0, top_k=", top_k, "], got ",
              k_base);
  ALLOCMOE_CHECK(std::isfinite(budget), "allocmoe.route: budget must be finite, got ", budget);
  ALLOCMOE_CHECK(budget >= static_cast<double>(k_base) && budget <= static_cast<double>(top_k),
              "allocmoe.route: budget must be in [k_base=", k_base, ", top_k=", top_k, "], got ", budget);
  if (is_group_scoring(scoring)) {
    ALLOCMOE_CHECK(n_group >= 1 && E % n_group == 0, "allocmoe.route: n_group must be >= 1 and divide E=", E,
                ", got ", n_group);
    ALLOCMOE_CHECK(topk_group >= 1 && topk_group <= n_group, "allocmoe.route: topk_group must be in [1, n_group=",
                n_group, "], got ", topk_group);
    ALLOCMOE_CHECK(topk_group * (E / n_group) >= top_k, "allocmoe.route: topk_group=", topk_group,
                " groups of ", E / n_group, " experts hold fewer than top_k=", top_k, " experts");
  }
  if (correction_bias.has_value()) {
    const at::Tensor& bias = *correction_bias;
    ALLOCMOE_CHECK(scoring == Scoring::kSigmoidGroup,
                "allocmoe.route: correction_bias is only used by scoring='sigmoid_group', got scoring='",
                std::string(scoring_name), "'");
    ALLOCMOE_CHECK(bias.dim() == 1 && bias.size(0) == E, "allocmoe.route: correction_bias must have shape [E=", E,
                "], got ", bias.sizes());
    ALLOCMOE_CHECK(bias.scalar_type() == at::kFloat, "allocmoe.route: correction_bias must be float32, got ",
                bias.scalar_type());
    ALLOCMOE_CHECK(bias.device() == router_logits.device(), "allocmoe.route: correction_bias is on ", bias.device(),
                " but router_logits is on ", router_logits.device());
  }
  return scoring;
}

// Number of (token, expert) slots Alloc-T keeps over all T tokens: round half up of budget * T,
// computed in double, clamped to [k_base * T, top_k * T] (docs/OPS.md, step 3).
inline int64_t alloc_total_slots(double budget, int64_t T, int64_t k_base, int64_t top_k) {
  const int64_t rounded = static_cast<int64_t>(std::floor(budget * static_cast<double>(T) + 0.5));
  const int64_t lo = k_base * T, hi = top_k * T;
  return rounded < lo ? lo : (rounded > hi ? hi : rounded);
}

// ---------------------------------------------------------------------------------------------
// experts
// ---------------------------------------------------------------------------------------------

enum class Activation {
  kSilu,       // g = [gate; up] (gate rows first), a = silu(gate) * up
  kSwigluOai,  // gate = g[0::2], up = g[1::2], clamped, a = (up + 1) * gate * sigmoid(alpha * gate)
};

inline Activation parse_activation(std::string_view activation) {
  if (activation == "silu") return Activation::kSilu;
  if (activation == "swiglu_oai") return Activation::kSwigluOai;
  ALLOCMOE_CHECK(false, "allocmoe.experts: unknown activation '", std::string(activation),
              "' (expected silu or swiglu_oai)");
}

// Checks every argument of experts and returns the parsed activation.
// hidden [T, H], gate_up [E, 2I, H], down [E, H, I] share one dtype (fp32/bf16/fp16) and may
// have any strides; weights [T, K] fp32; ids [T, K] int32; biases [E, 2I] / [E, H] in the dtype
// of the expert weights. All on one device.
inline Activation check_experts_args(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
                                     const at::Tensor& weights, const at::Tensor& ids,
                                     const std::optional<at::Tensor>& gate_up_bias,
                                     const std::optional<at::Tensor>& down_bias, std::string_view activation_name) {
  const Activation activation = parse_activation(activation_name);
  ALLOCMOE_CHECK(hidden.dim() == 2, "allocmoe.experts: hidden must be 2-D [T, H], got ", hidden.dim(), "-D");
  ALLOCMOE_CHECK(gate_up.dim() == 3, "allocmoe.experts: gate_up must be 3-D [E, 2I, H], got ", gate_up.dim(), "-D");
  ALLOCMOE_CHECK(down.dim() == 3, "allocmoe.experts: down must be 3-D [E, H, I], got ", down.dim(), "-D");
  ALLOCMOE_CHECK(weights.dim() == 2, "allocmoe.experts: weights must be 2-D [T, K], got ", weights.dim(), "-D");
  ALLOCMOE_CHECK(ids.dim() == 2, "allocmoe.experts: ids must be 2-D [T, K], got ", ids.dim(), "-D");

  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t E = gate_up.size(0), two_I = gate_up.size(1);
  ALLOCMOE_CHECK(is_supported_float(hidden.scalar_type()),
              "allocmoe.experts: hidden must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  ALLOCMOE_CHECK(gate_up.scalar_type() == hidden.scalar_type(), "allocmoe.experts: gate_up dtype ",
              gate_up.scalar_type(), " differs from hidden dtype ", hidden.scalar_type());
  ALLOCMOE_CHECK(down.scalar_type() == hidden.scalar_type(), "allocmoe.experts: down dtype ", down.scalar_type(),
              " differs from hidden dtype ", hidden.scalar_type());
  ALLOCMOE_CHECK(weights.scalar_type() == at::kFloat, "allocmoe.experts: weights must be float32, got ",
              weights.scalar_type());
  ALLOCMOE_CHECK(ids.scalar_type() == at::kInt, "allocmoe.experts: ids must be int32, got ", ids.scalar_type());

  ALLOCMOE_CHECK(E >= 1, "allocmoe.experts: gate_up must hold at least one expert, got shape ", gate_up.sizes());
  ALLOCMOE_CHECK(two_I >= 2 && two_I % 2 == 0, "allocmoe.experts: gate_up dim 1 (2I) must be even and >= 2, got ",
              gate_up.sizes());
  ALLOCMOE_CHECK(gate_up.size(2) == H, "allocmoe.experts: gate_up must have shape [E, 2I, H=", H, "], got ",
              gate_up.sizes());
  ALLOCMOE_CHECK(down.size(0) == E && down.size(1) == H && down.size(2) == two_I / 2,
              "allocmoe.experts: down must have shape [E=", E, ", H=", H, ", I=", two_I / 2, "], got ", down.sizes());
  ALLOCMOE_CHECK(weights.size(0) == T, "allocmoe.experts: weights must have T=", T, " rows, got ", weights.sizes());
  ALLOCMOE_CHECK(ids.sizes() == weights.sizes(), "allocmoe.experts: ids shape ", ids.sizes(),
              " differs from weights shape ", weights.sizes());

  const auto same_device = [&](const at::Tensor& t, const char* name) {
    ALLOCMOE_CHECK(t.device() == hidden.device(), "allocmoe.experts: ", name, " is on ", t.device(),
                " but hidden is on ", hidden.device());
  };
  same_device(gate_up, "gate_up");
  same_device(down, "down");
  same_device(weights, "weights");
  same_device(ids, "ids");
  if (gate_up_bias.has_value()) {
    const at::Tensor& b = *gate_up_bias;
    ALLOCMOE_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == two_I,
                "allocmoe.experts: gate_up_bias must have shape [E=", E, ", 2I=", two_I, "], got ", b.sizes());
    ALLOCMOE_CHECK(b.scalar_type() == hidden.scalar_type(), "allocmoe.experts: gate_up_bias dtype ", b.scalar_type(),
                " differs from hidden dtype ", hidden.scalar_type());
    same_device(b, "gate_up_bias");
  }
  if (down_bias.has_value()) {
    const at::Tensor& b = *down_bias;
    ALLOCMOE_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == H, "allocmoe.experts: down_bias must have shape [E=",
                E, ", H=", H, "], got ", b.sizes());
    ALLOCMOE_CHECK(b.scalar_type() == hidden.scalar_type(), "allocmoe.experts: down_bias dtype ", b.scalar_type(),
                " differs from hidden dtype ", hidden.scalar_type());
    same_device(b, "down_bias");
  }
  return activation;
}

}  // namespace allocmoe
