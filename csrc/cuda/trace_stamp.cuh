// %globaltimer stamps for the standalone harnesses in bench/ (their trace macros, STREAM_TRACE
// and ROUTE_TRACE, are defined only when a harness asks for them, never in the library build).
#pragma once

namespace allocmoe {

// Thread 0 of the block writes the current %globaltimer (ns) to *slot.
__device__ __forceinline__ void trace_stamp(unsigned long long* slot) {
  if (threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    *slot = t;
  }
}

}  // namespace allocmoe
