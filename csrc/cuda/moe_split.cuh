// Split-I decode path of the CUDA `moe` op on sm_90 (T <= 4, T*K <= 32; taken only when forced,
// ALLOCMOE_MOE_PATH=split): router logits in, routed experts' output out, in ONE cooperative launch
// of one CTA per SM, with no dependency between CTAs until the very end.
//
// The stream kernel (moe_stream.cuh) cuts gate_up by intermediate rows and down by output rows, so
// its down phase needs act rows that other CTAs produce: a hand-over between the phases. Here the
// work is the list of (used expert j, 32 intermediate rows) units, dealt round robin over the grid;
// for each unit a CTA streams the gate and up rows (the stream ring: 16 rows x 512 k a stage,
// mma.sync), forms the unit's 32 act values per pair (SiLU(gate) * up, rounded to the dtype, times
// the pair's routing weight), then streams the unit's down stripe (every output row, the unit's 32
// columns: tensor-map boxes of 256 rows x 64 bytes) and adds its partial down projection to its own
// fp32 [T, H] accumulator in shared memory. The weight stream of a CTA never waits for another
// CTA. At the end each CTA writes its accumulator to a partial [grid, T, H], meets the grid at a
// ticket barrier, and sums a slice of T*H over the partials in a fixed order: deterministic.
//
// Measured on H100 (bench/split_kernel_harness.cu, DeepSeek-V2-Lite shape, 8 layers rotated; see
// docs/KERNELS.md "session 16"): T=1 six experts 42.0 us a call in a CUDA graph (the stream kernel
// 40.7), three experts 24.2 (25.0); single calls after an L2 flush 44.1 (45.5) and 26.5 (30.2);
// T=2..4 5-8% behind the stream kernel. Trace at T=1, six experts: routing 2.0 us from entry,
// lists 2.2, the last CTA's last box 38.8, barrier 39.6, end 40.9. The same access pattern
// without compute reads 103.8 MB in 35.9 us a call.
#pragma once

#include "experts_stream.cuh"
#include "moe_stream.cuh"    // fence_proxy_async_shared
#include "routing.cuh"
#include "tensor_map.h"

