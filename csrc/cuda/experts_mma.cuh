// Small device helpers shared by the tensor-core paths of the CUDA `experts` op
// (experts_decode.cuh, experts_skinny.cuh, experts_prefill.cuh): 16-bit type traits, mma.sync,
// ldmatrix, cp.async, 16-byte loads, programmatic dependent launch and the slot combine.
// Everything here is sm_80+ PTX (mma.sync m16n8k16, cp.async, ldmatrix; griddepcontrol sm_90).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pdl.cuh"

namespace allocmoe::cuda_experts {

// Conversions and the m16n8k16 tensor-core product for one 16-bit element type.
// D (fp32, 16x8) += A (16x16, row) * B (16x8, col); fragments in the PTX ISA's register layout.
template <typename T>
struct Mma16;

template <>
struct Mma16<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma16<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// 16-byte load of data read exactly once (expert weights): not kept in L1.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 16-byte load of data that other CTAs read too (activations): cached.
__device__ __forceinline__ uint4 load_cached16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 fills the destination with zeros (rows past the end).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// One m16 x n8 x k32 step (two mma.sync) on fragments loaded straight from memory with one
// 16-byte load per row: thread (g = lane/4, c = lane%4) holds elements 8c..8c+7 of a 32-wide k
// chunk of A rows g and g+8 and of B column g. A dot product does not care about the order of
// k, and A and B use the same fixed permutation of k, so the fragments need no shuffling.
template <typename T>
__device__ __forceinline__ void mma_k32(float (&acc)[4], const uint4& row_g, const uint4& row_g8, const uint4& b) {
  Mma16<T>::mma(acc, row_g.x, row_g8.x, row_g.y, row_g8.y, b.x, b.y);
  Mma16<T>::mma(acc, row_g.z, row_g8.z, row_g.w, row_g8.w, b.z, b.w);
}

// 16-byte shared-memory load.
__device__ __forceinline__ uint4 load_shared16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// Final step of the prefill, skinny, stream (past 16 tokens) and wide paths: out[t] = sum over the
// valid slots k of t, in slot order (deterministic), of weights[slot] * y[row of slot] (fp32);
// one CTA per token, 4 columns per thread per step (H % 4 == 0). Tokens with no valid slot get
// zeros. Without slot_row and weights (all but the wide path) y's row is the slot and y is already
// times the routing weight.
struct CombineParams {
  const float* y;   // [T*K, H]
  const int* ids;   // [T, K]
  void* out;        // [T, H]
  int T, K, E, H;
  const int* slot_row = nullptr;    // [T*K] y's row of each slot (the wide path: y in expert order)
  const float* weights = nullptr;   // [T*K] routing weights, applied here (the wide path)
};

template <typename T>
__global__ void __launch_bounds__(256) combine_slots_kernel(CombineParams p) {
  wait_for_previous_grid();  // y comes from the grid before (launched as a dependent or not)
  const int t = blockIdx.x, H = p.H, K = p.K;
  T* out = static_cast<T*>(p.out);
  for (int h = threadIdx.x * 4; h < H; h += 256 * 4) {
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k = 0; k < K; ++k) {
      const int slot = t * K + k, e = p.ids[slot];
      if (e < 0 || e >= p.E) continue;
      const int row = p.slot_row ? p.slot_row[slot] : slot;
      const float w = p.weights ? p.weights[slot] : 1.f;
      const float4 v = *reinterpret_cast<const float4*>(p.y + (size_t)row * H + h);
      s.x += w * v.x;
      s.y += w * v.y;
      s.z += w * v.z;
      s.w += w * v.w;
    }
    const uint2 packed = make_uint2(Mma16<T>::pack2(s.x, s.y), Mma16<T>::pack2(s.z, s.w));
    *reinterpret_cast<uint2*>(out + (size_t)t * H + h) = packed;
  }
}

}  // namespace allocmoe::cuda_experts
