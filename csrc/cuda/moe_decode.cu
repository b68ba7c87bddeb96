// CUDA kernel of torch.ops.allocmoe.moe (see csrc/cpu/moe.cpp for the function it computes).
//
// Decode (1 <= T <= 16) runs as ONE cooperative launch, one 512-thread block per SM:
//   1. hidden -> shared memory; router GEMV (and the shared-expert gate row), a warp per row,
//      logits to a small workspace.                                              grid sync
//   2. every block routes all T tokens itself (route_block: the route op's code, deterministic, so
//      all blocks agree) and lists the work: shared experts, then the distinct selected experts in id
//      order, each with its tokens and gate weights.
//   3. the work is the flat list of (expert, intermediate column i) pairs, cut into 16-byte units
//      and split evenly over the blocks. For its pairs a block streams the gate and up rows once
//      (16-byte loads, many in flight), forms a = silu(gate) * up (rounded to the dtype, as the
//      experts op does), then streams the matching columns of down and adds the weighted partial
//      down projection of its tokens to its own fp32 partial [T, H].                 grid sync
//   4. the blocks sum the partials of the blocks that touched each token in a fixed order and
//      write out (one rounding). Fixed order everywhere: run-to-run deterministic.
// The weights of each selected expert are read exactly once and every SM streams from the start,
// which is what a memory-bound decode step needs. Anything else (more tokens, strided or
// unaligned weights, very large H) goes through the composition of route + experts.
//
// Which one runs (ALLOCMOE_MOE_PATH=auto|stream|fused|composite forces it): on sm_90 and newer
// the stream kernel of moe_stream.cuh (routing in every CTA, then the experts op's stream phases,
// one cooperative launch; router logits in, or computed from router_weight by one matmul first)
// where it applies, else the composition; this file's kernel (router GEMV inside, router_weight
// only) is auto's choice for T <= 16 on older GPUs. On H100 this kernel lost to the composition
// at every T (T=1: 67.0 vs 46.6 us, T=16: 1542 vs 339; bench/results/layer_*_2026-11-23_020911.md).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include "common/arg_checks.h"
#include "common/env_choice.h"
#include "cpu/moe.h"
#include "cuda/device_info.h"
#include "cuda/moe_split.cuh"
#include "cuda/moe_stream.cuh"
#include "cuda/routing.cuh"
#include "validation.h"

