// Device-side routing pieces shared by the CUDA `route` op (route.cu) and the fused decode
// `moe` op (moe_decode.cu): scoring one token with one warp, the Alloc-T threshold search over
// all tokens' extra candidates with one block, and writing a token's kept slots.
//
// Ordering rules are those of docs/OPS.md and they are made exact with integer keys:
// - a selection score c becomes ordered_bits(c), an unsigned int that compares like the float
//   (with -0 folded into +0, so equal floats give equal keys);
// - per-token candidates: rank of expert e = number of experts with a larger key, or an equal
//   key and a lower id (ties to the lower id);
// - Alloc-T: the pool entry j = (token t, rank r >= k_base) in (token, rank) order gets the
//   64-bit key (ordered_bits(c) << 32) | ~j, unique, and larger means "kept first" (ties to the
//   lower token, then the lower rank). Keeping the `extra` largest keys is keeping every key
//   >= the extra-th largest one, which a radix select over the 8 bytes of the key finds.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace allocmoe::cuda {

constexpr int kMaxExpertsCuda = 256;  // E <= 256: each lane of a warp holds at most 8 logits

enum ScoringCode : int { kSoftmax = 0, kSoftmaxGroup = 1, kSigmoidGroup = 2, kTopkSoftmax = 3 };

// Everything the device needs to route T tokens (host fills it after checking the arguments).
struct RouteArgs {
  int T, E, K, k_base;
  int scoring;
  int n_group, topk_group;
  int renorm;       // renormalise kept weights (norm_topk_prob or topk_softmax)
  float scale;      // routed_scaling_factor
  const float* bias;  // correction_bias [E] or nullptr
  long long extra;  // Alloc-T slots beyond k_base per token: n_total - k_base * T
};

