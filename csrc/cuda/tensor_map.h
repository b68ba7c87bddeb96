// Tensor-map copies (cp.async.bulk.tensor) of the wide path (experts_wide.cuh) and the split moe
// kernel (moe_split.cuh): the host encodes a 3-D map over a contiguous [E, rows, k] tensor of
// 16-bit elements, the device copies boxes of it (tma_load_3d). The driver's
// encoder is reached through the runtime (no link against libcuda); encoding is pure host work,
// so it is allowed during CUDA graph capture and the map travels as a kernel argument.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace allocmoe::cuda {

// Boxes of box_k x box_rows elements of one expert; reads past k land as zeros. False if the
// driver has no encoder or refuses the layout (the caller then takes another path).
// swizzle128: box rows of 128 bytes (box_k = 64) land with their 16-byte chunks XOR-ed by the row
// index mod 8 (CU_TENSOR_MAP_SWIZZLE_128B; the box's shared-memory address 1024-byte aligned).
// l2_promotion: bytes the L2 fetches from memory per box row request (0, 64, 128 or 256); a box
// row of 64 bytes read by one CTA while the neighbouring columns belong to others wants 64.
inline bool encode_weight_map(CUtensorMap* map, const void* base, int64_t E, int64_t rows, int64_t k, int box_k,
                              int box_rows, bool swizzle128 = false, int l2_promotion = 256) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(E)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(k) * 2, static_cast<cuuint64_t>(rows * k) * 2};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_k), static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t steps[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, const_cast<void*>(base), dims, strides, box, steps,
                CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                l2_promotion >= 256   ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B
                : l2_promotion >= 128 ? CU_TENSOR_MAP_L2_PROMOTION_L2_128B
                : l2_promotion >= 64  ? CU_TENSOR_MAP_L2_PROMOTION_L2_64B
                                      : CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace allocmoe::cuda

namespace allocmoe {

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

}  // namespace allocmoe
