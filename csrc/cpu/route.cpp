// CPU kernel of torch.ops.allocmoe.route: scoring, per-token candidates and Alloc-T budgeted
// selection across all T tokens, exactly as docs/OPS.md specifies (tests/reference.py is the
// executable form of that page and the tests compare this kernel against it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/arg_checks.h"

namespace allocmoe {
namespace {

// Per-token candidates: for each of the T tokens, its top_k eligible experts sorted by selection
// score c descending (ties to the lower expert id), with their gate probability p.
struct Candidates {
  int64_t top_k;
  std::vector<int32_t> id;  // [T * top_k]
  std::vector<float> c;     // [T * top_k]
  std::vector<float> p;     // [T * top_k]
};

// Strict "better than" order on (score, index): larger score first, then lower index.
inline bool better(float score_a, int64_t a, float score_b, int64_t b) {
  return score_a > score_b || (score_a == score_b && a < b);
}

// Fills p and c (fp32, length E) for one row of logits.
void score_row(const float* logits, int64_t E, Scoring scoring, const float* bias, float* p, float* c) {
  if (scoring == Scoring::kSigmoidGroup) {
    for (int64_t e = 0; e < E; ++e) {
      p[e] = 1.0f / (1.0f + std::exp(-logits[e]));
      c[e] = bias != nullptr ? p[e] + bias[e] : p[e];
    }
    return;
  }
  float mx = logits[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[e]);
  // The denominator does not depend on the order of the experts (docs/OPS.md): every exp, in
  // [0, 1], is cut into its first 20 and next 20 bits after the point and the pieces are summed
  // as integers, as the CUDA kernels do (csrc/cuda/routing.cuh). A row and any permutation of it
  // get the same probabilities, so equal scores across tokens stay equal (an fp32 running sum
  // made such ties depend on the order, and a vectorised softmax on the machine).
  uint64_t hi = 0, lo = 0;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(logits[e] - mx);
    const float x = p[e] * 1048576.0f;  // 2^20: exact
    const float h = std::trunc(x);
    hi += static_cast<uint64_t>(h);
    lo += static_cast<uint64_t>((x - h) * 1048576.0f);  // exact fraction, truncated at 2^-40
  }
  const float sum = static_cast<float>(static_cast<double>(hi) * 0x1p-20 + static_cast<double>(lo) * 0x1p-40);
  for (int64_t e = 0; e < E; ++e) {
    p[e] /= sum;
    c[e] = p[e];
  }
}

// Marks in `eligible` (length E) the experts of the topk_group best groups. Group score: max of c
// (softmax_group) or sum of the top-2 c (sigmoid_group; the top-1 if a group has one expert).
// Group ties go to the lower group index.
void select_groups(const float* c, int64_t E, Scoring scoring, int64_t n_group, int64_t topk_group,
                   std::vector<float>& group_score, std::vector<int64_t>& group_order, std::vector<uint8_t>& eligible) {
  const int64_t size = E / n_group;
  for (int64_t g = 0; g < n_group; ++g) {
    const float* cg = c + g * size;
    float best = cg[0], second = -INFINITY;
    for (int64_t i = 1; i < size; ++i) {
      if (cg[i] > best) {
        second = best;
        best = cg[i];
      } else if (cg[i] > second) {
        second = cg[i];
      }
    }
    group_score[g] = (scoring == Scoring::kSigmoidGroup && size >= 2) ? best + second : best;
  }
  std::iota(group_order.begin(), group_order.end(), int64_t{0});
  std::partial_sort(group_order.begin(), group_order.begin() + topk_group, group_order.end(),
                    [&](int64_t a, int64_t b) { return better(group_score[a], a, group_score[b], b); });
  std::fill(eligible.begin(), eligible.end(), uint8_t{0});
  for (int64_t j = 0; j < topk_group; ++j) {
    std::fill(eligible.begin() + group_order[j] * size, eligible.begin() + (group_order[j] + 1) * size, uint8_t{1});
  }
}

Candidates make_candidates(const at::Tensor& logits_f32, int64_t top_k, Scoring scoring, const float* bias,
                           int64_t n_group, int64_t topk_group) {
  const int64_t T = logits_f32.size(0), E = logits_f32.size(1);
  Candidates cand{top_k, std::vector<int32_t>(T * top_k), std::vector<float>(T * top_k), std::vector<float>(T * top_k)};
  const float* logits = logits_f32.data_ptr<float>();
  const bool grouped = is_group_scoring(scoring);
  // Grain: a few hundred tokens per task so tiny calls stay single-threaded.
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> p(E), c(E), group_score(grouped ? n_group : 0);
    std::vector<int64_t> group_order(grouped ? n_group : 0);
    std::vector<uint8_t> eligible(E, uint8_t{1});
    for (int64_t t = begin; t < end; ++t) {
      score_row(logits + t * E, E, scoring, bias, p.data(), c.data());
      if (grouped) select_groups(c.data(), E, scoring, n_group, topk_group, group_score, group_order, eligible);
      // Insertion into a sorted top_k list: one pass over E, cheaper than sorting for small top_k.
      int32_t* top_id = cand.id.data() + t * top_k;
      float* top_c = cand.c.data() + t * top_k;
      int64_t filled = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (!eligible[e]) continue;
        // Scanning e in increasing order, "better" reduces to a strict > against kept entries.
        if (filled == top_k && !(c[e] > top_c[top_k - 1])) continue;
        int64_t pos = filled < top_k ? filled++ : top_k - 1;
        while (pos > 0 && c[e] > top_c[pos - 1]) {
          top_c[pos] = top_c[pos - 1];
          top_id[pos] = top_id[pos - 1];
          --pos;
        }
        top_c[pos] = c[e];
        top_id[pos] = static_cast<int32_t>(e);
      }
      for (int64_t r = 0; r < top_k; ++r) cand.p[t * top_k + r] = p[top_id[r]];
    }
  });
  return cand;
}

