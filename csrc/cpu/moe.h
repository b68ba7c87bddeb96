// The `moe` op (one MoE layer: router GEMV, route, routed experts, shared experts) as a
// composition of the route and experts ops through the dispatcher. It is the CPU kernel of
// torch.ops.allocmoe.moe and the CUDA fallback where the fused decode kernel does not apply
// (more than 16 tokens, strided or unaligned weights).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace allocmoe {

// Shape/dtype/device checks of moe (no data access). Returns nothing; throws naming the argument.
void check_moe_args(const at::Tensor& hidden, const at::Tensor& router_weight, const at::Tensor& gate_up,
                    const at::Tensor& down, const std::optional<at::Tensor>& shared_gate_up,
                    const std::optional<at::Tensor>& shared_down, const std::optional<at::Tensor>& shared_gate);

at::Tensor moe_composite(const at::Tensor& hidden, const at::Tensor& router_weight, const at::Tensor& gate_up,
                         const at::Tensor& down, int64_t top_k, double budget, int64_t k_base,
                         c10::string_view scoring, const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                         int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                         const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
                         const std::optional<at::Tensor>& shared_gate);

}  // namespace allocmoe
