// Small-T ("stream") path of the CUDA `experts` op on sm_90: bf16/fp16, silu, no biases,
// contiguous gate_up [E, 2I, H] and down [E, H, I], H and I multiples of 32, T <= 64,
// T*K <= 512 (and E <= 512 past T*K = kStreamThreads).
//
// At decode sizes the op is one long read of the selected experts' weights; the only goal is
// to keep HBM busy from the first byte to the last. The decode path (experts_decode.cuh) reads
// with 16-byte ld.global from every thread and reaches ~2 TB/s; here the weights travel through
// the copy engine of each SM (cp.async.bulk, "TMA" without a tensor map) into a deep ring of
// shared memory, so that 70-220 KB per SM are in flight whatever the warps are doing.
//
// Two persistent launches of one CTA per SM (8 consumer warps + a weight producer warp + an
// operand producer warp, which only the down phase with act in the stages uses):
//   1. gate_up: work items (j-th used expert, 8 intermediate rows). A stage holds 16 weight rows
//      x 512 k: gate rows r..r+7 then up rows I+r..I+r+7, so one m16 tile has the gate and the up
//      value of a row in the same thread (SiLU*up needs no exchange). The tokens (B operand, 8
//      per n tile) come from x in shared memory: up to kStreamXRows tokens, all of x is staged
//      once and the items are dealt round robin; beyond, the items are dealt in chunks of
//      consecutive items (one expert, mostly) and a CTA stages the x rows of one (expert, pass)
//      at a time, when it changes. act[slot, r..r+7] = SiLU(gate) * up, rounded to the dtype.
//   2. down (programmatic dependent launch). Up to kStreamXRows tokens ("tile-major"): a CTA
//      owns 16 output rows (a tile; the next tile is gridDim.x further) and streams those rows of
//      every used expert in turn, so the sum over a token's experts stays in the CTA: no partial
//      outputs in memory, no cross-CTA reduction, deterministic. Beyond, "expert-major" (see
//      consume_down_by_expert): items like gate_up's, per-slot results into y, and a third
//      launch (combine_slots_kernel) sums each token's slots. The weight producer starts
//      streaming as soon as the CTA is resident, before the gate_up grid has finished. The act
//      rows (the B operand) stay in shared memory when all of them fit (T*K <= 32); otherwise a
//      second producer warp copies each stage's act pieces into the stage next to its weight
//      rows, once the gate_up grid is done (griddepcontrol.wait), so they arrive as far ahead
//      of the consumers as the weights do (stream_down_staged).
// The same two phases also run as ONE cooperative launch (stream_experts_kernel, and the fused moe
// kernel of moe_stream.cuh): the operand warp releases each expert's act through readiness
// counters (stream_ready.cuh) and brings act rows to the down phase as each expert completes.
// The experts op takes it only when forced (ALLOCMOE_STREAM_LAUNCHES=one; see experts.cu).
// Inside a stage the 8 consumer warps split k (32-wide chunks), multiply with mma.sync m16n8k16
// on the permuted-k fragments of experts_mma.cuh (a thread reads 16 contiguous bytes of rows g
// and g+8 and of its token), and meet in shared memory in warp order at the end of an item.
// Every CTA builds the same expert and slot lists from ids (no host sync, no alignment launch).
// All of it is deterministic run to run (fixed summation orders, no floating-point atomics).
#pragma once

#include <climits>

#include "experts_mma.cuh"
#include "mbarrier.cuh"
#include "stream_ready.cuh"
#include "trace_stamp.cuh"

