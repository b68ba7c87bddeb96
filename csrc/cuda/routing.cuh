// Device-side routing shared by the CUDA `route` op (route.cu) and the fused decode `moe` op:
// scoring tokens with one warp each (values in registers), the Alloc-T cut over all tokens'
// extra candidates with one block, and writing each token's kept slots. `route_block` (bottom)
// is the whole op for one block; route.cu also runs the pieces as separate kernels for large T.
//
// Ordering rules are those of docs/OPS.md and they are made exact with integer keys:
// - a selection score c becomes ordered_bits(c), an unsigned int that compares like the float
//   (with -0 folded into +0, so equal floats give equal keys);
// - per-token top-k: K rounds of a warp arg-max; a round takes the largest key
//   (__reduce_max_sync) and, among the experts holding it, the lowest id (__reduce_min_sync), so
//   ties go to the lower id, as on the CPU;
// - Alloc-T: the pool entry j = (token t, rank r >= k_base) in (token, rank) order gets the
//   64-bit key (ordered_bits(c) << 32) | ~j, unique, and larger means "kept first" (ties to the
//   lower token, then the lower rank). Keeping the `extra` largest keys is keeping every key
//   >= the extra-th largest one, which a radix select finds (block_alloc_cut), or keeping every
//   key with fewer than `extra` larger ones, which a warp counts for its own token
//   (warp_keep_by_rank, the warp path's small pools).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mbarrier.cuh"
#include "pdl.cuh"
#include "trace_stamp.cuh"