// Alloc-T: how many slots each token keeps. Every token keeps its ranks < k_base; the other
// n_total - k_base*T slots go to the candidates of rank >= k_base with the largest c over all
// tokens, ties to the lower token, then the lower rank. Since a row's candidates are sorted by
// c (ties to the lower rank), the kept slots of every row form a prefix; we return its length.
std::vector<int64_t> alloc_t_counts(const Candidates& cand, int64_t T, int64_t k_base, int64_t n_total) {
  const int64_t top_k = cand.top_k, per_token = top_k - k_base;
  const int64_t pool = T * per_token, extra = n_total - k_base * T;
  std::vector<int64_t> kept(T, k_base);
  if (extra >= pool) {
    std::fill(kept.begin(), kept.end(), top_k);
    return kept;
  }
  if (extra <= 0) return kept;
  // Pool entry j is token j / per_token, rank k_base + j % per_token; index order is (token, rank)
  // order, so "lower index" is exactly the documented tie-break.
  const auto score = [&](int64_t j) { return cand.c[(j / per_token) * top_k + k_base + j % per_token]; };
  std::vector<int64_t> entries(pool);
  std::iota(entries.begin(), entries.end(), int64_t{0});
  std::nth_element(entries.begin(), entries.begin() + (extra - 1), entries.end(),
                   [&](int64_t a, int64_t b) { return better(score(a), a, score(b), b); });
  for (int64_t i = 0; i < extra; ++i) ++kept[entries[i] / per_token];
  return kept;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& router_logits, int64_t top_k, double budget,
                                             int64_t k_base, c10::string_view scoring_name,
                                             const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                                             int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor) {
  const Scoring scoring = check_route_args(router_logits, top_k, budget, k_base,
                                           std::string_view(scoring_name.data(), scoring_name.size()),
                                           correction_bias, n_group, topk_group);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inference op: record no history
  const int64_t T = router_logits.size(0);
  const at::Tensor logits = router_logits.to(at::kFloat).contiguous();
  ALLOCMOE_CHECK(at::isfinite(logits).all().item<bool>(), "allocmoe.route: router_logits contains NaN or Inf");
  at::Tensor bias;
  if (correction_bias.has_value()) {
    bias = correction_bias->contiguous();
    ALLOCMOE_CHECK(at::isfinite(bias).all().item<bool>(), "allocmoe.route: correction_bias contains NaN or Inf");
  }

  at::Tensor weights = at::zeros({T, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::full({T, top_k}, -1, router_logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};

  const Candidates cand = make_candidates(logits, top_k, scoring, bias.defined() ? bias.data_ptr<float>() : nullptr,
                                          n_group, topk_group);
  const std::vector<int64_t> kept = alloc_t_counts(cand, T, k_base, alloc_total_slots(budget, T, k_base, top_k));

  // Weights: p of the kept slots, renormalised over them where the model renormalises (GPT-OSS's
  // softmax over the selected logits is exactly that), then scaled.
  const bool renormalise = norm_topk_prob || scoring == Scoring::kTopkSoftmax;
  const float scale = static_cast<float>(routed_scaling_factor);
  float* w = weights.data_ptr<float>();
  int32_t* out_ids = ids.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = kept[t], row = t * top_k;
    float denom = 1.0f;
    if (renormalise && n > 0) {
      denom = 0.0f;
      for (int64_t r = 0; r < n; ++r) denom += cand.p[row + r];
    }
    for (int64_t r = 0; r < n; ++r) {
      out_ids[row + r] = cand.id[row + r];
      w[row + r] = cand.p[row + r] / denom * scale;
    }
  }
  return {weights, ids};
}

}  // namespace allocmoe

TORCH_LIBRARY_IMPL(allocmoe, CPU, m) { m.impl("route", &allocmoe::route_cpu); }
