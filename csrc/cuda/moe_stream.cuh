// Fused decode path of the CUDA `moe` op on sm_90: router logits in, routed-expert output out,
// in ONE cooperative launch of one CTA per SM (the stream kernels of experts_stream.cuh, fused):
//   1. every CTA routes all T tokens itself (route_block of routing.cuh: the route op's code,
//      deterministic, so all CTAs agree; its scratch is the ring, free until the weights flow)
//      and builds the expert and slot lists;
//   2. the gate_up phase of experts_stream.cuh (act to global scratch);
//   3. a grid barrier among the consumer warps, then the down phase.
// The producer warp never stops at the barrier: it streams this CTA's down weights into the ring
// right after its gate_up weights, so HBM stays busy while the consumers wait for the slowest CTA.
//
// The barrier is a 64-bit arrival counter per device (g_stream_moe_arrivals, zero at module
// load): a launch of G CTAs adds G, so between launches it is a multiple of G and each CTA waits
// for the next multiple. No workspace to zero, nothing to allocate. Two launches can never mix
// their arrivals: every CTA of a launch must be resident (cooperative launch, one CTA per SM)
// before any passes the barrier, so a later launch gets an SM only after the earlier one's
// arrivals are all counted. (cooperative_groups' grid sync, tried first, holds the producer
// warp too and took 6 us under full HBM load on H100: its fences wait behind the copies.)
#pragma once

#include "experts_stream.cuh"
#include "routing.cuh"

namespace allocmoe::cuda_experts {

// The fused kernel's limits: x of every token stays in shared memory for the whole gate_up phase
// (the down phase is the tile-major one), and the routing result holds one slot per thread.
constexpr int kStreamMoeMaxTokens = 16;
constexpr int kStreamMoeMaxSlots = 256;
static_assert(kStreamMoeMaxTokens <= kStreamXRows, "x stays in shared memory for the whole gate_up phase");
static_assert(kStreamMoeMaxSlots <= kStreamMaxSlots, "the routing result fits the stream lists");

struct StreamMoeParams {
  StreamParams e;           // the experts' operands (ids and weights: routed in the kernel)
  const float* logits;      // router logits [T, E] fp32
  cuda::RouteArgs route;    // the routing (Alloc-T) of the T tokens
};

// One operand area for x (gate_up phase) and, after the barrier, the act buffers (down phase).
__host__ __device__ inline StreamSmem stream_moe_smem(int T, int K, int H, int I) {
  const int x_bytes = stream_x_rows(T) * stream_row_pitch(H);
  const int act_bytes = stream_act_rows(T, K) * stream_row_pitch(I);
  return StreamSmem(x_bytes > act_bytes ? x_bytes : act_bytes);
}

__device__ unsigned long long g_stream_moe_arrivals;

// All consumer threads of the grid; act written before it is visible after it (release by the
// arriving thread after a CTA barrier, acquire by the waiting one before the next).
__device__ __forceinline__ void consumers_grid_barrier() {
  consumers_sync();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) {
    unsigned long long old = 0, now = 0;
    asm volatile("atom.add.release.gpu.global.u64 %0, [%1], 1;\n" : "=l"(old) : "l"(&g_stream_moe_arrivals) : "memory");
    const unsigned long long target = old - old % gridDim.x + gridDim.x;
    do {
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(now) : "l"(&g_stream_moe_arrivals) : "memory");
    } while (now < target);
  }
#endif
  consumers_sync();
}

__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <typename T, int NT>
__global__ void __launch_bounds__(kStreamThreads, 1) stream_moe_kernel(StreamMoeParams m) {
  extern __shared__ __align__(16) unsigned char smem[];
  StreamParams p = m.e;
  const StreamSmem lay = stream_moe_smem(p.T, p.K, p.H, p.I);
  const StreamShared sh = stream_shared(smem, lay, p.stages);
  STREAM_TRACE(0);
  int* ids = reinterpret_cast<int*>(smem + StreamSmem::kRouteAt);
  float* weights = reinterpret_cast<float*>(ids + kStreamMaxSlots);
  cuda::route_block(m.logits, m.route, reinterpret_cast<uint32_t*>(sh.ring_ptr), ids, weights);
  STREAM_TRACE(4);
  fence_proxy_async_shared();  // the routing scratch is read and written before bulk copies land there
  p.ids = ids;
  p.weights = weights;
  const StreamLists L = build_stream_lists(ids, p.T * p.K, p.E, sh.lists, reinterpret_cast<int*>(sh.red));
  STREAM_TRACE(1);
  if (L.nused == 0) {  // the same in every CTA: no barrier needed
    write_zero_output<T>(p);
    return;
  }
  RingPos pos;
  if (threadIdx.x >= kStreamConsumers) {
    if ((threadIdx.x >> 5) == kStreamWeightWarp) {  // the operand warp has nothing to do here
      Producer prod = sh.producer(evict_first_policy());
      produce_gate_up<T, NT>(p, L, prod);
      produce_down<T, NT>(p, L, prod);
    }
    return;
  }
  unsigned char* operands = smem + StreamSmem::kOperandAt;
  consume_gate_up<T, NT>(p, L, sh, operands, stream_row_pitch(p.H), pos);
  consumers_grid_barrier();  // act of every CTA is complete and visible; x is dead, its area takes act rows
  consume_down<T, NT>(p, L, sh, smem, operands, stream_row_pitch(p.I), pos);
}

}  // namespace allocmoe::cuda_experts
