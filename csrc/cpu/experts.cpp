// CPU kernel of torch.ops.allocmoe.experts: the grouped expert MLP over the kept (token, expert)
// pairs, as docs/OPS.md specifies. Tokens are bucketed by expert and each expert runs one GEMM
// per projection over its tokens, so the cost is that of the kept activations only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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
  // An inference kernel: the ATen ops inside must not record autograd history even when the
  // model's weights require grad (the op itself has no autograd formula). Worker threads of
  // at::parallel_for do not inherit this thread-local guard, so each one sets it again.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up.size(0), K = ids.size(1);
  const at::ScalarType dtype = hidden.scalar_type();

  // Bucket the (token, slot) pairs by expert (counting sort, token order kept inside a bucket);
  // position[j] is where slot j's row lands, -1 for skipped slots.
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor w_c = weights.contiguous();
  const int32_t* id = ids_c.data_ptr<int32_t>();
  const float* w = w_c.data_ptr<float>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t j = 0; j < T * K; ++j) {
    ALLOCMOE_CHECK(id[j] >= -1 && id[j] < E, "allocmoe.experts: ids[", j / K, ", ", j % K, "] = ", id[j],
                " is out of range [-1, E=", E, ")");
    if (id[j] >= 0) ++start[id[j] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> token(start[E]);
  std::vector<int64_t> position(T * K, -1);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t j = 0; j < T * K; ++j) {
      if (id[j] < 0) continue;
      position[j] = fill[id[j]]++;
      token[position[j]] = j / K;
    }
  }

  // Expert outputs (before the gate weight), one fp32 row per kept pair, grouped by expert.
  // Experts run in parallel, each with single-threaded GEMMs over its own tokens: on a small
  // CPU this beats parallelising inside many tiny GEMMs, and the rows of different experts do
  // not overlap, so no synchronisation is needed.
  at::Tensor y_rows = at::empty({start[E], H}, hidden.options().dtype(at::kFloat));
  const at::Tensor hidden_f = hidden.to(at::kFloat);
  at::parallel_for(0, E, 1, [&](int64_t e_begin, int64_t e_end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_in_worker;
    for (int64_t e = e_begin; e < e_end; ++e) {
      const int64_t n = start[e + 1] - start[e];
      if (n == 0) continue;
      const at::Tensor rows = at::from_blob(token.data() + start[e], {n}, at::TensorOptions().dtype(at::kLong));
      // Inputs are exact in fp32, so fp32 GEMMs are "accumulate in fp32" for every input dtype.
      at::Tensor g = at::mm(hidden_f.index_select(0, rows), gate_up[e].to(at::kFloat).t());
      if (gate_up_bias.has_value()) g.add_((*gate_up_bias)[e].to(at::kFloat));
      // The intermediate is rounded to the input dtype, as a two-GEMM kernel stores it.
      const at::Tensor a = activate(g, activation, swiglu_alpha, swiglu_limit).to(dtype).to(at::kFloat);
      at::Tensor y = y_rows.narrow(0, start[e], n);
      at::mm_out(y, a, down[e].to(at::kFloat).t());
      if (down_bias.has_value()) y.add_((*down_bias)[e].to(at::kFloat));
    }
  });

  // Weighted sum over each token's kept slots in slot order, in fp32; one rounding at the end.
  at::Tensor out = at::zeros({T, H}, hidden.options().dtype(at::kFloat));
  const float* y = y_rows.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t pos = position[t * K + k];
        if (pos < 0) continue;
        const float wk = w[t * K + k];
        const float* yr = y + pos * H;
        float* orow = o + t * H;
        for (int64_t h = 0; h < H; ++h) orow[h] += wk * yr[h];
      }
    }
  });
  return out.to(dtype);
}

}  // namespace allocmoe

TORCH_LIBRARY_IMPL(allocmoe, CPU, m) { m.impl("experts", &allocmoe::experts_cpu); }
