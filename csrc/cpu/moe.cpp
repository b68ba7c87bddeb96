// CPU kernel of torch.ops.allocmoe.moe: one MoE layer composed of the route and experts ops.
//   logits = fp32(hidden) @ fp32(router_weight)^T            [T, E], fp32 accumulation
//   (weights, ids) = route(logits, top_k, budget, ...)        Alloc-T selection
//   out = experts(hidden, gate_up, down, weights, ids)
//       + experts(hidden, shared_gate_up, shared_down, g, all shared ids)   (always-on experts,
//         weight g = 1, or sigmoid(fp32(hidden) . fp32(shared_gate)) per token as in Qwen2-MoE)
// Each experts call rounds to hidden's dtype; the sum is taken in fp32 and rounded once more.
// The CUDA fused decode kernel computes the same function with one rounding at the end.
#include "cpu/moe.h"
#include "common/check.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace allocmoe {

void check_moe_args(const at::Tensor& hidden, const at::Tensor& router_weight, const at::Tensor& gate_up,
                    const at::Tensor& down, const std::optional<at::Tensor>& shared_gate_up,
                    const std::optional<at::Tensor>& shared_down, const std::optional<at::Tensor>& shared_gate) {
  ALLOCMOE_CHECK(hidden.dim() == 2, "allocmoe.moe: hidden must be 2-D [T, H], got ", hidden.dim(), "-D");
  const int64_t H = hidden.size(1);
  ALLOCMOE_CHECK(router_weight.dim() == 2 && router_weight.size(1) == H,
              "allocmoe.moe: router_weight must have shape [E, H=", H, "], got ", router_weight.sizes());
  ALLOCMOE_CHECK(router_weight.scalar_type() == hidden.scalar_type(), "allocmoe.moe: router_weight dtype ",
              router_weight.scalar_type(), " differs from hidden dtype ", hidden.scalar_type());
  ALLOCMOE_CHECK(router_weight.device() == hidden.device(), "allocmoe.moe: router_weight is on ", router_weight.device(),
              " but hidden is on ", hidden.device());
  ALLOCMOE_CHECK(gate_up.dim() == 3 && gate_up.size(0) == router_weight.size(0),
              "allocmoe.moe: gate_up must have shape [E=", router_weight.size(0), ", 2I, H], got ", gate_up.sizes());
  ALLOCMOE_CHECK(shared_gate_up.has_value() == shared_down.has_value(),
              "allocmoe.moe: shared_gate_up and shared_down must be given together");
  if (shared_gate_up.has_value()) {
    const at::Tensor& sgu = *shared_gate_up;
    const at::Tensor& sdn = *shared_down;
    ALLOCMOE_CHECK(sgu.dim() == 3 && sgu.size(1) % 2 == 0 && sgu.size(1) >= 2 && sgu.size(2) == H && sgu.size(0) >= 1,
                "allocmoe.moe: shared_gate_up must have shape [S, 2I_s, H=", H, "], got ", sgu.sizes());
    ALLOCMOE_CHECK(sdn.dim() == 3 && sdn.size(0) == sgu.size(0) && sdn.size(1) == H && sdn.size(2) == sgu.size(1) / 2,
                "allocmoe.moe: shared_down must have shape [S=", sgu.size(0), ", H=", H, ", I_s=", sgu.size(1) / 2,
                "], got ", sdn.sizes());
    ALLOCMOE_CHECK(sgu.scalar_type() == hidden.scalar_type() && sdn.scalar_type() == hidden.scalar_type(),
                "allocmoe.moe: shared_gate_up/shared_down dtype must be hidden's dtype ", hidden.scalar_type());
    ALLOCMOE_CHECK(sgu.device() == hidden.device() && sdn.device() == hidden.device(),
                "allocmoe.moe: shared_gate_up/shared_down must be on hidden's device ", hidden.device());
  }
  if (shared_gate.has_value()) {
    const at::Tensor& g = *shared_gate;
    ALLOCMOE_CHECK(shared_gate_up.has_value(), "allocmoe.moe: shared_gate needs shared_gate_up and shared_down");
    ALLOCMOE_CHECK(g.dim() == 1 && g.size(0) == H, "allocmoe.moe: shared_gate must have shape [H=", H, "], got ",
                g.sizes());
    ALLOCMOE_CHECK(g.scalar_type() == hidden.scalar_type(), "allocmoe.moe: shared_gate dtype ", g.scalar_type(),
                " differs from hidden dtype ", hidden.scalar_type());
    ALLOCMOE_CHECK(g.device() == hidden.device(), "allocmoe.moe: shared_gate is on ", g.device(), " but hidden is on ",
                hidden.device());
  }
}

at::Tensor moe_composite(const at::Tensor& hidden, const at::Tensor& router_weight, const at::Tensor& gate_up,
                         const at::Tensor& down, int64_t top_k, double budget, int64_t k_base,
                         c10::string_view scoring, const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                         int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                         const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                         const std::optional<at::Tensor>& shared_gate) {
  check_moe_args(hidden, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate);
  static auto route_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("allocmoe::route", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, int64_t, double, int64_t, c10::string_view,
                                 const std::optional<at::Tensor>&, int64_t, int64_t, bool, double)>();
  static auto experts_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("allocmoe::experts", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, c10::string_view, double, double)>();
  const at::Tensor hidden_f = hidden.to(at::kFloat);
  const at::Tensor logits = at::matmul(hidden_f, router_weight.to(at::kFloat).t());
  auto [weights, ids] = route_op.call(logits, top_k, budget, k_base, scoring, correction_bias, n_group, topk_group,
                                      norm_topk_prob, routed_scaling_factor);
  at::Tensor out = experts_op.call(hidden, gate_up, down, weights, ids, std::nullopt, std::nullopt, "silu", 1.702, 7.0);
  if (!shared_gate_up.has_value()) return out;
  const int64_t T = hidden.size(0), S = shared_gate_up->size(0);
  at::Tensor shared_w = at::ones({T, S}, hidden.options().dtype(at::kFloat));
  if (shared_gate.has_value()) {
    shared_w = shared_w * at::sigmoid(at::matmul(hidden_f, shared_gate->to(at::kFloat))).unsqueeze(1);
  }
  const at::Tensor shared_ids = at::arange(S, hidden.options().dtype(at::kInt)).unsqueeze(0).expand({T, S}).contiguous();
  const at::Tensor shared = experts_op.call(hidden, *shared_gate_up, *shared_down, shared_w.contiguous(), shared_ids,
                                            std::nullopt, std::nullopt, "silu", 1.702, 7.0);
  return (out.to(at::kFloat) + shared.to(at::kFloat)).to(hidden.scalar_type());
}

}  // namespace allocmoe

TORCH_LIBRARY_IMPL(allocmoe, CPU, m) { m.impl("moe", &allocmoe::moe_composite); }