namespace allocmoe::cuda {

// Timing hooks for bench/route_kernel_harness.cu only (never defined in the library build).
#ifdef ALLOCMOE_ROUTE_TRACE
__device__ unsigned long long g_route_trace[5 * 64];  // an array, not a pointer: no load before a stamp
#define ROUTE_TRACE(ev) trace_stamp(g_route_trace + (ev) * 64 + blockIdx.x)
#else
#define ROUTE_TRACE(ev) ((void)0)
#endif

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

// Per-warp scratch words of the group selection (c of every expert, then the groups), padded to
// a multiple of 4 so that consecutive warps' scratch stays 16-byte aligned.
__host__ __device__ inline int route_scratch_words(int E, int n_group) { return ((E + 3) & ~3) + ((n_group + 3) & ~3); }

// Logits per lane when a warp holds a token's E logits in registers (lane l: experts l + 32 j).
__host__ __device__ constexpr int route_values_per_lane(int E) { return E <= 32 ? 1 : E <= 64 ? 2 : E <= 128 ? 4 : 8; }

// Finalize handles a token with a segment of S = min(32, next power of two >= K) lanes, so a
// warp does 32 / S tokens at a time (4 for top_k = 6).
__host__ __device__ inline int route_rank_lanes(int K) {
  int s = 1;
  while (s < K && s < 32) s <<= 1;
  return s;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Unsigned key that orders like the float (NaN lands at an end, never a crash).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;  // -0 == +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
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

// The Alloc-T key of pool entry j whose selection score has ordered bits c_key.
__device__ __forceinline__ unsigned long long alloc_key(uint32_t c_key, uint32_t j) {
  return (static_cast<unsigned long long>(c_key) << 32) | static_cast<unsigned long long>(~j);
}

// Smallest lo and largest hi over the warp (every lane gets both), 64 bits through 32-bit redux.
__device__ __forceinline__ void warp_key_range(unsigned long long& lo, unsigned long long& hi) {
  const uint32_t hh = static_cast<uint32_t>(hi >> 32), lh = static_cast<uint32_t>(lo >> 32);
  const uint32_t mh = __reduce_max_sync(0xffffffffu, hh), nh = __reduce_min_sync(0xffffffffu, lh);
  const uint32_t ml = __reduce_max_sync(0xffffffffu, hh == mh ? static_cast<uint32_t>(hi) : 0u);
  const uint32_t nl = __reduce_min_sync(0xffffffffu, lh == nh ? static_cast<uint32_t>(lo) : 0xffffffffu);
  hi = (static_cast<unsigned long long>(mh) << 32) | ml;
  lo = (static_cast<unsigned long long>(nh) << 32) | nl;
}

// Where score_warp puts a token's candidates: p and id of rank r at [t * K + r] (every rank),
// the ordered c of ranks >= k_base at pool[t * (K - k_base) + r - k_base] (skipped if nullptr).
struct CandSink {
  float* p;
  int32_t* id;
  uint32_t* pool;
};

// Group-limited selection for one token (softmax_group / sigmoid_group with n_group > 1): zeroes
// the keys of the experts outside the topk_group best groups. `scratch` is this warp's
// route_scratch_words(E, n_group) words of shared memory.
template <int V>
__device__ __forceinline__ void group_filter(const float (&c)[V], uint32_t (&key)[V], const RouteArgs& a,
                                             uint32_t* scratch) {
  const int lane = threadIdx.x & 31;
  const int E = a.E, gsize = E / a.n_group;
  float* c_s = reinterpret_cast<float*>(scratch);  // [E]
  uint32_t* grp_s = scratch + ((E + 3) & ~3);      // [n_group]: group keys, then eligibility flags
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (lane + 32 * j < E) c_s[lane + 32 * j] = c[j];
  __syncwarp();
  for (int g = lane; g < a.n_group; g += 32) {
    const float* cg = c_s + g * gsize;
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
  uint32_t elig = 0;  // bit i: group lane + 32 i is among the topk_group best (ties to the lower group)
  for (int g = lane, i = 0; g < a.n_group; g += 32, ++i) {
    const uint32_t kg = grp_s[g];
    int rank = 0;
    for (int g2 = 0; g2 < a.n_group; ++g2) {
      const uint32_t k2 = grp_s[g2];
      rank += (k2 > kg) || (k2 == kg && g2 < g);
    }
    if (rank < a.topk_group) elig |= 1u << i;
  }
  __syncwarp();
  for (int g = lane, i = 0; g < a.n_group; g += 32, ++i) grp_s[g] = (elig >> i) & 1u;
  __syncwarp();
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = lane + 32 * j;
    if (e < E && grp_s[e / gsize] == 0u) key[j] = 0u;
  }
  __syncwarp();  // the next token may overwrite the scratch
}

// Scores of tokens t0 .. t0 + NT - 1 for the calling warp, in registers: p (the gate weight) and
// the selection key (ordered c; 0: padding or outside the chosen groups). Each lane holds V =
// route_values_per_lane(E) experts per token (lane + 32 j). The NT tokens go through every step
// together, so their reductions overlap. Tokens >= a.T are scored as zeros (never written).
// The softmax sum is exact to 2^-40 (two integer reductions of a fixed-point split, one rounding
// at the end): cheaper than a shuffle tree and independent of the summation order.
template <int V, int NT, typename in_t>
__device__ __forceinline__ void score_values(const in_t* __restrict__ logits, int t0, const RouteArgs& a,
                                             uint32_t* gscratch, float (&p)[NT][V], uint32_t (&key)[NT][V]) {
  const int lane = threadIdx.x & 31;
  const int E = a.E;
  const bool has_bias = a.scoring == kSigmoidGroup && a.bias != nullptr;
  float v[NT][V], bias[V];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const bool tv = t0 + i < a.T;
    const in_t* row = logits + static_cast<long long>(t0 + i) * E;
#pragma unroll
    for (int j = 0; j < V; ++j) v[i][j] = (tv && lane + 32 * j < E) ? to_float(row[lane + 32 * j]) : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) bias[j] = (has_bias && lane + 32 * j < E) ? a.bias[lane + 32 * j] : 0.0f;

  if (a.scoring == kSigmoidGroup) {
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) p[i][j] = 1.0f / (1.0f + expf(-v[i][j]));
  } else {
    uint32_t hi[NT], lo[NT], nan[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      uint32_t mk = 0u;  // the exact float max, as an integer reduction
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (lane + 32 * j < E) mk = max(mk, ordered_bits(v[i][j]));
      const float m = from_ordered_bits(__reduce_max_sync(0xffffffffu, mk));
      hi[i] = lo[i] = nan[i] = 0u;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        p[i][j] = lane + 32 * j < E ? expf(v[i][j] - m) : 0.0f;  // in [0, 1]
        const float x = p[i][j] * 1048576.0f;                      // 2^20: exact
        const uint32_t h = __float2uint_rz(x);
        hi[i] += h;
        lo[i] += __float2uint_rz((x - static_cast<float>(h)) * 1048576.0f);  // the next 20 bits
        nan[i] |= p[i][j] != p[i][j];
      }
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      hi[i] = __reduce_add_sync(0xffffffffu, hi[i]);  // <= 256 * 2^20: no overflow
      lo[i] = __reduce_add_sync(0xffffffffu, lo[i]);
      nan[i] = __reduce_or_sync(0xffffffffu, nan[i]);
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const float s = nan[i] ? __uint_as_float(0x7fc00000u)
                             : static_cast<float>(static_cast<double>(hi[i]) * 0x1p-20 + static_cast<double>(lo[i]) * 0x1p-40);
#pragma unroll
      for (int j = 0; j < V; ++j) p[i][j] = p[i][j] / s;
    }
  }
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    float c[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      c[j] = has_bias ? p[i][j] + bias[j] : p[i][j];
      key[i][j] = lane + 32 * j < E ? max(ordered_bits(c[j]), 1u) : 0u;
    }
    if ((a.scoring == kSoftmaxGroup || a.scoring == kSigmoidGroup) && a.n_group > 1)
      group_filter<V>(c, key[i], a, gscratch);
  }
}

