// Mid-T ("wide") path of the CUDA `experts` op on sm_90: bf16/fp16, silu, no biases, contiguous
// gate_up [E, 2I, H] and down [E, H, I], I a multiple of 64, H a multiple of 128.
//
// From a few dozen tokens on every expert is touched and each gets tens of tokens: the op is
// still one read of all the weights (memory-bound up to a few hundred tokens at the
// DeepSeek-V2-Lite shape), but the products now cost a tenth of the read and more, and the
// tokens' rows (the B operand) are read once per weight tile. The skinny path (experts_skinny.cuh)
// loads weights into registers and multiplies in the same warps, so its products add to the
// read instead of hiding under it (T=256: 1.18x the floor against 1.11x at T=64). Here the
// weights travel through the copy engine into a ring of shared-memory stages, as on the stream
// path (experts_stream.cuh), while the consumer warps multiply: warp specialisation.
//
// Launches: the prefill path's align kernel (tiles of up to kPairs (token, expert) pairs of
// one expert, rows of act and y in sorted order, tile counters zeroed), then ONE persistent
// cooperative launch of one CTA per SM for both projections (wide_kernel), then
// combine_slots_kernel (which applies the routing weights); all programmatic dependent launches.
// Why tensor maps: a plain bulk copy (cp.async.bulk, as the stream path uses) costs the SM's copy
// engine about the same whatever its size up to 1 KB (measured on H100, bench/stream_kernel_harness.cu
// wide: 20-33 million copies a second per SM, so 256-byte copies read 0.8-1.1 TB/s and 1 KB
// copies 2.8-2.9 TB/s); the weight rows of a stage are 256 bytes each, so the weights come as
// tensor-map boxes (cp.async.bulk.tensor: one instruction moves 64 or 128 rows of 64 k; the
// weight walk alone reads 3.1 TB/s with 3 stages or more, whatever the box shape), and the
// tokens' rows, gathered by slot, through cp.async (the load/store path) into the same stage.
// A work item is (tile, block of kWideRows weight rows): gate_up rows are 64 intermediate rows,
// gate and up interleaved per warp (warp w: gate rows 8w..8w+7, then the up rows of the same
// intermediates), so one m16 tile holds a row's gate and up value in the same thread; down rows
// are 128 output rows. A stage holds kWideK of k for the item's 128 weight rows (weight producer
// warp, tensor-map boxes) and for its tile's token rows (operand warp, cp.async: x rows for
// gate_up, act rows for down), so each B row piece serves 128 weight rows. Each consumer warp
// owns one m16 row tile and every k of the stage: no cross-warp reduction; the epilogue writes
// act (SiLU(gate)*up, rounded to the dtype) or y (fp32, row = the pair's sorted row).
// Deterministic run to run: the order of rows within a tile only moves rows.
#pragma once

#include <cuda.h>  // CUtensorMap (encoded on the host: encode_wide_maps)

#include "tensor_map.h"

#include "experts_prefill.cuh"
#include "experts_stream.cuh"