// Per-warp scratch words that score_token_warp needs (keys padded to a multiple of 4, groups).
// A multiple of 4 words, so every warp's keys start 16-byte aligned (they are read as uint4).
__host__ __device__ inline int route_scratch_words(int E, int n_group) { return ((E + 3) & ~3) + ((n_group + 3) & ~3); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Unsigned key that orders like the float (NaN lands at an end, never a crash).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;  // -0 == +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Scores one token (its E logits at `row`) with the calling warp and writes its K candidates,
// sorted, to cand_id / cand_p / cand_key [K] (any address space). `scratch` is this warp's
// route_scratch_words(E, n_group) words of shared memory. All 32 lanes must call it.
template <typename in_t>
__device__ void score_token_warp(const in_t* row, const RouteArgs& a, uint32_t* scratch, int32_t* cand_id,
                                 float* cand_p, uint32_t* cand_key) {
  const int lane = threadIdx.x & 31;
  const int E = a.E, E4 = (E + 3) & ~3;
  uint32_t* key_s = scratch;       // [E4]: first c as float bits, then the expert keys
  uint32_t* grp_s = scratch + E4;  // [n_group]: group keys, then eligibility flags
  float v[8], p[8], c[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? to_float(row[e]) : 0.0f;
  }
  if (a.scoring == kSigmoidGroup) {
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = 1.0f / (1.0f + expf(-v[j]));
  } else {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (lane + 32 * j < E) m = fmaxf(m, v[j]);
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      p[j] = lane + 32 * j < E ? expf(v[j] - m) : 0.0f;
      s += p[j];
    }
    s = warp_sum(s);
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = p[j] / s;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int e = lane + 32 * j;
    c[j] = p[j];
    if (a.scoring == kSigmoidGroup && a.bias != nullptr && e < E) c[j] = p[j] + a.bias[e];
  }
  const bool grouped = a.scoring == kSoftmaxGroup || a.scoring == kSigmoidGroup;
  if (grouped) {
    for (int j = 0; j < 8; ++j) {
      const int e = lane + 32 * j;
      if (e < E) key_s[e] = __float_as_uint(c[j]);
    }
    __syncwarp();
    const int gsize = E / a.n_group;
    for (int g = lane; g < a.n_group; g += 32) {
      const float* cg = reinterpret_cast<const float*>(key_s) + g * gsize;
      float best = cg[0], second = -INFINITY;
      for (int i = 1; i < gsize; ++i) {
        if (cg[i] > best) {
          second = best;
          best = cg[i];
        } else if (cg[i] > second) {
          second = cg[i];
        }
      }
      const float score = (a.scoring == kSigmoidGroup && gsize >= 2) ? best + second : best;
      grp_s[g] = ordered_bits(score);
    }
    __syncwarp();
    uint32_t elig = 0;  // bit j: group lane + 32 j is among the topk_group best
    for (int g = lane, j = 0; g < a.n_group; g += 32, ++j) {
      const uint32_t kg = grp_s[g];
      int rank = 0;
      for (int g2 = 0; g2 < a.n_group; ++g2) {
        const uint32_t k2 = grp_s[g2];
        rank += (k2 > kg) || (k2 == kg && g2 < g);
      }
      if (rank < a.topk_group) elig |= 1u << j;
    }
    __syncwarp();
    for (int g = lane, j = 0; g < a.n_group; g += 32, ++j) grp_s[g] = (elig >> j) & 1u;
    __syncwarp();
  }
  uint32_t key[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int e = lane + 32 * j;
    const bool ok = e < E && (!grouped || grp_s[e / (E / a.n_group)] != 0u);
    key[j] = ok ? max(ordered_bits(c[j]), 1u) : 0u;  // 0: ineligible, below every eligible key
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int e = lane + 32 * j;
    if (e < E4) key_s[e] = e < E ? key[j] : 0u;  // padding keys (id >= E) never outrank anything
  }
  __syncwarp();
  const uint4* key4 = reinterpret_cast<const uint4*>(key_s);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int e = lane + 32 * j;
    if (e >= E) continue;
    const uint32_t k = key[j];
    int rank = 0;
    for (int q = 0; q < E4 / 4; ++q) {
      const uint4 kk = key4[q];
      const int b = 4 * q;
      rank += (kk.x > k) || (kk.x == k && b < e);
      rank += (kk.y > k) || (kk.y == k && b + 1 < e);
      rank += (kk.z > k) || (kk.z == k && b + 2 < e);
      rank += (kk.w > k) || (kk.w == k && b + 3 < e);
    }
    if (rank < a.K) {
      cand_id[rank] = e;
      cand_p[rank] = p[j];
      cand_key[rank] = k;
    }
  }
  __syncwarp();
}

// Result of the Alloc-T threshold search: keep pool entry j iff !none && key(j) >= thr.
struct Threshold {
  unsigned long long thr;
  int none;
};

__device__ __forceinline__ unsigned long long pool_key(const uint32_t* cand_key, int K, int k_base, int per_token,
                                                       unsigned int j) {
  const unsigned int t = j / per_token, r = k_base + (j - t * per_token);
  return (static_cast<unsigned long long>(cand_key[t * K + r]) << 32) | static_cast<unsigned long long>(~j);
}

// Finds the Alloc-T threshold over the pool of a.T * (K - k_base) extra candidates with the
// calling block (any blockDim that is a multiple of 32). cand_key [T, K] may be in shared or
// global memory; it must be complete and visible to the block on entry.
__device__ inline Threshold block_alloc_threshold(const uint32_t* cand_key, const RouteArgs& a) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long s_prefix;
  __shared__ long long s_need;
  __shared__ int s_done;
  const int per_token = a.K - a.k_base;
  const long long pool = static_cast<long long>(a.T) * per_token;
  if (a.extra <= 0) return Threshold{0ull, 1};
  if (a.extra >= pool) return Threshold{0ull, 0};
  if (threadIdx.x == 0) {
    s_prefix = 0ull;
    s_need = a.extra;
    s_done = 0;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    const unsigned long long prefix = s_prefix;
    for (long long j = threadIdx.x; j < pool; j += blockDim.x) {
      const unsigned long long k = pool_key(cand_key, a.K, a.k_base, per_token, static_cast<unsigned int>(j));
      if (shift == 56 || ((k ^ prefix) >> (shift + 8)) == 0ull) atomicAdd(&hist[(k >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l holds digits 255-8l .. 248-8l (descending), so an exclusive scan over lanes gives
      // the count of keys in larger digits.
      const int lane = threadIdx.x;
      unsigned int h[8], local = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        h[j] = hist[255 - 8 * lane - j];
        local += h[j];
      }
      unsigned int incl = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      long long above = incl - local;
      const long long need = s_need;
      __syncwarp();  // every lane has read s_need before one lane rewrites it
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (above < need && need <= above + h[j]) {
          const unsigned int digit = 255 - 8 * lane - j;
          s_prefix = prefix | (static_cast<unsigned long long>(digit) << shift);
          s_need = need - above;
          s_done = (need - above) == static_cast<long long>(h[j]);
        }
        above += h[j];
      }
    }
    __syncthreads();
    if (s_done) break;
  }
  const Threshold th{s_prefix, 0};
  __syncthreads();  // every thread has read the shared state before a later call rewrites it
  return th;
}