namespace allocmoe::cuda_experts {

#ifndef ALLOCMOE_SPLIT_ROWS  // bench/split_kernel_harness.cu tries other widths with it
#define ALLOCMOE_SPLIT_ROWS 32
#endif
constexpr int kSplitRows = ALLOCMOE_SPLIT_ROWS;  // intermediate rows of a unit: the width of its down stripe
constexpr int kSplitPieces = kSplitRows / 8;     // 16-byte pieces of a down box row
constexpr int kSplitBoxRows = 256;  // down rows per tensor-map box: one per consumer thread
constexpr int kSplitMaxTokens = 4;
constexpr int kSplitMaxSlots = kWarpListSlots;  // the per-warp list builder's limit
static_assert(kSplitBoxRows == kStreamConsumers, "a consumer thread per row of a down box");
static_assert(kSplitRows * kSplitBoxRows * 2 <= kStreamStageBytes, "a down box fits a stage");
static_assert(kSplitRows % 16 == 0, "whole gate_up items (8 rows) and 32-byte down box rows");

// The end barrier's tickets (stream_ready.cuh's scheme: never reset, every launch adds exactly
// kTicketsPerLaunch). Safe across launches on other streams: the launch is cooperative and the ring
// fills each CTA's SM, so a later launch gets an SM only when a CTA of this one leaves, which it does
// only after every CTA of this one has taken its ticket.
__device__ unsigned long long g_split_tickets;

struct SplitParams {
  StreamParams e;         // x, gate_up, out, T, K, E, H, I, stages (ids, weights: routed here)
  const float* logits;    // router logits [T, E] fp32
  cuda::RouteArgs route;  // the routing (Alloc-T) of the T tokens
  float* partial;         // [gridDim.x, T, H] fp32 scratch
};

// Operand area (after StreamSmem's fixed areas): x rows, the act values of the CTA's current unit
// (a routed token names an expert once, so a unit has at most T pairs), the accumulator.
struct SplitSmem {
  int x_at, act_at, acc_at, bytes;
  __host__ __device__ SplitSmem(int T, int H) {
    x_at = 0;
    act_at = x_at + T * stream_row_pitch(H);
    acc_at = act_at + T * kSplitRows * 4;
    bytes = acc_at + T * H * 4;
  }
  __host__ __device__ static StreamSmem stream(int T, int H) { return StreamSmem::of_bytes(SplitSmem(T, H).bytes, 0); }
};

// The units of this CTA: blockIdx.x, + gridDim.x, ... of nused * (I / kSplitRows). (Measured on
// H100, T=1: contiguous ranges per CTA read the gate and up rows as fast, ~2.85 TB/s; 16-row units
// read them faster but the 32-byte down box rows slower: 43.1 against 42.3 us at six experts.)
struct SplitRange {
  int n, per_expert;  // units, units per expert
  __device__ __forceinline__ SplitRange(int nused, int I) : n(nused * (I / kSplitRows)), per_expert(I / kSplitRows) {}
  __device__ __forceinline__ int expert(int u) const { return u / per_expert; }
  __device__ __forceinline__ int row0(int u) const { return (u % per_expert) * kSplitRows; }
};

// The weight stream of a CTA, unit after unit: the gate and up rows, then the down boxes row block
// by row block. (Measured on H100, bench/split_kernel_harness.cu, T=1: all gate and up rows first,
// then the down boxes row block by row block across the CTA's units, is the same within noise,
// 42.0 against 42.2 us at six experts, 24.6 against 24.3 at three.)
template <typename T>
__device__ __forceinline__ void produce_split(const StreamParams& p, const StreamLists& L, const SplitRange& R,
                                              const CUtensorMap* down_map, Producer& prod) {
  const int lane = threadIdx.x & 31, H = p.H, I = p.I;
  const T* gu = static_cast<const T*>(p.gate_up);
  const auto gate_up = [&](int u) {
    const int j = R.expert(u), r0 = R.row0(u), e = L.used[j];
    const int passes = (L.start[j + 1] - L.start[j] + 7) / 8;
    for (int r = r0; r < r0 + kSplitRows; r += 8) {
      const int row = lane < 8 ? r + lane : I + r + (lane - 8);  // gate rows, then up rows
      prod.unit(gu + ((size_t)e * 2 * I + row) * H, H, passes);
    }
  };
  RingPos& pos = prod.pos;
  const auto box = [&](int u, int h0) {
    STREAM_WAIT(0, prod.empty0 + 8 * pos.stage, pos.phase ^ 1u);
    if (lane == 0) {
      mbar_arrive_expect_tx(prod.full0 + 8 * pos.stage, kSplitRows * kSplitBoxRows * 2);
      tma_load_3d(prod.ring + pos.stage * prod.stage_bytes, down_map, R.row0(u), h0, L.used[R.expert(u)],
                  prod.full0 + 8 * pos.stage, prod.policy);
    }
    __syncwarp();
    pos.next(prod.stages);
  };
  for (int u = blockIdx.x; u < R.n; u += gridDim.x) {
    gate_up(u);
    for (int h0 = 0; h0 < H; h0 += kSplitBoxRows) box(u, h0);
  }
}

// Consumers, unit after unit: the gate_up items into act (kSplitRows values per pair), then the
// down boxes into acc[t * H + h] (thread tid owns the rows h = tid mod kSplitBoxRows).
template <typename T>
__device__ __forceinline__ void consume_split(const StreamParams& p, const float* weights, const StreamLists& L,
                                              const SplitRange& R, const StreamShared& sh, unsigned char* xs,
                                              float* act, float* acc) {
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int H = p.H, K = p.K, x_pitch = stream_row_pitch(H), vec = H / 8;
  const T* x = static_cast<const T*>(p.x);
  for (int idx = tid; idx < p.T * vec; idx += kStreamConsumers) {
    const int t = idx / vec, v = idx % vec;
    *reinterpret_cast<uint4*>(xs + (size_t)t * x_pitch + v * 16) = load_cached16(x + (size_t)t * H + v * 8);
  }
  for (int idx = tid; idx < p.T * H; idx += kStreamConsumers) acc[idx] = 0.f;
  consumers_sync();
  RingPos pos;
  const auto gate_up = [&](int u) {
    const int j = R.expert(u), s0 = L.start[j], npairs = L.start[j + 1] - s0;
    if (npairs > p.T) __trap();  // routing names an expert once per token (the act area's size)
    for (int r = 0; r < kSplitRows; r += 8)
      for (int p0 = 0; p0 < npairs; p0 += 8) {
        const int npass = min(8, npairs - p0);
        const T* brow[1] = {reinterpret_cast<const T*>(xs + (size_t)(L.list[s0 + p0 + (g < npass ? g : 0)] / K) * x_pitch) +
                            8 * c};
        float a[1][4];
        consume_pass<T, 1, true>(a, brow, npass, H, sh.full0, sh.empty0, sh.ring_ptr, sh.stages, sh.stage_bytes, pos);
        stash_partials<1>(sh.red, a);
        consumers_sync();
        for (int idx = tid; idx < npass * 8; idx += kStreamConsumers) {
          const int pl = idx >> 3, rr = idx & 7, slot = L.list[s0 + p0 + pl];
          const float v = silu(sum_partials(sh.red, pl, rr)) * sum_partials(sh.red, pl, rr + 8);
          act[(p0 + pl) * kSplitRows + r + rr] = Mma16<T>::to_float(Mma16<T>::from_float(v)) * weights[slot];
        }
        consumers_sync();
      }
  };
  // A down box row is kSplitPieces 16-byte pieces (64 bytes); thread tid reads them starting at
  // piece (tid / 2) mod 4, so a quarter warp hits 8 distinct bank groups.
  const auto piece_of = [tid](int q) { return ((tid >> 1) + q) % kSplitPieces; };
  const auto box = [&](int u, int h0) {
    const int j = R.expert(u), s0 = L.start[j], npairs = L.start[j + 1] - s0, h = h0 + tid;
    STREAM_WAIT(1, sh.full0 + 8 * pos.stage, pos.phase);
    const unsigned char* row = sh.ring_ptr + pos.stage * sh.stage_bytes + tid * (kSplitRows * 2);
    float w[kSplitPieces][8];  // w[q][i]: column piece_of(q) * 8 + i
#pragma unroll
    for (int q = 0; q < kSplitPieces; ++q) {
      const uint4 v = load_shared16(row + piece_of(q) * 16);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) w[q][i] = Mma16<T>::to_float(e[i]);
    }
    mbar_arrive(sh.empty0 + 8 * pos.stage);
    pos.next(sh.stages);
    if (h < H)
      for (int pl = 0; pl < npairs; ++pl) {
        float d = 0.f;
#pragma unroll
        for (int q = 0; q < kSplitPieces; ++q) {
          const float4* ap = reinterpret_cast<const float4*>(act + pl * kSplitRows + piece_of(q) * 8);
          const float4 a0 = ap[0], a1 = ap[1];
          d += w[q][0] * a0.x + w[q][1] * a0.y + w[q][2] * a0.z + w[q][3] * a0.w;
          d += w[q][4] * a1.x + w[q][5] * a1.y + w[q][6] * a1.z + w[q][7] * a1.w;
        }
        acc[(L.list[s0 + pl] / K) * H + h] += d;
      }
  };
  for (int u = blockIdx.x; u < R.n; u += gridDim.x) {
    gate_up(u);  // writes act only past a consumer barrier, so after every thread's last box of u - G
    if (u == blockIdx.x) STREAM_TRACE(2);
    for (int h0 = 0; h0 < H; h0 += kSplitBoxRows) box(u, h0);
    if (u == blockIdx.x) STREAM_TRACE(3);
  }
}

