// CUDA kernel of torch.ops.allocmoe.route (docs/OPS.md): scoring, per-token top-k and Alloc-T
// selection across all T tokens, bit-for-bit the same ids as the CPU op for the same scores.
//
// Three paths, chosen on the host from the shapes (never from the data: no sync):
// - warp (top_k <= 32, T <= kWarpMaxTokens): ONE launch, a warp per token with its candidates
//   in registers (route_token_per_warp, routing.cuh). One block up to 16 tokens; past that, on
//   sm_90, the tokens are spread over a thread block cluster of up to 8 blocks of 8 warps (more
//   warps per block past T = 64): the blocks exchange the Alloc-T pool through distributed
//   shared memory and meet at one cluster barrier, then each finds the cut on its copy and
//   writes its rows. Without a cut (budget == top_k or == k_base, or T == 1) no barrier at all.
// - block (top_k > 32, small T): ONE launch of one block (route_block_body): candidates in
//   shared memory, warps loop over the tokens.
// - multi (the rest): score (a warp per token, candidates straight into the outputs, pool keys
//   into a workspace), then, only when the budget needs a cut, one block finds the cut and a
//   finalize kernel rewrites the rows; both are programmatic dependent launches on sm_90, so
//   they get scheduled while the grid before them drains. Without a cut the score kernel writes
//   the final rows itself: one launch, no workspace.
// ALLOCMOE_ROUTE_PATH=warp|block|multi forces a path where it applies (tests, measurements).
// No host sync; the only allocation besides the outputs is the multi path's workspace, from the
// caching allocator (graph-safe).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/arg_checks.h"
#include "common/env_choice.h"
#include "cuda/device_info.h"
#include "cuda/routing.cuh"
#include "validation.h"