// One round of the per-token top-k: m = the largest key of the warp, id = the lowest expert id
// holding it (every lane gets both); bj / pb: this lane's best slot and its p (for the owner).
template <int V>
__device__ __forceinline__ void warp_argmax(const uint32_t (&key)[V], const float (&p)[V], uint32_t& m, uint32_t& id,
                                            int& bj, float& pb) {
  const int lane = threadIdx.x & 31;
  uint32_t best = key[0];
  bj = 0;
  pb = p[0];
#pragma unroll
  for (int j = 1; j < V; ++j)
    if (key[j] > best) {  // strict: the lower j (lower id) wins a tie within the lane
      best = key[j];
      bj = j;
      pb = p[j];
    }
  m = __reduce_max_sync(0xffffffffu, best);
  id = __reduce_min_sync(0xffffffffu, best == m ? static_cast<uint32_t>(lane + 32 * bj) : 0xffffffffu);
}

// Takes the winner (expert id, owned by lane id & 31 at slot bj) out of the lane's keys.
template <int V>
__device__ __forceinline__ void take_winner(uint32_t (&key)[V], uint32_t id, int bj) {
  if (static_cast<int>(id & 31u) == static_cast<int>(threadIdx.x & 31)) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j == bj) key[j] = 0u;
  }
}

// Scores tokens t0 .. t0 + NT - 1 (those < a.T) with the calling warp and writes their
// candidates to `out` (rank r of token t by the lane that owns the expert); widens [lo, hi] to
// the Alloc-T keys of the tokens' pool entries. All 32 lanes must call it.
template <int V, int NT, typename in_t>
__device__ __forceinline__ void score_warp(const in_t* __restrict__ logits, int t0, const RouteArgs& a,
                                           uint32_t* gscratch, CandSink out, unsigned long long& lo,
                                           unsigned long long& hi) {
  const int K = a.K, kb = a.k_base, pt = a.K - a.k_base;
  float p[NT][V];
  uint32_t key[NT][V];
  score_values<V, NT>(logits, t0, a, gscratch, p, key);
  for (int r = 0; r < K; ++r) {
    uint32_t m[NT], id[NT];
    int bj[NT];
    float pb[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) warp_argmax<V>(key[i], p[i], m[i], id[i], bj[i], pb[i]);
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int t = t0 + i;
      if (static_cast<int>(id[i] & 31u) == static_cast<int>(threadIdx.x & 31) && t < a.T) {
        out.p[t * K + r] = pb[i];
        out.id[t * K + r] = static_cast<int32_t>(id[i]);
        if (r >= kb && out.pool != nullptr) out.pool[t * pt + (r - kb)] = m[i];
      }
      take_winner<V>(key[i], id[i], bj[i]);
      // A token's pool keys decrease with the rank: rank k_base holds its largest, K-1 its smallest.
      if (t < a.T && r == kb) hi = max(hi, alloc_key(m[i], static_cast<uint32_t>(t * pt)));
      if (t < a.T && r == K - 1 && r >= kb) lo = min(lo, alloc_key(m[i], static_cast<uint32_t>(t * pt + pt - 1)));
    }
  }
}

// A token's candidates held by its warp: lane r < K holds rank r (K <= 32).
struct RankRegs {
  uint32_t key;  // ordered c
  int32_t id;
  float p;
};

// Scores token t (< a.T) with the calling warp; the candidates stay in registers.
template <int V, typename in_t>
__device__ __forceinline__ RankRegs score_token_regs(const in_t* __restrict__ logits, int t, const RouteArgs& a,
                                                     uint32_t* gscratch) {
  const int lane = threadIdx.x & 31;
  float p[1][V];
  uint32_t key[1][V];
  score_values<V, 1>(logits, t, a, gscratch, p, key);
  RankRegs rr{0u, -1, 0.0f};
  for (int r = 0; r < a.K; ++r) {
    uint32_t m, id;
    int bj;
    float pb;
    warp_argmax<V>(key[0], p[0], m, id, bj, pb);
    const float pr = __shfl_sync(0xffffffffu, pb, static_cast<int>(id & 31u));  // off the critical path
    take_winner<V>(key[0], id, bj);
    if (lane == r) rr = RankRegs{m, static_cast<int32_t>(id), pr};
  }
  return rr;
}

// Writes token t's row from registers: ids[t, :n] and their weights (renormalised over the kept
// slots if asked, in rank order as the CPU op sums, then scaled), -1 / 0 after.
__device__ __forceinline__ void finalize_token_regs(int t, int n, const RankRegs& rr, const RouteArgs& a,
                                                    float* weights, int32_t* ids) {
  const int lane = threadIdx.x & 31;
  float denom = 1.0f;
  if (a.renorm && n > 0) {
    denom = 0.0f;
    for (int q = 0; q < n; ++q) denom += __shfl_sync(0xffffffffu, rr.p, q);
  }
  if (lane < a.K) {
    weights[t * a.K + lane] = lane < n ? rr.p / denom * a.scale : 0.0f;
    ids[t * a.K + lane] = lane < n ? rr.id : -1;
  }
}

