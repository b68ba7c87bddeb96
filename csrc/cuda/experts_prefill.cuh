// Large-T ("prefill") path of the CUDA `experts` op: bf16/fp16, silu, no biases, contiguous
// gate_up [E, 2I, H] and down [E, H, I], H and I multiples of 32. Four launches, no host sync,
// every buffer sized by the worst case T*K (no data-dependent allocation):
//   1. align (one CTA): count slots per expert, prefix sums, scatter the slot indices into
//      per-expert contiguous lists (sorted_slot), and a table of 128-row tiles (expert, first row).
//   2. gate_up grouped GEMM: per tile, rows = the expert's slots (hidden rows gathered), columns
//      = 64 gate rows and the matching 64 up rows of gate_up[e]; SiLU(gate)*up in the epilogue,
//      rounded to the input dtype, into act_sorted[row, I].
//   3. down grouped GEMM: act_sorted rows x down[e] rows, times the routing weight, into
//      y[slot, H] (fp32).
//   4. combine (combine_slots_kernel): out[t] = sum over valid k of y[t*K + k] in slot order.
// The GEMMs are mma.sync m16n8k16 with fp32 accumulators, 128x128x32 CTA tiles, 8 warps (2 x 4),
// a 3-stage cp.async pipeline and XOR-swizzled shared memory read by ldmatrix. The tile grid is
// sized by the worst case (ceil(T*K/128) + min(E, T*K) tiles); CTAs past the real count exit.
// Not tuned (no wgmma/TMA yet); the order of a list only moves rows, each row's result is the same.
#pragma once

#include "experts_mma.cuh"