namespace allocmoe::cuda_experts {

constexpr int kWideRows = 128;                // weight rows per item: 8 consumer warps x one m16 tile
constexpr int kWideK = 128;                   // k per stage: two tensor-map boxes of 64 k (128-byte rows)
constexpr int kWideBoxK = 64, kWideHalfBytes = kWideRows * kWideBoxK * 2;
constexpr int kWideBPitch = kWideK * 2 + 64;  // 80 words = 16 mod 32: token rows g, g+1 on disjoint bank halves
constexpr int kWideABytes = 2 * kWideHalfBytes;
constexpr int kWideMaxStages = 8;
constexpr int kWideMinStages = 3;
constexpr int kWideQueue = 4;  // items claimed by the weight producer and not yet taken by every role
// Shared memory before the ring: the ring's full/empty mbarriers, the item queue's full/empty
// mbarriers and items, the operand warp's row table (up to 64 ints); then the ring, 1024-byte
// aligned at run time (the 128-byte swizzle of the tensor copies needs it).
constexpr int kWideQueueBarsAt = 16 * kWideMaxStages, kWideQueueAt = kWideQueueBarsAt + 16 * kWideQueue;
constexpr int kWideRowTableAt = kWideQueueAt + 4 * kWideQueue;
constexpr int kWideHeader = 640;
constexpr int kWideRingAt = kWideHeader + 1024;  // + the run-time 1024-byte alignment (128-byte swizzle)
static_assert(kWideRowTableAt + 4 * 64 <= kWideHeader, "row table of 64 pairs before the ring");
static_assert(kWideHalfBytes % 1024 == 0 && (32 * kWideBPitch) % 1024 == 0, "every box 1024-byte aligned");
static_assert(kWideRows == kStreamConsumerWarps * 16, "one m16 row tile per consumer warp");
// Box rows of the tensor maps: per 64 k, gate_up comes as a box of 64 gate rows and one of the
// matching 64 up rows, down as one box of 128 output rows. A stage's weights are two halves (k
// 0..63, 64..127) of 128 rows x 128 bytes, chunks swizzled: wide_a_offset.
constexpr int kWideGateUpBoxRows = kWideRows / 2, kWideDownBoxRows = kWideRows;
// Byte offset in a stage of k elements 8c'..8c'+7 of weight row r, c' = 4 kc + c (kc: 32-wide k
// chunk, 0..3): with the 128-byte swizzle the 8 rows g of an MMA fragment load fall on 8 different
// 16-byte bank groups (no bank conflicts; unswizzled 256-byte rows put all 8 on the same ones).
__device__ __forceinline__ int wide_a_offset(int r, int kc, int c) {
  return (kc >> 1) * kWideHalfBytes + r * 128 + (((((kc & 1) << 2) | c) ^ (r & 7)) << 4);
}
// The two tensor maps of the weights (false if the driver cannot encode them).
inline bool encode_wide_maps(CUtensorMap* gate_up_map, CUtensorMap* down_map, const void* gate_up, const void* down,
                             int64_t E, int64_t H, int64_t I) {
  return cuda::encode_weight_map(gate_up_map, gate_up, E, 2 * I, H, kWideBoxK, kWideGateUpBoxRows, true) &&
         cuda::encode_weight_map(down_map, down, E, H, I, kWideBoxK, kWideDownBoxRows, true);
}

// Token rows per tile (kPairs): 32 while an expert rarely gets more (T*K <= 16 E, on average at
// most 16 pairs per expert), else 64, so that an expert's weights are streamed once per tile as
// seldom as possible; 64-pair stages are deeper in shared memory, so the ring is shallower.
__host__ __device__ constexpr int wide_pairs(int64_t TK, int64_t E) { return TK <= 16 * E ? 32 : 64; }
__host__ __device__ constexpr int wide_stage_bytes(int pairs) { return kWideABytes + pairs * kWideBPitch; }
__host__ __device__ constexpr int wide_smem_bytes(int stages, int pairs) {
  return kWideRingAt + stages * wide_stage_bytes(pairs);
}
inline int wide_fit_stages(int smem_optin, int pairs) {
  const int n = (smem_optin - kWideRingAt) / wide_stage_bytes(pairs);
  return n < kWideMaxStages ? n : kWideMaxStages;
}

// Harness-only experiments (bench/stream_kernel_harness.cu, never in the library build): 1 skips
// the operand warp's gathers, 2 the consumers' MMAs (wrong results, for timing only).
#ifndef ALLOCMOE_WIDE_DIAG
#define ALLOCMOE_WIDE_DIAG 0
#endif

// One arrival on bar once every cp.async this thread issued before has landed (the barrier's
// count includes it: .noinc).
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Consumer timing hooks of the harness (ALLOCMOE_STREAM_TRACE): cycles in the full-barrier waits
// and between a stage's arrival and its release, summed over one consumer warp's items.
struct WideStamp {
  long long wait = 0, busy = 0;
  bool first_stage = false, first_down = false;  // stamp the next arrival as event 2 / 6
};

// One consumer warp's share of one item with NT n8 tiles of pairs: acc[nt] (nt < NT) = its m16
// row tile (weight rows arow0 and arow8 of the stage, for this thread's g) times the tile's
// token rows, over every stage of the item. Per half stage (64 k) all the fragments are loaded
// before the MMAs; two accumulator sets (even and odd 32-wide k chunks) halve the chains of
// dependent MMAs. Measured on H100 (harness, consumer warp 0): with loads behind per-chunk
// branches and one chain, a stage took ~1200 cycles at 1 n8 tile and ~2200 at 3, as long as
// the stage's weights take to arrive, so the consumers, not the copies, set the pace.
template <typename T, int NT, int kMaxNT>
__device__ __forceinline__ void wide_consume_item(float (&acc)[kMaxNT][4], const unsigned char* ring_ptr, RingPos& pos,
                                                  int stages, uint32_t full0, uint32_t empty0, int kdim, int arow0,
                                                  int arow8, int lane, WideStamp& stamp) {
  const int g = lane >> 2, c = lane & 3;
  constexpr int kStageBytes = wide_stage_bytes(kMaxNT * 8);
  float part[2][NT][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[s][nt][i] = 0.f;
  for (int k0 = 0; k0 < kdim; k0 += kWideK) {
    const bool both_halves = kdim - k0 > kWideBoxK;  // kdim is a multiple of 64
#ifdef ALLOCMOE_STREAM_TRACE
    const long long t_wait = clock64();
#endif
    mbar_wait(full0 + 8 * pos.stage, pos.phase);
#ifdef ALLOCMOE_STREAM_TRACE
    const long long t_got = clock64();
    stamp.wait += t_got - t_wait;
    if (stamp.first_stage) STREAM_TRACE(2), stamp.first_stage = false;
    if (stamp.first_down) STREAM_TRACE(6), stamp.first_down = false;
#endif
    const unsigned char* st = ring_ptr + pos.stage * kStageBytes;
    const unsigned char* bt = st + kWideABytes + g * kWideBPitch;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 1 && !both_halves) break;
      uint4 a[2][2], b[2][NT];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int kc = 2 * h + j;
        a[j][0] = load_shared16(st + wide_a_offset(arow0, kc, c));
        a[j][1] = load_shared16(st + wide_a_offset(arow8, kc, c));
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) b[j][nt] = load_shared16(bt + nt * 8 * kWideBPitch + (kc * 32 + 8 * c) * 2);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          if (ALLOCMOE_WIDE_DIAG != 2) mma_k32<T>(part[j][nt], a[j][0], a[j][1], b[j][nt]);
    }
#ifdef ALLOCMOE_STREAM_TRACE
    stamp.busy += clock64() - t_got;
#endif
    mbar_arrive(empty0 + 8 * pos.stage);  // orders this thread's reads before the next writes
    pos.next(stages);
  }
