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
// one expert, rows of act in sorted order), then gate_up and down as two persistent programmatic
// dependent launches of one CTA per SM, then combine_slots_kernel.
// Why tensor maps: a plain bulk copy (cp.async.bulk, as the stream path uses) costs the SM's copy
// engine about the same whatever its size up to 1 KB (measured on H100, bench/stream_kernel_harness.cu
// wide: 20-33 million copies a second per SM, so 256-byte copies read 0.8-1.1 TB/s and 1 KB
// copies 2.8-2.9 TB/s); the weight rows of a stage are 256 bytes each, so the weights come as
// tensor-map boxes (cp.async.bulk.tensor: one instruction moves 64 or 128 rows), and the tokens'
// rows, gathered by slot, through cp.async (the load/store path) into the same stage.
// A work item is (tile, block of kWideRows weight rows): gate_up rows are 64 intermediate rows,
// gate and up interleaved per warp (warp w: gate rows 8w..8w+7, then the up rows of the same
// intermediates), so one m16 tile holds a row's gate and up value in the same thread; down rows
// are 128 output rows. A stage holds kWideK of k for the item's 128 weight rows (weight producer
// warp, tensor-map boxes) and for its tile's token rows (operand warp, cp.async: x rows for
// gate_up, act rows for down), so each B row piece serves 128 weight rows. Each consumer warp
// owns one m16 row tile and every k of the stage: no cross-warp reduction; the epilogue writes
// act (SiLU(gate)*up, rounded to the dtype) or y[slot] (times the routing weight, fp32).
// Deterministic run to run: the order of rows within a tile only moves rows.
#pragma once

#include <cuda.h>  // CUtensorMap (encoded on the host, experts.cu)

#include "experts_prefill.cuh"
#include "experts_stream.cuh"

namespace allocmoe::cuda_experts {

constexpr int kWideRows = 128;                // weight rows per item: 8 consumer warps x one m16 tile
constexpr int kWideK = 128;                   // k per stage: a 256-byte tensor-map box row
constexpr int kWideAPitch = kWideK * 2;       // weight rows as the box lands (dense)
constexpr int kWideBPitch = kWideK * 2 + 64;  // 80 words = 16 mod 32: token rows g, g+1 on disjoint bank halves
constexpr int kWideABytes = kWideRows * kWideAPitch;
constexpr int kWideMaxStages = 8;
constexpr int kWideMinStages = 3;
constexpr int kWideRingAt = 256;  // after the mbarriers, 128-byte aligned at run time (tensor copies need it)
static_assert(2 * kWideMaxStages * 8 <= 128, "mbarriers before the ring");
static_assert(kWideABytes % 128 == 0 && (32 * kWideBPitch) % 128 == 0, "every stage 128-byte aligned");
static_assert(kWideRows == kStreamConsumerWarps * 16, "one m16 row tile per consumer warp");
// Box rows of the tensor maps: gate_up comes as a box of 64 gate rows and one of the matching 64
// up rows, down as one box of 128 output rows.
constexpr int kWideGateUpBoxRows = kWideRows / 2, kWideDownBoxRows = kWideRows;

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

// Box at coordinates (c0, c1, c2) of a 3-D tensor map into shared memory, reported to bar.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar,
                                            uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(policy)
      : "memory");
#endif
}
// One arrival on bar once every cp.async this thread issued before has landed (the barrier's
// count includes it: .noinc).
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}

