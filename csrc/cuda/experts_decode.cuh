// Small-T ("decode") path of the CUDA `experts` op: bf16/fp16, silu, no biases, contiguous
// gate_up [E, 2I, H] and down [E, H, I], H and I multiples of 32.
//
// The op is memory-bound here: every selected expert's weights (both projections) must be read
// once, and that is all the time it should take. Two launches:
//   1. gate_up: CTA (row tile r, j) handles the j-th used expert (in id order) and 16 rows of its
//      intermediate: gate rows r..r+15 and up rows I+r..I+r+15 for every (token, slot) routed to
//      it, then SiLU(gate)*up, rounded to the input dtype, into act[slot, I].
//   2. down: CTA (h tile, j) computes 16 rows of down[e] @ act[slot] for the same pairs, times the
//      routing weight, into y[slot, H] (fp32). The last CTA to finish an h tile (a counter per
//      tile) sums y over each token's slots in slot order and writes the output rows: the sum
//      is deterministic, with no atomics on data and no third launch. On sm_90 the down grid is
//      a programmatic dependent launch: it starts while gate_up drains, finds its expert and
//      issues its first weight loads, then waits (griddepcontrol.wait) before reading act.
// Grids are sized by the worst case (min(E, T*K) used experts); CTAs past the number of used
// experts exit at once, so nothing depends on the host knowing the routing (no sync, graph-safe).
//
// Inside a CTA, 8 warps split the reduction dimension (32-wide chunks, round robin) and their
// partial sums meet in shared memory in a fixed order (deterministic). Each warp multiplies with
// mma.sync m16n8k16: the weights are the A operand (16 rows), the routed tokens the B operand
// (8 per n tile), both loaded straight from global memory with 16-byte loads. That works because
// a dot product does not care about the order of k: thread (g = lane/4, c = lane%4) loads
// elements 8c..8c+7 of a 32-wide chunk of weight rows g and g+8 and of token g, and the same
// fixed permutation of k is used for A and B, so the fragments need no shuffling.
#pragma once

#include "experts_mma.cuh"

namespace allocmoe::cuda_experts {

constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeRows = 16;  // rows of one projection per CTA (one m16 tile)

struct DecodeParams {
  const void* x;          // hidden [T, H]
  const void* gate_up;    // [E, 2I, H]
  const void* down;       // [E, H, I]
  const float* weights;   // [T, K]
  const int* ids;         // [T, K]
  void* act;              // [T*K, I] scratch, input dtype
  float* y;               // [T*K, H] scratch, weighted down outputs per slot
  void* out;              // [T, H]
  int* counters;          // [H / 16] scratch, CTAs finished per h tile
  int T, K, E, H, I;
};

// Dynamic shared memory of one decode CTA, laid out as
//   [used-expert bitmap | misc ints | slot list (T*K) | 16-byte aligned fp32 reduction buffer].
struct DecodeSmem {
  int mask_words, misc_ints = 16, slot_ints, red_offset_bytes, red_floats, total_bytes;
  __host__ __device__ DecodeSmem(int E, int TK, int nt, int red_stride) {
    mask_words = (E + 31) / 32;
    slot_ints = TK;
    const int ints = mask_words + misc_ints + slot_ints;
    red_offset_bytes = ((ints * 4) + 15) / 16 * 16;
    red_floats = kDecodeWarps * nt * 8 * red_stride;
    total_bytes = red_offset_bytes + red_floats * 4;
  }
};

// Reduction buffer row stride per pair (gate_up: 16 gate + 16 up rows; down: 16), padded by one
// float to spread the shared-memory banks.
constexpr int kGateUpRedStride = 2 * kDecodeRows + 1;
constexpr int kDownRedStride = kDecodeRows + 1;

struct ExpertSlots {
  int expert;  // this CTA's expert, or -1 when blockIdx.y >= number of used experts
  int nused;   // number of distinct experts with at least one slot
  int npairs;  // slots routed to `expert`, listed in increasing slot order in s_slots
};

// Finds the j-th used expert (in id order) and lists its slots. Every thread returns the same.
__device__ __forceinline__ ExpertSlots find_expert_slots(const int* __restrict__ ids, int TK, int E, int j,
                                                         uint32_t* s_mask, int* s_misc, int* s_slots) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nwords = (E + 31) >> 5;
  for (int w = tid; w < nwords; w += kDecodeThreads) s_mask[w] = 0u;
  __syncthreads();
  for (int i = tid; i < TK; i += kDecodeThreads) {
    const int e = ids[i];
    if (e >= 0 && e < E) atomicOr(&s_mask[e >> 5], 1u << (e & 31));  // out-of-range ids are skipped
  }
  __syncthreads();
  if (tid == 0) {
    int seen = 0, found = -1;
    for (int w = 0; w < nwords; ++w) {
      uint32_t m = s_mask[w];
      const int c = __popc(m);
      if (found < 0 && j < seen + c) {
        for (int r = j - seen; r > 0; --r) m &= m - 1u;  // drop the lower set bits
        found = (w << 5) + __ffs(m) - 1;
      }
      seen += c;
    }
    s_misc[0] = found;
    s_misc[1] = seen;
  }
  __syncthreads();
  const int e = s_misc[0], nused = s_misc[1];
  if (e < 0) return {-1, nused, 0};
  // Ordered compaction of the slots whose id is e (ballot + per-warp counts).
  int base = 0;
  for (int start = 0; start < TK; start += kDecodeThreads) {
    const int i = start + tid;
    const bool hit = i < TK && ids[i] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) s_misc[2 + warp] = __popc(ballot);
    __syncthreads();
    int before = base, total = 0;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const int c = s_misc[2 + w];
      total += c;
      if (w < warp) before += c;
    }
    if (hit) s_slots[before + __popc(ballot & ((1u << lane) - 1u))] = i;
    base += total;
    __syncthreads();
  }
  return {e, nused, base};
}

