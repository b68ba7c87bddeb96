// mbarrier primitives (sm_90), shared by every CUDA op: the stream kernels' rings
// (experts_stream.cuh) and the route op's pool exchange between the blocks of a cluster
// (routing.cuh). Bars are 8-byte shared-memory words named by their shared address
// (smem_addr / __cvta_generic_to_shared). Empty bodies (or a trap where a result is needed)
// when compiled for older targets, which the hosts never launch these paths on.
#pragma once

#include <cstdint>

namespace allocmoe {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
#endif
}
// Makes the inits before it visible to the whole cluster (async proxy included).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Waits until the phase of parity `parity` has completed. Acquire at CTA scope (what this CTA's
// threads and its bulk copies wrote), or with kCluster at cluster scope (bytes that other blocks
// of the cluster stored with st_async_cluster_u32).
template <bool kCluster = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    if constexpr (kCluster)
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                   " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    else
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
#endif
}
// Stores v at shared address `local` of block `rank` of the cluster and completes 4 bytes on that
// block's mbarrier at its shared address `bar` (both addresses as in the calling block: the
// layouts are the same in every block). The destination must have initialised the mbarrier
// (and a cluster barrier must order that init before this store).
__device__ __forceinline__ void st_async_cluster_u32(uint32_t local, uint32_t bar, uint32_t rank, uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote, remote_bar;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote_bar) : "r"(bar), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];\n" ::"r"(remote), "r"(v),
               "r"(remote_bar)
               : "memory");
#else
  __trap();
#endif
}

}  // namespace allocmoe