namespace allocmoe::cuda_experts {

constexpr int kStreamConsumerWarps = 8;
constexpr int kStreamConsumers = kStreamConsumerWarps * 32;
// + the weight producer warp + the operand producer warp (down phase with act in the stages)
constexpr int kStreamThreads = kStreamConsumers + 64;
constexpr int kStreamWeightWarp = kStreamConsumerWarps, kStreamOperandWarp = kStreamConsumerWarps + 1;
constexpr int kStreamRows = 16;                          // weight rows per stage: one m16 tile
#ifndef ALLOCMOE_STREAM_CHUNK  // bench/stream_kernel_harness.cu tries other widths with it
#define ALLOCMOE_STREAM_CHUNK 512
#endif
constexpr int kStreamChunk = ALLOCMOE_STREAM_CHUNK;      // k per stage row: 1 KB bulk copies
constexpr int kStreamChunksPerWarp = kStreamChunk / 32 / 8;  // 32-wide k chunks of a stage per consumer warp
static_assert(kStreamChunk % 256 == 0, "whole 32-wide chunks for every consumer warp");
// Stage row pitch: the row + 64 bytes (512 k: 272 words = 16 mod 32), so the two rows (g, g + 1)
// that a quarter warp reads with 16-byte loads sit on disjoint bank halves: no conflicts.
constexpr int kStreamPitch = kStreamChunk * 2 + 64;
constexpr int kStreamStageBytes = kStreamRows * kStreamPitch;
constexpr int kStreamMaxStages = 16;
constexpr int kStreamMinStages = 4;
constexpr int kStreamMaxTokens = 64;
constexpr int kStreamMaxSlots = 512;     // T*K (the lists live in shared memory)
constexpr int kStreamMaxExperts = 512;  // past kStreamThreads slots: the list builder's counters
static_assert(kStreamMaxSlots <= kReadySlots, "a readiness counter per used expert");
// Tokens whose x rows all stay in shared memory for the whole gate_up phase; beyond, x rows are
// staged per (expert, pass) (the gate_up item dealing above).
constexpr int kStreamXRows = 16;
__host__ __device__ constexpr bool stream_x_resident(int T) { return T <= kStreamXRows; }
__host__ __device__ constexpr int stream_x_rows(int T) { return T <= kStreamXRows ? T : kStreamXRows; }
constexpr int kStreamRedStride = kStreamRows + 1;  // floats per (warp, pair) in the reduction buffer
// Pairs (token, expert) multiplied per pass: one n8 tile up to 8 tokens, two up to 16.
__host__ __device__ constexpr int stream_pairs_per_pass(int T) { return T <= 8 ? 8 : 16; }
// Up to this many slots (T*K, and T <= kStreamXRows) the down phase holds every act row in
// shared memory, loaded once; beyond it the act rows come in the stages (stream_down_staged).
// Measured on H100 (T=1): with the HBM queues full of weight copies an L2 round trip takes
// microseconds, and one per unit (six at top-6) left the down consumers waiting most of the time.
constexpr int kStreamResidentSlots = 32;
static_assert(kStreamResidentSlots <= kActBars, "an act mbarrier per used expert of the resident down phase");

// Timing hooks for the standalone harness only (never defined in the library build).
#ifdef ALLOCMOE_STREAM_TRACE
__device__ unsigned long long g_stream_trace[8 * 1024];  // an array, not a pointer: no load before a stamp
#define STREAM_TRACE(ev) trace_stamp(g_stream_trace + (ev) * 1024 + blockIdx.x)
#else
#define STREAM_TRACE(ev) ((void)0)
#endif

#ifdef ALLOCMOE_STREAM_WAITS
// Harness only as well (bench/split_kernel_harness.cu built with -DALLOCMOE_STREAM_WAITS): SM cycles
// a CTA spends waiting on the ring, [0] the weight warp's lane 0 on empty stages, [1] consumer
// thread 0 on full ones (a stream fed by memory: the consumers wait; fed too slowly by the
// consumers: the producer waits). The counting slows the kernel a little.
__device__ unsigned long long g_stream_wait[2 * 1024];
#define STREAM_WAIT(who, bar, parity)                                                              \
  do {                                                                                             \
    const long long w0_ = clock64();                                                               \
    mbar_wait(bar, parity);                                                                        \
    if (threadIdx.x == ((who) == 0 ? kStreamWeightWarp * 32 : 0))                                  \
      g_stream_wait[(who) * 1024 + blockIdx.x] += clock64() - w0_;                                 \
  } while (0)
#else
#define STREAM_WAIT(who, bar, parity) mbar_wait(bar, parity)
#endif

struct StreamParams {
  const void* x;         // hidden [T, H]
  const void* gate_up;   // [E, 2I, H]
  const void* down;      // [E, H, I]
  const float* weights;  // [T, K]
  const int* ids;        // [T, K]
  void* act;             // [T*K, I] scratch, input dtype
  void* out;             // [T, H]
  int T, K, E, H, I;
  int stages;            // ring depth of this launch (host: what the shared memory holds)
  float* y = nullptr;    // [T*K, H] fp32 scratch of the expert-major down phase (T > kStreamXRows)
};

// Row pitch in shared memory of a [rows][len] 16-bit operand: len*2 bytes padded to 16 mod 32
// words, so the rows g and g + 1 that a quarter warp reads with 16-byte loads sit on disjoint
// bank halves (the same rule as kStreamPitch).
__host__ __device__ constexpr int stream_row_pitch(int len) {
  return (len / 2 + (((16 - len / 2) % 32) + 32) % 32) * 4;
}

// Shared memory of one CTA: [mbarriers | lists | reduction buffers | sums | routing result |
// operand rows | ring].
// The operand rows are the tokens' x (gate_up: T rows of H) or two buffers of act rows
// (down: 2 x NT*8 rows of I, the next expert's rows load while the current one is multiplied).
struct StreamSmem {
  static constexpr int kBarBytes = 2 * kStreamMaxStages * 8;
  static constexpr int kListInts = 5 * kStreamMaxSlots + 8;  // StreamLists: 5 arrays, nused
  static constexpr int kListsAt = kBarBytes;
  static constexpr int kRedAt = kListsAt + kListInts * 4;
  static constexpr int kRedBytes = kStreamConsumerWarps * 16 * kStreamRedStride * 4;
  static_assert(kRedBytes >= 4 * kStreamMaxExperts * 4, "the list builder's counters fit the reduction buffer");
  static constexpr int kPairSumsAt = kRedAt + kRedBytes;  // [16 pairs][kStreamRedStride] floats
  static constexpr int kOutAccAt = kPairSumsAt + 16 * kStreamRedStride * 4;  // [kStreamMaxTokens][16] floats
  // The fused moe kernel's routing result: ids [kStreamMaxSlots] ints, then the weights.
  static constexpr int kRouteAt = kOutAccAt + kStreamMaxTokens * 16 * 4;
  static constexpr int kSignalsAt = kRouteAt + 2 * kStreamMaxSlots * 4;  // StreamSignals (one launch)
  static constexpr int kOperandAt = (kSignalsAt + static_cast<int>(sizeof(StreamSignals)) + 127) / 128 * 128;
  int pitch, ring_at;
  int stage_bytes = kStreamStageBytes;  // 16 weight rows, + the operand rows copied with them
  // operand_rows of operand_len elements in the operand area; staged_rows operand rows in every
  // stage after its weight rows (the down phase with act in the stages).
  __host__ __device__ StreamSmem(int operand_rows, int operand_len, int staged_rows = 0) {
    pitch = stream_row_pitch(operand_len);
    ring_at = (kOperandAt + operand_rows * pitch + 127) / 128 * 128;
    stage_bytes = (kStreamRows + staged_rows) * kStreamPitch;
  }
  // Operand area of operand_bytes holding rows of several pitches (the one-launch kernels: x,
  // then act).
  __host__ __device__ static StreamSmem of_bytes(int operand_bytes, int staged_rows) {
    StreamSmem s(0, 0, staged_rows);
    s.ring_at = (kOperandAt + operand_bytes + 127) / 128 * 128;
    return s;
  }
  __host__ __device__ int total(int stages) const { return ring_at + stages * stage_bytes; }
  // Ring depth: as many stages as smem_limit bytes hold, up to kStreamMaxStages.
  __host__ __device__ int fit_stages(int smem_limit) const {
    const int room = smem_limit - ring_at, n = room < 0 ? 0 : room / stage_bytes;
    return n < kStreamMaxStages ? n : kStreamMaxStages;
  }
};

// The down phase copies act rows into every stage next to the weight rows (a second producer
// warp, once the gate_up grid is done), except when all of act stays in shared memory (T <=
// kStreamXRows, T*K <= kStreamResidentSlots). Measured on H100 (bench/stream_kernel_harness.cu
// mid flushed, DeepSeek-V2-Lite shape): staging act through the consumers (cp.async one unit
// ahead, or per (expert, pass)) held the down phase at 2.5-2.6 TB/s at T = 16..64 while gate_up
// ran at 3.05 and the same access pattern without compute at 3.08: an L2 round trip under full
// HBM load outlasts a unit.
__host__ __device__ constexpr bool stream_down_staged(int T, int K) {
  return !(T <= kStreamXRows && T * K <= kStreamResidentSlots);
}
__host__ __device__ inline StreamSmem stream_gate_up_smem(int T, int H) { return StreamSmem(stream_x_rows(T), H); }
// The one-launch kernel: x during gate_up, then (T*K <= kStreamResidentSlots) all act rows, in one
// operand area; stages with room for act rows when the down phase stages them.
__host__ __device__ inline StreamSmem stream_one_launch_smem(int T, int K, int H, int I) {
  const bool staged = stream_down_staged(T, K);
  const int x_bytes = stream_x_rows(T) * stream_row_pitch(H);
  const int act_bytes = staged ? 0 : T * K * stream_row_pitch(I);
  return StreamSmem::of_bytes(x_bytes > act_bytes ? x_bytes : act_bytes, staged ? stream_pairs_per_pass(T) : 0);
}
__host__ __device__ inline StreamSmem stream_down_smem(int T, int K, int I) {
  return stream_down_staged(T, K) ? StreamSmem(0, I, stream_pairs_per_pass(T)) : StreamSmem(T * K, I);
}

// ---------------------------------------------------------------------------------------------
// Bulk-copy primitives (sm_90; empty bodies when compiled for older targets, which the host never
// launches this path on). The mbarrier primitives are in mbarrier.cuh.
// ---------------------------------------------------------------------------------------------
// L2 policies of the bulk copies: weights are read exactly once (evict them first, keep x / act
// / y resident); act rows copied into the stages are read again for every tile (normal).
__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (evict_first) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  else asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  return policy;
}
__device__ __forceinline__ uint64_t evict_first_policy() { return l2_policy(true); }
__device__ __forceinline__ uint64_t evict_normal_policy() { return l2_policy(false); }
// global -> shared bulk copy (bytes % 16 == 0, both addresses 16-byte aligned) that reports its
// bytes to the mbarrier `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                          uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
#endif
}
// The consumer warps' own barrier (the producer warp never joins it).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(kStreamConsumers) : "memory"); }

// Position in the ring of stages, advanced in the same order by the producer and the consumers.
struct RingPos {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void next(int stages) {
    if (++stage == stages) stage = 0, phase ^= 1u;
  }
};

// ---------------------------------------------------------------------------------------------
// Expert and slot lists, built by every CTA from ids (all threads of the CTA take part).
// ---------------------------------------------------------------------------------------------
struct StreamLists {
  int* list;   // valid slots grouped by used expert (first-appearance order), increasing within
  int* used;   // expert id of the j-th used expert
  int* start;  // list[start[j] .. start[j+1]) are the slots of the j-th used expert
  int nused;
};