namespace allocmoe::cuda {

RouteArgs make_route_args(const at::Tensor& logits, int64_t top_k, double budget, int64_t k_base, Scoring scoring,
                          const at::Tensor& bias, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                          double routed_scaling_factor);  // route.cu

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxFusedTokens = 16;
constexpr int kMaxShared = 8;
constexpr int kMaxBlocks = 1024;

// ---- element types: 16 bytes = kVec elements, unpacked to fp32 -----------------------------
template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static void unpack(const uint4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
  __device__ static float round(float x) { return __bfloat162float(__float2bfloat16(x)); }
};
template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ static void unpack(const uint4& v, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static __half from_float(float x) { return __float2half(x); }
  __device__ static float round(float x) { return __half2float(__float2half(x)); }
};
template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static void unpack(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  __device__ static float from_float(float x) { return x; }
  __device__ static float round(float x) { return x; }
};

// Weights are read once: read-only path, do not keep them in L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

struct MoeArgs {
  const void* hidden;       // [T, H]
  const void* router_w;     // [E, H]
  const void* shared_gate;  // [H] or nullptr
  const void* gate_up;      // [E, 2I, H]
  const void* down;         // [E, H, I]
  const void* sgu;          // [S, 2Is, H] or nullptr
  const void* sdn;          // [S, H, Is] or nullptr
  int T, H, E, I, S, Is;
  int max_pairs;            // upper bound of the (expert, column) pairs one block gets
  RouteArgs r;
  float* logits_ws;   // [T, E + 1] (column E: shared-expert gate logit)
  float* partial_ws;  // [gridDim.x, T, H]
  void* out;          // [T, H]
};

// Shared-memory carve-up, computed the same way on the host (size) and the device (offsets).
struct SmemLayout {
  size_t x, a, logits, cand_id, cand_w, scratch, tokmask, seg_expert, seg_off, seg_nt, seg_mask, ent_tok,
      ent_w, block_mask, red, total;
  __host__ __device__ static size_t up16(size_t v) { return (v + 15) & ~size_t{15}; }
  __host__ __device__ SmemLayout(int T, int H, int E, int K, int S, int n_group, int max_pairs, int elem_bytes,
                                 int nblocks) {
    size_t o = 0;
    const auto take = [&](size_t bytes) {
      const size_t at = o;
      o = up16(o + bytes);
      return at;
    };
    const int nseg = S + E;
    x = take(size_t(T) * H * elem_bytes);
    a = take(size_t(T) * max_pairs * 4);
    logits = take(size_t(T) * (E + 1) * 4);
    cand_id = take(size_t(T) * K * 4);
    cand_w = take(size_t(T) * K * 4);
    scratch = take(size_t(route_block_scratch_words(T, E, K, n_group, kWarps)) * 4);
    tokmask = take(size_t(E) * 4);
    seg_expert = take(size_t(nseg) * 4);
    seg_off = take(size_t(nseg) * 4);
    seg_nt = take(size_t(nseg) * 4);
    seg_mask = take(size_t(nseg) * 4);
    ent_tok = take(size_t(S * T + T * K) * 4);
    ent_w = take(size_t(S * T + T * K) * 4);
    block_mask = take(size_t(nblocks) * 4);
    red = take(size_t(kWarps) * 32 * 4);
    total = o;
  }
};

// Warp-cooperative dot products of NR weight rows (16-byte chunks) with NT token rows of x in
// shared memory: acc[r][t] += row_r . x[tok[t]] (per-lane partial sums; caller reduces).
template <typename scalar_t, int NT, int NR>
__device__ __forceinline__ void warp_rows_dot(const uint4* const (&rows)[NR], const scalar_t* x_s, int H,
                                              const int (&tok)[NT], int nt, float (&acc)[NR][NT]) {
  constexpr int V = Elem<scalar_t>::kVec;
  // 16-byte chunks per lane per row in one batch: loads in flight vs registers (NR * J loads).
  constexpr int J = NR == 1 ? (NT >= 8 ? 4 : 8) : (NT >= 8 ? 2 : 4);
  const int lane = threadIdx.x & 31;
  const int hv = H / V;
  for (int c0 = 0; c0 < hv; c0 += 32 * J) {
    uint4 w[NR][J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = c0 + lane + 32 * j;
#pragma unroll
      for (int r = 0; r < NR; ++r)
        if (c < hv) w[r][j] = ld_stream(rows[r] + c);
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = c0 + lane + 32 * j;
      if (c >= hv) continue;
      float wf[NR][V];
#pragma unroll
      for (int r = 0; r < NR; ++r) Elem<scalar_t>::unpack(w[r][j], wf[r]);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= nt) continue;
        float xf[V];
        Elem<scalar_t>::unpack(reinterpret_cast<const uint4*>(x_s + static_cast<size_t>(tok[t]) * H)[c], xf);
#pragma unroll
        for (int r = 0; r < NR; ++r)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[r][t] = fmaf(wf[r][i], xf[i], acc[r][t]);
      }
    }
  }
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(kThreads, 1) moe_decode_kernel(MoeArgs m) {
  namespace cg = cooperative_groups;
  using E_t = Elem<scalar_t>;
  constexpr int V = E_t::kVec;
  extern __shared__ __align__(16) unsigned char smem[];
  const int T = m.T, H = m.H, E = m.E, K = m.r.K, S = m.S;
  const int nb = gridDim.x, b = blockIdx.x;
  const SmemLayout L(T, H, E, K, S, m.r.n_group, m.max_pairs, sizeof(scalar_t), nb);
  scalar_t* x_s = reinterpret_cast<scalar_t*>(smem + L.x);
  float* a_s = reinterpret_cast<float*>(smem + L.a);
  float* lg_s = reinterpret_cast<float*>(smem + L.logits);
  int32_t* cid_s = reinterpret_cast<int32_t*>(smem + L.cand_id);
  float* cw_s = reinterpret_cast<float*>(smem + L.cand_w);
  uint32_t* scratch_s = reinterpret_cast<uint32_t*>(smem + L.scratch);
  uint32_t* tokmask_s = reinterpret_cast<uint32_t*>(smem + L.tokmask);
  int* seg_expert = reinterpret_cast<int*>(smem + L.seg_expert);
  int* seg_off = reinterpret_cast<int*>(smem + L.seg_off);
  int* seg_nt = reinterpret_cast<int*>(smem + L.seg_nt);
  uint32_t* seg_mask = reinterpret_cast<uint32_t*>(smem + L.seg_mask);
  int* ent_tok = reinterpret_cast<int*>(smem + L.ent_tok);
  float* ent_w = reinterpret_cast<float*>(smem + L.ent_w);
  uint32_t* bmask_s = reinterpret_cast<uint32_t*>(smem + L.block_mask);
  float* red_s = reinterpret_cast<float*>(smem + L.red);
  __shared__ int s_nseg;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int hv = H / V;
  const scalar_t* hidden = static_cast<const scalar_t*>(m.hidden);

  // 1. hidden -> shared memory, router GEMV (plus the shared-expert gate row).
  for (int i = tid; i < T * hv; i += kThreads)
    reinterpret_cast<uint4*>(x_s)[i] = reinterpret_cast<const uint4*>(hidden)[i];
  __syncthreads();
  {
    int tok[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) tok[t] = t < T ? t : 0;
    const int rows = E + (m.shared_gate != nullptr ? 1 : 0);
    for (int r = b * kWarps + warp; r < rows; r += nb * kWarps) {
      const scalar_t* wrow = r < E ? static_cast<const scalar_t*>(m.router_w) + static_cast<size_t>(r) * H
                                   : static_cast<const scalar_t*>(m.shared_gate);
      const uint4* rowp[1] = {reinterpret_cast<const uint4*>(wrow)};
      float acc[1][NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[0][t] = 0.0f;
      warp_rows_dot<scalar_t, NT, 1>(rowp, x_s, H, tok, T, acc);
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[0][t] = warp_sum(acc[0][t]);
      if (lane == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
          if (t < T) m.logits_ws[t * (E + 1) + r] = acc[0][t];
      }
    }
  }
  cg::this_grid().sync();

  // 2. Route all tokens in every block; list the work.
  // lg_s: the router logits [T, E], then the shared-expert gate logits [T].
  for (int i = tid; i < T * (E + 1); i += kThreads) {
    const int t = i / (E + 1), e = i - t * (E + 1);
    lg_s[e < E ? t * E + e : T * E + t] = __ldcg(m.logits_ws + i);
  }
  __syncthreads();
  route_block(lg_s, m.r, scratch_s, cid_s, cw_s);
  for (int e = tid; e < E; e += kThreads) {
    uint32_t mk = 0;
    for (int j = 0; j < T * K; ++j)
      if (cid_s[j] == e) mk |= 1u << (j / K);
    tokmask_s[e] = mk;
  }
  __syncthreads();
  const uint32_t all_tokens = T >= 32 ? 0xffffffffu : ((1u << T) - 1u);
  if (warp == 0) {
    // Segments: shared experts 0..S-1, then the used experts in id order (lane l: ids 8l..8l+7).
    int used = 0, ents = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int e = lane * 8 + j;
      const uint32_t mk = e < E ? tokmask_s[e] : 0u;
      used += mk != 0u;
      ents += __popc(mk);
    }
    int inc_used = used, inc_ents = ents;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, inc_used, o), n = __shfl_up_sync(0xffffffffu, inc_ents, o);
      if (lane >= o) {
        inc_used += u;
        inc_ents += n;
      }
    }
    int seg = S + inc_used - used, ent = S * T + inc_ents - ents;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int e = lane * 8 + j;
      const uint32_t mk = e < E ? tokmask_s[e] : 0u;
      if (mk != 0u) {
        seg_expert[seg] = e;
        seg_off[seg] = ent;
        seg_nt[seg] = __popc(mk);
        seg_mask[seg] = mk;
        ++seg;
        ent += __popc(mk);
      }
    }
    if (lane == 31) s_nseg = S + inc_used;
    if (lane < S) {
      seg_expert[lane] = -1 - lane;
      seg_off[lane] = lane * T;
      seg_nt[lane] = T;
      seg_mask[lane] = all_tokens;
    }
  }
  for (int i = tid; i < S * T; i += kThreads) {
    const int t = i % T;
    ent_tok[i] = t;
    ent_w[i] = m.shared_gate != nullptr ? 1.0f / (1.0f + expf(-lg_s[T * E + t])) : 1.0f;
  }
  __syncthreads();
  const int nseg = s_nseg;
  for (int seg = S + tid; seg < nseg; seg += kThreads) {
    const int e = seg_expert[seg];
    uint32_t mk = seg_mask[seg];
    int at = seg_off[seg];
    while (mk != 0u) {
      const int t = __ffs(mk) - 1;
      mk &= mk - 1u;
      float w = 0.0f;
      for (int r = 0; r < K; ++r)
        if (cid_s[t * K + r] == e) w = cw_s[t * K + r];
      ent_tok[at] = t;
      ent_w[at] = w;
      ++at;
    }
  }
  // Unit u (16 bytes of a down row = kVec pairs): shared experts first, then routed segments.
  const int us = m.S > 0 ? m.Is / V : 0, ur = m.I / V;
  const long long U = static_cast<long long>(S) * us + static_cast<long long>(nseg - S) * ur;
  const auto seg_start = [&](int seg) -> long long {
    return seg < S ? static_cast<long long>(seg) * us : static_cast<long long>(S) * us + static_cast<long long>(seg - S) * ur;
  };
  const auto first_seg = [&](long long u) -> int {
    return u < static_cast<long long>(S) * us ? static_cast<int>(u / us)
                                              : S + static_cast<int>((u - static_cast<long long>(S) * us) / ur);
  };
  __syncthreads();
  for (int bb = tid; bb < nb; bb += kThreads) {
    const long long u0 = U * bb / nb, u1 = U * (bb + 1) / nb;
    uint32_t mk = 0;
    for (int seg = u0 < u1 ? first_seg(u0) : nseg; seg < nseg && seg_start(seg) < u1; ++seg) mk |= seg_mask[seg];
    bmask_s[bb] = mk;
  }

  // 3. This block's pairs: gate/up rows, activation, matching down columns -> fp32 partial.
  const long long u0 = U * b / nb, u1 = U * (b + 1) / nb;
  float* partial = m.partial_ws + static_cast<size_t>(b) * T * H;
  uint32_t written = 0;  // tokens whose partial row this block has already stored
  for (int seg = u0 < u1 ? first_seg(u0) : nseg; seg < nseg && seg_start(seg) < u1; ++seg) {
    const long long ss = seg_start(seg), se = ss + (seg < S ? us : ur);
    const int Ie = seg < S ? m.Is : m.I;
    const int ex = seg_expert[seg];
    const scalar_t* gu = ex < 0 ? static_cast<const scalar_t*>(m.sgu) + static_cast<size_t>(-1 - ex) * 2 * Ie * H
                                : static_cast<const scalar_t*>(m.gate_up) + static_cast<size_t>(ex) * 2 * Ie * H;
    const scalar_t* dn = ex < 0 ? static_cast<const scalar_t*>(m.sdn) + static_cast<size_t>(-1 - ex) * H * Ie
                                : static_cast<const scalar_t*>(m.down) + static_cast<size_t>(ex) * H * Ie;
    const int p0 = static_cast<int>((max(u0, ss) - ss) * V), p1 = static_cast<int>((min(u1, se) - ss) * V);
    const int nt = seg_nt[seg];
    int tok[NT];
    float tw[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      tok[t] = t < nt ? ent_tok[seg_off[seg] + t] : 0;
      tw[t] = t < nt ? ent_w[seg_off[seg] + t] : 0.0f;
    }
    // gate/up rows i and Ie + i -> a[t][i - p0]
    for (int i = p0 + warp; i < p1; i += kWarps) {
      const uint4* rows[2] = {reinterpret_cast<const uint4*>(gu + static_cast<size_t>(i) * H),
                              reinterpret_cast<const uint4*>(gu + static_cast<size_t>(Ie + i) * H)};
      float acc[2][NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = 0.0f;
      warp_rows_dot<scalar_t, NT, 2>(rows, x_s, H, tok, nt, acc);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= nt) continue;
        const float g = warp_sum(acc[0][t]), u = warp_sum(acc[1][t]);
        if (lane == 0) a_s[t * m.max_pairs + (i - p0)] = E_t::round(g / (1.0f + expf(-g)) * u);
      }
    }
    __syncthreads();
    // down[:, p0:p1]: L lanes per row (a power of two <= the row's 16-byte chunks), 32/L rows per
    // warp instruction, RU rows per lane in flight.
    const int q = (p1 - p0) / V;
    int Lr = 1;
    while (Lr * 2 <= q && Lr < 32) Lr *= 2;
    const int R = 32 / Lr, sub = lane & (Lr - 1), rsub = lane / Lr;
    constexpr int RU = NT <= 4 ? 4 : 2;
    for (int hb = warp * RU * R; hb < H; hb += kWarps * RU * R) {
      float acc[RU][NT];
#pragma unroll
      for (int k = 0; k < RU; ++k)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[k][t] = 0.0f;
      for (int mm = sub; mm < q; mm += Lr) {
        uint4 wv[RU];
#pragma unroll
        for (int k = 0; k < RU; ++k) {
          const int h = hb + k * R + rsub;
          if (h < H) wv[k] = ld_stream(reinterpret_cast<const uint4*>(dn + static_cast<size_t>(h) * Ie + p0) + mm);
        }
#pragma unroll
        for (int k = 0; k < RU; ++k) {
          if (hb + k * R + rsub >= H) continue;
          float wf[V];
          E_t::unpack(wv[k], wf);
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            if (t >= nt) continue;
            const float4* ap = reinterpret_cast<const float4*>(a_s + t * m.max_pairs + mm * V);
#pragma unroll
            for (int v4 = 0; v4 < V / 4; ++v4) {
              const float4 av = ap[v4];
              acc[k][t] = fmaf(wf[4 * v4], av.x, acc[k][t]);
              acc[k][t] = fmaf(wf[4 * v4 + 1], av.y, acc[k][t]);
              acc[k][t] = fmaf(wf[4 * v4 + 2], av.z, acc[k][t]);
              acc[k][t] = fmaf(wf[4 * v4 + 3], av.w, acc[k][t]);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < RU; ++k)
#pragma unroll
        for (int t = 0; t < NT; ++t)
          for (int o = Lr >> 1; o > 0; o >>= 1) acc[k][t] += __shfl_xor_sync(0xffffffffu, acc[k][t], o);
      if (sub == 0) {
#pragma unroll
        for (int k = 0; k < RU; ++k) {
          const int h = hb + k * R + rsub;
          if (h >= H) continue;
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            if (t >= nt) continue;
            float* pp = partial + static_cast<size_t>(tok[t]) * H + h;
            const float v = tw[t] * acc[k][t];
            *pp = ((written >> tok[t]) & 1u) ? *pp + v : v;
          }
        }
      }
    }
    written |= seg_mask[seg];
    __syncthreads();
  }
  cg::this_grid().sync();

  // 4. out[t, h] = sum over the blocks that touched token t of their partials, fixed order.
  const int nh = (H + 31) / 32;
  scalar_t* out = static_cast<scalar_t*>(m.out);
  for (int item = b; item < T * nh; item += nb) {
    const int t = item / nh, h = (item % nh) * 32 + lane;
    float s = 0.0f;
    if (h < H) {
      for (int bb = warp; bb < nb; bb += kWarps)
        if ((bmask_s[bb] >> t) & 1u) s += __ldcg(m.partial_ws + (static_cast<size_t>(bb) * T + t) * H + h);
    }
    red_s[warp * 32 + lane] = s;
    __syncthreads();
    if (warp == 0 && h < H) {
      float tot = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) tot += red_s[w * 32 + lane];
      out[static_cast<size_t>(t) * H + h] = E_t::from_float(tot);
    }
    __syncthreads();
  }
}