__device__ __forceinline__ void add4(float4& s, const float4& v) { s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w; }

// Partials out, a ticket barrier over the grid, then this CTA's slice of T*H summed over the
// partials and written in the output dtype. Consumer threads only. A warp per quad of outputs:
// lane l sums the partials l, l + 32, ... (loads issued eight at a time), then a butterfly over the
// lanes; a fixed order, so deterministic run to run. Measured on H100 (bench/split_kernel_harness.cu
// trace, T=1): a per-thread fence before the ticket and a loop of one dependent L2 load per partial
// held the tail at 3.3 us from the last CTA's down end to the kernel's end.
template <typename T>
__device__ __forceinline__ void reduce_split(const SplitParams& sp, const float* acc) {
  const StreamParams& p = sp.e;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n = p.T * p.H, G = gridDim.x;
  float* mine = sp.partial + (size_t)blockIdx.x * n;
  consumers_sync();  // acc rows are the down loop's per thread; read here in another order
  STREAM_TRACE(5);
  for (int idx = tid; idx < n; idx += kStreamConsumers) mine[idx] = acc[idx];
  consumers_sync();
  if (tid == 0) {  // the release is cumulative: it covers the CTA's stores ordered by the barrier
    const unsigned long long add = blockIdx.x == 0 ? kTicketsPerLaunch - G + 1 : 1;
    unsigned long long t = 0;
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;\n" : "=l"(t) : "l"(&g_split_tickets), "l"(add) : "memory");
    const unsigned long long target = (t / kTicketsPerLaunch + 1) * kTicketsPerLaunch;
    while (ld_acquire_gpu(&g_split_tickets) < target) __nanosleep(32);
  }
  consumers_sync();
  STREAM_TRACE(6);
  const int nq = n / 4, q0 = static_cast<int>((long long)nq * blockIdx.x / G),
            q1 = static_cast<int>((long long)nq * (blockIdx.x + 1) / G);
  const float4* part = reinterpret_cast<const float4*>(sp.partial);
  T* out = static_cast<T*>(p.out);
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int q = q0 + warp; q < q1; q += kStreamConsumerWarps) {
    float4 s = zero;
    for (int b0 = 0; b0 < G; b0 += 8 * 32) {  // one round of loads up to 256 CTAs
      float4 v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int b = b0 + 32 * i + lane;
        v[i] = b < G ? __ldcg(part + (size_t)b * nq + q) : zero;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) add4(s, v[i]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)  // every lane adds the same two values: the same sum
      add4(s, make_float4(__shfl_xor_sync(0xffffffffu, s.x, off), __shfl_xor_sync(0xffffffffu, s.y, off),
                          __shfl_xor_sync(0xffffffffu, s.z, off), __shfl_xor_sync(0xffffffffu, s.w, off)));
    if (lane < 4) out[(size_t)q * 4 + lane] = Mma16<T>::from_float(lane == 0 ? s.x : lane == 1 ? s.y : lane == 2 ? s.z : s.w);
  }
  STREAM_TRACE(7);
}