// How many of a token's slots Alloc-T keeps: mode 0 = k_base (no extra slot), 1 = all K,
// 2 = k_base + its pool entries whose key is >= thr.
struct AllocCut {
  unsigned long long thr;
  int mode;
};

__host__ __device__ inline int alloc_cut_mode(long long extra, long long pool) {
  return extra <= 0 ? 0 : extra >= pool ? 1 : 2;
}

// Finds the Alloc-T cut over the N pool entries (keys built from pool[j], shared or global, all
// written and visible on entry) with the calling block: the `need`-th largest key, by a radix
// select whose digits start at the highest bit where the block's smallest and largest keys (lo,
// hi, the same in every thread) differ, so the first pass already spreads the keys (softmax
// scores share their leading bits) and the select usually ends after one or two passes, as soon
// as the digit that holds the need-th key is entirely kept. `hist`: 3 * 256 words of shared
// memory whose first 256 are zero on entry. Every warp reads the histogram and picks the digit
// itself, and the histograms rotate over three buffers (pass p counts into p % 3 and zeroes
// (p + 1) % 3, which nobody reads any more), so a pass costs one block barrier.
__device__ inline AllocCut block_alloc_cut(const uint32_t* pool, int N, long long need, uint32_t* hist,
                                           unsigned long long lo, unsigned long long hi) {
  if (need <= 0) return AllocCut{0ull, 0};
  if (need >= N) return AllocCut{0ull, 1};
  const int lane = threadIdx.x & 31;
  int fixed = 64 - __clzll(lo ^ hi);  // bits >= fixed are the same in every key (lo != hi: N >= 2)
  unsigned long long prefix = fixed >= 64 ? 0ull : (hi >> fixed) << fixed;
  int rem = static_cast<int>(need);
  const int bits = 32 - __clz(N);
  for (int pass = 0;; ++pass) {
    const int shift = fixed > 8 ? fixed - 8 : 0;
    uint32_t* h = hist + (pass % 3) * 256;
    uint32_t* hz = hist + ((pass + 1) % 3) * 256;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hz[i] = 0u;
    for (int j0 = threadIdx.x; j0 < N; j0 += 4 * blockDim.x) {
      uint32_t ck[4];  // four loads in flight (global pool of the large-T path)
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = j0 + u * static_cast<int>(blockDim.x);
        ck[u] = j < N ? pool[j] : 0u;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = j0 + u * static_cast<int>(blockDim.x);
        const unsigned long long k = alloc_key(ck[u], static_cast<uint32_t>(j));
        if (j < N && (fixed >= 64 || ((k ^ prefix) >> fixed) == 0ull))
          atomicAdd(&h[static_cast<uint32_t>(k >> shift) & 255u], 1u);
      }
    }
    __syncthreads();
    // Lane l holds digits 255-8l .. 248-8l (descending): the keys in larger digits are those of
    // the lanes below and of its own earlier digits.
    const uint4 lo4 = reinterpret_cast<const uint4*>(h)[62 - 2 * lane];  // digits 248-8l .. 251-8l
    const uint4 hi4 = reinterpret_cast<const uint4*>(h)[63 - 2 * lane];  // digits 252-8l .. 255-8l
    const uint32_t cnt[8] = {hi4.w, hi4.z, hi4.y, hi4.x, lo4.w, lo4.z, lo4.y, lo4.x};
    int local = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) local += static_cast<int>(cnt[j]);
    // Keys in the digits of the lanes below: a bit-sliced prefix count (independent ballots, no
    // chain of shuffles); local < 2^bits since no count exceeds N.
    const uint32_t below = (1u << lane) - 1u;
    int above = 0;
    for (int b = 0; b < bits; ++b) above += __popc(__ballot_sync(0xffffffffu, (local >> b) & 1) & below) << b;
    int found = -1, rem_in = 0, in_bin = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = static_cast<int>(cnt[j]);
      if (found < 0 && above < rem && rem <= above + c) {
        found = 255 - 8 * lane - j;
        rem_in = rem - above;
        in_bin = c;
      }
      above += c;
    }
    const int src = __ffs(__ballot_sync(0xffffffffu, found >= 0)) - 1;
    const int digit = __shfl_sync(0xffffffffu, found, src);
    rem = __shfl_sync(0xffffffffu, rem_in, src);
    const bool done = __shfl_sync(0xffffffffu, rem_in == in_bin, src);
    prefix |= static_cast<unsigned long long>(digit) << shift;
    fixed = shift;
    if (done || shift == 0) break;  // shift 0: keys are unique, the bin holds exactly the need-th
  }
  return AllocCut{prefix, 2};
}

