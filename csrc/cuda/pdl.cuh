// Programmatic dependent launch (sm_90), shared by every CUDA op: a grid launched with
// programmatic stream serialization may start while the grid before it drains. It must call
// wait_for_previous_grid() before it reads anything that grid writes (the wait returns once that
// grid has finished and its writes are visible); allow_next_grid() lets the next such grid get
// scheduled now. No-ops before sm_90 and in grids launched normally.
#pragma once

namespace allocmoe {

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

}  // namespace allocmoe
