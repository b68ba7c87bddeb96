// CUDA kernel of torch.ops.allocmoe.route (docs/OPS.md): scoring, per-token top-k and Alloc-T
// selection across all T tokens, bit-for-bit the same ids as the CPU op for the same scores.
//
// Small calls (T <= 128 and T * top_k <= 4096: decode and small batches) run as ONE block in
// ONE launch: each warp scores tokens into shared memory, the block radix-selects the Alloc-T
// threshold, then writes the outputs. Larger calls use three launches: score (a warp per
// token, candidates into the outputs and a key workspace), one block for the threshold search,
// finalize (a thread per token). No host sync; the only allocation besides the outputs is the
// key workspace of the large path, from the caching allocator (graph-safe).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/arg_checks.h"
#include "cuda/routing.cuh"
#include "validation.h"

namespace allocmoe::cuda {
namespace {

constexpr int kSmallMaxTokens = 128;
constexpr int kSmallMaxSlots = 4096;
constexpr int kSmallMaxSmem = 46 * 1024;  // stay under the 48 KB default dynamic limit

template <typename in_t>
__global__ void __launch_bounds__(1024) route_small_kernel(const in_t* __restrict__ logits, RouteArgs a,
                                                           float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ uint32_t smem[];
  uint32_t* cand_key = smem;  // [T, K]
  uint32_t* scratch = smem + ((a.T * a.K + 3) & ~3);  // 16-byte aligned
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int words = route_scratch_words(a.E, a.n_group);
  // Candidates go straight into the outputs (ids, p in weights); finalize rewrites them.
  for (int t = warp; t < a.T; t += nwarps) {
    score_token_warp(logits + static_cast<long long>(t) * a.E, a, scratch + warp * words, ids + t * a.K,
                     weights + t * a.K, cand_key + t * a.K);
  }
  __syncthreads();
  const Threshold th = block_alloc_threshold(cand_key, a);
  for (int t = threadIdx.x; t < a.T; t += blockDim.x) finalize_token(t, a, cand_key, weights, ids, th, weights, ids);
}

template <typename in_t>
__global__ void __launch_bounds__(256) route_score_kernel(const in_t* __restrict__ logits, RouteArgs a,
                                                          float* __restrict__ weights, int32_t* __restrict__ ids,
                                                          uint32_t* __restrict__ cand_key) {
  extern __shared__ uint32_t smem[];
  const int warp = threadIdx.x >> 5;
  const int t = blockIdx.x * (blockDim.x >> 5) + warp;
  if (t >= a.T) return;  // warp-uniform
  uint32_t* scratch = smem + warp * route_scratch_words(a.E, a.n_group);
  score_token_warp(logits + static_cast<long long>(t) * a.E, a, scratch, ids + static_cast<long long>(t) * a.K,
                   weights + static_cast<long long>(t) * a.K, cand_key + static_cast<long long>(t) * a.K);
}

__global__ void __launch_bounds__(1024) route_threshold_kernel(const uint32_t* __restrict__ cand_key, RouteArgs a,
                                                               unsigned long long* __restrict__ out) {
  const Threshold th = block_alloc_threshold(cand_key, a);
  if (threadIdx.x == 0) {
    out[0] = th.thr;
    out[1] = static_cast<unsigned long long>(th.none);
  }
}

__global__ void route_finalize_kernel(const uint32_t* __restrict__ cand_key, const unsigned long long* __restrict__ thr,
                                      RouteArgs a, float* __restrict__ weights, int32_t* __restrict__ ids) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= a.T) return;
  const Threshold th{thr[0], static_cast<int>(thr[1])};
  finalize_token(t, a, cand_key, weights, ids, th, weights, ids);
}