namespace allocmoe::cuda {
namespace {

constexpr int kWarpMaxTokens = 256;       // warp path: at most 8 blocks x 32 warps
constexpr int kWarpAutoMaxTokens = 128;   // ... and chosen automatically up to here
constexpr int kBlockAutoMaxTokens = 16;   // block path (top_k > 32): one SM scores every token
constexpr int kMaxSmem = 48 * 1024;       // the default dynamic shared-memory limit
constexpr int kScoreWarps = 8;            // multi path: warps (tokens) per block of the score kernel

template <int V, typename in_t>
__global__ void __launch_bounds__(1024) route_block_kernel(const in_t* __restrict__ logits, RouteArgs a,
                                                           float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ uint4 smem4[];
  route_block_body<V, 1>(logits, a, reinterpret_cast<uint32_t*>(smem4), ids, weights);
}

// Multi path, step 1: a warp per token. Candidates go into the outputs (p into weights); with
// pool == nullptr there is no cut and the warp writes the final row right away (cut mode).
template <int V, typename in_t>
__global__ void __launch_bounds__(kScoreWarps * 32) route_score_kernel(const in_t* __restrict__ logits, RouteArgs a,
                                                                       float* __restrict__ weights,
                                                                       int32_t* __restrict__ ids,
                                                                       uint32_t* __restrict__ pool, int mode) {
  extern __shared__ uint4 smem4[];
  allow_next_grid();  // the cut kernel may get scheduled now; it waits for this grid
  const int warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kScoreWarps + warp;
  if (t >= a.T) return;  // warp-uniform
  uint32_t* gscratch = reinterpret_cast<uint32_t*>(smem4) + warp * route_scratch_words(a.E, a.n_group);
  unsigned long long lo = ~0ull, hi = 0ull;
  score_warp<V, 1>(logits, t, a, gscratch, CandSink{weights, ids, pool}, lo, hi);
  if (pool == nullptr) {
    __syncwarp();
    finalize_rows_warp<true>(t, t + 1, a, AllocCut{0ull, mode}, weights, ids, nullptr, weights, ids);
  }
}

// Multi path, step 2: one block finds the cut over the pool keys in the workspace.
__global__ void __launch_bounds__(1024) route_cut_kernel(const uint32_t* __restrict__ pool, RouteArgs a,
                                                         unsigned long long* __restrict__ cut) {
  __shared__ __align__(16) uint32_t hist[3 * 256];
  __shared__ unsigned long long range[2 * 32];
  allow_next_grid();
  wait_for_previous_grid();
  const int pt = a.K - a.k_base, N = a.T * pt;
  // Range of all keys: token t's largest is its first pool entry, its smallest its last.
  unsigned long long lo = ~0ull, hi = 0ull;
  for (int t = threadIdx.x; t < a.T; t += blockDim.x) {
    hi = max(hi, alloc_key(pool[t * pt], static_cast<uint32_t>(t * pt)));
    lo = min(lo, alloc_key(pool[t * pt + pt - 1], static_cast<uint32_t>(t * pt + pt - 1)));
  }
  const AllocCut c = block_range_cut(pool, N, a.extra, hist, range, lo, hi);
  if (threadIdx.x == 0) cut[0] = c.thr;
}

// Multi path, step 3: a warp per 32 / route_rank_lanes(K) tokens rewrites the rows in place.
__global__ void __launch_bounds__(256) route_finalize_kernel(const uint32_t* __restrict__ pool,
                                                             const unsigned long long* __restrict__ cut, RouteArgs a,
                                                             float* __restrict__ weights, int32_t* __restrict__ ids) {
  wait_for_previous_grid();
  const int per = 32 / route_rank_lanes(a.K);
  const int t0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * per;
  if (t0 >= a.T) return;  // warp-uniform
  finalize_rows_warp<true>(t0, min(t0 + per, a.T), a, AllocCut{cut[0], 2}, weights, ids, pool, weights, ids);
}

// Thread block clusters need sm_90.
bool has_clusters(int device) { return device_info(device).major >= 9; }

enum class RoutePath { kAuto, kWarp, kBlock, kMulti };

RoutePath forced_path() {  // choices in the order of RoutePath
  return static_cast<RoutePath>(env_choice("allocmoe.route", "ALLOCMOE_ROUTE_PATH", {"auto", "warp", "block", "multi"}));
}

// Launches `kernel` on `grid` blocks forming one cluster (cluster > 1) or as a programmatic
// dependent launch (pdl), through cudaLaunchKernelEx; both are captured into CUDA graphs as such.
template <typename Kernel, typename... Args>
void launch_ex(Kernel kernel, int grid, int threads, size_t smem, cudaStream_t stream, int cluster, bool pdl,
               Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.numAttrs = 1;
  } else if (pdl) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.numAttrs = 1;
  }
  cfg.attrs = attr;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

template <int V, typename in_t>
void launch_route_v(const at::Tensor& logits, const RouteArgs& a, at::Tensor& weights, at::Tensor& ids,
                    cudaStream_t stream) {
  const in_t* lp = reinterpret_cast<const in_t*>(logits.data_ptr());
  float* wp = weights.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  const RoutePath forced = forced_path();
  const bool sm90 = has_clusters(logits.device().index());

  // Warp path: its launch shape (warp_path_warps_per_block, routing.cuh).
  const int wmax = sm90 ? kWarpMaxTokens : 32;
  const int nw = warp_path_warps_per_block(a.T, sm90);
  const int nb = (a.T + nw - 1) / nw;
  const size_t warp_smem = static_cast<size_t>(warp_path_smem_words(a, nw)) * 4;
  const bool warp_ok = a.K <= 32 && a.T <= wmax && warp_smem <= static_cast<size_t>(kMaxSmem);
  // Block path: one block of up to 32 warps.
  const int bw = std::min(32, a.T);
  const size_t block_smem = static_cast<size_t>(route_block_scratch_words(a.T, a.E, a.K, a.n_group, bw)) * 4;
  const bool block_ok = block_smem <= static_cast<size_t>(kMaxSmem);

  RoutePath path = RoutePath::kMulti;
  if (forced == RoutePath::kWarp && warp_ok) path = RoutePath::kWarp;
  else if (forced == RoutePath::kBlock && block_ok) path = RoutePath::kBlock;
  else if (forced == RoutePath::kAuto && warp_ok && a.T <= kWarpAutoMaxTokens) path = RoutePath::kWarp;
  else if (forced == RoutePath::kAuto && block_ok && a.T <= kBlockAutoMaxTokens) path = RoutePath::kBlock;

  if (path == RoutePath::kWarp) {
    if (nb > 1)
      launch_ex(route_warp_kernel<V, true, in_t>, nb, nw * 32, warp_smem, stream, nb, false, lp, a, wp, ip);
    else
      route_warp_kernel<V, false, in_t><<<1, nw * 32, warp_smem, stream>>>(lp, a, wp, ip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (path == RoutePath::kBlock) {
    route_block_kernel<V, in_t><<<1, bw * 32, block_smem, stream>>>(lp, a, wp, ip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const long long N = static_cast<long long>(a.T) * (a.K - a.k_base);
  const int mode = alloc_cut_mode(a.extra, N);
  const int score_blocks = (a.T + kScoreWarps - 1) / kScoreWarps;
  const size_t score_smem =
      (a.n_group > 1) ? static_cast<size_t>(kScoreWarps) * route_scratch_words(a.E, a.n_group) * 4 : 0;
  if (mode != 2) {
    route_score_kernel<V, in_t><<<score_blocks, kScoreWarps * 32, score_smem, stream>>>(lp, a, wp, ip, nullptr, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Workspace: pool keys [N], then the cut (8-byte aligned).
  at::Tensor ws = at::empty({N + 4}, logits.options().dtype(at::kInt));
  uint32_t* pool = reinterpret_cast<uint32_t*>(ws.data_ptr<int32_t>());
  unsigned long long* cut = reinterpret_cast<unsigned long long*>(pool + ((N + 1) & ~1ll));
  route_score_kernel<V, in_t><<<score_blocks, kScoreWarps * 32, score_smem, stream>>>(lp, a, wp, ip, pool, mode);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const uint32_t* cpool = pool;
  launch_ex(route_cut_kernel, 1, 1024, 0, stream, 1, sm90, cpool, a, cut);
  const int per = 32 / route_rank_lanes(a.K);
  const int rows_per_block = 8 * per;
  const unsigned long long* ccut = cut;
  launch_ex(route_finalize_kernel, (a.T + rows_per_block - 1) / rows_per_block, 256, 0, stream, 1, sm90, cpool, ccut,
            a, wp, ip);
}

template <typename in_t>
void launch_route(const at::Tensor& logits, const RouteArgs& a, at::Tensor& weights, at::Tensor& ids,
                  cudaStream_t stream) {
  switch (route_values_per_lane(a.E)) {
    case 1: launch_route_v<1, in_t>(logits, a, weights, ids, stream); break;
    case 2: launch_route_v<2, in_t>(logits, a, weights, ids, stream); break;
    case 4: launch_route_v<4, in_t>(logits, a, weights, ids, stream); break;
    default: launch_route_v<8, in_t>(logits, a, weights, ids, stream); break;
  }
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