template <typename T>
__global__ void __launch_bounds__(kStreamThreads, 1) split_moe_kernel(const SplitParams sp,
                                                                      const __grid_constant__ CUtensorMap down_map) {
  extern __shared__ __align__(16) unsigned char smem[];
  STREAM_TRACE(0);
  const StreamParams& p = sp.e;
  const StreamSmem lay = SplitSmem::stream(p.T, p.H);
  const SplitSmem ops(p.T, p.H);
  const StreamShared sh = stream_shared(smem, lay, p.stages);
  int* ids = reinterpret_cast<int*>(smem + StreamSmem::kRouteAt);
  float* weights = reinterpret_cast<float*>(ids + kStreamMaxSlots);
  cuda::route_block(sp.logits, sp.route, reinterpret_cast<uint32_t*>(sh.ring_ptr), ids, weights);
  STREAM_TRACE(4);
  fence_proxy_async_shared();  // the routing scratch is read and written before bulk copies land there
  const StreamLists L = build_stream_lists_warp(ids, p.T * p.K, p.E, sh.lists);
  STREAM_TRACE(1);
  const SplitRange R(L.nused, p.I);
  const int warp = threadIdx.x >> 5;
  unsigned char* operands = smem + StreamSmem::kOperandAt;
  float* acc = reinterpret_cast<float*>(operands + ops.acc_at);
  if (warp == kStreamWeightWarp) {
    Producer prod = sh.producer(evict_first_policy());
    produce_split<T>(p, L, R, &down_map, prod);
  } else if (warp < kStreamConsumerWarps) {
    consume_split<T>(p, weights, L, R, sh, operands + ops.x_at, reinterpret_cast<float*>(operands + ops.act_at), acc);
    reduce_split<T>(sp, acc);
  }
}

}  // namespace allocmoe::cuda_experts