// A warp path token with at most kRankMaxEntries pool entries, in a pool of at most
// kRankMaxPool, finds its Alloc-T keep count by ranks (warp_keep_by_rank) instead of the block's
// radix cut, which costs a block barrier per pass (two or three passes) after the pool is
// published. Measured on H100 (bench/route_kernel_harness.cu, DeepSeek-V2-Lite routing, a call
// in a graph): docs/KERNELS.md, "route: keep counts by rank".
constexpr int kRankMaxEntries = 8, kRankMaxPool = 1024;
__host__ __device__ inline bool rank_cut_fits(int pt, int N) { return pt <= kRankMaxEntries && N <= kRankMaxPool; }

// How many of one token's pt pool entries Alloc-T keeps, by the calling warp alone: entry r
// (ordered score in lane kb + r, pool index j0 + r) is kept iff fewer than `extra` pool keys are
// larger than its alloc_key. Each lane counts, for all of the token's entries at once, the
// larger keys among pool[lane], pool[lane + 32], ...; one warp sum per entry adds the lanes up.
// Keys are unique, so this keeps exactly the entries that the radix cut keeps; a token's
// entries are in decreasing key order, so the kept ones are its first ones.
template <int R>  // R >= pt entries in registers
__device__ __forceinline__ int warp_keep_by_rank_r(const uint32_t* pool, int N, long long extra, int j0, int pt,
                                                   uint32_t key, int kb) {
  const int lane = threadIdx.x & 31;
  unsigned long long own[R];
  uint32_t larger[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint32_t c = __shfl_sync(0xffffffffu, key, min(kb + r, 31));
    own[r] = r < pt ? alloc_key(c, static_cast<uint32_t>(j0 + r)) : ~0ull;  // ~0ull: no key is larger
    larger[r] = 0u;
  }
#pragma unroll 2
  for (int q = lane; q < N; q += 32) {
    const unsigned long long kq = alloc_key(pool[q], static_cast<uint32_t>(q));
#pragma unroll
    for (int r = 0; r < R; ++r) larger[r] += kq > own[r];
  }
  int kept = 0;
#pragma unroll
  for (int r = 0; r < R; ++r)
    kept += r < pt && static_cast<long long>(__reduce_add_sync(0xffffffffu, larger[r])) < extra;
  return kept;
}
__device__ __forceinline__ int warp_keep_by_rank(const uint32_t* pool, int N, long long extra, int j0, int pt,
                                                 uint32_t key, int kb) {
  if (pt <= 2) return warp_keep_by_rank_r<2>(pool, N, extra, j0, pt, key, kb);
  if (pt <= 4) return warp_keep_by_rank_r<4>(pool, N, extra, j0, pt, key, kb);
  if (pt <= 6) return warp_keep_by_rank_r<6>(pool, N, extra, j0, pt, key, kb);
  return warp_keep_by_rank_r<kRankMaxEntries>(pool, N, extra, j0, pt, key, kb);
}

// The Alloc-T cut for a whole block: the key range (lo, hi) of every thread (any split of the
// keys) is reduced over the block, then block_alloc_cut runs on pool[0, N). Every thread calls
// it; hist (3 * 256 words) and range (64 words) are shared scratch.
__device__ inline AllocCut block_range_cut(const uint32_t* pool, int N, long long need, uint32_t* hist,
                                           unsigned long long* range, unsigned long long lo, unsigned long long hi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_key_range(lo, hi);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
  if (lane == 0) {
    range[2 * warp] = lo;
    range[2 * warp + 1] = hi;
  }
  __syncthreads();
  lo = lane < nwarps ? range[2 * lane] : ~0ull;
  hi = lane < nwarps ? range[2 * lane + 1] : 0ull;
  warp_key_range(lo, hi);
  return block_alloc_cut(pool, N, need, hist, lo, hi);
}

