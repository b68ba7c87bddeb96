// The one place where the torch.ops.allocmoe operator schemas are defined.
// Kernels register per backend with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) kernels for torch.compile live in python/allocmoe_ext/ops.py.
// The semantics of every op are written down in docs/OPS.md.
#include <torch/library.h>

TORCH_LIBRARY(allocmoe, m) {
  // Scoring, per-token top-k and Alloc-T budgeted selection across all T tokens.
  // Returns (weights[T, top_k] fp32, ids[T, top_k] int32); dropped slots have id -1, weight 0.
  m.def(
      "route(Tensor router_logits, int top_k, float budget, int k_base=1, str scoring=\"softmax\", "
      "Tensor? correction_bias=None, int n_group=1, int topk_group=1, bool norm_topk_prob=False, "
      "float routed_scaling_factor=1.0) -> (Tensor weights, Tensor ids)");
  // Grouped expert MLP over the kept (token, expert) pairs, weighted sum over slots.
  m.def(
      "experts(Tensor hidden, Tensor gate_up, Tensor down, Tensor weights, Tensor ids, "
      "Tensor? gate_up_bias=None, Tensor? down_bias=None, str activation=\"silu\", "
      "float swiglu_alpha=1.702, float swiglu_limit=7.0) -> Tensor");
  // One MoE layer for decode: router GEMV (or the router's logits), route (Alloc-T), routed
  // experts and shared experts. Exactly one of router_weight and router_logits is given.
  m.def("moe(Tensor hidden, Tensor? router_weight, Tensor gate_up, Tensor down, int top_k, float budget, int k_base=1, str scoring=\"softmax\", Tensor? correction_bias=None, int n_group=1, int topk_group=1, bool norm_topk_prob=False, float routed_scaling_factor=1.0, Tensor? shared_gate_up=None, Tensor? shared_down=None, Tensor? shared_gate=None, Tensor? router_logits=None) -> Tensor");
}