template <typename scalar_t, int NT>
bool launch_fused(MoeArgs m, size_t smem, int nblocks, cudaStream_t stream) {
  auto* kernel = &moe_decode_kernel<scalar_t, NT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  if (per_sm < 1) return false;
  void* args[] = {&m};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(nblocks), dim3(kThreads), args,
                                             smem, stream));
  return true;
}

template <typename scalar_t>
bool dispatch_tokens(const MoeArgs& m, size_t smem, int nblocks, cudaStream_t stream) {
  if (m.T <= 1) return launch_fused<scalar_t, 1>(m, smem, nblocks, stream);
  if (m.T <= 2) return launch_fused<scalar_t, 2>(m, smem, nblocks, stream);
  if (m.T <= 4) return launch_fused<scalar_t, 4>(m, smem, nblocks, stream);
  if (m.T <= 8) return launch_fused<scalar_t, 8>(m, smem, nblocks, stream);
  return launch_fused<scalar_t, 16>(m, smem, nblocks, stream);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

enum class MoePath { kAuto, kStream, kFused, kComposite, kSplit };

// ALLOCMOE_MOE_PATH (tests force every path); choices in the order of MoePath.
MoePath forced_moe_path() {
  return static_cast<MoePath>(env_choice("allocmoe.moe", "ALLOCMOE_MOE_PATH", {"auto", "stream", "fused", "composite", "split"}));
}

// ---- the stream path (moe_stream.cuh) -----------------------------------------------------
using cuda_experts::StreamMoeParams;
using cuda_experts::StreamParams;
using cuda_experts::StreamSmem;

// Ring depth of the stream kernel: as many stages as the shared memory holds.
int stream_moe_stages(int64_t T, int64_t K, int64_t H, int64_t I, const DeviceInfo& d) {
  const StreamSmem lay = cuda_experts::stream_one_launch_smem(static_cast<int>(T), static_cast<int>(K), static_cast<int>(H),
                                                       static_cast<int>(I));
  return lay.fit_stages(d.smem_optin);
}

// What the stream and split kernels share: sm_90 with cooperative launch, bf16/fp16, contiguous
// 16-byte aligned weights, H and I multiples of 32, E <= 256, and a ring of at least
// kStreamMinStages stages (stages_of(H, I): what the kernel's shared memory holds, asked once the
// sizes are known to be in range) with room for the routing scratch (every CTA routes before the
// weights flow).
template <typename StagesOf>
bool ring_moe_fits(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down, int64_t T, int64_t K,
                   int64_t E, int64_t n_group, Scoring scoring, const DeviceInfo& d, StagesOf stages_of) {
  const int64_t H = hidden.size(1), I = gate_up.size(1) / 2;
  using namespace cuda_experts;
  if (d.major < 9 || !d.coop || E > kMaxExpertsCuda || K > 32) return false;
  if (!(hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf)) return false;
  if (!gate_up.is_contiguous() || !down.is_contiguous() || !aligned16(gate_up) || !aligned16(down)) return false;
  if (H % 32 != 0 || I % 32 != 0 || H > 65536 || I > 65536 || E * 2 * I * H >= (int64_t(1) << 62)) return false;
  const int stages = stages_of(H, I);
  const int groups = is_group_scoring(scoring) ? static_cast<int>(n_group) : 1;
  const int route_bytes = 4 * route_block_scratch_words(static_cast<int>(T), static_cast<int>(E), static_cast<int>(K),
                                                        groups, kStreamThreads / 32);
  return stages >= kStreamMinStages && route_bytes <= stages * kStreamStageBytes;
}

// The stream kernel: T <= 16, T*K <= 256, and what ring_moe_fits checks.
bool stream_moe_fits(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down, int64_t T,
                     int64_t K, int64_t E, int64_t n_group, Scoring scoring, const DeviceInfo& d) {
  using namespace cuda_experts;
  if (T > kStreamMoeMaxTokens || T * K > kStreamMoeMaxSlots) return false;
  return ring_moe_fits(hidden, gate_up, down, T, K, E, n_group, scoring, d,
                       [&](int64_t H, int64_t I) { return stream_moe_stages(T, K, H, I, d); });
}

// One cooperative launch of a stream-style kernel (kStreamThreads per CTA, one CTA per SM): every
// CTA resident at once, which the waits between CTAs need (captured into CUDA graphs as such).
// smem_done: the caller's per-kernel record of the devices whose shared-memory limit is raised.
template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), bool (&smem_done)[64], int grid, size_t smem, cudaStream_t stream,
                        const Args&... args) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  set_smem_limit(reinterpret_cast<const void*>(kernel), device_info(dev).smem_optin, smem_done);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(cuda_experts::kStreamThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

template <typename Elem, int NT>
void launch_stream_moe(const StreamMoeParams& m, size_t smem, int grid, cudaStream_t stream) {
  static bool done[64] = {};
  launch_cooperative(&cuda_experts::stream_moe_kernel<Elem, NT>, done, grid, smem, stream, m);
}

void run_stream_moe(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& gate_up, const at::Tensor& down,
                    const RouteArgs& r, at::Tensor& out, const DeviceInfo& d, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = r.K;
  at::Tensor act = at::empty({(int64_t)T * K, I}, x.options());
  StreamMoeParams m{StreamParams{x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), nullptr, nullptr, act.data_ptr(),
                                 out.data_ptr(), T, K, E, H, I, stream_moe_stages(T, K, H, I, d)},
                    logits.data_ptr<float>(), r};
  const size_t smem = cuda_experts::stream_one_launch_smem(T, K, H, I).total(m.e.stages);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (cuda_experts::stream_pairs_per_pass(T) == 8) {
    if (bf16) launch_stream_moe<__nv_bfloat16, 1>(m, smem, d.sms, stream);
    else launch_stream_moe<__half, 1>(m, smem, d.sms, stream);
  } else {
    if (bf16) launch_stream_moe<__nv_bfloat16, 2>(m, smem, d.sms, stream);
    else launch_stream_moe<__half, 2>(m, smem, d.sms, stream);
  }
}

