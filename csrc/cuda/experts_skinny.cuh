// Mid-T ("skinny") path of the CUDA `experts` op: bf16/fp16, silu, no biases, contiguous
// gate_up [E, 2I, H] and down [E, H, I], H and I multiples of 32, T*K <= kSkinnyMaxSlots.
//
// Between decode (a handful of tokens) and prefill (hundreds of tokens per expert) each expert
// gets a few dozen tokens: at the DeepSeek-V2-Lite shape, T=64..256 and top-6 give 6..24 tokens
// per expert. The op is still memory-bound (every expert's weights must be read once), so the
// weights go on the wide (M = 16 rows per warp) side of mma.sync m16n8k16 and the expert's
// tokens on the narrow side (up to 64 per pass, n8 tiles past the expert's count skipped).
// Three launches, no host sync:
//   1. gate_up: CTA (64 intermediate columns, expert e). Warp w owns columns 8w..8w+7: its m16
//      tile is those 8 gate rows (tile rows 0..7) and the matching 8 up rows (tile rows 8..15), so
//      SiLU(gate)*up is formed in the accumulator registers. act[slot, I] in the input dtype.
//   2. down: CTA (128 output rows, expert e), warp w owns 16 rows; times the routing weight into
//      y[slot, H] (fp32). A programmatic dependent launch: it lists its slots and issues its
//      first weight loads while gate_up drains, then waits before reading act.
//   3. combine_slots_kernel: out[t] = sum of y over t's valid slots in slot order.
// Every CTA lists the slots routed to its expert itself (one pass over ids, ordered ballot
// compaction), so no alignment launch or global sort is needed; CTAs of unused experts exit.
//
// Operands: the weights are streamed once, straight from global memory into registers with
// 16-byte loads (a block of 4 x 32 k per thread in flight, mma_k32's permuted-k fragments); the
// tokens' rows (x or act, small and shared by the 8 warps) go through a 3-stage cp.async ring in
// shared memory, laid out [chunk][token][32] so a warp's 16-byte fragment loads are
// conflict-free. Each output element is one warp's fixed-order sum: deterministic.
#pragma once

#include "experts_mma.cuh"

namespace allocmoe::cuda_experts {

constexpr int kSkinnyWarps = 8;
constexpr int kSkinnyThreads = kSkinnyWarps * 32;
constexpr int kSkinnyGateUpCols = 8 * kSkinnyWarps;    // intermediate columns per gate_up CTA
constexpr int kSkinnyDownRows = 16 * kSkinnyWarps;     // output rows per down CTA
constexpr int kSkinnyChunks = 4;                       // 32-wide k chunks per pipeline block
constexpr int kSkinnyStages = 3;                       // token blocks in flight (shared memory)
constexpr int kSkinnyTokens = 64;                      // tokens per pass (n side)
constexpr int kSkinnyNT = kSkinnyTokens / 8;           // n8 tiles per pass
constexpr int kSkinnyMaxSlots = 4096;                  // T*K limit (slot list in shared memory)
constexpr int kSkinnyIdsPerLoad = 8;                   // ids loaded per thread before compaction

struct SkinnyParams {
  const void* x;         // hidden [T, H]
  const void* gate_up;   // [E, 2I, H]
  const void* down;      // [E, H, I]
  const float* weights;  // [T, K]
  const int* ids;        // [T, K]
  void* act;             // [T*K, I] scratch, input dtype
  float* y;              // [T*K, H] scratch, weighted down output per slot
  int T, K, E, H, I;
};

// Dynamic shared memory: [per-warp counts | slot list (T*K ints) | 16-byte aligned token ring].
struct SkinnySmem {
  int slots_offset_ints, ring_offset_bytes, stage_elems, total_bytes;
  __host__ __device__ explicit SkinnySmem(int TK) {
    slots_offset_ints = kSkinnyWarps;
    ring_offset_bytes = ((kSkinnyWarps + TK) * 4 + 15) / 16 * 16;
    stage_elems = kSkinnyChunks * kSkinnyTokens * 32;
    total_bytes = ring_offset_bytes + kSkinnyStages * stage_elems * 2;
  }
};

// Lists the slots routed to expert e, in increasing slot order, into s_slots; returns how many.
// Each thread loads kSkinnyIdsPerLoad ids before the first use (one L2 round trip per 2048 ids).
__device__ __forceinline__ int list_expert_slots(const int* __restrict__ ids, int TK, int e, int* s_counts,
                                                 int* s_slots) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int base = 0;
  for (int start = 0; start < TK; start += kSkinnyThreads * kSkinnyIdsPerLoad) {
    int v[kSkinnyIdsPerLoad];
#pragma unroll
    for (int u = 0; u < kSkinnyIdsPerLoad; ++u) {
      const int i = start + u * kSkinnyThreads + tid;
      v[u] = i < TK ? __ldg(ids + i) : -1;
    }
#pragma unroll
    for (int u = 0; u < kSkinnyIdsPerLoad; ++u) {
      if (start + u * kSkinnyThreads >= TK) break;  // uniform across the CTA
      const bool hit = v[u] == e;
      const unsigned ballot = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) s_counts[warp] = __popc(ballot);
      __syncthreads();
      int before = base, total = 0;
#pragma unroll
      for (int w = 0; w < kSkinnyWarps; ++w) {
        const int cnt = s_counts[w];
        total += cnt;
        if (w < warp) before += cnt;
      }
      if (hit) s_slots[before + __popc(ballot & ((1u << lane) - 1u))] = start + u * kSkinnyThreads + tid;
      base += total;
      __syncthreads();
    }
  }
  return base;
}

