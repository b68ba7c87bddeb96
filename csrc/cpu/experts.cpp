// CPU kernel of torch.ops.allocmoe.experts: the grouped expert MLP over the kept (token, expert)
// pairs, as docs/OPS.md specifies. Tokens are bucketed by expert and each expert runs one GEMM
// per projection over its tokens, so the cost is that of the kept activations only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/arg_checks.h"

namespace allocmoe {
namespace {

// a from g = gate_up[e] @ x + bias (fp32, [n, 2I]) -> [n, I] fp32.
at::Tensor activate(const at::Tensor& g, Activation activation, double alpha, double limit) {
  const int64_t I = g.size(1) / 2;
  if (activation == Activation::kSilu) {
    return at::silu(g.narrow(1, 0, I)) * g.narrow(1, I, I);
  }
  const at::Tensor gate = g.slice(1, 0, 2 * I, 2).clamp_max(limit);
  const at::Tensor up = g.slice(1, 1, 2 * I, 2).clamp(-limit, limit);
  return (up + 1.0) * gate * at::sigmoid(gate * alpha);
}

}  // namespace

at::Tensor experts_cpu(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
                       const at::Tensor& weights, const at::Tensor& ids, const std::optional<at::Tensor>& gate_up_bias,
                       const std::optional<at::Tensor>& down_bias, c10::string_view activation_name,
                       double swiglu_alpha, double swiglu_limit) {
  const Activation activation = check_experts_args(hidden, gate_up, down, weights, ids, gate_up_bias, down_bias,
                                                   std::string_view(activation_name.data(), activation_name.size()));
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up.size(0), K = ids.size(1);
  const at::ScalarType dtype = hidden.scalar_type();

  // Bucket the (token, slot) pairs by expert (counting sort, token order kept inside a bucket).
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor w_c = weights.contiguous();
  const int32_t* id = ids_c.data_ptr<int32_t>();
  const float* w = w_c.data_ptr<float>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t j = 0; j < T * K; ++j) {
    TORCH_CHECK(id[j] >= -1 && id[j] < E, "allocmoe.experts: ids[", j / K, ", ", j % K, "] = ", id[j],
                " is out of range [-1, E=", E, ")");
    if (id[j] >= 0) ++start[id[j] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> token(start[E]);
  std::vector<float> slot_weight(start[E]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t j = 0; j < T * K; ++j) {
      if (id[j] < 0) continue;
      const int64_t at_pos = fill[id[j]]++;
      token[at_pos] = j / K;
      slot_weight[at_pos] = w[j];
    }
  }

  // fp32 accumulator of the weighted sum over slots; one rounding to the output dtype at the end.
  at::Tensor out = at::zeros({T, H}, hidden.options().dtype(at::kFloat));
  const at::Tensor hidden_f = hidden.to(at::kFloat);
  const auto cpu_long = at::TensorOptions().dtype(at::kLong);
  const auto cpu_float = at::TensorOptions().dtype(at::kFloat);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    const at::Tensor rows = at::from_blob(token.data() + start[e], {n}, cpu_long);
    const at::Tensor rw = at::from_blob(slot_weight.data() + start[e], {n, 1}, cpu_float);
    // Inputs are exact in fp32, so fp32 GEMMs are "accumulate in fp32" for every input dtype.
    at::Tensor g = at::mm(hidden_f.index_select(0, rows), gate_up[e].to(at::kFloat).t());
    if (gate_up_bias.has_value()) g.add_((*gate_up_bias)[e].to(at::kFloat));
    // The intermediate is rounded to the input dtype, as a two-GEMM kernel stores it.
    const at::Tensor a = activate(g, activation, swiglu_alpha, swiglu_limit).to(dtype).to(at::kFloat);
    at::Tensor y = at::mm(a, down[e].to(at::kFloat).t());
    if (down_bias.has_value()) y.add_((*down_bias)[e].to(at::kFloat));
    out.index_add_(0, rows, y.mul_(rw));
  }
  return out.to(dtype);
}

}  // namespace allocmoe

TORCH_LIBRARY_IMPL(allocmoe, CPU, m) { m.impl("experts", &allocmoe::experts_cpu); }