#pragma unroll
  for (int nt = 0; nt < kMaxNT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = nt < NT ? part[0][nt][i] + part[1][nt][i] : 0.f;
}

// Tile readiness between the two phases of the one launch: every consumer warp adds 1 to its
// tile's counter (scratch, zeroed by the align kernel) once its act values of a gate_up item are
// stored; a down item's operand warp acquires the counter at gate_up blocks x consumer warps.
__device__ __forceinline__ void wide_tile_release(int* counter) {
  __syncwarp();  // the warp's act stores, ordered before lane 0's release (cumulative at gpu scope)
  if ((threadIdx.x & 31) == 0) red_add_gpu(counter, 1, true);
}
__device__ __forceinline__ void wide_tile_acquire(const int* counter, int target) {
  while (ld_acquire_gpu(counter) < target) __nanosleep(64);  // every lane acquires: its own cp.async reads of act come after
}

// Both phases in ONE cooperative launch (one CTA per SM, all resident): the items are every
// gate_up item (tile, block of 64 intermediates: x -> act), then every down item (tile, block of
// 128 output rows: act -> y). A down item waits only for the gate_up items of its own tile
// (wide_tile_acquire), so the CTAs that finish gate_up early start on down while the others
// drain, instead of the whole grid waiting at a launch boundary. Items are claimed in order from
// a global counter (the first one of each CTA is blockIdx.x), so a CTA that streams faster takes
// more of them: measured on H100 with two launches and items dealt round robin, the CTAs' gate_up
// ends spread over 45-75 us at T = 64 and 256, far more than one item (~20 us). No deadlock: each
// CTA runs its items in the order it claimed them, gate_up items wait for nothing but their own
// ring, and every gate_up item is claimed before any down item.
// Inside the CTA the weight producer claims and passes each item to the operand warp and the
// consumer warps through a queue of kWideQueue slots (mbarriers: full, one arrival by the
// producer; empty, one by the operand warp and one per consumer warp).
// gate_up_map: [E, 2I, H] in boxes of 64 k x 64 rows; down_map: [E, H, I] in boxes of 64 k x
// 128 rows (encode_wide_maps); stages: the ring depth the launch sized.
template <typename T, int kPairs>
__global__ void __launch_bounds__(kStreamThreads, 1)
    wide_kernel(PrefillParams p, const __grid_constant__ CUtensorMap gate_up_map,
                const __grid_constant__ CUtensorMap down_map, int stages) {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t full0 = smem_addr(smem), empty0 = full0 + 8 * kWideMaxStages;
  const uint32_t qfull0 = full0 + kWideQueueBarsAt, qempty0 = qfull0 + 8 * kWideQueue;
  int* s_item = reinterpret_cast<int*>(smem + kWideQueueAt);
  int* s_row = reinterpret_cast<int*>(smem + kWideRowTableAt);  // operand warp: the item's token rows
  const uint32_t ring = (smem_addr(smem) + kWideHeader + 1023) / 1024 * 1024;
  unsigned char* ring_ptr = smem + (ring - smem_addr(smem));
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      mbar_init(full0 + 8 * i, 1 + 32);  // the weight producer's expect_tx + the operand warp's 32 lanes
      mbar_init(empty0 + 8 * i, kStreamConsumers);
    }
    for (int q = 0; q < kWideQueue; ++q) {
      mbar_init(qfull0 + 8 * q, 1);
      mbar_init(qempty0 + 8 * q, 1 + kStreamConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();
  STREAM_TRACE(0);
  wait_for_previous_grid();  // the align grid: tile table, sorted slots, zeroed tile counters
  allow_next_grid();
  const int gu_blocks = p.I / kWideGateUpBoxRows, dn_blocks = p.H / kWideRows;
  const int n_gate_up = *p.num_tiles * gu_blocks, n_items = n_gate_up + *p.num_tiles * dn_blocks;
  const int ready = gu_blocks * kStreamConsumerWarps;  // a tile's counter once its act is complete
  STREAM_TRACE(1);
  // Item -> (phase, tile, block of weight rows).
  auto decode = [&](int item, int& tile, int& rb) {
    const bool gu = item < n_gate_up;
    const int i = gu ? item : item - n_gate_up, blocks = gu ? gu_blocks : dn_blocks;
    tile = i / blocks, rb = i % blocks;
    return gu;
  };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The next item of the queue, for the operand warp and the consumer warps (n_items or more: no more).
  auto take = [&](int q) {
    const int slot = q % kWideQueue;
    mbar_wait(qfull0 + 8 * slot, (q / kWideQueue) & 1);
    const int item = s_item[slot];
    __syncwarp();
    if (lane == 0) mbar_arrive(qempty0 + 8 * slot);
    return item;
  };
  constexpr int kStageBytes = wide_stage_bytes(kPairs), kNTiles = kPairs / 8;
  RingPos pos;
  if (warp == kStreamWeightWarp) {
    if (lane != 0) return;
    const uint64_t pol = evict_first_policy();
    for (int q = 0, item = blockIdx.x;; ++q) {
      const int slot = q % kWideQueue;
      mbar_wait(qempty0 + 8 * slot, ((q / kWideQueue) & 1) ^ 1u);
      s_item[slot] = item;
      mbar_arrive(qfull0 + 8 * slot);  // release: the item is visible to the waiters' acquire
      if (item >= n_items) break;
      const int next = atomicAdd(p.next_item, 1) + static_cast<int>(gridDim.x);  // used after this item
      int tile, rb;
      const bool gu = decode(item, tile, rb);
      const int e = p.tile_expert[tile], kdim = gu ? p.H : p.I;
      for (int k0 = 0; k0 < kdim; k0 += kWideK) {
        const uint32_t bar = full0 + 8 * pos.stage, st = ring + pos.stage * kStageBytes;
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        const int halves = kdim - k0 > kWideBoxK ? 2 : 1;  // kdim is a multiple of 64
        mbar_arrive_expect_tx(bar, halves * kWideHalfBytes);
        for (int h = 0; h < halves; ++h) {
          const uint32_t dst = st + h * kWideHalfBytes;
          const int k = k0 + h * kWideBoxK;
          if (gu) {
            tma_load_3d(dst, &gate_up_map, k, rb * kWideGateUpBoxRows, e, bar, pol);
            tma_load_3d(dst + kWideHalfBytes / 2, &gate_up_map, k, p.I + rb * kWideGateUpBoxRows, e, bar, pol);
          } else {
            tma_load_3d(dst, &down_map, k, rb * kWideDownBoxRows, e, bar, pol);
          }
        }
        pos.next(stages);
      }
      item = next;
    }
  } else if (warp == kStreamOperandWarp) {
    // Half a warp per token row (16 lanes x 16 bytes = the stage's 256 bytes of k), two rows per
    // instruction: whole 32-byte sectors. Rows past npass and k past kdim are left as they are:
    // the consumers skip k past kdim, and a stale row only reaches MMA columns that are dropped.
    const int half = lane >> 4, chunk = lane & 15;
    for (int q = 0;; ++q) {
      const int item = take(q);
      if (item >= n_items) break;
      int tile, rb;
      const bool gu = decode(item, tile, rb);
      const int e = p.tile_expert[tile], r0 = p.tile_row[tile], kdim = gu ? p.H : p.I;
      const int npass = min(kPairs, p.expert_offset[e + 1] - r0);
      const T* src = static_cast<const T*>(gu ? p.x : p.act) + 8 * chunk;
      const size_t pitch = gu ? p.H : p.I;
      __syncwarp();  // the previous item's row table is no longer read
      for (int r = lane; r < npass; r += 32) s_row[r] = gu ? p.sorted_slot[r0 + r] / p.K : r0 + r;
      __syncwarp();
      if (!gu) wide_tile_acquire(p.tile_done + tile, ready);
      for (int k0 = 0; k0 < kdim; k0 += kWideK) {
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        unsigned char* dst = ring_ptr + pos.stage * kStageBytes + kWideABytes + 16 * chunk;
        if (ALLOCMOE_WIDE_DIAG != 1 && k0 + 8 * chunk < kdim)
          for (int r = half; r < npass; r += 2) cp_async16(dst + r * kWideBPitch, src + s_row[r] * pitch + k0, 16);
        cp_async_arrive_noinc(full0 + 8 * pos.stage);
        pos.next(stages);
      }
    }
  } else {
    const int g = lane >> 2, c = lane & 3;
    bool in_down = false;
    WideStamp stamp;
    stamp.first_stage = true;
    for (int q = 0;; ++q) {
      const int item = take(q);
      if (item >= n_items) break;
      int tile, rb;
      const bool gu = decode(item, tile, rb);
      if (!gu && !in_down) in_down = stamp.first_down = true, STREAM_TRACE(3);  // this CTA's gate_up items are done
      const int e = p.tile_expert[tile], r0 = p.tile_row[tile], kdim = gu ? p.H : p.I;
      const int npass = min(kPairs, p.expert_offset[e + 1] - r0), ntiles = (npass + 7) / 8;
      // This warp's m16 tile: rows g and g + 8 of the MMA are gate row 8w+g and its up row
      // (gate_up), or output rows 16w+g and 16w+g+8 (down).
      const int arow0 = gu ? 8 * warp + g : 16 * warp + g;
      const int arow8 = gu ? kWideGateUpBoxRows + 8 * warp + g : 16 * warp + g + 8;
      float acc[kNTiles][4];
      switch (ntiles) {  // a compile-time count of n8 tiles: no branches between the loads and the MMAs
#define ALLOCMOE_WIDE_NT(n) \
  case n:                   \
    if constexpr (n <= kNTiles) wide_consume_item<T, n>(acc, ring_ptr, pos, stages, full0, empty0, kdim, arow0, arow8, lane, stamp); \
    break;
        ALLOCMOE_WIDE_NT(1) ALLOCMOE_WIDE_NT(2) ALLOCMOE_WIDE_NT(3) ALLOCMOE_WIDE_NT(4)
        ALLOCMOE_WIDE_NT(5) ALLOCMOE_WIDE_NT(6) ALLOCMOE_WIDE_NT(7) ALLOCMOE_WIDE_NT(8)
#undef ALLOCMOE_WIDE_NT
      }
      // acc[nt][i]: row g (i < 2) or g + 8, pair nt*8 + 2c + (i & 1).
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int pr = nt * 8 + 2 * c + i;
          if (pr >= npass) continue;
          if (gu) {
            T* act = static_cast<T*>(p.act);
            act[(size_t)(r0 + pr) * p.I + rb * kWideGateUpBoxRows + 8 * warp + g] =
                Mma16<T>::from_float(silu(acc[nt][i]) * acc[nt][2 + i]);
          } else {  // y in sorted order: the combine applies the routing weights (no loads here)
            float* y = p.y + (size_t)(r0 + pr) * p.H + rb * kWideRows + 16 * warp + g;
            y[0] = acc[nt][i];
            y[8] = acc[nt][2 + i];
          }
        }
      if (gu) wide_tile_release(p.tile_done + tile);
    }
    if (!in_down) STREAM_TRACE(3);
    STREAM_TRACE(7);
#ifdef ALLOCMOE_STREAM_TRACE
    if (threadIdx.x == 0) g_stream_trace[4 * 1024 + blockIdx.x] = stamp.wait, g_stream_trace[5 * 1024 + blockIdx.x] = stamp.busy;
#endif
  }
}

}  // namespace allocmoe::cuda_experts