// This thread's A fragments of pipeline block kb (4 chunks of rows g and g+8); zero past the end
// of k or for a warp with no rows.
template <typename T>
__device__ __forceinline__ void skinny_load_a(uint4 (&a)[kSkinnyChunks][2], const T* a0, const T* a8, bool active,
                                              int kb, int nchunks) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int ch = 0; ch < kSkinnyChunks; ++ch) {
    const int kc = kb * kSkinnyChunks + ch;
    const bool ok = active && kc < nchunks;
    a[ch][0] = ok ? load_stream16(a0 + (size_t)kc * 32) : zero;
    a[ch][1] = ok ? load_stream16(a8 + (size_t)kc * 32) : zero;
  }
}

// One pass over k for up to kSkinnyTokens tokens: acc[nt] += A (this warp's 16 rows) x B (token
// columns nt*8..nt*8+7). `a` holds block 0 of A on entry (issued early by the caller).
// row_of(r) points at token r's row of B (x or act), for r < rows. Ends with a barrier, so the
// ring may be refilled at once.
template <typename T, typename RowFn>
__device__ __forceinline__ void skinny_pass(float (&acc)[kSkinnyNT][4], uint4 (&a)[kSkinnyChunks][2], const T* a0,
                                            const T* a8, bool active, int nchunks, int rows, RowFn row_of,
                                            T* ring, int stage_elems) {
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int nt_used = (rows + 7) >> 3, rows_pad = nt_used * 8;
  const int nblocks = (nchunks + kSkinnyChunks - 1) / kSkinnyChunks;
  // 16-byte pieces of block kb: piece i -> (chunk, token, part) with part fastest, so
  // consecutive threads fill consecutive shared memory. Tokens past `rows` repeat the last row
  // (their columns are never stored); chunks past k are zero-filled.
  auto load_b = [&](int stage, int kb) {
    T* dst = ring + stage * stage_elems;
    const int pieces = kSkinnyChunks * rows_pad * 4;
    for (int i = tid; i < pieces; i += kSkinnyThreads) {
      const int part = i & 3, q = i >> 2, r = q % rows_pad, ch = q / rows_pad;
      const int kc = kb * kSkinnyChunks + ch;
      const T* src = row_of(min(r, rows - 1));
      const bool ok = kc < nchunks;
      cp_async16(dst + (ch * kSkinnyTokens + r) * 32 + part * 8, ok ? src + (size_t)kc * 32 + part * 8 : src,
                 ok ? 16 : 0);
    }
  };
#pragma unroll
  for (int s = 0; s < kSkinnyStages - 1; ++s) {
    if (s < nblocks) load_b(s, s);
    cp_async_commit();
  }
  for (int kb = 0; kb < nblocks; ++kb) {
    // This block's weights are issued before the wait and the barrier (block 0 by the caller);
    // with two CTAs (16 warps) per SM that keeps about 64 KB of weights in flight per SM.
    if (kb > 0) skinny_load_a(a, a0, a8, active, kb, nchunks);
    cp_async_wait<kSkinnyStages - 2>();
    __syncthreads();  // block kb landed for all threads; the stage of block kb-1 is free
    const int nxt = kb + kSkinnyStages - 1;
    if (nxt < nblocks) load_b(nxt % kSkinnyStages, nxt);
    cp_async_commit();
    if (active) {
      const T* b = ring + (kb % kSkinnyStages) * stage_elems;
#pragma unroll
      for (int ch = 0; ch < kSkinnyChunks; ++ch) {
        if (kb * kSkinnyChunks + ch >= nchunks) break;
#pragma unroll
        for (int nt = 0; nt < kSkinnyNT; ++nt) {
          if (nt >= nt_used) break;
          const uint4 bf = load_shared16(b + (ch * kSkinnyTokens + nt * 8 + g) * 32 + c * 8);
          mma_k32<T>(acc[nt], a[ch][0], a[ch][1], bf);
        }
      }
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kSkinnyThreads, 2) skinny_gate_up_kernel(SkinnyParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int TK = p.T * p.K;
  const SkinnySmem lay(TK);
  int* s_counts = reinterpret_cast<int*>(smem);
  int* s_slots = s_counts + lay.slots_offset_ints;
  T* ring = reinterpret_cast<T*>(smem + lay.ring_offset_bytes);
  // The down grid may start now: it lists its slots and streams its first weights, then waits
  // for this grid to finish before it reads act.
  allow_next_grid();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int e = blockIdx.y, H = p.H, I = p.I, K = p.K;
  const int j_warp = blockIdx.x * kSkinnyGateUpCols + 8 * warp;  // this warp's first intermediate column
  const bool active = j_warp < I;                                // I % 32 == 0: uniform per warp
  const int j = active ? j_warp + g : 0;
  const T* wg = static_cast<const T*>(p.gate_up) + (size_t)e * 2 * I * H + (size_t)j * H + 8 * c;
  const T* wu = wg + (size_t)I * H;
  const int nchunks = H / 32;
  uint4 a[kSkinnyChunks][2];
  skinny_load_a(a, wg, wu, active, 0, nchunks);  // in flight while the slots are listed

  const int npairs = list_expert_slots(p.ids, TK, e, s_counts, s_slots);
  const T* x = static_cast<const T*>(p.x);
  T* act = static_cast<T*>(p.act);
  for (int p0 = 0; p0 < npairs; p0 += kSkinnyTokens) {
    const int rows = min(kSkinnyTokens, npairs - p0);
    if (p0 > 0) skinny_load_a(a, wg, wu, active, 0, nchunks);
    float acc[kSkinnyNT][4];
#pragma unroll
    for (int nt = 0; nt < kSkinnyNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    skinny_pass<T>(
        acc, a, wg, wu, active, nchunks, rows, [&](int r) { return x + (size_t)(s_slots[p0 + r] / K) * H; }, ring,
        lay.stage_elems);
    if (!active) continue;
#pragma unroll
    for (int nt = 0; nt < kSkinnyNT; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = nt * 8 + 2 * c + i;
        if (r < rows)  // tile row g: gate column j, row g+8: up column j
          act[(size_t)s_slots[p0 + r] * I + j] = Mma16<T>::from_float(silu(acc[nt][i]) * acc[nt][2 + i]);
      }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSkinnyThreads, 2) skinny_down_kernel(SkinnyParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int TK = p.T * p.K;
  const SkinnySmem lay(TK);
  int* s_counts = reinterpret_cast<int*>(smem);
  int* s_slots = s_counts + lay.slots_offset_ints;
  T* ring = reinterpret_cast<T*>(smem + lay.ring_offset_bytes);
  allow_next_grid();  // the combine grid waits for this one before reading y

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int e = blockIdx.y, H = p.H, I = p.I;
  const int h_warp = blockIdx.x * kSkinnyDownRows + 16 * warp;  // this warp's first output row
  const bool active = h_warp < H;                               // H % 32 == 0: uniform per warp
  const int h = active ? h_warp + g : 0;
  const T* w0 = static_cast<const T*>(p.down) + (size_t)e * H * I + (size_t)h * I + 8 * c;
  const T* w8 = w0 + (size_t)8 * I;
  const int nchunks = I / 32;
  uint4 a[kSkinnyChunks][2];
  skinny_load_a(a, w0, w8, active, 0, nchunks);

  const int npairs = list_expert_slots(p.ids, TK, e, s_counts, s_slots);  // ids: not written by gate_up
  wait_for_previous_grid();  // act is written by the gate_up grid
  const T* act = static_cast<const T*>(p.act);
  for (int p0 = 0; p0 < npairs; p0 += kSkinnyTokens) {
    const int rows = min(kSkinnyTokens, npairs - p0);
    if (p0 > 0) skinny_load_a(a, w0, w8, active, 0, nchunks);
    float acc[kSkinnyNT][4];
#pragma unroll
    for (int nt = 0; nt < kSkinnyNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    skinny_pass<T>(
        acc, a, w0, w8, active, nchunks, rows, [&](int r) { return act + (size_t)s_slots[p0 + r] * I; }, ring,
        lay.stage_elems);
    if (!active) continue;
#pragma unroll
    for (int nt = 0; nt < kSkinnyNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = nt * 8 + 2 * c + (i & 1);
        if (r < rows) {
          const int slot = s_slots[p0 + r];
          p.y[(size_t)slot * H + h + 8 * (i >> 1)] = p.weights[slot] * acc[nt][i];
        }
      }
  }
}

}  // namespace allocmoe::cuda_experts