// One phase (kGateUp: x -> act; else act -> y) on tiles of up to kPairs token rows. wmap: the
// phase's weights as a tensor map (gate_up [E, 2I, H] with boxes of 128 k x 64 rows, down
// [E, H, I] with boxes of 128 k x 128 rows); stages: the ring depth the launch sized.
template <typename T, bool kGateUp, int kPairs>
__global__ void __launch_bounds__(kStreamThreads, 1) wide_kernel(PrefillParams p, const __grid_constant__ CUtensorMap wmap,
                                                                  int stages) {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t full0 = smem_addr(smem), empty0 = full0 + 8 * kWideMaxStages;
  const uint32_t ring = (smem_addr(smem) + 128 + 127) / 128 * 128;
  unsigned char* ring_ptr = smem + (ring - smem_addr(smem));
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      mbar_init(full0 + 8 * i, 1 + 32);  // the weight producer's expect_tx + the operand warp's 32 lanes
      mbar_init(empty0 + 8 * i, kStreamConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();
  STREAM_TRACE(kGateUp ? 0 : 4);
  // gate_up: the tile table comes from the align grid right before. down: it was final before
  // the gate_up grid started, so only act (the operand warp) waits for that grid.
  if (kGateUp) wait_for_previous_grid();
  allow_next_grid();
  const int blocks = kGateUp ? p.I / (kWideRows / 2) : p.H / kWideRows;
  const int kdim = kGateUp ? p.H : p.I;
  const int n_items = *p.num_tiles * blocks;
  STREAM_TRACE(kGateUp ? 1 : 5);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kStageBytes = wide_stage_bytes(kPairs), kNTiles = kPairs / 8;
  RingPos pos;
  if (warp == kStreamWeightWarp) {
    if (lane != 0) return;
    const uint64_t pol = evict_first_policy();
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
      const int tile = item / blocks, rb = item % blocks, e = p.tile_expert[tile];
      for (int k0 = 0; k0 < kdim; k0 += kWideK) {
        const uint32_t bar = full0 + 8 * pos.stage, st = ring + pos.stage * kStageBytes;
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        mbar_arrive_expect_tx(bar, kWideABytes);  // whole boxes land (zeros past k = kdim)
        if (kGateUp) {
          tma_load_3d(st, &wmap, k0, rb * kWideGateUpBoxRows, e, bar, pol);
          tma_load_3d(st + kWideGateUpBoxRows * kWideAPitch, &wmap, k0, p.I + rb * kWideGateUpBoxRows, e, bar, pol);
        } else {
          tma_load_3d(st, &wmap, k0, rb * kWideDownBoxRows, e, bar, pol);
        }
        pos.next(stages);
      }
    }
  } else if (warp == kStreamOperandWarp) {
    if (!kGateUp) wait_for_previous_grid();  // act
    const T* x = static_cast<const T*>(p.x);
    const T* act = static_cast<const T*>(p.act);
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
      const int tile = item / blocks, e = p.tile_expert[tile], r0 = p.tile_row[tile];
      const int npass = min(kPairs, p.expert_offset[e + 1] - r0);
      // Lane l copies token rows l, l + 32, ... of the tile (zeros past npass).
      const T* src[kPairs / 32];
#pragma unroll
      for (int j = 0; j < kPairs / 32; ++j) {
        const int r = lane + 32 * j;
        src[j] = r >= npass ? x : kGateUp ? x + (size_t)(p.sorted_slot[r0 + r] / p.K) * p.H : act + (size_t)(r0 + r) * p.I;
      }
      for (int k0 = 0; k0 < kdim; k0 += kWideK) {
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        unsigned char* dst = ring_ptr + pos.stage * kStageBytes + kWideABytes + lane * kWideBPitch;
#pragma unroll
        for (int j = 0; j < kPairs / 32; ++j)
#pragma unroll
          for (int v = 0; v < kWideK / 8; ++v) {
            const int k = k0 + 8 * v;
            cp_async16(dst + 32 * j * kWideBPitch + 16 * v, src[j] + (k < kdim ? k : 0),
                       lane + 32 * j < npass && k < kdim ? 16 : 0);
          }
        cp_async_arrive_noinc(full0 + 8 * pos.stage);
        pos.next(stages);
      }
    }
  } else {
    const int g = lane >> 2, c = lane & 3;
    // This warp's m16 tile: rows g and g + 8 of the MMA are gate row 8w+g and its up row (gate_up),
    // or output rows 16w+g and 16w+g+8 (down).
    const int arow0 = (kGateUp ? 8 * warp + g : 16 * warp + g) * kWideAPitch;
    const int arow8 = (kGateUp ? kWideGateUpBoxRows + 8 * warp + g : 16 * warp + g + 8) * kWideAPitch;
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
      const int tile = item / blocks, rb = item % blocks, e = p.tile_expert[tile], r0 = p.tile_row[tile];
      const int npass = min(kPairs, p.expert_offset[e + 1] - r0), ntiles = (npass + 7) / 8;
      float acc[kNTiles][4];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
      for (int k0 = 0; k0 < kdim; k0 += kWideK) {
        const int nch = min(kWideK, kdim - k0) / 32;
        mbar_wait(full0 + 8 * pos.stage, pos.phase);
        if (item == static_cast<int>(blockIdx.x) && k0 == 0) STREAM_TRACE(kGateUp ? 2 : 6);  // the first stage landed
        const unsigned char* st = ring_ptr + pos.stage * kStageBytes;
        const unsigned char* bt = st + kWideABytes + g * kWideBPitch;
#pragma unroll
        for (int kc = 0; kc < kWideK / 32; ++kc) {
          if (kc < nch) {
            const int col = (kc * 32 + 8 * c) * 2;
            const uint4 a0 = load_shared16(st + arow0 + col);
            const uint4 a8 = load_shared16(st + arow8 + col);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
              if (nt < ntiles) mma_k32<T>(acc[nt], a0, a8, load_shared16(bt + nt * 8 * kWideBPitch + col));
          }
        }
        mbar_arrive(empty0 + 8 * pos.stage);  // orders this thread's reads before the next writes
        pos.next(stages);
      }
      // acc[nt][i]: row g (i < 2) or g + 8, pair nt*8 + 2c + (i & 1).
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int pr = nt * 8 + 2 * c + i;
          if (pr >= npass) continue;
          if (kGateUp) {
            T* act = static_cast<T*>(p.act);
            act[(size_t)(r0 + pr) * p.I + rb * kWideGateUpBoxRows + 8 * warp + g] =
                Mma16<T>::from_float(silu(acc[nt][i]) * acc[nt][2 + i]);
          } else {
            const int slot = p.sorted_slot[r0 + pr];
            const float w = p.weights[slot];
            float* y = p.y + (size_t)slot * p.H + rb * kWideRows + 16 * warp + g;
            y[0] = w * acc[nt][i];
            y[8] = w * acc[nt][2 + i];
          }
        }
    }
    STREAM_TRACE(kGateUp ? 3 : 7);
  }
}

}  // namespace allocmoe::cuda_experts