// Writes the final slots of tokens t_begin .. t_end - 1 with the calling warp (a segment of
// route_rank_lanes(K) lanes per token): ids[t, :n] and their weights (renormalised over the kept
// slots if asked, then scaled), -1 / 0 after. cand_p / cand_id hold the candidates (any address
// space); with kInPlace they are the outputs themselves. pool is read only in cut mode 2.
template <bool kInPlace>
__device__ __forceinline__ void finalize_rows_warp(int t_begin, int t_end, const RouteArgs& a, AllocCut cut,
                                                   const float* cand_p, const int32_t* cand_id, const uint32_t* pool,
                                                   float* w_out, int32_t* id_out) {
  const int lane = threadIdx.x & 31;
  const int K = a.K, kb = a.k_base, pt = a.K - a.k_base;
  const int S = route_rank_lanes(K);
  const int seg = lane / S, rl = lane % S;
  const uint32_t segmask = S == 32 ? 0xffffffffu : ((1u << S) - 1u) << (seg * S);
  for (int tb = t_begin; tb < t_end; tb += 32 / S) {
    const int t = tb + seg;
    const bool tv = t < t_end;
    int n = cut.mode == 0 ? kb : K;
    if (cut.mode == 2) {
      int kept = 0;  // the kept pool entries of a token are a prefix of its ranks: count them
      for (int rb = 0; rb < K; rb += S) {
        const int r = rb + rl;
        bool keep = false;
        if (tv && r >= kb && r < K) {
          const int j = t * pt + (r - kb);
          keep = alloc_key(pool[j], static_cast<uint32_t>(j)) >= cut.thr;
        }
        kept += __popc(__ballot_sync(0xffffffffu, keep) & segmask);
      }
      n = kb + kept;
    }
    float denom = 1.0f;
    if (tv && a.renorm && n > 0) {
      denom = 0.0f;  // in rank order, as the CPU op sums
      for (int q = 0; q < n; ++q) denom += cand_p[t * K + q];
    }
    if (kInPlace) __syncwarp();  // every lane has read the row before any lane rewrites it
    for (int rb = 0; rb < K; rb += S) {
      const int r = rb + rl;
      if (tv && r < K) {
        const float pr = cand_p[t * K + r];
        const int32_t idr = cand_id[t * K + r];
        w_out[t * K + r] = r < n ? pr / denom * a.scale : 0.0f;
        id_out[t * K + r] = r < n ? idr : -1;
      }
    }
    if (kInPlace) __syncwarp();
  }
}

// ---- thread block clusters and programmatic dependent launch (sm_90; never run below) --------
// The cluster barrier is split: arrive (relaxed) then wait (acquire). All threads of every block
// of the cluster take part; `.aligned` needs the warp converged.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// ---- one warp per token: the fast path for small T --------------------------------------------
// Token t of the calling warp (t >= a.T: the warp only takes part in the barriers). The pool
// (ordered c of every token's ranks >= k_base, [a.T * (K - k_base)]), the histograms (3 x 256,
// 16-byte aligned) and the group scratch are this block's shared memory. With kCluster the
// tokens are spread over the blocks of a thread block cluster: each block scores its own
// tokens and stores their pool entries into every block's pool (distributed shared memory,
// st.async), each store completing its 4 bytes on the destination block's mbarrier `xbar`; a
// block waits for its own N * 4 bytes only (no second cluster barrier), then each warp decides
// its own token's entries on its block's copy (by rank, or with the block's radix cut past
// rank_cut_fits) and writes its rows. Without a cut (budget == top_k or == k_base, or T == 1)
// there is no barrier at all. `xbar`: an 8-byte-aligned shared word (kCluster only).
// Needs a.K <= 32 (a lane per rank).
template <int V, bool kCluster, typename in_t>
__device__ __forceinline__ void route_token_per_warp(const in_t* __restrict__ logits, const RouteArgs& a, int t,
                                                     uint32_t* hist, uint32_t* pool, uint32_t* gscratch,
                                                     int32_t* ids, float* weights, uint64_t* xbar = nullptr) {
  const int lane = threadIdx.x & 31;
  const int K = a.K, kb = a.k_base, pt = a.K - a.k_base;
  const int N = a.T * pt;
  const int mode = alloc_cut_mode(a.extra, N);
  const bool cut_needed = mode == 2 && a.T > 1;
  ROUTE_TRACE(0);
  const uint32_t bar = kCluster ? static_cast<uint32_t>(__cvta_generic_to_shared(xbar)) : 0u;
  if (kCluster && cut_needed) {
    if (threadIdx.x == 0) {
      mbar_init(bar, 1);
      mbar_init_fence();
    }
    cluster_arrive_relaxed();  // "this block has started and its xbar is set", waited on below
  }
  RankRegs rr{0u, -1, 0.0f};
  if (t < a.T) rr = score_token_regs<V>(logits, t, a, gscratch);
  ROUTE_TRACE(1);
  // One token (or no cut): its best `extra` pool entries are the extra slots.
  int n = mode == 0 ? kb : mode == 1 ? K : kb + static_cast<int>(a.extra);
  if (cut_needed) {
    const bool by_rank = rank_cut_fits(pt, N);
    if (!by_rank)
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    const bool mine = t < a.T && lane >= kb && lane < K;
    const int j = t * pt + lane - kb;
    if (kCluster) {
      cluster_wait();  // every block of the cluster runs and has set its xbar: it may be written
      // Remote stores may land before this (the phase cannot complete before this arrival).
      if (threadIdx.x == 0) mbar_arrive_expect_tx(bar, static_cast<uint32_t>(N) * 4u);
      if (mine) {
        const uint32_t nblocks = gridDim.x;  // the grid is one cluster
        const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(pool + j));
        for (uint32_t b = 0; b < nblocks; ++b) st_async_cluster_u32(dst, bar, b, rr.key);
      }
      // All N entries are here once their bytes are. A block never leaves before that, so no
      // store reaches a block that has left.
      mbar_wait<true>(bar, 0);
      if (!by_rank) __syncthreads();  // the zeroed histogram, before the radix cut counts into it
    } else {
      if (mine) pool[j] = rr.key;
      __syncthreads();
    }
    ROUTE_TRACE(2);
    if (by_rank) {
      if (t < a.T) n = kb + warp_keep_by_rank(pool, N, a.extra, t * pt, pt, rr.key, kb);
    } else {
      // Range of all keys: token t2's largest is its first pool entry, its smallest its last.
      unsigned long long lo = ~0ull, hi = 0ull;
      for (int t2 = lane; t2 < a.T; t2 += 32) {
        hi = max(hi, alloc_key(pool[t2 * pt], static_cast<uint32_t>(t2 * pt)));
        lo = min(lo, alloc_key(pool[t2 * pt + pt - 1], static_cast<uint32_t>(t2 * pt + pt - 1)));
      }
      warp_key_range(lo, hi);
      const AllocCut cut = block_alloc_cut(pool, N, a.extra, hist, lo, hi);
      n = kb + __popc(__ballot_sync(0xffffffffu, mine && alloc_key(rr.key, static_cast<uint32_t>(j)) >= cut.thr));
    }
    ROUTE_TRACE(3);
  }
  if (t < a.T) finalize_token_regs(t, n, rr, a, weights, ids);
  ROUTE_TRACE(4);
}