// Writes token t's kept slots: ids[t, :n_t] and their weights, ids -1 / weight 0 after.
// cand_p / cand_id hold the candidates on entry and may alias weights_out / ids_out.
__device__ __forceinline__ void finalize_token(int t, const RouteArgs& a, const uint32_t* cand_key,
                                               const float* cand_p, const int32_t* cand_id, Threshold th,
                                               float* weights_out, int32_t* ids_out) {
  const int K = a.K, per_token = K - a.k_base;
  int n = a.k_base;
  if (!th.none) {
    for (int r = a.k_base; r < K; ++r) {
      const unsigned int j = static_cast<unsigned int>(t) * per_token + (r - a.k_base);
      if (pool_key(cand_key, K, a.k_base, per_token, j) >= th.thr) ++n;
      else break;  // a token's candidates are sorted: the kept ones are a prefix
    }
  }
  float denom = 1.0f;
  if (a.renorm && n > 0) {
    denom = 0.0f;
    for (int r = 0; r < n; ++r) denom += cand_p[t * K + r];
  }
  for (int r = 0; r < K; ++r) {
    const float p = cand_p[t * K + r];
    const int32_t id = cand_id[t * K + r];
    weights_out[t * K + r] = r < n ? p / denom * a.scale : 0.0f;
    ids_out[t * K + r] = r < n ? id : -1;
  }
}

// ---- block-level entry point (used by the fused decode kernel) ------------------------------
// Shared-memory words route_block needs: candidate keys [T, K] (padded to 4 words) and the
// per-warp scoring scratch. A multiple of 4 words, so it can be placed 16-byte aligned.
__host__ __device__ inline int route_block_scratch_words(int T, int E, int K, int n_group, int nwarps) {
  return ((T * K + 3) & ~3) + nwarps * route_scratch_words(E, n_group);
}

// Routes the T = a.T tokens whose fp32 logits (row-major [T, a.E]) are at `logits` (shared or
// global memory) with the calling block; every thread must call it. On return (after a
// __syncthreads inside) ids[t * a.K + r] / weights[...] hold exactly what the route op writes.
// `scratch`: route_block_scratch_words(a.T, a.E, a.K, a.n_group, blockDim.x / 32) words of
// 16-byte-aligned shared memory. Any blockDim that is a multiple of 32 (<= 1024).
__device__ inline void route_block(const float* logits, const RouteArgs& a, uint32_t* scratch, int32_t* ids,
                                   float* weights) {
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint32_t* cand_key = scratch;
  uint32_t* warp_scratch = scratch + ((a.T * a.K + 3) & ~3);
  const int words = route_scratch_words(a.E, a.n_group);
  for (int t = warp; t < a.T; t += nwarps)
    score_token_warp(logits + static_cast<long long>(t) * a.E, a, warp_scratch + warp * words, ids + t * a.K,
                     weights + t * a.K, cand_key + t * a.K);
  __syncthreads();
  const Threshold th = block_alloc_threshold(cand_key, a);
  for (int t = threadIdx.x; t < a.T; t += blockDim.x) finalize_token(t, a, cand_key, weights, ids, th, weights, ids);
  __syncthreads();
}

}  // namespace allocmoe::cuda