// The lists of ids[0 .. TK) (all threads of the CTA take part; the same lists in every CTA).
// s: kListInts ints; scratch: 4 * E ints, free until the caller's first reduction (the reduction
// buffer; only the counting builder uses it). Three builders, by T*K: up to 32 slots each warp
// builds its own copy (build_stream_lists_warp, below); then, up to one slot per thread, a
// block-wide pairwise count (measured at T=1 on H100 before the per-warp builder: 1.25 us from
// kernel entry, against 2.0 us for the counting builder, whose five barriers and atomics cost
// more than they save at small T*K); past that the counting builder keeps T*K = 384..512 at
// ~4 us instead of a per-slot loop over every slot.
__device__ __forceinline__ StreamLists build_stream_lists_pairwise(const int* __restrict__ ids, int TK, int E, int* s) {
  int* s_ids = s;
  int* s_first = s + kStreamMaxSlots;
  StreamLists L{s + 2 * kStreamMaxSlots, s + 3 * kStreamMaxSlots, s + 4 * kStreamMaxSlots, 0};
  const int i = threadIdx.x;
  if (i < TK) {
    const int v = ids[i];
    s_ids[i] = (v >= 0 && v < E) ? v : -1;  // out-of-range ids are skipped like -1
  }
  __syncthreads();
  // f: the first slot naming the same expert; before: slots before i naming it.
  int e = -1, f = -1, before = 0;
  if (i < TK && (e = s_ids[i]) >= 0) {
    f = i;
    for (int j = 0; j < i; ++j)
      if (s_ids[j] == e) {
        if (f == i) f = j;
        ++before;
      }
  }
  if (i < TK) s_first[i] = f;
  const int nused = __syncthreads_count(f >= 0 && f == i);
  const int valid = __syncthreads_count(f >= 0);
  if (f >= 0) {
    int pos = before, j_used = 0;  // slots of experts that appeared earlier come first
    for (int j = 0; j < TK; ++j) {
      const int fj = s_first[j];
      pos += (fj >= 0 && fj < f);
      j_used += (fj == j && j < f);
    }
    L.list[pos] = i;
    if (before == 0) L.used[j_used] = e, L.start[j_used] = pos;
  }
  if (i == 0) L.start[nused] = valid;
  __syncthreads();
  L.nused = nused;
  return L;
}