template <typename in_t>
void launch_route(const at::Tensor& logits, const RouteArgs& a, at::Tensor& weights, at::Tensor& ids,
                  cudaStream_t stream) {
  const in_t* lp = reinterpret_cast<const in_t*>(logits.data_ptr());
  float* wp = weights.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  const int words = route_scratch_words(a.E, a.n_group);
  const long long slots = static_cast<long long>(a.T) * a.K;
  if (a.T <= kSmallMaxTokens && slots <= kSmallMaxSlots) {
    // Enough warps to score the tokens in one or two rounds, within the shared-memory budget.
    const int fixed = static_cast<int>((slots + 3) & ~3ll) * 4;
    int nwarps = std::min(32, std::max(1, (kSmallMaxSmem - fixed) / (words * 4)));
    nwarps = std::min(nwarps, std::max(4, a.T));
    const size_t smem = fixed + static_cast<size_t>(nwarps) * words * 4;
    route_small_kernel<in_t><<<1, nwarps * 32, smem, stream>>>(lp, a, wp, ip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor ws = at::empty({slots + 4}, logits.options().dtype(at::kInt));  // keys + threshold
  uint32_t* keys = reinterpret_cast<uint32_t*>(ws.data_ptr<int32_t>());
  unsigned long long* thr = reinterpret_cast<unsigned long long*>(keys + ((slots + 1) & ~1ll));
  constexpr int kWarps = 8;
  route_score_kernel<in_t><<<(a.T + kWarps - 1) / kWarps, kWarps * 32, kWarps * words * 4, stream>>>(lp, a, wp, ip,
                                                                                                    keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  route_threshold_kernel<<<1, 1024, 0, stream>>>(keys, a, thr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  route_finalize_kernel<<<(a.T + 255) / 256, 256, 0, stream>>>(keys, thr, a, wp, ip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

RouteArgs make_route_args(const at::Tensor& logits, int64_t top_k, double budget, int64_t k_base, Scoring scoring,
                          const at::Tensor& bias, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                          double routed_scaling_factor) {
  const int64_t T = logits.size(0), E = logits.size(1);
  ALLOCMOE_CHECK(T * top_k < (int64_t{1} << 31), "allocmoe.route: T * top_k = ", T * top_k, " is too large");
  const bool grouped = is_group_scoring(scoring);
  RouteArgs a{};
  a.T = static_cast<int>(T);
  a.E = static_cast<int>(E);
  a.K = static_cast<int>(top_k);
  a.k_base = static_cast<int>(k_base);
  a.scoring = scoring == Scoring::kSoftmax        ? kSoftmax
              : scoring == Scoring::kSoftmaxGroup ? kSoftmaxGroup
              : scoring == Scoring::kSigmoidGroup ? kSigmoidGroup
                                                  : kTopkSoftmax;
  a.n_group = grouped ? static_cast<int>(n_group) : 1;
  a.topk_group = grouped ? static_cast<int>(topk_group) : 1;
  a.renorm = (norm_topk_prob || scoring == Scoring::kTopkSoftmax) ? 1 : 0;
  a.scale = static_cast<float>(routed_scaling_factor);
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.extra = alloc_total_slots(budget, T, k_base, top_k) - k_base * T;
  return a;
}

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& router_logits, int64_t top_k, double budget,
                                              int64_t k_base, c10::string_view scoring_name,
                                              const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                                              int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor) {
  const Scoring scoring =
      check_route_args(router_logits, top_k, budget, k_base, std::string_view(scoring_name.data(), scoring_name.size()),
                       correction_bias, n_group, topk_group);
  ALLOCMOE_CHECK(router_logits.size(1) <= 256, "allocmoe.route: router_logits has E=", router_logits.size(1),
              " experts; the CUDA kernel supports E <= 256");
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const int64_t T = router_logits.size(0);
  const at::Tensor logits = router_logits.contiguous();
  const at::Tensor bias = correction_bias.has_value() ? correction_bias->contiguous() : at::Tensor();
  if (validation_enabled()) {
    ALLOCMOE_CHECK(at::isfinite(logits).all().item<bool>(), "allocmoe.route: router_logits contains NaN or Inf");
    if (bias.defined())
      ALLOCMOE_CHECK(at::isfinite(bias).all().item<bool>(), "allocmoe.route: correction_bias contains NaN or Inf");
  }
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};
  const RouteArgs a = make_route_args(logits, top_k, budget, k_base, scoring, bias, n_group, topk_group,
                                      norm_topk_prob, routed_scaling_factor);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (logits.scalar_type()) {
    case at::kFloat: launch_route<float>(logits, a, weights, ids, stream); break;
    case at::kBFloat16: launch_route<__nv_bfloat16>(logits, a, weights, ids, stream); break;
    case at::kHalf: launch_route<__half>(logits, a, weights, ids, stream); break;
    default: ALLOCMOE_CHECK(false, "allocmoe.route: unsupported router_logits dtype ", logits.scalar_type());
  }
  return {weights, ids};
}

}  // namespace allocmoe::cuda

TORCH_LIBRARY_IMPL(allocmoe, CUDA, m) { m.impl("route", &allocmoe::cuda::route_cuda); }
