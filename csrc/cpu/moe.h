// The `moe` op (one MoE layer: router GEMV or given logits, route, routed experts, shared experts) as a
// composition of the route and experts ops through the dispatcher. It is the CPU kernel of
// torch.ops.allocmoe.moe and the CUDA fallback where the fused decode kernel does not apply
// (more than 16 tokens, strided or unaligned weights).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace allocmoe {

// Shape/dtype/device checks of moe (no data access). Returns E; throws naming the argument.
int64_t check_moe_args(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight,
                       const at::Tensor& gate_up, const at::Tensor& down,
                       const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                       const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& router_logits);

// The router's fp32 logits [T, E]: router_logits as fp32, or fp32(hidden) @ fp32(router_weight)^T.
at::Tensor moe_logits(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight,
                      const std::optional<at::Tensor>& router_logits);

// routed + the shared experts (always-on experts through the experts op, weight 1 or the
// sigmoid gate), summed in fp32 and rounded once; routed itself when there are none.
at::Tensor moe_add_shared(const at::Tensor& hidden, const at::Tensor& routed,
                          const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                          const std::optional<at::Tensor>& shared_gate);

at::Tensor moe_composite(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight,
                         const at::Tensor& gate_up, const at::Tensor& down, int64_t top_k, double budget,
                         int64_t k_base, c10::string_view scoring, const std::optional<at::Tensor>& correction_bias,
                         int64_t n_group, int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                         const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                         const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& router_logits);

}  // namespace allocmoe
