// Per-expert readiness of act inside ONE launch of the stream kernels (experts_stream.cuh): the
// down phase of a CTA may use the j-th used expert's act rows as soon as every gate_up item of
// that expert is done, wherever in the grid it ran. No grid barrier and no second launch, so the
// down work of early CTAs fills the gate_up tail of the late ones.
//
// Counters live in device globals (zero at module load), never reset and never allocated: every
// launch adds EXACTLY kReadyPerLaunch to each of the kReadySlots counters (one per item of a
// used expert, the complement by CTA 0, the whole amount for unused slots) and exactly
// kTicketsPerLaunch to the ticket counter (1 per CTA, the complement by CTA 0). So when launch n
// starts, ready[j] == n * kReadyPerLaunch, and expert j of launch n is complete exactly when
// ready[j] >= (n + 1) * kReadyPerLaunch; a CTA learns n from its ticket.
// This needs the launches to be ordered: a CTA of launch n+1 touches the counters only after every
// CTA of launch n has taken its ticket and every expert of launch n is complete. Within a stream
// the entry griddepcontrol.wait gives that; across streams, a later launch gets an SM only when a
// CTA of the earlier one leaves it (a CTA per SM, all shared memory), and a CTA leaves only after
// it has seen both conditions (stream_ready_exit). The launch is cooperative, so a grid is either
// all resident or not started: waiting CTAs never hold SMs that the ones they wait for need.
#pragma once

#include <cstdint>

namespace allocmoe::cuda_experts {

constexpr unsigned long long kTicketsPerLaunch = 1ull << 16;  // > any grid
constexpr unsigned long long kReadyPerLaunch = 1ull << 20;    // > gate_up items of one expert (I/8)
constexpr int kReadySlots = 512;                                 // used experts of one launch, at most
constexpr int kReadyWords = kReadySlots / 32;                     // confirmed-expert bit words

__device__ unsigned long long g_stream_tickets;
__device__ unsigned long long g_stream_ready[kReadySlots];

// Counters between CTAs of one grid (these readiness counters, the wide path's tile counters):
// an acquire load and a release (or relaxed) add at gpu scope, 64 or 32 bits.
__device__ __forceinline__ unsigned long long ld_acquire_gpu(const unsigned long long* p) {
  unsigned long long v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
#endif
  return v;
}
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
#endif
  return v;
}
__device__ __forceinline__ void red_add_gpu(unsigned long long* p, unsigned long long v, bool release) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  if (release) asm volatile("red.release.gpu.global.add.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
  else asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
#endif
}
__device__ __forceinline__ void red_add_gpu(int* p, int v, bool release) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  if (release) asm volatile("red.release.gpu.global.add.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
  else asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
#endif
}
// The CTA's own hand-overs go through mbarriers (what compute-sanitizer's racecheck can follow):
//   runs: consumer thread 0 -> operand warp, one arrival per finished run of gate_up items of one
//         expert (a ring of kRunSlots; `run_free` lets the consumers reuse a slot);
//   gate_up_over: every consumer thread, once past its last use of x (the operand area turns into
//         act rows);
//   act: operand warp -> consumers, expert j's act rows are in shared memory (resident act).
constexpr int kRunSlots = 8;
constexpr int kActBars = 32;  // resident act: T*K <= kStreamResidentSlots used experts
struct StreamSignals {
  uint64_t run_done[kRunSlots], run_free[kRunSlots], gate_up_over, act[kActBars];
  uint32_t confirmed[kReadyWords];  // operand warp: experts seen complete
};

// The operand warp's side (all 32 lanes call every function).
struct StreamReady {
  unsigned long long ready_target, tickets_target;
  uint32_t* confirmed;
  int nused;

  // Takes this CTA's ticket; CTA 0 also adds the complements (items_per_expert per used expert).
  __device__ __forceinline__ static StreamReady begin(StreamSignals* s, int nused, int items_per_expert) {
    const int lane = threadIdx.x & 31;
    unsigned long long t = 0;
    if (lane == 0) {
      const unsigned long long add = blockIdx.x == 0 ? kTicketsPerLaunch - gridDim.x + 1 : 1;
      asm volatile("atom.relaxed.gpu.global.add.u64 %0, [%1], %2;\n" : "=l"(t) : "l"(&g_stream_tickets), "l"(add) : "memory");
    }
    t = __shfl_sync(0xffffffffu, t, 0);
    const unsigned long long epoch = t / kTicketsPerLaunch;
    if (blockIdx.x == 0)
      for (int j = lane; j < kReadySlots; j += 32)
        red_add_gpu(g_stream_ready + j, j < nused ? kReadyPerLaunch - items_per_expert : kReadyPerLaunch, false);
    return StreamReady{(epoch + 1) * kReadyPerLaunch, (epoch + 1) * kTicketsPerLaunch, s->confirmed, nused};
  }
  // n gate_up items of expert j are done (their act rows written by the consumers, which the
  // operand warp has acquired through StreamSignals::items_done).
  __device__ __forceinline__ void release(int j, int n) const {
    if ((threadIdx.x & 31) == 0) red_add_gpu(g_stream_ready + j, static_cast<unsigned long long>(n), true);
  }
  // Returns once expert j is complete; one poll reads 32 experts' counters at once.
  __device__ __forceinline__ void confirm(int j) const {
    const int lane = threadIdx.x & 31, w = j >> 5;
    uint32_t have = confirmed[w];
    while (!((have >> (j & 31)) & 1u)) {
      const int jj = (w << 5) + lane;
      const bool done = jj < nused && ld_acquire_gpu(g_stream_ready + jj) >= ready_target;
      have |= __ballot_sync(0xffffffffu, done);
      if (!((have >> (j & 31)) & 1u)) __nanosleep(128);
    }
    __syncwarp();
    if (lane == 0) confirmed[w] = have;
    __syncwarp();
  }
  // Before the CTA leaves: every expert complete and every CTA of this launch ticketed (header).
  __device__ __forceinline__ void exit_conditions() const {
    for (int j = 0; j < nused; ++j) confirm(j);  // one poll per 32 experts when all are done
    if ((threadIdx.x & 31) == 0)
      while (ld_acquire_gpu(&g_stream_tickets) < tickets_target) __nanosleep(128);
    __syncwarp();
  }
};

}  // namespace allocmoe::cuda_experts