// Inclusive prefix sum of v over the 32 lanes of a warp (every lane calls it).
__device__ __forceinline__ int warp_inclusive_sum(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// Past one slot per thread: every phase is parallel over slots or experts except one warp's walk
// over the slots, 32 at a time, that numbers the used experts in order of first appearance.
// scratch: 4 * E ints.
//   counts and first slots (shared-memory atomics) -> used experts and their starts (the walk,
//   then a scan of the counts) -> slots dropped into their expert's segment in any order ->
//   each slot's rank in its segment = how many of the segment's slots are smaller.
__device__ __forceinline__ StreamLists build_stream_lists_counted(const int* __restrict__ ids, int TK, int E, int* s,
                                                                  int* scratch) {
  int* s_ids = s;
  int* s_any = s + kStreamMaxSlots;  // the slots grouped by expert, unordered within a group
  StreamLists L{s + 2 * kStreamMaxSlots, s + 3 * kStreamMaxSlots, s + 4 * kStreamMaxSlots, 0};
  int* s_nused = s + 5 * kStreamMaxSlots + 1;  // start has nused + 1 <= kStreamMaxSlots + 1 entries
  int* count = scratch;         // [E] slots naming expert e
  int* first = scratch + E;     // [E] its first slot
  int* used_at = scratch + 2 * E;  // [E] j of expert e (valid where count[e] > 0)
  int* fill = scratch + 3 * E;  // [E] slots dropped into its segment so far
  const int tid = threadIdx.x, lane = tid & 31;
  for (int i = tid; i < TK; i += blockDim.x) {
    const int v = ids[i];
    s_ids[i] = (v >= 0 && v < E) ? v : -1;  // out-of-range ids are skipped like -1
  }
  for (int e = tid; e < E; e += blockDim.x) count[e] = 0, first[e] = INT_MAX, fill[e] = 0;
  __syncthreads();
  for (int i = tid; i < TK; i += blockDim.x) {
    const int e = s_ids[i];
    if (e >= 0) atomicAdd(&count[e], 1), atomicMin(&first[e], i);
  }
  __syncthreads();
  if (tid < 32) {
    int nused = 0;
    for (int c0 = 0; c0 < TK; c0 += 32) {
      const int i = c0 + lane, e = i < TK ? s_ids[i] : -1;
      const bool is_first = e >= 0 && first[e] == i;
      const unsigned firsts = __ballot_sync(0xffffffffu, is_first);
      if (is_first) {
        const int j = nused + __popc(firsts & ((1u << lane) - 1u));
        used_at[e] = j;
        L.used[j] = e;
      }
      nused += __popc(firsts);
    }
    __syncwarp();
    // start[j]: exclusive prefix sum of the used experts' counts, 32 at a time.
    int run = 0;
    for (int j0 = 0; j0 < nused; j0 += 32) {
      const int j = j0 + lane, n = j < nused ? count[L.used[j]] : 0;
      const int incl = warp_inclusive_sum(n);
      if (j < nused) L.start[j] = run + incl - n;
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) L.start[nused] = run, *s_nused = nused;
  }
  __syncthreads();
  for (int i = tid; i < TK; i += blockDim.x) {
    const int e = s_ids[i];
    if (e >= 0) s_any[L.start[used_at[e]] + atomicAdd(&fill[e], 1)] = i;
  }
  __syncthreads();
  for (int i = tid; i < TK; i += blockDim.x) {
    const int e = s_ids[i];
    if (e < 0) continue;
    const int j = used_at[e], b = L.start[j], n = L.start[j + 1];
    int rank = 0;
    for (int q = b; q < n; ++q) rank += s_any[q] < i;
    L.list[b + rank] = i;
  }
  L.nused = *s_nused;
  __syncthreads();
  return L;
}

// Up to one slot per lane (decode, T*K <= 32): every warp builds its own copy of the lists from
// registers (match, ballot and a scan; no shared-memory walk, no block barrier after the ids
// arrive), so each warp, the weight producer first of all, goes on as soon as its own ids load
// returns. The same lists as the pairwise builder. s: kWarpListInts ints per warp. Measured on
// H100 (bench/stream_kernel_harness.cu trace, DeepSeek-V2-Lite shape), kernel entry to lists
// built, against the pairwise builder: T=1 gate_up 1.12 -> 0.86 us, down 0.90 -> 0.44; T=4
// gate_up 1.82 -> 0.83, down 1.37 -> 0.61; both launches in a graph T=1 40.6 -> 39.4 us, T=4
// 126.0 -> 123.3.
constexpr int kWarpListSlots = 32;
constexpr int kWarpListInts = 3 * kWarpListSlots + 1;  // list | used | start
static_assert(kWarpListInts * (kStreamThreads / 32) <= 5 * kStreamMaxSlots, "every warp's lists fit the list area");
__device__ __forceinline__ StreamLists build_stream_lists_warp(const int* __restrict__ ids, int TK, int E, int* s) {
  const int lane = threadIdx.x & 31;
  int* w = s + (threadIdx.x >> 5) * kWarpListInts;
  StreamLists L{w, w + kWarpListSlots, w + 2 * kWarpListSlots, 0};
  int e = lane < TK ? ids[lane] : -1;  // in flight across the barrier below
  // The caller's mbarrier init (thread 0) and, in the fused kernel, the routing result in shared
  // memory are visible to every warp past this barrier; nothing waits on the ids load at it.
  __syncthreads();
  e = (e >= 0 && e < E) ? e : -1;  // out-of-range ids are skipped like -1
  const bool valid = e >= 0;
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int f = __ffs(same) - 1;  // the first slot naming the same expert
  const bool first = valid && f == lane;
  const unsigned firsts = __ballot_sync(0xffffffffu, first);
  const unsigned valids = __ballot_sync(0xffffffffu, valid);
  // Segment starts: an exclusive scan, over the first slots in slot order, of their experts' counts.
  const int count = first ? __popc(same) : 0;
  const int incl = warp_inclusive_sum(count);
  const int seg = __shfl_sync(0xffffffffu, incl - count, f);
  if (valid) {
    const int pos = seg + __popc(same & ((1u << lane) - 1u));
    L.list[pos] = lane;
    if (first) {
      const int j = __popc(firsts & ((1u << lane) - 1u));
      L.used[j] = e, L.start[j] = pos;
    }
  }
  L.nused = __popc(firsts);
  if (lane == 0) L.start[L.nused] = __popc(valids);
  __syncwarp();
  return L;
}

__device__ __forceinline__ StreamLists build_stream_lists(const int* __restrict__ ids, int TK, int E, int* s,
                                                          int* scratch) {
  if (TK <= kWarpListSlots) return build_stream_lists_warp(ids, TK, E, s);
  return TK <= static_cast<int>(blockDim.x) ? build_stream_lists_pairwise(ids, TK, E, s)
                                            : build_stream_lists_counted(ids, TK, E, s, scratch);
}

// ---------------------------------------------------------------------------------------------
// Producer (one warp): streams 16 weight rows x kdim per unit, in stages of kStreamChunk, once
// per pass of the consumers, in exactly their order. Lanes 0..15 each copy one row of a stage.
// ---------------------------------------------------------------------------------------------
struct Producer {
  uint32_t full0, empty0, ring;
  int stages, stage_bytes;
  uint64_t policy;
  RingPos pos;
  int extra_arrivals = 0;  // full barriers that also wait for the operand warp, which has no part here
  // row: this lane's weight row (lanes >= kStreamRows pass anything; it is not read).
  __device__ __forceinline__ void unit(const void* row, int kdim, int passes) {
    const int lane = threadIdx.x & 31;
    const char* src = static_cast<const char*>(row);
    for (int pass = 0; pass < passes; ++pass)
      for (int k0 = 0; k0 < kdim; k0 += kStreamChunk) {
        const uint32_t bytes = static_cast<uint32_t>(min(kStreamChunk, kdim - k0)) * 2u;
        STREAM_WAIT(0, empty0 + 8 * pos.stage, pos.phase ^ 1u);
        if (lane == 0) {
          mbar_arrive_expect_tx(full0 + 8 * pos.stage, bytes * kStreamRows);
          if (extra_arrivals) mbar_arrive(full0 + 8 * pos.stage);
        }
        __syncwarp();
        if (lane < kStreamRows)
          bulk_copy(ring + pos.stage * stage_bytes + lane * kStreamPitch, src + (size_t)k0 * 2, bytes,
                    full0 + 8 * pos.stage, policy);
        pos.next(stages);
      }
  }
  // The operand producer's part of the same unit: for each pass, the act rows of its npass pairs
  // (row pl at src + row_of(pl) * kdim) into rows kStreamRows + pl of each stage.
  template <typename T, typename RowFn>
  __device__ __forceinline__ void operand_unit(const T* src, int kdim, int npairs, int per_pass, RowFn row_of) {
    const int lane = threadIdx.x & 31;
    for (int p0 = 0; p0 < npairs; p0 += per_pass) {
      const int npass = min(per_pass, npairs - p0);
      const T* row = lane < npass ? src + (size_t)row_of(p0 + lane) * kdim : src;
      for (int k0 = 0; k0 < kdim; k0 += kStreamChunk) {
        const uint32_t bytes = static_cast<uint32_t>(min(kStreamChunk, kdim - k0)) * sizeof(T);
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        if (lane == 0) mbar_arrive_expect_tx(full0 + 8 * pos.stage, bytes * npass);
        __syncwarp();
        if (lane < npass)
          bulk_copy(ring + pos.stage * stage_bytes + (kStreamRows + lane) * kStreamPitch, row + k0, bytes,
                    full0 + 8 * pos.stage, policy);
        pos.next(stages);
      }
    }
  }
};

// Consumers: one pass (NT*8 pairs) of one item. brow[nt] points at this thread's token row
// (element 8c of it); kShared: it lives in shared memory (x), else in global memory (act);
// kStaged: the token rows come in each stage after its weight rows (brow unused).
template <typename T, int NT, bool kShared, bool kStaged = false>
__device__ __forceinline__ void consume_pass(float (&acc)[NT][4], const T* const (&brow)[NT], int npass, int kdim,
                                             uint32_t full0, uint32_t empty0, const unsigned char* ring, int stages,
                                             int stage_bytes, RingPos& pos) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int k0 = 0; k0 < kdim; k0 += kStreamChunk) {
    const int nch = min(kStreamChunk, kdim - k0) / 32;
    uint4 b[kStreamChunksPerWarp][NT];
    if (!kStaged) {
#pragma unroll
      for (int u = 0; u < kStreamChunksPerWarp; ++u) {
        const int ch = warp + u * kStreamConsumerWarps;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const bool live = ch < nch && (NT == 1 || nt * 8 < npass);
          const T* src = brow[nt] + k0 + ch * 32;
          b[u][nt] = !live ? zero : (kShared ? load_shared16(src) : load_cached16(src));
        }
      }
    }
    STREAM_WAIT(1, full0 + 8 * pos.stage, pos.phase);
    const unsigned char* st = ring + pos.stage * stage_bytes;
    if (kStaged) {  // rows past npass hold older data: read row 0 there (its columns are dropped)
#pragma unroll
      for (int u = 0; u < kStreamChunksPerWarp; ++u) {
        const int ch = warp + u * kStreamConsumerWarps;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int pr = nt * 8 + g < npass ? nt * 8 + g : 0;
          b[u][nt] = ch < nch && (NT == 1 || nt * 8 < npass)
                         ? load_shared16(st + (kStreamRows + pr) * kStreamPitch + (ch * 32 + 8 * c) * 2)
                         : zero;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStreamChunksPerWarp; ++u) {
      const int ch = warp + u * kStreamConsumerWarps;
      if (ch < nch) {
        const uint4 a0 = load_shared16(st + g * kStreamPitch + (ch * 32 + 8 * c) * 2);
        const uint4 a8 = load_shared16(st + (g + 8) * kStreamPitch + (ch * 32 + 8 * c) * 2);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          if (NT == 1 || nt * 8 < npass) mma_k32<T>(acc[nt], a0, a8, b[u][nt]);
      }
    }
    // Every consumer thread releases the stage itself: mbarrier.arrive orders only the arriving
    // thread's own reads before the producer's next bulk write into the stage.
    mbar_arrive(empty0 + 8 * pos.stage);
    pos.next(stages);
  }
}

// Writes one warp's accumulators to red[warp][pair][row] (row = m16 row, pair = n column).
template <int NT>
__device__ __forceinline__ void stash_partials(float* red, const float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  float* my = red + (size_t)warp * 16 * kStreamRedStride;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) my[(nt * 8 + 2 * c + (i & 1)) * kStreamRedStride + g + ((i >> 1) << 3)] = acc[nt][i];
}

__device__ __forceinline__ float sum_partials(const float* red, int pair, int row) {
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kStreamConsumerWarps; ++w) s += red[((size_t)w * 16 + pair) * kStreamRedStride + row];
  return s;
}