// ---- the split path (moe_split.cuh) ------------------------------------------------------
using cuda_experts::SplitParams;
using cuda_experts::SplitSmem;

int split_moe_stages(int64_t T, int64_t H, const DeviceInfo& d) {
  return SplitSmem::stream(static_cast<int>(T), static_cast<int>(H)).fit_stages(d.smem_optin);
}

// The split kernel: T <= 4, T*K <= 32, and what ring_moe_fits checks.
bool split_moe_fits(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down, int64_t T, int64_t K,
                    int64_t E, int64_t n_group, Scoring scoring, const DeviceInfo& d) {
  using namespace cuda_experts;
  if (T > kSplitMaxTokens || T * K > kSplitMaxSlots) return false;
  return ring_moe_fits(hidden, gate_up, down, T, K, E, n_group, scoring, d,
                       [&](int64_t H, int64_t) { return split_moe_stages(T, H, d); });
}

// False (nothing launched) when the driver cannot encode the down tensor's map.
template <typename Elem>
bool launch_split_moe(const SplitParams& sp, const at::Tensor& down, int grid, cudaStream_t stream) {
  const StreamParams& p = sp.e;
  CUtensorMap map;
  // L2 promotion of 64 bytes, the box row: measured on H100 (bench/decode_seq.py, T=1, six experts,
  // an earlier version of the kernel) 256-byte promotion took 56.3 us, none 50.7, 64 bytes 46.1.
  if (!encode_weight_map(&map, down.data_ptr(), p.E, p.H, p.I, cuda_experts::kSplitRows, cuda_experts::kSplitBoxRows,
                         false, 64))
    return false;
  static bool done[64] = {};
  launch_cooperative(&cuda_experts::split_moe_kernel<Elem>, done, grid, SplitSmem::stream(p.T, p.H).total(p.stages),
                     stream, sp, map);
  return true;
}

