// CPU kernel of torch.ops.allocmoe.moe: one MoE layer composed of the route and experts ops.
//   logits = fp32(hidden) @ fp32(router_weight)^T            [T, E], fp32 accumulation
//            (or fp32(router_logits), when the caller computed them)
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

namespace {
// The experts op through the dispatcher (CPU or CUDA kernel, whichever the tensors are on).
auto experts_handle() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("allocmoe::experts", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view, double,
                        double)>();
}
}  // namespace

int64_t check_moe_args(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight,
                       const at::Tensor& gate_up, const at::Tensor& down,
                       const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                       const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& router_logits) {
  ALLOCMOE_CHECK(hidden.dim() == 2, "allocmoe.moe: hidden must be 2-D [T, H], got ", hidden.dim(), "-D");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  ALLOCMOE_CHECK(router_weight.has_value() != router_logits.has_value(),
                 "allocmoe.moe: give exactly one of router_weight and router_logits");
  int64_t E = 0;
  if (router_weight.has_value()) {
    const at::Tensor& rw = *router_weight;
    ALLOCMOE_CHECK(rw.dim() == 2 && rw.size(1) == H,
                   "allocmoe.moe: router_weight must have shape [E, H=", H, "], got ", rw.sizes());
    ALLOCMOE_CHECK(rw.scalar_type() == hidden.scalar_type(), "allocmoe.moe: router_weight dtype ", rw.scalar_type(),
                   " differs from hidden dtype ", hidden.scalar_type());
    ALLOCMOE_CHECK(rw.device() == hidden.device(), "allocmoe.moe: router_weight is on ", rw.device(),
                   " but hidden is on ", hidden.device());
    E = rw.size(0);
  } else {
    const at::Tensor& lg = *router_logits;
    ALLOCMOE_CHECK(lg.dim() == 2 && lg.size(0) == T,
                   "allocmoe.moe: router_logits must have shape [T=", T, ", E], got ", lg.sizes());
    ALLOCMOE_CHECK(lg.scalar_type() == at::kFloat || lg.scalar_type() == at::kBFloat16 ||
                       lg.scalar_type() == at::kHalf,
                   "allocmoe.moe: router_logits must be float32, bfloat16 or float16, got ", lg.scalar_type());
    ALLOCMOE_CHECK(lg.device() == hidden.device(), "allocmoe.moe: router_logits is on ", lg.device(),
                   " but hidden is on ", hidden.device());
    E = lg.size(1);
  }
  ALLOCMOE_CHECK(gate_up.dim() == 3 && gate_up.size(0) == E,
                 "allocmoe.moe: gate_up must have shape [E=", E, ", 2I, H], got ", gate_up.sizes());
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
  return E;
}

at::Tensor moe_logits(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight,
                      const std::optional<at::Tensor>& router_logits) {
  if (router_logits.has_value()) return router_logits->to(at::kFloat).contiguous();
  return at::matmul(hidden.to(at::kFloat), router_weight->to(at::kFloat).t());
}

at::Tensor moe_composite(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight,
                         const at::Tensor& gate_up, const at::Tensor& down, int64_t top_k, double budget,
                         int64_t k_base, c10::string_view scoring, const std::optional<at::Tensor>& correction_bias,
                         int64_t n_group, int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                         const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                         const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& router_logits) {
  check_moe_args(hidden, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, router_logits);
  static auto route_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("allocmoe::route", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, int64_t, double, int64_t, c10::string_view,
                                 const std::optional<at::Tensor>&, int64_t, int64_t, bool, double)>();
  static const auto experts_op = experts_handle();
  const at::Tensor logits = moe_logits(hidden, router_weight, router_logits);
  auto [weights, ids] = route_op.call(logits, top_k, budget, k_base, scoring, correction_bias, n_group, topk_group,
                                      norm_topk_prob, routed_scaling_factor);
  const at::Tensor out =
      experts_op.call(hidden, gate_up, down, weights, ids, std::nullopt, std::nullopt, "silu", 1.702, 7.0);
  return moe_add_shared(hidden, out, shared_gate_up, shared_down, shared_gate);
}

at::Tensor moe_add_shared(const at::Tensor& hidden, const at::Tensor& routed,
                          const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                          const std::optional<at::Tensor>& shared_gate) {
  if (!shared_gate_up.has_value()) return routed;
  static const auto experts_op = experts_handle();
  const int64_t T = hidden.size(0), S = shared_gate_up->size(0);
  at::Tensor shared_w = at::ones({T, S}, hidden.options().dtype(at::kFloat));
  if (shared_gate.has_value()) {
    shared_w = shared_w * at::sigmoid(at::matmul(hidden.to(at::kFloat), shared_gate->to(at::kFloat))).unsqueeze(1);
  }
  const at::Tensor shared_ids = at::arange(S, hidden.options().dtype(at::kInt)).unsqueeze(0).expand({T, S}).contiguous();
  const at::Tensor shared = experts_op.call(hidden, *shared_gate_up, *shared_down, shared_w.contiguous(), shared_ids,
                                            std::nullopt, std::nullopt, "silu", 1.702, 7.0);
  return (routed.to(at::kFloat) + shared.to(at::kFloat)).to(hidden.scalar_type());
}

}  // namespace allocmoe

TORCH_LIBRARY_IMPL(allocmoe, CPU, m) { m.impl("moe", &allocmoe::moe_composite); }
