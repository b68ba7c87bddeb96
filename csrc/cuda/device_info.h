// Device facts the host side of the CUDA ops needs to pick paths and size launches: read once
// per device (attribute queries, no sync), then cached for every later call and CUDA graph
// capture. One copy for the whole module (an inline function's statics are shared).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mutex>

#include "common/check.h"

namespace allocmoe::cuda {

struct DeviceInfo {
  int sms = 0;         // multiprocessors
  int smem_optin = 0;  // largest dynamic shared memory one block may opt into, bytes
  int coop = 0;        // cooperative launch supported
  int major = 0;       // compute capability major (9: sm_90, clusters, bulk copies, PDL)
};

inline const DeviceInfo& device_info(int dev) {
  constexpr int kMaxDevices = 64;
  ALLOCMOE_CHECK(dev >= 0 && dev < kMaxDevices, "allocmoe: CUDA device index ", dev, " out of range [0, ",
                 kMaxDevices, ")");
  static DeviceInfo info[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  std::call_once(once[dev], [dev] {
    DeviceInfo& d = info[dev];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
  });
  return info[dev];
}

// Raises a kernel's dynamic shared-memory limit past the 48 KB default, once per device (done:
// the kernel's own flags), so that nothing but the launch happens on later calls, inside CUDA
// graph capture included. Called with the kernel's largest possible size.
inline void set_smem_limit(const void* kernel, int bytes, bool (&done)[64]) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && done[dev]) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (dev < 64) done[dev] = true;
}

}  // namespace allocmoe::cuda