struct StreamShared {
  uint32_t full0, empty0, ring;
  unsigned char* ring_ptr;
  float* red;
  int* lists;
  int stages, stage_bytes;
  __device__ __forceinline__ Producer producer(uint64_t policy) const {
    return Producer{full0, empty0, ring, stages, stage_bytes, policy, {}};
  }
};

// Barrier setup: full barriers get one arrival per producer warp (its expect_tx) plus the
// bytes, empty barriers one arrival per consumer thread.
__device__ __forceinline__ StreamShared stream_shared(unsigned char* smem, const StreamSmem& lay, int stages,
                                                      int producers = 1) {
  StreamShared s;
  s.full0 = smem_addr(smem);
  s.empty0 = s.full0 + 8 * kStreamMaxStages;
  s.ring_ptr = smem + lay.ring_at;
  s.ring = smem_addr(s.ring_ptr);
  s.red = reinterpret_cast<float*>(smem + StreamSmem::kRedAt);
  s.lists = reinterpret_cast<int*>(smem + StreamSmem::kListsAt);
  s.stages = stages;
  s.stage_bytes = lay.stage_bytes;
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      mbar_init(s.full0 + 8 * i, producers);
      mbar_init(s.empty0 + 8 * i, kStreamConsumers);
    }
    mbar_init_fence();
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// The two phases, each as a producer part and a consumer part, so that the experts op (two
// launches, below) and the fused moe kernel (moe_stream.cuh, one launch with a grid barrier
// between the phases) run the same code. The ring position carries over from one phase to the
// next: the producer may stream down weights while the consumers still multiply gate_up rows.
// ---------------------------------------------------------------------------------------------

// gate_up items: (j-th used expert, 8 intermediate rows). With x resident (T <= kStreamXRows)
// they are dealt round robin over the grid (items blockIdx.x, + gridDim.x, ...): at any moment the
// grid reads neighbouring rows of one expert (measured on H100: the CTAs then finish within
// 0.4 us of each other at T=1, against 5 us with contiguous ranges per CTA, whose addresses are
// spread over the whole expert). Beyond, each CTA takes a contiguous range, so that its items
// share one or two experts and their x rows are staged once per expert, not once per item.
__device__ __forceinline__ int gate_up_item_count(const StreamLists& L, int I) { return L.nused * (I / 8); }

