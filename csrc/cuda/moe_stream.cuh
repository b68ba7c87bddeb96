// Fused decode path of the CUDA `moe` op on sm_90: router logits in, routed-expert output out,
// in ONE cooperative launch of one CTA per SM:
//   1. every CTA routes all T tokens itself (route_block of routing.cuh: the route op's code,
//      deterministic, so all CTAs agree; its scratch is the ring, free until the weights flow)
//      and builds the expert and slot lists;
//   2. the experts op's one-launch body (stream_one_launch, experts_stream.cuh): gate_up, then
//      the down phase of each expert as soon as its act is complete grid-wide (stream_ready.cuh).
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

__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

struct StreamMoeParams {
  StreamParams e;           // the experts' operands (ids and weights: routed in the kernel)
  const float* logits;      // router logits [T, E] fp32
  cuda::RouteArgs route;    // the routing (Alloc-T) of the T tokens
};

template <typename T, int NT>
__global__ void __launch_bounds__(kStreamThreads, 1) stream_moe_kernel(StreamMoeParams m) {
  extern __shared__ __align__(16) unsigned char smem[];
  StreamParams p = m.e;
  const StreamSmem lay = stream_one_launch_smem(p.T, p.K, p.H, p.I);
  const StreamShared sh = stream_shared(smem, lay, p.stages, stream_down_staged(p.T, p.K) ? 2 : 1);
  init_signals(smem);
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
  if (L.nused == 0) {  // the same in every CTA: nobody touches the counters
    write_zero_output<T>(p);
    return;
  }
  stream_one_launch<T, NT>(p, L, sh, smem);
}

}  // namespace allocmoe::cuda_experts