// Chunks of 32 along k loaded per warp before the first mma: enough bytes in flight per warp
// while the accumulators (NT n tiles) stay in registers.
template <int NT>
constexpr int gate_up_unroll() { return NT == 1 ? 4 : (NT <= 4 ? 2 : 1); }
template <int NT>
constexpr int down_unroll() { return NT == 1 ? 6 : (NT == 2 ? 4 : 2); }

// U chunks (32 k each, kDecodeWarps apart) of the gate_up product: all loads first, then the mma.
template <typename T, int NT, int U>
__device__ __forceinline__ void gate_up_step(float (&ag)[NT][4], float (&au)[NT][4], const T* wg0, const T* wg8,
                                             const T* wu0, const T* wu8, const T* const (&xrow)[NT], int kc) {
  uint4 A[U][4], B[U][NT];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const size_t off = (size_t)(kc + u * kDecodeWarps) * 32;
    A[u][0] = load_stream16(wg0 + off);
    A[u][1] = load_stream16(wg8 + off);
    A[u][2] = load_stream16(wu0 + off);
    A[u][3] = load_stream16(wu8 + off);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) B[u][nt] = load_cached16(xrow[nt] + off);
  }
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mma_k32<T>(ag[nt], A[u][0], A[u][1], B[u][nt]);
      mma_k32<T>(au[nt], A[u][2], A[u][3], B[u][nt]);
    }
}

// U chunks of the down product; chunks at or past nchunks contribute zero. The weight loads
// are issued before the wait for the gate_up grid, the act loads after it.
template <typename T, int NT, int U>
__device__ __forceinline__ void down_step(float (&acc)[NT][4], const T* wd0, const T* wd8,
                                          const T* const (&arow)[NT], int kc, int nchunks) {
  uint4 A[U][2], B[U][NT];
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int k = kc + u * kDecodeWarps;
    const size_t off = (size_t)k * 32;
    A[u][0] = k < nchunks ? load_stream16(wd0 + off) : zero;
    A[u][1] = k < nchunks ? load_stream16(wd8 + off) : zero;
  }
  wait_for_previous_grid();
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int k = kc + u * kDecodeWarps;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) B[u][nt] = k < nchunks ? load_cached16(arow[nt] + (size_t)k * 32) : zero;
  }
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mma_k32<T>(acc[nt], A[u][0], A[u][1], B[u][nt]);
}