// This CTA's share of n items: chunks of `chunk` consecutive items dealt round robin (chunk 1:
// plain round robin; chunk >= n / gridDim.x: one contiguous range).
struct ItemIter {
  int n, chunk, item, chunk_end;
  __device__ __forceinline__ ItemIter(int n_, int chunk_)
      : n(n_), chunk(chunk_), item(chunk_ * static_cast<int>(blockIdx.x)), chunk_end(min(n_, item + chunk_)) {}
  __device__ __forceinline__ bool more() const { return item < n; }
  __device__ __forceinline__ void next() {
    if (++item == chunk_end) {
      item += (static_cast<int>(gridDim.x) - 1) * chunk;
      chunk_end = min(n, item + chunk);
    }
  }
};
#ifndef ALLOCMOE_STREAM_ITEM_CHUNK  // bench/stream_kernel_harness.cu tries others (0: contiguous)
#define ALLOCMOE_STREAM_ITEM_CHUNK 4
#endif
// Staged operands (T > kStreamXRows): chunks of 4 items (of one expert, mostly), so a CTA
// restages x or act at most once per chunk. Measured on H100 at the DeepSeek-V2-Lite shape, T=64
// (bench/stream_kernel_harness.cu mid): chunks of 4 387.8 us, one contiguous range per CTA 392.7,
// chunks of 16 414.7 (5 or 6 chunks per CTA: the grid waits for the CTAs with 6).
__device__ __forceinline__ int stream_item_chunk(int n, int T) {
  if (stream_x_resident(T)) return 1;
  return ALLOCMOE_STREAM_ITEM_CHUNK > 0 ? ALLOCMOE_STREAM_ITEM_CHUNK
                                        : (n + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
}
__device__ __forceinline__ ItemIter gate_up_items(const StreamLists& L, int I, int T) {
  const int n = gate_up_item_count(L, I);
  return ItemIter(n, stream_item_chunk(n, T));
}

template <typename T, int NT>
__device__ __forceinline__ void produce_gate_up(const StreamParams& p, const StreamLists& L, Producer& prod) {
  const int lane = threadIdx.x & 31, H = p.H, I = p.I, tiles = I / 8;
  const T* gu = static_cast<const T*>(p.gate_up);
  for (ItemIter it = gate_up_items(L, I, p.T); it.more(); it.next()) {
    const int j = it.item / tiles, r0 = (it.item % tiles) * 8;
    const int row = lane < 8 ? r0 + lane : I + r0 + (lane - 8);  // gate rows, then up rows
    const int npairs = L.start[j + 1] - L.start[j];
    prod.unit(gu + ((size_t)L.used[j] * 2 * I + row) * H, H, (npairs + NT * 8 - 1) / (NT * 8));
  }
}

// The consumers copy n rows of len elements (row r at src + row_of(r) * len) into dst (rows of
// pitch bytes) with cp.async, wait for them, and meet: staging of x or act rows.
template <typename T, typename RowFn>
__device__ __forceinline__ void stage_rows(unsigned char* dst, int pitch, const T* src, int len, int n, RowFn row_of) {
  const int vec = len / 8;
  for (int idx = threadIdx.x; idx < n * vec; idx += kStreamConsumers) {
    const int r = idx / vec, v = idx % vec;
    cp_async16(dst + (size_t)r * pitch + v * 16, src + (size_t)row_of(r) * len + v * 8, 16);
  }
  cp_async_commit();
  cp_async_wait<0>();
  consumers_sync();
}

// x -> shared memory at xs (rows of x_pitch bytes): all T rows up front when x is resident, else
// the rows of each (expert, pass) when it comes up. Then this CTA's items: act[slot, r..r+7].
// sig (one launch): the end of each run of items of one expert goes to the operand warp, and
// every thread says when it is past x (StreamSignals).
template <typename T, int NT>
__device__ __forceinline__ void consume_gate_up(const StreamParams& p, const StreamLists& L, const StreamShared& sh,
                                                unsigned char* xs, int x_pitch, RingPos& pos,
                                                StreamSignals* sig = nullptr) {
  static_assert(NT * 8 <= kStreamXRows, "a pass's x rows fit the staging area");
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int H = p.H, I = p.I, K = p.K, tiles = I / 8;
  const int vec = H / 8;
  const T* x = static_cast<const T*>(p.x);
  const bool resident = stream_x_resident(p.T);
  if (resident) {
    for (int idx = tid; idx < p.T * vec; idx += kStreamConsumers) {
      const int t = idx / vec, v = idx % vec;
      *reinterpret_cast<uint4*>(xs + (size_t)t * x_pitch + v * 16) = load_cached16(x + (size_t)t * H + v * 8);
    }
    consumers_sync();
  }
  STREAM_TRACE(2);
  T* act = static_cast<T*>(p.act);
  int staged_j = -1, staged_p0 = -1, run = 0;
  for (ItemIter it = gate_up_items(L, I, p.T); it.more(); it.next()) {
    const int j = it.item / tiles, r0 = (it.item % tiles) * 8;
    const int s0 = L.start[j], npairs = L.start[j + 1] - s0;
    for (int p0 = 0; p0 < npairs; p0 += NT * 8) {
      const int npass = min(NT * 8, npairs - p0);
      if (!resident && (j != staged_j || p0 != staged_p0)) {
        // Nobody reads xs now: the previous pass ended at a consumer barrier.
        stage_rows(xs, x_pitch, x, H, npass, [&](int pl) { return L.list[s0 + p0 + pl] / K; });
        staged_j = j, staged_p0 = p0;
      }
      const T* brow[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int pr = p0 + nt * 8 + g;
        const int row = resident ? L.list[s0 + (pr < npairs ? pr : p0)] / K : (pr < npairs ? pr - p0 : 0);
        brow[nt] = reinterpret_cast<const T*>(xs + (size_t)row * x_pitch) + 8 * c;
      }
      float acc[NT][4];
      consume_pass<T, NT, true>(acc, brow, npass, H, sh.full0, sh.empty0, sh.ring_ptr, sh.stages, sh.stage_bytes, pos);
      stash_partials<NT>(sh.red, acc);
      consumers_sync();
      for (int idx = tid; idx < npass * 8; idx += kStreamConsumers) {
        const int pl = idx >> 3, r = idx & 7;
        const float gs = sum_partials(sh.red, pl, r), us = sum_partials(sh.red, pl, r + 8);
        act[(size_t)L.list[s0 + p0 + pl] * I + r0 + r] = Mma16<T>::from_float(silu(gs) * us);
      }
      consumers_sync();
    }
    if (sig != nullptr) {  // this item's act rows are written (consumer barrier above)
      ItemIter nx = it;
      nx.next();
      if (!nx.more() || nx.item / tiles != j) {  // the end of a run of expert j
        if (tid == 0) {
          mbar_wait(smem_addr(&sig->run_free[run % kRunSlots]), ((run / kRunSlots) & 1) ^ 1u);
          mbar_arrive(smem_addr(&sig->run_done[run % kRunSlots]));
        }
        ++run;
      }
    }
  }
  if (sig != nullptr) mbar_arrive(smem_addr(&sig->gate_up_over));
  STREAM_TRACE(3);
}

// One unit of the down phase: output row tile `tile`, j-th used expert, pairs p0 .. p0 + NT*8.
// Units run tile by tile (tiles blockIdx.x, + gridDim.x, ...), every used expert of a tile in
// order, so the whole sum of a tile's rows stays in this CTA.
template <int NT>
struct DownUnit {
  int tile, j, p0;
  __device__ __forceinline__ void next(const StreamLists& L) {
    p0 += NT * 8;
    if (p0 >= L.start[j + 1] - L.start[j]) {
      p0 = 0;
      if (++j == L.nused) j = 0, tile += gridDim.x;
    }
  }
};

template <typename T, int NT>
__device__ __forceinline__ void produce_down(const StreamParams& p, const StreamLists& L, Producer& prod) {
  const int lane = threadIdx.x & 31, H = p.H, I = p.I, tiles = H / kStreamRows;
  const T* dn = static_cast<const T*>(p.down);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    for (int j = 0; j < L.nused; ++j) {
      const int npairs = L.start[j + 1] - L.start[j];
      prod.unit(dn + ((size_t)L.used[j] * H + tile * kStreamRows + (lane & 15)) * I, I, (npairs + NT * 8 - 1) / (NT * 8));
    }
}

// The operand producer of the staged tile-major down phase: the act rows of each unit, in
// produce_down's order. act is gate_up's output: ready(j) returns once expert j's rows are
// complete and visible (the two launches wait for the gate_up grid before, and pass a no-op).
template <typename T, int NT, typename ReadyFn>
__device__ __forceinline__ void produce_down_act(const StreamParams& p, const StreamLists& L, Producer& prod,
                                                 ReadyFn ready) {
  const int tiles = p.H / kStreamRows;
  const T* act = static_cast<const T*>(p.act);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    for (int j = 0; j < L.nused; ++j) {
      if (tile == static_cast<int>(blockIdx.x)) ready(j);
      const int s0 = L.start[j];
      prod.operand_unit(act, p.I, L.start[j + 1] - s0, NT * 8, [&](int pl) { return L.list[s0 + pl]; });
    }
}

// The down phase's consumers. staged: the act rows come in the stages (produce_down_act);
// otherwise all T*K act rows are resident at bufs (row slot at bufs + slot * act_pitch), loaded
// here once the gate_up grid is done (two launches: wait_for_previous_grid) or, with sig (one
// launch), by the operand warp expert by expert.
template <typename T, int NT>
__device__ __forceinline__ void consume_down(const StreamParams& p, const StreamLists& L, const StreamShared& sh,
                                             unsigned char* smem, unsigned char* bufs, int act_pitch, RingPos& pos,
                                             bool staged = false, StreamSignals* sig = nullptr) {
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int H = p.H, I = p.I, K = p.K, ntok = p.T;
  const int tiles = H / kStreamRows;
  T* out = static_cast<T*>(p.out);
  float* pair_sums = reinterpret_cast<float*>(smem + StreamSmem::kPairSumsAt);
  float* out_acc = reinterpret_cast<float*>(smem + StreamSmem::kOutAccAt);
  const T* act = static_cast<const T*>(p.act);
  for (int idx = tid; idx < ntok * kStreamRows; idx += kStreamConsumers) out_acc[idx] = 0.f;

  wait_for_previous_grid();
  STREAM_TRACE(6);
  DownUnit<NT> u{static_cast<int>(blockIdx.x), 0, 0};
  if (u.tile >= tiles) return;
  if (!staged && sig == nullptr) {  // every valid slot's row, at bufs + slot * act_pitch
    const int vec = I / 8, nvalid = L.start[L.nused];
    for (int idx = tid; idx < nvalid * vec; idx += kStreamConsumers) {
      const int slot = L.list[idx / vec], v = idx % vec;
      cp_async16(bufs + (size_t)slot * act_pitch + v * 16, act + (size_t)slot * I + v * 8, 16);
    }
    cp_async_commit();
    cp_async_wait<0>();
    consumers_sync();
  }
  while (u.tile < tiles) {
    DownUnit<NT> nx = u;
    nx.next(L);
    if (!staged && sig != nullptr) mbar_wait(smem_addr(&sig->act[u.j]), 0);

    const int s0 = L.start[u.j], npairs = L.start[u.j + 1] - s0, npass = min(NT * 8, npairs - u.p0);
    const T* brow[NT];  // staged: unused (the rows are in the stages)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int pl = nt * 8 + g < npass ? nt * 8 + g : 0;
      brow[nt] = reinterpret_cast<const T*>(bufs + (size_t)L.list[s0 + u.p0 + pl] * act_pitch) + 8 * c;
    }
    float acc[NT][4];
    if (staged)
      consume_pass<T, NT, true, true>(acc, brow, npass, I, sh.full0, sh.empty0, sh.ring_ptr, sh.stages, sh.stage_bytes,
                                      pos);
    else
      consume_pass<T, NT, true>(acc, brow, npass, I, sh.full0, sh.empty0, sh.ring_ptr, sh.stages, sh.stage_bytes, pos);
    stash_partials<NT>(sh.red, acc);
    consumers_sync();
    for (int idx = tid; idx < npass * kStreamRows; idx += kStreamConsumers) {
      const int pl = idx / kStreamRows, r = idx % kStreamRows;
      pair_sums[pl * kStreamRedStride + r] = sum_partials(sh.red, pl, r);
    }
    consumers_sync();
    // One thread per output row adds the pairs in order (a row may name an expert twice, so
    // two pairs can share a token): deterministic, no races.
    if (tid < kStreamRows)
      for (int pl = 0; pl < npass; ++pl) {
        const int slot = L.list[s0 + u.p0 + pl];
        out_acc[(slot / K) * kStreamRows + tid] += p.weights[slot] * pair_sums[pl * kStreamRedStride + tid];
      }
    if (nx.tile != u.tile) {  // the tile is complete: write every token's rows, reset the sums
      consumers_sync();
      for (int idx = tid; idx < ntok * kStreamRows; idx += kStreamConsumers) {
        const int t = idx / kStreamRows, r = idx % kStreamRows;
        out[(size_t)t * H + u.tile * kStreamRows + r] = Mma16<T>::from_float(out_acc[idx]);
        out_acc[idx] = 0.f;
      }
    }
    u = nx;
  }
  STREAM_TRACE(7);
}