// The route op's warp path (route.cu) as a kernel: warp w of block b routes token b * warps + w.
// Shared memory: warp_path_smem_words. Launched alone (kCluster = false) or as one cluster.
//
// Warps per block: one block up to 16 tokens (and below sm_90, which has no clusters), then a
// cluster of blocks of 8 warps up to 64 tokens, then 8 blocks of more warps. Past 16 tokens,
// scoring on one SM costs more than the cluster's exchange (bench/route_kernel_harness.cu on
// H100, a call in a graph, top-6 of 64, budgets 2 to 4.5: T = 32 one block 6.0-6.2 us, a cluster
// of 4 x 8 4.5 before the st.async exchange, 3.03-3.06 with it). At T = 16 a cluster of 8 x 2
// routes faster alone (2.80 vs 3.01 us with a cut) but the layer bench showed no gain with it
// (bench/results/route_cluster_shape_h100_2026-11-24_session14.txt; docs/KERNELS.md, session 14).
__host__ __device__ inline int warp_path_warps_per_block(int T, bool clusters) {
  return T <= 16 || !clusters ? T : T <= 64 ? 8 : (T + 7) / 8;
}
// Shared words: histograms (3 x 256), the exchange's mbarrier (4 words, for alignment), the pool,
// the group scratch.
__host__ __device__ inline int warp_path_smem_words(const RouteArgs& a, int nwarps) {
  return 3 * 256 + 4 + ((a.T * (a.K - a.k_base) + 3) & ~3) + (a.n_group > 1 ? nwarps * route_scratch_words(a.E, a.n_group) : 0);
}

template <int V, bool kCluster, typename in_t>
__global__ void __launch_bounds__(1024) route_warp_kernel(const in_t* __restrict__ logits, RouteArgs a,
                                                          float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ uint4 smem4[];
  // A programmatic dependent launch after this one (the experts op's stream path) may get its
  // CTAs resident and set up now; it waits for this grid before it reads ids or weights.
  allow_next_grid();
  uint32_t* smem = reinterpret_cast<uint32_t*>(smem4);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint64_t* xbar = reinterpret_cast<uint64_t*>(smem + 3 * 256);
  uint32_t* pool = smem + 3 * 256 + 4;
  uint32_t* gscratch = pool + ((a.T * (a.K - a.k_base) + 3) & ~3) + warp * route_scratch_words(a.E, a.n_group);
  route_token_per_warp<V, kCluster>(logits, a, blockIdx.x * nwarps + warp, smem, pool, gscratch, ids, weights, xbar);
}

// ---- the whole route for one block ---------------------------------------------------------
// Word offsets of route_block's shared scratch (the pool is sized T * K so that the layout does
// not depend on k_base).
struct RouteBlockLayout {
  int hist, range, pool, cand_p, cand_id, group, total;
  __host__ __device__ RouteBlockLayout(int T, int E, int K, int n_group, int nwarps) {
    const auto up4 = [](int w) { return (w + 3) & ~3; };
    hist = 0;                                // 3 x 256 histogram words
    range = hist + 3 * 256;                  // [nwarps][2] unsigned long long: lo, hi
    pool = range + up4(4 * nwarps);          // [T * (K - k_base)] ordered c of the pool entries
    cand_p = pool + up4(T * K);              // [T, K]
    cand_id = cand_p + up4(T * K);           // [T, K]
    group = cand_id + up4(T * K);            // [nwarps][route_scratch_words] if n_group > 1
    total = group + (n_group > 1 ? nwarps * route_scratch_words(E, n_group) : 0);
  }
};