namespace allocmoe::cuda_experts {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3, kGemmThreads = 256, kAlignThreads = 1024;

struct PrefillParams {
  const void* x;            // hidden [T, H]
  const void* gate_up;      // [E, 2I, H]
  const void* down;         // [E, H, I]
  const float* weights;     // [T, K]
  const int* ids;           // [T, K]
  int* sorted_slot;         // [T*K] slots grouped by expert
  int* expert_offset;       // [E + 1] first row of each expert's list in sorted_slot
  int* tile_expert;         // [max_tiles]
  int* tile_row;            // [max_tiles] first sorted row of the tile
  int* num_tiles;           // [1]
  int* tile_done;           // [max_tiles] zeroed by the align kernel (the wide path's tile readiness)
  int* next_item;           // [1] zeroed by the align kernel (the wide path's item counter)
  int* slot_row;            // [T*K] sorted row of each valid slot (the wide path's combine)
  void* act;                // [T*K, I] scratch, rows in sorted order, input dtype
  float* y;                 // [T*K, H] scratch, fp32 down output: per slot times its weight (prefill),
                            // per sorted row unweighted (wide; the combine applies the weights)
  void* out;                // [T, H]
  int T, K, E, H, I;
};

// Most tiles of tile_rows rows the align kernel can make (each used expert's last tile is partial).
inline int prefill_max_tiles(int64_t TK, int64_t E, int tile_rows = kBM) {
  return static_cast<int>((TK + tile_rows - 1) / tile_rows + (E < TK ? E : TK));
}

// Tiles of tile_rows rows (kBM here; the wide path, experts_wide.cuh, takes smaller ones).
// Shared memory: count[E], cursor[E], tile_start[E]. Launched as a programmatic dependent launch
// (the wide path) it reads ids only once the grid before is done, and lets the next grid's CTAs
// become resident (and wait) while it runs; launched normally (prefill) both are no-ops.
__global__ void __launch_bounds__(kAlignThreads) prefill_align_kernel(PrefillParams p, int tile_rows) {
  extern __shared__ int s_align[];
  int* s_count = s_align;
  int* s_cursor = s_align + p.E;
  int* s_tile = s_align + 2 * p.E;
  const int tid = threadIdx.x, TK = p.T * p.K;
  for (int e = tid; e < p.E; e += kAlignThreads) s_count[e] = 0;
  wait_for_previous_grid();
  allow_next_grid();
  __syncthreads();
  for (int i = tid; i < TK; i += kAlignThreads) {
    const int e = p.ids[i];
    if (e >= 0 && e < p.E) atomicAdd(&s_count[e], 1);  // out-of-range ids are skipped
  }
  __syncthreads();
  if (tid == 0) {  // E is small (<= a few hundred): a serial scan is cheap
    int rows = 0, tiles = 0;
    for (int e = 0; e < p.E; ++e) {
      s_cursor[e] = rows;
      s_tile[e] = tiles;
      p.expert_offset[e] = rows;
      rows += s_count[e];
      tiles += (s_count[e] + tile_rows - 1) / tile_rows;
    }
    p.expert_offset[p.E] = rows;
    *p.num_tiles = tiles;
    *p.next_item = 0;
  }
  __syncthreads();
  for (int e = tid; e < p.E; e += kAlignThreads) {
    const int n = (s_count[e] + tile_rows - 1) / tile_rows;
    for (int t = 0; t < n; ++t) {
      p.tile_expert[s_tile[e] + t] = e;
      p.tile_row[s_tile[e] + t] = s_cursor[e] + t * tile_rows;
      p.tile_done[s_tile[e] + t] = 0;
    }
  }
  __syncthreads();
  for (int i = tid; i < TK; i += kAlignThreads) {
    const int e = p.ids[i];
    if (e >= 0 && e < p.E) {
      const int row = atomicAdd(&s_cursor[e], 1);
      p.sorted_slot[row] = i;
      p.slot_row[i] = row;
    }
  }
}

// Element offset of 16-byte chunk ch (0..3) of tile row r: chunks XOR-swizzled by (r/2)%4 so that
// the 8 row addresses of one ldmatrix phase fall in 8 different bank groups.
__device__ __forceinline__ int swz(int r, int ch) { return r * kBK + ((ch ^ ((r >> 1) & 3)) << 3); }

// Main loop shared by both GEMMs: acc[mi][ni] += A[rows of warp] * B[cols of warp]^T over k.
// a_src/b_src: this thread's two rows (tid/4 and tid/4+64) at chunk tid%4, bytes 16 or 0 (zero fill).
// b_row_of(q, h): tile row of the B n8 tile (q: pair of n8 tiles loaded by one ldmatrix_x4).
template <typename T, typename BRowFn>
__device__ __forceinline__ void gemm_mainloop(float (&acc)[4][4][4], T* sA, T* sB, const T* const (&a_src)[2],
                                              const int (&a_bytes)[2], const T* const (&b_src)[2],
                                              const int (&b_bytes)[2], int nk, BRowFn b_row_of) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2;
  const int lr = tid >> 2, lc = tid & 3;
  auto load_stage = [&](int stage, int kt) {
    T* a = sA + stage * kBM * kBK;
    T* b = sB + stage * kBN * kBK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      cp_async16(a + swz(lr + 64 * i, lc), a_src[i] + (size_t)kt * kBK, a_bytes[i]);
      cp_async16(b + swz(lr + 64 * i, lc), b_src[i] + (size_t)kt * kBK, b_bytes[i]);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for all threads; stage kt-1 is no longer read
    const int nxt = kt + kStages - 1;
    if (nxt < nk) load_stage(nxt % kStages, nxt);
    cp_async_commit();
    const T* a = sA + (kt % kStages) * kBM * kBK;
    const T* b = sB + (kt % kStages) * kBN * kBK;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) ldmatrix_x4(af[mi], a + swz(wm * 64 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int q = 0; q < 2; ++q)
        ldmatrix_x4(bf[q], b + swz(b_row_of(q) + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          Mma16<T>::mma(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[ni >> 1][(ni & 1) * 2],
                        bf[ni >> 1][(ni & 1) * 2 + 1]);
    }
  }
}

// Tile of blockIdx.y: expert, first sorted row, valid rows; false when past the real tile count.
__device__ __forceinline__ bool prefill_tile(const PrefillParams& p, int& e, int& m0, int& rows) {
  if ((int)blockIdx.y >= *p.num_tiles) return false;
  e = p.tile_expert[blockIdx.y];
  m0 = p.tile_row[blockIdx.y];
  rows = min(kBM, p.expert_offset[e + 1] - m0);
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) prefill_gate_up_kernel(PrefillParams p) {
  __shared__ __align__(128) T sA[kStages * kBM * kBK];
  __shared__ __align__(128) T sB[kStages * kBN * kBK];
  int e, m0, rows;
  if (!prefill_tile(p, e, m0, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int lr = tid >> 2, lc = tid & 3, H = p.H, I = p.I;
  const int n0 = blockIdx.x * (kBN / 2);  // intermediate columns n0..n0+63 (gate and up)
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.gate_up) + (size_t)e * 2 * I * H;
  const T* a_src[2];
  const T* b_src[2];
  int a_bytes[2], b_bytes[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lr + 64 * i;
    const bool row_ok = r < rows;
    const int tok = row_ok ? p.sorted_slot[m0 + r] / p.K : 0;
    a_src[i] = x + (size_t)tok * H + lc * 8;
    a_bytes[i] = row_ok ? 16 : 0;
    // B tile rows 0..63: gate rows n0.., rows 64..127: up rows I+n0..
    const int n = n0 + (r & 63);
    const bool col_ok = n < I;
    b_src[i] = w + (size_t)(col_ok ? (r < 64 ? n : I + n) : 0) * H + lc * 8;
    b_bytes[i] = col_ok ? 16 : 0;
  }
  float acc[4][4][4] = {};
  // Warp wn owns gate columns 16wn..16wn+15 (n8 tiles 0,1) and the same up columns (tiles 2,3).
  gemm_mainloop<T>(acc, sA, sB, a_src, a_bytes, b_src, b_bytes, H / kBK,
                   [&](int q) { return q * 64 + wn * 16; });
  T* act = static_cast<T*>(p.act);
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * 64 + mi * 16 + g + half * 8;
      if (r >= rows) continue;
#pragma unroll
      for (int ni = 0; ni < 2; ++ni) {
        const int n = n0 + wn * 16 + ni * 8 + 2 * c;
        if (n >= I) continue;
        const float a0 = silu(acc[mi][ni][2 * half]) * acc[mi][ni + 2][2 * half];
        const float a1 = silu(acc[mi][ni][2 * half + 1]) * acc[mi][ni + 2][2 * half + 1];
        *reinterpret_cast<uint32_t*>(act + (size_t)(m0 + r) * I + n) = Mma16<T>::pack2(a0, a1);
      }
    }
}

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) prefill_down_kernel(PrefillParams p) {
  __shared__ __align__(128) T sA[kStages * kBM * kBK];
  __shared__ __align__(128) T sB[kStages * kBN * kBK];
  int e, m0, rows;
  if (!prefill_tile(p, e, m0, rows)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int lr = tid >> 2, lc = tid & 3, H = p.H, I = p.I;
  const int n0 = blockIdx.x * kBN;  // output columns (h)
  const T* act = static_cast<const T*>(p.act);
  const T* w = static_cast<const T*>(p.down) + (size_t)e * H * I;
  const T* a_src[2];
  const T* b_src[2];
  int a_bytes[2], b_bytes[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lr + 64 * i;
    const bool row_ok = r < rows;
    a_src[i] = act + (size_t)(row_ok ? m0 + r : 0) * I + lc * 8;
    a_bytes[i] = row_ok ? 16 : 0;
    const bool col_ok = n0 + r < H;
    b_src[i] = w + (size_t)(col_ok ? n0 + r : 0) * I + lc * 8;
    b_bytes[i] = col_ok ? 16 : 0;
  }
  float acc[4][4][4] = {};
  gemm_mainloop<T>(acc, sA, sB, a_src, a_bytes, b_src, b_bytes, I / kBK,
                   [&](int q) { return wn * 32 + q * 16; });
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * 64 + mi * 16 + g + half * 8;
      if (r >= rows) continue;
      const int slot = p.sorted_slot[m0 + r];
      const float wt = p.weights[slot];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int h = n0 + wn * 32 + ni * 8 + 2 * c;
        if (h >= H) continue;
        *reinterpret_cast<float2*>(p.y + (size_t)slot * H + h) =
            make_float2(wt * acc[mi][ni][2 * half], wt * acc[mi][ni][2 * half + 1]);
      }
    }
}

}  // namespace allocmoe::cuda_experts