// Expert-major down phase (T > kStreamXRows, where one output tile would need the act rows of
// every used expert, from L2, once per tile: measured on H100 at T=64 the tile-major phase above
// ran at 2.1 TB/s). Items are (j-th used expert, 16 output rows) in contiguous ranges per CTA,
// exactly as gate_up's: the act rows of one (expert, pass) are staged once and serve every tile
// of that expert in the range. Each pair's 16 values, times its routing weight, go to
// y[slot, rows] (fp32); combine_slots_kernel (a third, dependent launch) sums each token's slots
// in slot order, so the result stays deterministic.
__device__ __forceinline__ int down_item_count(const StreamLists& L, int H) { return L.nused * (H / kStreamRows); }

template <typename T, int NT>
__device__ __forceinline__ void produce_down_by_expert(const StreamParams& p, const StreamLists& L, Producer& prod) {
  const int lane = threadIdx.x & 31, H = p.H, I = p.I, tiles = H / kStreamRows;
  const T* dn = static_cast<const T*>(p.down);
  const int n = down_item_count(L, H);
  for (ItemIter it(n, stream_item_chunk(n, p.T)); it.more(); it.next()) {
    const int j = it.item / tiles, tile = it.item % tiles;
    const int npairs = L.start[j + 1] - L.start[j];
    prod.unit(dn + ((size_t)L.used[j] * H + tile * kStreamRows + (lane & 15)) * I, I, (npairs + NT * 8 - 1) / (NT * 8));
  }
}

// The operand producer of the expert-major down phase: the act rows of each item, in
// produce_down_by_expert's order (ready: as in produce_down_act).
template <typename T, int NT, typename ReadyFn>
__device__ __forceinline__ void produce_down_act_by_expert(const StreamParams& p, const StreamLists& L,
                                                           Producer& prod, ReadyFn ready) {
  const int tiles = p.H / kStreamRows, n = down_item_count(L, p.H);
  const T* act = static_cast<const T*>(p.act);
  int last_j = -1;
  for (ItemIter it(n, stream_item_chunk(n, p.T)); it.more(); it.next()) {
    const int j = it.item / tiles, s0 = L.start[j];
    if (j != last_j) ready(j), last_j = j;
    prod.operand_unit(act, p.I, L.start[j + 1] - s0, NT * 8, [&](int pl) { return L.list[s0 + pl]; });
  }
}

// The act rows come in the stages (produce_down_act_by_expert).
template <typename T, int NT>
__device__ __forceinline__ void consume_down_by_expert(const StreamParams& p, const StreamLists& L,
                                                       const StreamShared& sh, RingPos& pos) {
  const int tid = threadIdx.x;
  const int H = p.H, I = p.I, tiles = H / kStreamRows;
  STREAM_TRACE(6);
  const int n = down_item_count(L, H);
  const T* const brow[NT] = {};  // unused: the token rows are in the stages
  for (ItemIter it(n, stream_item_chunk(n, p.T)); it.more(); it.next()) {
    const int j = it.item / tiles, tile = it.item % tiles;
    const int s0 = L.start[j], npairs = L.start[j + 1] - s0;
    for (int p0 = 0; p0 < npairs; p0 += NT * 8) {
      const int npass = min(NT * 8, npairs - p0);
      float acc[NT][4];
      consume_pass<T, NT, true, true>(acc, brow, npass, I, sh.full0, sh.empty0, sh.ring_ptr, sh.stages,
                                      sh.stage_bytes, pos);
      stash_partials<NT>(sh.red, acc);
      consumers_sync();
      for (int idx = tid; idx < npass * kStreamRows; idx += kStreamConsumers) {
        const int pl = idx / kStreamRows, r = idx % kStreamRows, slot = L.list[s0 + p0 + pl];
        p.y[(size_t)slot * H + tile * kStreamRows + r] = p.weights[slot] * sum_partials(sh.red, pl, r);
      }
      consumers_sync();
    }
  }
  STREAM_TRACE(7);
}

// Nothing routed anywhere (every id is -1 or out of range): the output is zero.
template <typename T>
__device__ __forceinline__ void write_zero_output(const StreamParams& p) {
  T* out = static_cast<T*>(p.out);
  for (int tile = blockIdx.x; tile < p.H / kStreamRows; tile += gridDim.x)
    for (int idx = threadIdx.x; idx < p.T * kStreamRows; idx += blockDim.x)
      out[(size_t)(idx / kStreamRows) * p.H + tile * kStreamRows + idx % kStreamRows] = Mma16<T>::from_float(0.f);
}

// ---------------------------------------------------------------------------------------------
// One launch (the experts op, and the fused moe kernel after its routing): both phases in one
// persistent grid, the down phase of each expert released by readiness counters (stream_ready.cuh)
// instead of the end of a gate_up grid. The operand warp runs the protocol: it releases this CTA's
// gate_up items per expert as the consumers finish them, then confirms each expert the down phase
// needs and brings its act rows (into the stages, or all of them into shared memory).
// ---------------------------------------------------------------------------------------------
// Orders act, written by other CTAs through the generic proxy and acquired through the counters,
// before this warp's bulk copies (async proxy) read it.
__device__ __forceinline__ void fence_proxy_async_global() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
}

template <typename T, int NT>
__device__ __forceinline__ void stream_operand_warp(const StreamParams& p, const StreamLists& L, const StreamShared& sh,
                                                    StreamSignals* sig, unsigned char* operands, bool staged) {
  const int lane = threadIdx.x & 31, tiles = p.I / 8;
  const StreamReady ready = StreamReady::begin(sig, L.nused, tiles);
  // gate_up: the items of one expert's run are released together, after the consumers' last.
  const int chunks_h = (p.H + kStreamChunk - 1) / kStreamChunk;
  int run = 0, run_n = 0, stages_used = 0;
  for (ItemIter it = gate_up_items(L, p.I, p.T); it.more();) {
    const int j = it.item / tiles;
    stages_used += (L.start[j + 1] - L.start[j] + NT * 8 - 1) / (NT * 8) * chunks_h;
    ++run_n;
    it.next();
    if (!it.more() || it.item / tiles != j) {
      const int slot = run % kRunSlots;
      mbar_wait(smem_addr(&sig->run_done[slot]), (run / kRunSlots) & 1);
      ready.release(j, run_n);
      __syncwarp();
      if (lane == 0) mbar_arrive(smem_addr(&sig->run_free[slot]));
      ++run, run_n = 0;
    }
  }
  if (!staged) {  // all act rows resident (tile-major): expert by expert, as each completes
    if (static_cast<int>(blockIdx.x) < p.H / kStreamRows) {
      mbar_wait(smem_addr(&sig->gate_up_over), 0);  // x is dead: its area takes act rows
      const int vec = p.I / 8, pitch = stream_row_pitch(p.I);
      const T* act = static_cast<const T*>(p.act);
      for (int j = 0; j < L.nused; ++j) {
        ready.confirm(j);
        const int s0 = L.start[j], n = L.start[j + 1] - s0;
        for (int idx = lane; idx < n * vec; idx += 32) {
          const int slot = L.list[s0 + idx / vec], v = idx % vec;
          cp_async16(operands + (size_t)slot * pitch + v * 16, act + (size_t)slot * p.I + v * 8, 16);
        }
        cp_async_commit();
        cp_async_wait<0>();
        mbar_arrive(smem_addr(&sig->act[j]));  // every lane, after its own copies
      }
    }
  } else {  // act pieces into the stages that follow this CTA's gate_up stages
    Producer prod = sh.producer(evict_normal_policy());
    prod.pos.stage = stages_used % sh.stages;
    prod.pos.phase = static_cast<uint32_t>(stages_used / sh.stages) & 1u;
    auto gate = [&](int j) {
      ready.confirm(j);
      fence_proxy_async_global();
    };
    if (stream_x_resident(p.T)) produce_down_act<T, NT>(p, L, prod, gate);
    else produce_down_act_by_expert<T, NT>(p, L, prod, gate);
  }
  ready.exit_conditions();
}