bool run_split_moe(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& gate_up, const at::Tensor& down,
                   const RouteArgs& r, at::Tensor& out, const DeviceInfo& d, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = r.K;
  at::Tensor partial = at::empty({(int64_t)d.sms, T, H}, x.options().dtype(at::kFloat));
  const SplitParams sp{StreamParams{x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), nullptr, nullptr, nullptr,
                                    out.data_ptr(), T, K, E, H, I, split_moe_stages(T, H, d)},
                       logits.data_ptr<float>(), r, partial.data_ptr<float>()};
  return x.scalar_type() == at::kBFloat16 ? launch_split_moe<__nv_bfloat16>(sp, down, d.sms, stream)
                                          : launch_split_moe<__half>(sp, down, d.sms, stream);
}

}  // namespace

at::Tensor moe_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& router_weight, const at::Tensor& gate_up,
                    const at::Tensor& down, int64_t top_k, double budget, int64_t k_base, c10::string_view scoring_name,
                    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
                    bool norm_topk_prob, double routed_scaling_factor, const std::optional<at::Tensor>& shared_gate_up,
                    const std::optional<at::Tensor>& shared_down, const std::optional<at::Tensor>& shared_gate,
                    const std::optional<at::Tensor>& router_logits) {
  const int64_t E = check_moe_args(hidden, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                                   router_logits);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const at::Tensor logits_shape = at::empty({0, E}, hidden.options().dtype(at::kFloat));
  const Scoring scoring =
      check_route_args(logits_shape, top_k, budget, k_base, std::string_view(scoring_name.data(), scoring_name.size()),
                       correction_bias, n_group, topk_group);
  ALLOCMOE_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(2) == H && gate_up.size(1) % 2 == 0 &&
                  down.size(0) == E && down.size(1) == H && down.size(2) == gate_up.size(1) / 2,
              "allocmoe.moe: gate_up must be [E, 2I, H] and down [E, H, I], got ", gate_up.sizes(), " and ",
              down.sizes());
  ALLOCMOE_CHECK(gate_up.scalar_type() == hidden.scalar_type() && down.scalar_type() == hidden.scalar_type(),
              "allocmoe.moe: gate_up/down dtype must be hidden's dtype ", hidden.scalar_type());
  ALLOCMOE_CHECK(gate_up.device() == hidden.device() && down.device() == hidden.device(),
              "allocmoe.moe: gate_up/down must be on hidden's device ", hidden.device());
  const auto composite = [&] {
    return moe_composite(hidden, router_weight, gate_up, down, top_k, budget, k_base, scoring_name, correction_bias,
                         n_group, topk_group, norm_topk_prob, routed_scaling_factor, shared_gate_up, shared_down,
                         shared_gate, router_logits);
  };
  if (T == 0) return at::empty({0, H}, hidden.options());
  const int64_t I = gate_up.size(1) / 2;
  const int64_t S = shared_gate_up.has_value() ? shared_gate_up->size(0) : 0;
  const int64_t Is = S > 0 ? shared_gate_up->size(1) / 2 : 0;
  const DeviceInfo& info = device_info(hidden.get_device());
  const at::Tensor bias = correction_bias.has_value() ? correction_bias->contiguous() : at::Tensor();
  const MoePath path = forced_moe_path();

  // sm_90: the stream kernel (routing in every CTA, then the experts op's stream phases), the split
  // kernel when forced (moe_split.cuh: T <= 4, T*K <= 32), or the composition where they cannot run.
  // Auto takes the stream kernel where all act rows stay in shared memory (T*K <= 32); beyond, the
  // composition's two-launch experts op is faster (see use_one_stream_launch in experts.cu). Not
  // the split kernel: on H100 (bench/split_kernel_harness.cu, DeepSeek-V2-Lite, T=1, a CUDA graph
  // of calls) it is 1.3 us slower at six experts (42.0 vs 40.7 us), 0.8 faster at three (24.2 vs
  // 25.0), and 5-8% slower at T=2..4.
  const bool split = path == MoePath::kSplit;
  if (split || path == MoePath::kStream || (path == MoePath::kAuto && info.major >= 9)) {
    if (split ? !split_moe_fits(hidden, gate_up, down, T, top_k, E, n_group, scoring, info)
              : !stream_moe_fits(hidden, gate_up, down, T, top_k, E, n_group, scoring, info))
      return composite();
    if (!split && path == MoePath::kAuto && cuda_experts::stream_down_staged(static_cast<int>(T), static_cast<int>(top_k)))
      return composite();
    const at::Tensor logits = moe_logits(hidden, router_weight, router_logits);
    if (validation_enabled()) {
      ALLOCMOE_CHECK(at::isfinite(logits).all().item<bool>(), "allocmoe.moe: router logits contain NaN or Inf");
      if (bias.defined())
        ALLOCMOE_CHECK(at::isfinite(bias).all().item<bool>(), "allocmoe.moe: correction_bias contains NaN or Inf");
    }
    RouteArgs r = make_route_args(logits, top_k, budget, k_base, scoring, bias, n_group, topk_group, norm_topk_prob,
                                  routed_scaling_factor);
    at::Tensor out = at::empty({T, H}, hidden.options());
    at::Tensor x = hidden.contiguous();
    if (!aligned16(x)) x = x.clone();  // the kernel reads x with 16-byte loads
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (split) {
      if (!run_split_moe(x, logits, gate_up, down, r, out, info, stream)) return composite();
    } else {
      run_stream_moe(x, logits, gate_up, down, r, out, info, stream);
    }
    return moe_add_shared(hidden, out, shared_gate_up, shared_down, shared_gate);
  }
  // The one-launch kernel computes the router GEMV itself.
  if (path == MoePath::kComposite || path == MoePath::kAuto && info.major >= 9 || !router_weight.has_value())
    return composite();
  const int64_t V = 16 / hidden.element_size();
  bool fusable = T <= kMaxFusedTokens && E <= kMaxExpertsCuda && S <= kMaxShared && H % V == 0 && I % V == 0 &&
                 Is % V == 0 && hidden.is_contiguous() && router_weight->is_contiguous() && gate_up.is_contiguous() &&
                 down.is_contiguous() && aligned16(hidden) && aligned16(*router_weight) && aligned16(gate_up) &&
                 aligned16(down) && hidden.scalar_type() != at::kDouble;
  if (S > 0) {
    fusable = fusable && shared_gate_up->is_contiguous() && shared_down->is_contiguous() &&
              aligned16(*shared_gate_up) && aligned16(*shared_down);
  }
  if (shared_gate.has_value()) fusable = fusable && shared_gate->is_contiguous() && aligned16(*shared_gate);
  fusable = fusable && info.coop != 0;
  const int nblocks = std::min(info.sms, kMaxBlocks);
  const int64_t units_max = S * (Is / V) + std::min<int64_t>(E, T * top_k) * (I / V);
  const int max_pairs = static_cast<int>((units_max + nblocks - 1) / nblocks * V);
  const SmemLayout layout(static_cast<int>(T), static_cast<int>(H), static_cast<int>(E), static_cast<int>(top_k),
                          static_cast<int>(S), is_group_scoring(scoring) ? static_cast<int>(n_group) : 1, max_pairs,
                          static_cast<int>(hidden.element_size()), nblocks);
  fusable = fusable && layout.total + 2048 <= static_cast<size_t>(info.smem_optin);  // + static smem
  if (!fusable) return composite();

  if (validation_enabled()) {
    ALLOCMOE_CHECK(at::isfinite(hidden).all().item<bool>(), "allocmoe.moe: hidden contains NaN or Inf");
    ALLOCMOE_CHECK(at::isfinite(*router_weight).all().item<bool>(), "allocmoe.moe: router_weight contains NaN or Inf");
    if (bias.defined())
      ALLOCMOE_CHECK(at::isfinite(bias).all().item<bool>(), "allocmoe.moe: correction_bias contains NaN or Inf");
  }
  at::Tensor out = at::empty({T, H}, hidden.options());
  at::Tensor ws = at::empty({T * (E + 1) + static_cast<int64_t>(nblocks) * T * H}, hidden.options().dtype(at::kFloat));
  MoeArgs m{};
  m.hidden = hidden.data_ptr();
  m.router_w = router_weight->data_ptr();
  m.shared_gate = shared_gate.has_value() ? shared_gate->data_ptr() : nullptr;
  m.gate_up = gate_up.data_ptr();
  m.down = down.data_ptr();
  m.sgu = S > 0 ? shared_gate_up->data_ptr() : nullptr;
  m.sdn = S > 0 ? shared_down->data_ptr() : nullptr;
  m.T = static_cast<int>(T);
  m.H = static_cast<int>(H);
  m.E = static_cast<int>(E);
  m.I = static_cast<int>(I);
  m.S = static_cast<int>(S);
  m.Is = static_cast<int>(Is);
  m.max_pairs = max_pairs;
  const at::Tensor logits_t = at::empty({0, E}, hidden.options().dtype(at::kFloat));
  m.r = make_route_args(logits_t, top_k, budget, k_base, scoring, bias, n_group, topk_group, norm_topk_prob,
                        routed_scaling_factor);
  m.r.T = static_cast<int>(T);
  m.r.extra = alloc_total_slots(budget, T, k_base, top_k) - k_base * T;
  m.logits_ws = ws.data_ptr<float>();
  m.partial_ws = m.logits_ws + T * (E + 1);
  m.out = out.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool launched = false;
  switch (hidden.scalar_type()) {
    case at::kFloat: launched = dispatch_tokens<float>(m, layout.total, nblocks, stream); break;
    case at::kBFloat16: launched = dispatch_tokens<__nv_bfloat16>(m, layout.total, nblocks, stream); break;
    case at::kHalf: launched = dispatch_tokens<__half>(m, layout.total, nblocks, stream); break;
    default: break;
  }
  return launched ? out : composite();
}

}  // namespace allocmoe::cuda

TORCH_LIBRARY_IMPL(allocmoe, CUDA, m) { m.impl("moe", &allocmoe::cuda::moe_cuda); }