// Accumulator element (i) of n tile nt -> (row, pair column) of the 16 x (8*NT) warp tile.
__device__ __forceinline__ int acc_row(int i, int g) { return g + ((i >> 1) << 3); }
__device__ __forceinline__ int acc_col(int i, int nt, int c) { return nt * 8 + 2 * c + (i & 1); }

template <typename T, int NT>
__global__ void __launch_bounds__(kDecodeThreads) decode_gate_up_kernel(DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const DecodeSmem lay(p.E, p.T * p.K, NT, kGateUpRedStride);
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(smem);
  int* s_misc = reinterpret_cast<int*>(smem) + lay.mask_words;
  int* s_slots = s_misc + lay.misc_ints;
  float* red = reinterpret_cast<float*>(smem + lay.red_offset_bytes);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
  // The down launch that follows counts finished CTAs per h tile; start it from zero here
  // (stream order makes this visible to it), so no memset launch is needed.
  if (blockIdx.x == 0 && blockIdx.y == 0)
    for (int i = tid; i < p.H / kDecodeRows; i += kDecodeThreads) p.counters[i] = 0;
  // The down grid may start now (its CTAs find their expert and stream weights while this grid
  // drains); it waits for this grid's completion before it reads act or touches the counters.
  allow_next_grid();

  const ExpertSlots es = find_expert_slots(p.ids, p.T * p.K, p.E, blockIdx.y, s_mask, s_misc, s_slots);
  if (es.expert < 0) return;

  const int H = p.H, I = p.I, r0 = blockIdx.x * kDecodeRows;
  const T* wg0 = static_cast<const T*>(p.gate_up) + (size_t)es.expert * 2 * I * H + (size_t)(r0 + g) * H + 8 * c;
  const T* wg8 = wg0 + (size_t)8 * H;
  const T* wu0 = wg0 + (size_t)I * H;
  const T* wu8 = wu0 + (size_t)8 * H;
  const T* x = static_cast<const T*>(p.x);
  T* act = static_cast<T*>(p.act);
  const int nchunks = H / 32;
  constexpr int UNR = gate_up_unroll<NT>();

  for (int p0 = 0; p0 < es.npairs; p0 += NT * 8) {
    // Token row of this thread's pair column in each n tile. Columns past the pair count read
    // token 0 (finite, in bounds); their results are never stored.
    const T* xrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int pr = p0 + nt * 8 + g;
      const int tok = pr < es.npairs ? s_slots[pr] / p.K : 0;
      xrow[nt] = x + (size_t)tok * H + 8 * c;
    }
    float ag[NT][4], au[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) ag[nt][i] = au[nt][i] = 0.f;

    // Full groups of UNR chunks with every load issued before the first mma, then the rest.
    int kc = warp;
    for (; kc + (UNR - 1) * kDecodeWarps < nchunks; kc += UNR * kDecodeWarps)
      gate_up_step<T, NT, UNR>(ag, au, wg0, wg8, wu0, wu8, xrow, kc);
    for (; kc < nchunks; kc += kDecodeWarps) gate_up_step<T, NT, 1>(ag, au, wg0, wg8, wu0, wu8, xrow, kc);

    // Partial sums of the 8 warps meet in shared memory: red[warp][pair][row] (gate rows 0..15,
    // up rows 16..31), summed below in warp order.
    float* my = red + (size_t)warp * NT * 8 * kGateUpRedStride;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = acc_row(i, g), col = acc_col(i, nt, c);
        my[col * kGateUpRedStride + row] = ag[nt][i];
        my[col * kGateUpRedStride + kDecodeRows + row] = au[nt][i];
      }
    __syncthreads();
    const int npass = min(NT * 8, es.npairs - p0);
    for (int idx = tid; idx < npass * kDecodeRows; idx += kDecodeThreads) {
      const int pl = idx / kDecodeRows, r = idx % kDecodeRows;
      float gs = 0.f, us = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float* src = red + ((size_t)w * NT * 8 + pl) * kGateUpRedStride;
        gs += src[r];
        us += src[kDecodeRows + r];
      }
      const int slot = s_slots[p0 + pl];
      act[(size_t)slot * I + r0 + r] = Mma16<T>::from_float(silu(gs) * us);
    }
    __syncthreads();
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kDecodeThreads) decode_down_kernel(DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const DecodeSmem lay(p.E, p.T * p.K, NT, kDownRedStride);
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(smem);
  int* s_misc = reinterpret_cast<int*>(smem) + lay.mask_words;
  int* s_slots = s_misc + lay.misc_ints;
  float* red = reinterpret_cast<float*>(smem + lay.red_offset_bytes);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
  const int H = p.H, I = p.I, K = p.K, h0 = blockIdx.x * kDecodeRows;
  T* out = static_cast<T*>(p.out);

  const ExpertSlots es = find_expert_slots(p.ids, p.T * K, p.E, blockIdx.y, s_mask, s_misc, s_slots);
  if (es.expert < 0) {
    wait_for_previous_grid();
    if (es.nused == 0 && blockIdx.y == 0)  // no slot routed anywhere: the output is zero
      for (int idx = tid; idx < p.T * kDecodeRows; idx += kDecodeThreads)
        out[(size_t)(idx / kDecodeRows) * H + h0 + idx % kDecodeRows] = Mma16<T>::from_float(0.f);
    return;
  }

  const T* wd0 = static_cast<const T*>(p.down) + (size_t)es.expert * H * I + (size_t)(h0 + g) * I + 8 * c;
  const T* wd8 = wd0 + (size_t)8 * I;
  const T* act = static_cast<const T*>(p.act);
  const int nchunks = I / 32;
  constexpr int UNR = down_unroll<NT>();

  for (int p0 = 0; p0 < es.npairs; p0 += NT * 8) {
    // act row of this thread's pair column; columns past the count reuse the first pair's row.
    const T* arow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int pr = p0 + nt * 8 + g;
      arow[nt] = act + (size_t)s_slots[pr < es.npairs ? pr : p0] * I + 8 * c;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

    // Groups of UNR chunks, the last one masked: for I = 1408 every warp needs one group of 6.
    for (int kc = warp; kc < nchunks; kc += UNR * kDecodeWarps)
      down_step<T, NT, UNR>(acc, wd0, wd8, arow, kc, nchunks);
    wait_for_previous_grid();  // warps with no chunk still must not run ahead of gate_up

    float* my = red + (size_t)warp * NT * 8 * kDownRedStride;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) my[acc_col(i, nt, c) * kDownRedStride + acc_row(i, g)] = acc[nt][i];
    __syncthreads();
    const int npass = min(NT * 8, es.npairs - p0);
    for (int idx = tid; idx < npass * kDecodeRows; idx += kDecodeThreads) {
      const int pl = idx / kDecodeRows, r = idx % kDecodeRows;
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) s += red[((size_t)w * NT * 8 + pl) * kDownRedStride + r];
      const int slot = s_slots[p0 + pl];
      p.y[(size_t)slot * H + h0 + r] = p.weights[slot] * s;
    }
    __syncthreads();
  }

  // Publish this CTA's y rows; the last of the nused CTAs of this h tile does the combine.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_misc[0] = (atomicAdd(&p.counters[blockIdx.x], 1) == es.nused - 1);
  __syncthreads();
  if (!s_misc[0]) return;
  __threadfence();
  for (int idx = tid; idx < p.T * kDecodeRows; idx += kDecodeThreads) {
    const int t = idx / kDecodeRows, r = idx % kDecodeRows;
    float s = 0.f;
    for (int k = 0; k < K; ++k) {  // slot order: deterministic
      const int slot = t * K + k, e = p.ids[slot];
      if (e >= 0 && e < p.E) s += __ldcg(&p.y[(size_t)slot * H + h0 + r]);
    }
    out[(size_t)t * H + h0 + r] = Mma16<T>::from_float(s);
  }
  if (tid == 0) p.counters[blockIdx.x] = 0;  // ready for the next call even without the reset
}

}  // namespace allocmoe::cuda_experts