// Everything after the lists (L.nused > 0); sh's full barriers count 2 arrivals when staged.
template <typename T, int NT>
__device__ __forceinline__ void stream_one_launch(const StreamParams& p, const StreamLists& L, const StreamShared& sh,
                                                  unsigned char* smem) {
  const bool staged = stream_down_staged(p.T, p.K);
  StreamSignals* sig = reinterpret_cast<StreamSignals*>(smem + StreamSmem::kSignalsAt);
  unsigned char* operands = smem + StreamSmem::kOperandAt;
  const int warp = threadIdx.x >> 5;
  if (warp == kStreamWeightWarp) {
    Producer prod = sh.producer(evict_first_policy());
    prod.extra_arrivals = staged ? 1 : 0;  // gate_up stages carry no act rows
    produce_gate_up<T, NT>(p, L, prod);
    prod.extra_arrivals = 0;
    if (stream_x_resident(p.T)) produce_down<T, NT>(p, L, prod);
    else produce_down_by_expert<T, NT>(p, L, prod);
  } else if (warp == kStreamOperandWarp) {
    stream_operand_warp<T, NT>(p, L, sh, sig, operands, staged);
  } else {
    RingPos pos;
    consume_gate_up<T, NT>(p, L, sh, operands, stream_row_pitch(p.H), pos, sig);
    if (stream_x_resident(p.T))
      consume_down<T, NT>(p, L, sh, smem, operands, stream_row_pitch(p.I), pos, staged,
                          staged ? nullptr : sig);
    else
      consume_down_by_expert<T, NT>(p, L, sh, pos);
  }
}

// The protocol's mbarriers and words (thread 0, before the CTA's first barrier).
__device__ __forceinline__ void init_signals(unsigned char* smem) {
  if (threadIdx.x != 0) return;
  StreamSignals* s = reinterpret_cast<StreamSignals*>(smem + StreamSmem::kSignalsAt);
  for (int i = 0; i < kRunSlots; ++i) mbar_init(smem_addr(&s->run_done[i]), 1), mbar_init(smem_addr(&s->run_free[i]), 1);
  mbar_init(smem_addr(&s->gate_up_over), kStreamConsumers);
  for (int i = 0; i < kActBars; ++i) mbar_init(smem_addr(&s->act[i]), 32);
  for (int i = 0; i < kReadyWords; ++i) s->confirmed[i] = 0;
  mbar_init_fence();
}

// The experts op in one cooperative, programmatic dependent launch (+ combine_slots_kernel past
// kStreamXRows tokens).
template <typename T, int NT>
__global__ void __launch_bounds__(kStreamThreads, 1) stream_experts_kernel(StreamParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const StreamSmem lay = stream_one_launch_smem(p.T, p.K, p.H, p.I);
  const StreamShared sh = stream_shared(smem, lay, p.stages, stream_down_staged(p.T, p.K) ? 2 : 1);
  init_signals(smem);
  STREAM_TRACE(0);
  wait_for_previous_grid();  // ids and x may come from the grid before; so may its counter updates
  allow_next_grid();
  const StreamLists L = build_stream_lists(p.ids, p.T * p.K, p.E, sh.lists, reinterpret_cast<int*>(sh.red));
  STREAM_TRACE(1);
  if (L.nused == 0) {  // the same in every CTA: nobody touches the counters
    write_zero_output<T>(p);
    return;
  }
  stream_one_launch<T, NT>(p, L, sh, smem);
}

// ---------------------------------------------------------------------------------------------
// The experts op's two launches.
// ---------------------------------------------------------------------------------------------
template <typename T, int NT>
__global__ void __launch_bounds__(kStreamThreads, 1) stream_gate_up_kernel(StreamParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const StreamSmem lay(stream_x_rows(p.T), p.H);
  const StreamShared sh = stream_shared(smem, lay, p.stages);
  STREAM_TRACE(0);
  wait_for_previous_grid();  // ids and x may come from the grid before
  allow_next_grid();         // the down grid may take each SM as soon as this grid leaves it
  const StreamLists L = build_stream_lists(p.ids, p.T * p.K, p.E, sh.lists, reinterpret_cast<int*>(sh.red));
  STREAM_TRACE(1);
  if (!gate_up_items(L, p.I, p.T).more()) return;
  RingPos pos;
  if (threadIdx.x >= kStreamConsumers) {
    if ((threadIdx.x >> 5) == kStreamWeightWarp) {
      Producer prod = sh.producer(evict_first_policy());
      produce_gate_up<T, NT>(p, L, prod);
    }
    return;
  }
  consume_gate_up<T, NT>(p, L, sh, smem + StreamSmem::kOperandAt, lay.pitch, pos);
}

template <typename T, int NT>
__global__ void __launch_bounds__(kStreamThreads, 1) stream_down_kernel(StreamParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const bool staged = stream_down_staged(p.T, p.K);
  const StreamSmem lay = stream_down_smem(p.T, p.K, p.I);
  const StreamShared sh = stream_shared(smem, lay, p.stages, staged ? 2 : 1);
  STREAM_TRACE(4);
  // ids were final before the gate_up grid started, so the lists and the weight stream need
  // not wait for it; only act and the output do.
  const StreamLists L = build_stream_lists(p.ids, p.T * p.K, p.E, sh.lists, reinterpret_cast<int*>(sh.red));
  STREAM_TRACE(5);
  if (L.nused == 0) {
    wait_for_previous_grid();
    write_zero_output<T>(p);
    return;
  }
  RingPos pos;
  const int warp = threadIdx.x >> 5;
  if (!stream_x_resident(p.T)) {  // expert-major, into y (combine_slots_kernel follows)
    allow_next_grid();
    const int n = down_item_count(L, p.H);
    if (!ItemIter(n, stream_item_chunk(n, p.T)).more()) return;
    if (warp == kStreamWeightWarp) {
      Producer prod = sh.producer(evict_first_policy());
      produce_down_by_expert<T, NT>(p, L, prod);
    } else if (warp == kStreamOperandWarp) {
      Producer prod = sh.producer(evict_normal_policy());
      wait_for_previous_grid();
      produce_down_act_by_expert<T, NT>(p, L, prod, [](int) {});
    } else {
      consume_down_by_expert<T, NT>(p, L, sh, pos);
    }
    return;
  }
  if ((int)blockIdx.x >= p.H / kStreamRows) return;
  if (warp == kStreamWeightWarp) {
    Producer prod = sh.producer(evict_first_policy());
    produce_down<T, NT>(p, L, prod);
  } else if (warp == kStreamOperandWarp) {
    if (staged) {
      Producer prod = sh.producer(evict_normal_policy());
      wait_for_previous_grid();
      produce_down_act<T, NT>(p, L, prod, [](int) {});
    }
  } else {
    consume_down<T, NT>(p, L, sh, smem, smem + StreamSmem::kOperandAt, lay.pitch, pos, staged);
  }
}

}  // namespace allocmoe::cuda_experts