__host__ __device__ inline int route_block_scratch_words(int T, int E, int K, int n_group, int nwarps) {
  return RouteBlockLayout(T, E, K, n_group, nwarps).total;
}

// route_block with the values-per-lane V and tokens-per-warp NT fixed (route.cu launches it as
// a kernel for small T). Warps score tokens in chunks of NT, one block barrier publishes the
// pool, the cut costs one barrier per radix pass, and each warp finalizes rows. Without a cut
// (budget == top_k, or k_base == budget) a warp finalizes its own rows right away: no barrier.
template <int V, int NT, typename in_t>
__device__ __forceinline__ void route_block_body(const in_t* __restrict__ logits, const RouteArgs& a,
                                                 uint32_t* scratch, int32_t* ids, float* weights) {
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const RouteBlockLayout L(a.T, a.E, a.K, a.n_group, nwarps);
  uint32_t* hist = scratch + L.hist;
  unsigned long long* range = reinterpret_cast<unsigned long long*>(scratch + L.range);
  uint32_t* pool = scratch + L.pool;
  float* cand_p = reinterpret_cast<float*>(scratch + L.cand_p);
  int32_t* cand_id = reinterpret_cast<int32_t*>(scratch + L.cand_id);
  uint32_t* gscratch = scratch + L.group + warp * route_scratch_words(a.E, a.n_group);
  const int N = a.T * (a.K - a.k_base);
  const int mode = alloc_cut_mode(a.extra, N);
  const CandSink sink{cand_p, cand_id, mode == 2 ? pool : nullptr};
  unsigned long long lo = ~0ull, hi = 0ull;
  for (int t0 = warp * NT; t0 < a.T; t0 += nwarps * NT) {
    score_warp<V, NT>(logits, t0, a, gscratch, sink, lo, hi);
    if (mode != 2) {
      __syncwarp();
      finalize_rows_warp<false>(t0, min(t0 + NT, a.T), a, AllocCut{0ull, mode}, cand_p, cand_id, pool, weights, ids);
    }
  }
  if (mode != 2) return;
  const AllocCut cut = block_range_cut(pool, N, a.extra, hist, range, lo, hi);
  const int per = 32 / route_rank_lanes(a.K);
  for (int t0 = warp * per; t0 < a.T; t0 += nwarps * per)
    finalize_rows_warp<false>(t0, min(t0 + per, a.T), a, cut, cand_p, cand_id, pool, weights, ids);
}

// Routes the T = a.T tokens whose fp32 logits (row-major [T, a.E]) are at `logits` (shared or
// global memory) with the calling block; every thread must call it. On return (after a
// __syncthreads inside) ids[t * a.K + r] / weights[...] hold exactly what the route op writes.
// `scratch`: route_block_scratch_words(a.T, a.E, a.K, a.n_group, blockDim.x / 32) words of
// 16-byte-aligned shared memory. Any blockDim that is a multiple of 32 (<= 1024), E <= 256.
__device__ inline void route_block(const float* logits, const RouteArgs& a, uint32_t* scratch, int32_t* ids,
                                   float* weights) {
  const int nwarps = blockDim.x >> 5;
  if (a.T <= nwarps && a.K <= 32) {  // a warp per token, candidates in registers
    const RouteBlockLayout L(a.T, a.E, a.K, a.n_group, nwarps);
    const int warp = threadIdx.x >> 5;
    uint32_t* gscratch = scratch + L.group + warp * route_scratch_words(a.E, a.n_group);
    switch (route_values_per_lane(a.E)) {
      case 1: route_token_per_warp<1, false>(logits, a, warp, scratch + L.hist, scratch + L.pool, gscratch, ids, weights); break;
      case 2: route_token_per_warp<2, false>(logits, a, warp, scratch + L.hist, scratch + L.pool, gscratch, ids, weights); break;
      case 4: route_token_per_warp<4, false>(logits, a, warp, scratch + L.hist, scratch + L.pool, gscratch, ids, weights); break;
      default: route_token_per_warp<8, false>(logits, a, warp, scratch + L.hist, scratch + L.pool, gscratch, ids, weights); break;
    }
  } else {
    switch (route_values_per_lane(a.E)) {
      case 1: route_block_body<1, 1>(logits, a, scratch, ids, weights); break;
      case 2: route_block_body<2, 1>(logits, a, scratch, ids, weights); break;
      case 4: route_block_body<4, 1>(logits, a, scratch, ids, weights); break;
      default: route_block_body<8, 1>(logits, a, scratch, ids, weights); break;
    }
  }
  __syncthreads();
}

}  // namespace allocmoe::cuda
