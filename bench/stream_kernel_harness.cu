// Standalone harness for the stream kernels of the experts op (csrc/cuda/experts_stream.cuh), no
// torch: a kernel change is compiled here in ~10 s and measured on the GPU in ~1 s, instead of a
// ~4 minute extension build. It prints, in one run:
//   - ceilings: device-to-device copy, the same bulk-copy ring reading 1 GiB and the T=1 k=6 bytes
//     with no compute (and 16 MB that stay in L2), a 16-byte ld.global stream;
//   - a check of the stream kernels against the decode kernels (experts_decode.cuh) on one layer;
//   - a per-CTA %globaltimer trace of both launches (entry, lists built, end, ...) at T=1 and 4;
//   - the fused moe kernel against route + both launches, and the launch cost of its shape;
//   - CUDA-graph timings of gate_up, down and both (PDL), DeepSeek-V2-Lite shape, 8 layers of
//     weights rotated so nothing is served from L2.
// With the argument "mid" it runs only the mid-T part instead: the stream kernels at T = 17..64
// (x staged per expert) checked and timed against the skinny kernels, and a trace at T=64;
// "mid flushed": bench-like single calls after an L2 flush (events + %globaltimer stamps + trace).
// With "wide": the bulk-copy granularity probe (rows x bytes per copy, no compute; the stream
// path's 16 x 1 KB stages as 16 bulk copies against 2 tensor-map boxes), then the wide
// path (experts_wide.cuh) checked against skinny at T = 17..512 (rel diff, NaN, run to run) and
// timed against skinny and the stream path (CUDA graph of 40 calls; single calls after an L2 flush).
// Build on a machine with nvcc (no GPU needed) from the repository root, then run the binary on
// the GPU (-DALLOCMOE_STREAM_CHUNK=768 etc. tries another stage width):
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I csrc/cuda -o stream_kernel_harness bench/stream_kernel_harness.cu
#define ALLOCMOE_STREAM_TRACE
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <algorithm>
#include <cmath>
#include <cstring>
#include "experts_stream.cuh"
#include "experts_decode.cuh"
#include "moe_stream.cuh"
#include "experts_skinny.cuh"
#include "experts_wide.cuh"
#include "tensor_map.h"
#include "harness_util.cuh"
using namespace allocmoe;  // mbarrier.cuh, pdl.cuh
using namespace allocmoe::cuda_experts;

// pure streaming reference: each CTA bulk-copies a contiguous byte range through the same ring, no compute
__global__ void __launch_bounds__(kStreamThreads, 1) ring_read_kernel(const char* src, size_t bytes, int stages, int* sink) {
  extern __shared__ __align__(16) unsigned char smem[];
  const StreamSmem lay(1, 64);
  const StreamShared sh = stream_shared(smem, lay, stages);
  __syncthreads();
  const size_t per = bytes / gridDim.x / 16384 * 16384;
  const char* my = src + per * blockIdx.x;
  const int nst = (int)(per / 16384);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  RingPos pos;
  if (warp > kStreamConsumerWarps) return;
  if (warp == kStreamConsumerWarps) {
    const uint64_t pol = evict_first_policy();
    for (int s = 0; s < nst; ++s) {
      mbar_wait(sh.empty0 + 8 * pos.stage, pos.phase ^ 1u);
      if (lane == 0) mbar_arrive_expect_tx(sh.full0 + 8 * pos.stage, 16384);
      __syncwarp();
      if (lane < 16) bulk_copy(sh.ring + pos.stage * kStreamStageBytes + lane * kStreamPitch, my + (size_t)s * 16384 + lane * 1024, 1024, sh.full0 + 8 * pos.stage, pol);
      pos.next(stages);
    }
    return;
  }
  int acc = 0;
  for (int s = 0; s < nst; ++s) {
    mbar_wait(sh.full0 + 8 * pos.stage, pos.phase);
    acc += sh.ring_ptr[pos.stage * kStreamStageBytes + threadIdx.x];
    mbar_arrive(sh.empty0 + 8 * pos.stage);
    pos.next(stages);
  }
  if (acc == 123456) sink[0] = acc;
}
__global__ void ldg_read_kernel(const uint4* src, size_t n, int* sink) {
  uint4 a = make_uint4(0,0,0,0);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x * 4) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) { size_t j = i + (size_t)u * gridDim.x * blockDim.x; v[u] = j < n ? load_stream16(src + j) : make_uint4(0,0,0,0); }
#pragma unroll
    for (int u = 0; u < 4; ++u) a.x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (a.x == 0x12345678u) sink[0] = 1;
}

// Access-pattern probe: no compute, the ring of the stream kernels. CTA b streams 16-row units of
// nexp matrices of `rows` rows of row_bytes each, tile-major (rows 16b', b' = b, b + G, ...), each
// unit in stages of 16 rows x chunk bytes: the down phase's pattern with row_bytes = 2 * I.
__global__ void __launch_bounds__(kStreamThreads, 1) pattern_read_kernel(const char* base, int nexp, int rows, int row_bytes, int chunk, int stages, int* sink) {
  extern __shared__ __align__(16) unsigned char smem[];
  const StreamSmem lay(1, 64);
  const StreamShared sh = stream_shared(smem, lay, stages);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tiles = rows / 16;
  RingPos pos;
  if (warp > kStreamConsumerWarps) return;
  if (warp == kStreamConsumerWarps) {
    const uint64_t pol = evict_first_policy();
    for (int t = blockIdx.x; t < tiles; t += gridDim.x)
      for (int e = 0; e < nexp; ++e)
        for (int k0 = 0; k0 < row_bytes; k0 += chunk) {
          const int by = min(chunk, row_bytes - k0);
          mbar_wait(sh.empty0 + 8 * pos.stage, pos.phase ^ 1u);
          if (lane == 0) mbar_arrive_expect_tx(sh.full0 + 8 * pos.stage, by * 16);
          __syncwarp();
          if (lane < 16) bulk_copy(sh.ring + pos.stage * kStreamStageBytes + lane * kStreamPitch, base + ((size_t)e * rows + t * 16 + lane) * row_bytes + k0, by, sh.full0 + 8 * pos.stage, pol);
          pos.next(stages);
        }
    return;
  }
  int acc = 0;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x)
    for (int e = 0; e < nexp; ++e)
      for (int k0 = 0; k0 < row_bytes; k0 += chunk) {
        mbar_wait(sh.full0 + 8 * pos.stage, pos.phase);
        acc += sh.ring_ptr[pos.stage * kStreamStageBytes + threadIdx.x];
        mbar_arrive(sh.empty0 + 8 * pos.stage);
        pos.next(stages);
      }
  if (acc == 123456) sink[0] = acc;
}

// Bulk-copy granularity probe: no compute. A stage is R rows x C bytes (R bulk copies of C bytes,
// spread over the producer warp's lanes); CTA b walks row blocks b, b + G, ... of nexp matrices of
// `rows` rows of row_bytes, each block in stages of C bytes per row.
__global__ void __launch_bounds__(kStreamThreads, 1) copy_probe_kernel(const char* base, int nexp, int rows, int row_bytes, int R, int C, int stages, int* sink) {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t full0 = smem_addr(smem), empty0 = full0 + 8 * kStreamMaxStages;
  unsigned char* ring_ptr = smem + 256;
  const uint32_t ring = smem_addr(ring_ptr);
  const int pitch = C + 64, stage_bytes = R * pitch;
  if (threadIdx.x == 0) { for (int i = 0; i < stages; ++i) { mbar_init(full0 + 8 * i, 1); mbar_init(empty0 + 8 * i, kStreamConsumers); } mbar_init_fence(); }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, blocks = rows / R;
  RingPos pos;
  if (warp > kStreamConsumerWarps) return;
  if (warp == kStreamConsumerWarps) {
    const uint64_t pol = evict_first_policy();
    for (int b = blockIdx.x; b < blocks * nexp; b += gridDim.x)
      for (int k0 = 0; k0 < row_bytes; k0 += C) {
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        if (lane == 0) mbar_arrive_expect_tx(full0 + 8 * pos.stage, C * R);
        __syncwarp();
        for (int r = lane; r < R; r += 32)
          bulk_copy(ring + pos.stage * stage_bytes + r * pitch, base + ((size_t)(b % nexp) * rows + (b / nexp) * R + r) * row_bytes + k0, C, full0 + 8 * pos.stage, pol);
        pos.next(stages);
      }
    return;
  }
  int acc = 0;
  for (int b = blockIdx.x; b < blocks * nexp; b += gridDim.x)
    for (int k0 = 0; k0 < row_bytes; k0 += C) {
      mbar_wait(full0 + 8 * pos.stage, pos.phase);
      acc += ring_ptr[pos.stage * stage_bytes + threadIdx.x];
      mbar_arrive(empty0 + 8 * pos.stage);
      pos.next(stages);
    }
  if (acc == 123456) sink[0] = acc;
}

// A weight walk with tensor-map boxes alone (map: encode_weight_map with E = 1), no compute:
// items of box_rows rows dealt round robin, each streamed over all of k in stages of `boxes`
// boxes of box_k x box_rows elements side by side in k. The stream path's 16 x 1 KB stages as 2
// boxes (against 16 bulk copies, copy_probe_kernel), and the wide path's walk by box shape and
// ring depth (how DRAM reads depend on them).
__global__ void __launch_bounds__(kStreamThreads, 1) box_probe_kernel(const __grid_constant__ CUtensorMap map, int rows, int row_elems,
                                                                      int box_rows, int box_k, int boxes, int stages, int* sink) {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t full0 = smem_addr(smem), empty0 = full0 + 8 * kStreamMaxStages;
  const uint32_t ring = (smem_addr(smem) + 16 * kStreamMaxStages + 127) / 128 * 128;
  unsigned char* ring_ptr = smem + (ring - smem_addr(smem));
  const int box = box_rows * box_k * 2, stage = boxes * box, step = boxes * box_k, blocks = rows / box_rows;
  if (threadIdx.x == 0) { for (int i = 0; i < stages; ++i) { mbar_init(full0 + 8 * i, 1); mbar_init(empty0 + 8 * i, kStreamConsumers); } mbar_init_fence(); }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  RingPos pos;
  if (warp > kStreamConsumerWarps) return;
  if (warp == kStreamConsumerWarps) {
    if (lane != 0) return;
    const uint64_t pol = evict_first_policy();
    for (int b = blockIdx.x; b < blocks; b += gridDim.x)
      for (int k0 = 0; k0 < row_elems; k0 += step) {
        mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1u);
        mbar_arrive_expect_tx(full0 + 8 * pos.stage, stage);
        for (int j = 0; j < boxes; ++j)
          tma_load_3d(ring + pos.stage * stage + j * box, &map, k0 + j * box_k, b * box_rows, 0, full0 + 8 * pos.stage, pol);
        pos.next(stages);
      }
    return;
  }
  int acc = 0;
  for (int b = blockIdx.x; b < blocks; b += gridDim.x)
    for (int k0 = 0; k0 < row_elems; k0 += step) {
      mbar_wait(full0 + 8 * pos.stage, pos.phase);
      acc += ring_ptr[pos.stage * stage + threadIdx.x];
      mbar_arrive(empty0 + 8 * pos.stage);
      pos.next(stages);
    }
  if (acc == 123456) sink[0] = acc;
}

// The route op's block routine alone (one CTA), for the unfused reference: route -> gate_up -> down.
__global__ void __launch_bounds__(kStreamThreads) route_only_kernel(const float* logits, allocmoe::cuda::RouteArgs a, int* ids, float* w) {
  extern __shared__ __align__(16) uint32_t scratch[];
  __shared__ int sids[kStreamMoeMaxSlots];
  __shared__ float sw[kStreamMoeMaxSlots];
  allocmoe::allow_next_grid();  // as the route op's kernels: the gate_up grid may get resident now
  allocmoe::cuda::route_block(logits, a, scratch, sids, sw);
  for (int i = threadIdx.x; i < a.T * a.K; i += blockDim.x) { ids[i] = sids[i]; w[i] = sw[i]; }
}
allocmoe::cuda::RouteArgs softmax_args(int T, int E, int K, int n_total) {
  return allocmoe::cuda::RouteArgs{T, E, K, 1, allocmoe::cuda::kSoftmax, 1, 1, 0, 1.0f, nullptr, (long long)n_total - T};
}

// Launch-cost probe: a kernel of the fused kernel's shape that does nothing but exist (what any
// call of that shape costs in a graph: ~1.0 us on H100, session 13).
__global__ void __launch_bounds__(kStreamThreads, 1) empty_smem_kernel(int* sink, int bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (threadIdx.x == 0 && bytes > 0 && smem[bytes - 1] == 123) sink[0] = 1;
}

// Writes %globaltimer to s[i]: brackets a call in bench-like timings (launch gap, spread, tail).
__global__ void stamp_kernel(unsigned long long* s, int i) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  s[i] = t;
}

int main(int argc, char** argv) {
  const int E = 64, H = 2048, I = 1408, L = 8;
  int dev = 0; CK(cudaSetDevice(dev));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, dev));
  int optin = 0; CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int sms = prop.multiProcessorCount;
  printf("%s sms=%d optin=%d\n", prop.name, sms, optin);
  unsigned long long* tr; CK(cudaGetSymbolAddress(reinterpret_cast<void**>(&tr), g_stream_trace));
  const size_t gu_n = (size_t)E * 2 * I * H, dn_n = (size_t)E * H * I;
  std::vector<bf*> gu(L), dn(L);
  for (int l = 0; l < L; ++l) {
    CK(cudaMalloc(&gu[l], gu_n * 2)); CK(cudaMalloc(&dn[l], dn_n * 2));
    fill<<<1024, 256>>>(gu[l], gu_n, 17 * l + 1); fill<<<1024, 256>>>(dn[l], dn_n, 31 * l + 7);
  }
  const int TMAX = 64, KMAX = 8;
  bf* x; float* w; int* ids; void* act; float* y; bf* out; int* cnt; int* sink;
  CK(cudaMalloc(&x, TMAX * H * 2)); fill<<<64, 256>>>(x, TMAX * H, 99);
  CK(cudaMalloc(&w, TMAX * KMAX * 4)); CK(cudaMalloc(&ids, L * TMAX * KMAX * 4));
  CK(cudaMalloc(&act, TMAX * KMAX * I * 2)); CK(cudaMalloc(&y, TMAX * KMAX * H * 4));
  CK(cudaMalloc(&out, TMAX * H * 2)); CK(cudaMalloc(&cnt, 4096)); CK(cudaMemset(cnt, 0, 4096)); CK(cudaMalloc(&sink, 4));
  std::vector<float> hw(TMAX * KMAX, 0.3f); CK(cudaMemcpy(w, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice));
  std::mt19937 rng(5);
  CK(cudaFuncSetAttribute(stream_gate_up_kernel<bf, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  CK(cudaFuncSetAttribute(stream_down_kernel<bf, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  CK(cudaFuncSetAttribute(stream_gate_up_kernel<bf, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  CK(cudaFuncSetAttribute(stream_down_kernel<bf, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  CK(cudaFuncSetAttribute(ring_read_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));

  auto time_graph = [&](auto&& body, int iters) { return graph_us(st, e0, e1, body, iters); };

  // ceilings
  {
    const size_t nb = (size_t)1 << 30; char *a, *b; CK(cudaMalloc(&a, nb)); CK(cudaMalloc(&b, nb));
    float us = time_graph([&](int) { CK(cudaMemcpyAsync(b, a, nb, cudaMemcpyDeviceToDevice, st)); }, 5);
    printf("copy 1 GiB: %.1f us = %.0f GB/s (read+write)\n", us, 2.0 * nb / us / 1e3);
    for (int stg : {4}) {
      float u2 = time_graph([&](int) { ring_read_kernel<<<sms, kStreamThreads, StreamSmem(1, 64).total(stg), st>>>(a, nb, stg, sink); }, 5);
      printf("ring read 1 GiB stages=%d: %.1f us = %.0f GB/s\n", stg, u2, 1.0 * nb / u2 / 1e3);
    }
    for (int ctas : {sms, 2 * sms, 4 * sms}) {
      float u3 = time_graph([&](int) { ldg_read_kernel<<<ctas, 512, 0, st>>>((const uint4*)a, nb / 16, sink); }, 5);
      printf("ldg read 1 GiB %d CTAs x 512: %.1f us = %.0f GB/s\n", ctas, u3, 1.0 * nb / u3 / 1e3);
    }
    // 104 MB read (the T=1 k=6 bytes): ring and ldg
    const size_t small = (size_t)6 * 3 * H * I * 2;
    for (int stg : {4}) {
      float u4 = time_graph([&](int i) { ring_read_kernel<<<sms, kStreamThreads, StreamSmem(1, 64).total(stg), st>>>(a + (i % 8) * (nb / 8) / 4096 * 4096, small, stg, sink); }, 20);
      printf("ring read %.1f MB stages=%d: %.1f us = %.0f GB/s\n", small / 1e6, stg, u4, small / u4 / 1e3);
    }
    // the same ring over 16 MB that stay in L2 (the same bytes every call): whether 1 KB copies
    // that hit L2 flow faster than HBM's rate (what a prefetch into L2 can buy)
    {
      const size_t l2b = (size_t)16 << 20;
      float u6 = time_graph([&](int) { ring_read_kernel<<<sms, kStreamThreads, StreamSmem(1, 64).total(8), st>>>(a, l2b, 8, sink); }, 20);
      printf("ring read 16 MB from L2 stages=8: %.1f us = %.0f GB/s\n", u6, l2b / u6 / 1e3);
    }
    // access patterns (no compute), ~277 MB: down-shaped units (2048 rows x 2816 B: 128 tiles of
    // 16 rows for 132 CTAs), 132 tiles, 4 KB rows, 1 KB rows (a stage is 16 contiguous KB)
    CK(cudaFuncSetAttribute(pattern_read_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    struct Pat { const char* name; int rows, row_bytes, nexp, chunk; };
    Pat pats[] = {{"down 2048x2816 x48 (128 tiles)", 2048, 2816, 48, 1024}, {"2112x2816 x47 (132 tiles)", 2112, 2816, 47, 1024},
                  {"2048x4096 x33", 2048, 4096, 33, 1024}, {"2048x1024 x132 (contiguous stages)", 2048, 1024, 132, 1024}};
    for (auto& pt : pats) {
      const double by = (double)pt.nexp * pt.rows * pt.row_bytes;
      for (int stg : {8}) {
        float u5 = time_graph([&](int i) { pattern_read_kernel<<<sms, kStreamThreads, StreamSmem(1, 64).total(stg), st>>>(a + (i % 2) * (nb / 2), pt.nexp, pt.rows, pt.row_bytes, pt.chunk, stg, sink); }, 10);
        printf("pattern %s stages=%d: %.1f us = %.0f GB/s\n", pt.name, stg, u5, by / u5 / 1e3);
      }
    }
    CK(cudaFree(a)); CK(cudaFree(b));
  }
  auto run_case = [&](int T, int K, int which, int stages_cap) {
    // ids: L sets of T rows of K distinct experts
    std::vector<int> h(L * T * K);
    int touched = 0;
    for (int l = 0; l < L; ++l) {
      std::vector<int> seen(E, 0);
      for (int t = 0; t < T; ++t) {
        std::vector<int> perm(E); for (int e = 0; e < E; ++e) perm[e] = e; std::shuffle(perm.begin(), perm.end(), rng);
        for (int k = 0; k < K; ++k) { h[(l * T + t) * K + k] = perm[k]; seen[perm[k]] = 1; }
      }
      for (int e = 0; e < E; ++e) touched += seen[e];
    }
    CK(cudaMemcpy(ids, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    const double bytes = (double)touched / L * 3.0 * H * I * 2;
    auto body = [&](int i) {
      const int l = i % L;
      StreamParams p{x, gu[l], dn[l], w, ids + l * T * K, act, out, T, K, E, H, I, 0};
      cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = 1;
      const StreamSmem lg(T, H), ld = stream_down_smem(T, K, I);
      auto stg = [&](const StreamSmem& lay) { return std::min(stages_cap, lay.fit_stages(optin)); };
      if (which & 1) {
        p.stages = stg(lg); cfg.dynamicSmemBytes = lg.total(p.stages);
        if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 2>, p));
      }
      if (which & 2) {
        p.stages = stg(ld); cfg.dynamicSmemBytes = ld.total(p.stages);
        if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 2>, p));
      }
    };
    float us = time_graph(body, 40);
    const double part = which == 3 ? 1.0 : which == 1 ? 2.0 / 3 : 1.0 / 3;
    printf("T=%2d K=%d %-8s cap=%2d touched=%.1f: %.1f us  %.0f GB/s\n", T, K, which == 3 ? "both" : which == 1 ? "gate_up" : "down", stages_cap, (double)touched / L, us, bytes * part / us / 1e3);
  };
  // ref once and test twice into NaN-poisoned outputs of T rows: rel diff of test vs ref, NaN
  // count in test, whether test's two runs differ.
  struct Compared { double rel; int nan, nondet; };
  auto compare_outputs = [&](int T, auto&& ref, auto&& test) {
    bf *o1, *o2, *o3; CK(cudaMalloc(&o1, T * H * 2)); CK(cudaMalloc(&o2, T * H * 2)); CK(cudaMalloc(&o3, T * H * 2));
    CK(cudaMemset(o1, 0xff, T * H * 2)); CK(cudaMemset(o2, 0xff, T * H * 2)); CK(cudaMemset(o3, 0xff, T * H * 2));
    ref(o1); test(o2); test(o3);
    CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
    std::vector<bf> a(T * H), b(T * H), b2(T * H);
    CK(cudaMemcpy(a.data(), o1, T * H * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(b.data(), o2, T * H * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b2.data(), o3, T * H * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0; Compared c{0, 0, memcmp(b.data(), b2.data(), T * H * 2) != 0};
    for (int i = 0; i < T * H; ++i) { double u = __bfloat162float(a[i]), v = __bfloat162float(b[i]); if (v != v) ++c.nan; num += (u - v) * (u - v); den += u * u; }
    c.rel = sqrt(num / (den + 1e-30));
    CK(cudaFree(o1)); CK(cudaFree(o2)); CK(cudaFree(o3));
    return c;
  };
  // ---- "wide": the wide path (experts_wide.cuh) against skinny (and stream where it runs), T = 17..512 ----
  if (argc > 1 && strcmp(argv[1], "wide") == 0) {
    for (auto* f : {(const void*)skinny_gate_up_kernel<bf>, (const void*)skinny_down_kernel<bf>, (const void*)wide_kernel<bf, 32>, (const void*)wide_kernel<bf, 64>,
                    (const void*)stream_gate_up_kernel<bf, 2>, (const void*)stream_down_kernel<bf, 2>})
      CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    const int WT = 512, WK = 8;
    {  // bulk-copy granularity: ~554 MB (48 matrices of 2048 x 5632 B), R rows x C bytes per stage, stages to fill ~200 KB
      CK(cudaFuncSetAttribute(copy_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
      const size_t nb = (size_t)48 * 2048 * 5632; char* a; CK(cudaMalloc(&a, 2 * nb));
      for (int R : {16, 32, 128}) for (int C : {256, 512, 1024}) {
        const int stage = R * (C + 64), stg = std::min(16, (optin - 256) / stage);
        if (stg < 2) continue;
        float us = time_graph([&](int i) { copy_probe_kernel<<<sms, kStreamThreads, 256 + stg * stage, st>>>(a + (i % 2) * nb, 48, 2048, 5632, R, C, stg, sink); }, 6);
        printf("copy probe R=%3d C=%4d stages=%2d (%3d KB in flight): %.1f us = %.0f GB/s\n", R, C, stg, stg * R * C / 1024, us, nb / us / 1e3);
      }
      // stages of 16 rows x 1 KB (the stream path's), 12 stages: 16 bulk copies vs 2 tensor-map boxes,
      // rows contiguous (1 KB rows) and 4 KB apart (gate_up rows at H = 2048)
      CK(cudaFuncSetAttribute(box_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
      for (int row_bytes : {1024, 4096}) {
        const int rows = (int)(nb / row_bytes), stg = 12;
        CUtensorMap map[2];
        for (int h = 0; h < 2; ++h)
          if (!allocmoe::cuda::encode_weight_map(&map[h], a + h * nb, 1, rows, row_bytes / 2, 256, 16)) { printf("tensor map encode failed\n"); return 1; }
        const float us_b = time_graph([&](int i) { copy_probe_kernel<<<sms, kStreamThreads, 256 + stg * 16 * (1024 + 64), st>>>(a + (i % 2) * nb, 1, rows, row_bytes, 16, 1024, stg, sink); }, 6);
        const float us_t = time_graph([&](int i) { box_probe_kernel<<<sms, kStreamThreads, 512 + stg * 16 * 1024, st>>>(map[i % 2], rows, row_bytes / 2, 16, 256, 2, stg, sink); }, 6);
        printf("16 rows x 1 KB stages, rows of %d B: 16 bulk copies %.1f us = %.0f GB/s, 2 tensor boxes %.1f us = %.0f GB/s\n",
               row_bytes, us_b, nb / us_b / 1e3, us_t, nb / us_t / 1e3);
      }
      // the wide path's walk: rows of 4 KB (gate_up at H = 2048), box shapes x ring depths
      const int shapes[][2] = {{128, 128}, {64, 256}, {128, 64}, {32, 256}, {256, 64}};
      for (auto& sh : shapes) {
        const int br = sh[0], bk = sh[1], rows = (int)(nb / 4096), stage = br * bk * 2;
        CUtensorMap map[2];
        for (int h = 0; h < 2; ++h)
          if (!allocmoe::cuda::encode_weight_map(&map[h], a + h * nb, 1, rows, 2048, bk, br)) { printf("tensor map encode failed\n"); return 1; }
        printf("boxes of %3d rows x %3d k (%2d KB), GB/s by stages:", br, bk, stage / 1024);
        for (int stg = 3; stg <= std::min(kStreamMaxStages, (optin - 512) / stage); ++stg) {
          const float us = time_graph([&](int i) { box_probe_kernel<<<sms, kStreamThreads, 512 + stg * stage, st>>>(map[i % 2], rows, 2048, br, bk, 1, stg, sink); }, 6);
          printf(" %d:%.0f", stg, nb / us / 1e3);
        }
        printf("\n");
      }
      CK(cudaFree(a));
    }
    for (int pairs : {32, 64}) printf("wide, %d-pair tiles: %d stages of %d B\n", pairs, wide_fit_stages(optin, pairs), wide_stage_bytes(pairs));
    bf *wx, *wo; float *ww, *wy; int *wids, *sorted, *offset, *texp, *trow, *ntiles, *tdone, *nexti, *slot_row; void* wact;
    const int max_tiles = prefill_max_tiles(WT * WK, E, 32);
    CK(cudaMalloc(&wx, WT * H * 2)); fill<<<64, 256>>>(wx, WT * H, 99);
    CK(cudaMalloc(&wo, WT * H * 2)); CK(cudaMalloc(&ww, WT * WK * 4)); CK(cudaMalloc(&wy, (size_t)WT * WK * H * 4));
    CK(cudaMalloc(&wids, L * WT * WK * 4)); CK(cudaMalloc(&sorted, WT * WK * 4)); CK(cudaMalloc(&offset, (E + 1) * 4));
    CK(cudaMalloc(&texp, max_tiles * 4)); CK(cudaMalloc(&trow, max_tiles * 4)); CK(cudaMalloc(&ntiles, 4)); CK(cudaMalloc(&tdone, max_tiles * 4)); CK(cudaMalloc(&nexti, 4)); CK(cudaMalloc(&slot_row, WT * WK * 4));
    CK(cudaMalloc(&wact, (size_t)WT * WK * I * 2));
    std::vector<float> hw3(WT * WK); for (auto& v : hw3) v = std::uniform_real_distribution<float>(0.1f, 1.f)(rng);
    CK(cudaMemcpy(ww, hw3.data(), hw3.size() * 4, cudaMemcpyHostToDevice));
    cudaLaunchAttribute attr[2]; attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; attr[0].val.programmaticStreamSerializationAllowed = 1;
    attr[1].id = cudaLaunchAttributeCooperative; attr[1].val.cooperative = 1;
    auto pdl = [&](dim3 grid, int threads, int smem, bool coop = false) {
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = grid; cfg.blockDim = dim3(threads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = coop ? 2 : 1;
      cfg.dynamicSmemBytes = smem; return cfg;
    };
    std::vector<CUtensorMap> gu_map(L), dn_map(L);
    for (int l = 0; l < L; ++l)
      if (!encode_wide_maps(&gu_map[l], &dn_map[l], gu[l], dn[l], E, H, I)) { printf("tensor map encode failed\n"); return 1; }
    // the library's launches (experts.cu launch_wide); pairs 0: the library's choice (wide_pairs)
    auto wide = [&](int T, int K, int l, const int* id, bf* o, int pairs = 0) {
      if (pairs == 0) pairs = wide_pairs(T * K, E);
      PrefillParams p{wx, gu[l], dn[l], ww, id, sorted, offset, texp, trow, ntiles, tdone, nexti, slot_row, wact, wy, o, T, K, E, H, I};
      const int stages = wide_fit_stages(optin, pairs);
      cudaLaunchConfig_t cfg = pdl(dim3(1), kAlignThreads, 3 * E * 4);
      CK(cudaLaunchKernelEx(&cfg, prefill_align_kernel, p, pairs));
      cfg = pdl(dim3(sms), kStreamThreads, wide_smem_bytes(stages, pairs), true);
      if (pairs == 32) CK(cudaLaunchKernelEx(&cfg, wide_kernel<bf, 32>, p, gu_map[l], dn_map[l], stages));
      else CK(cudaLaunchKernelEx(&cfg, wide_kernel<bf, 64>, p, gu_map[l], dn_map[l], stages));
      cfg = pdl(dim3(T), 256, 0);
      CK(cudaLaunchKernelEx(&cfg, combine_slots_kernel<bf>, CombineParams{wy, id, o, T, K, E, H, slot_row, ww}));
    };
    auto skinny = [&](int T, int K, int l, const int* id, bf* o) {
      SkinnyParams p{wx, gu[l], dn[l], ww, id, wact, wy, T, K, E, H, I};
      const int smem = SkinnySmem(T * K).total_bytes;
      skinny_gate_up_kernel<bf><<<dim3(I / kSkinnyGateUpCols, E), kSkinnyThreads, smem, st>>>(p);
      cudaLaunchConfig_t cfg = pdl(dim3(H / kSkinnyDownRows, E), kSkinnyThreads, smem);
      CK(cudaLaunchKernelEx(&cfg, skinny_down_kernel<bf>, p));
      cfg = pdl(dim3(T), 256, 0);
      CK(cudaLaunchKernelEx(&cfg, combine_slots_kernel<bf>, CombineParams{wy, id, o, T, K, E, H}));
    };
    auto stream2 = [&](int T, int K, int l, const int* id, bf* o) {  // the stream path's two launches + combine (T > 16)
      StreamParams p{wx, gu[l], dn[l], ww, id, wact, o, T, K, E, H, I, 0, wy};
      const StreamSmem lg(stream_x_rows(T), H), ld = stream_down_smem(T, K, I);
      p.stages = lg.fit_stages(optin);
      cudaLaunchConfig_t cfg = pdl(dim3(sms), kStreamThreads, lg.total(p.stages));
      CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 2>, p));
      p.stages = ld.fit_stages(optin); cfg.dynamicSmemBytes = ld.total(p.stages);
      CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 2>, p));
      cfg = pdl(dim3(T), 256, 0);
      CK(cudaLaunchKernelEx(&cfg, combine_slots_kernel<bf>, CombineParams{wy, id, o, T, K, E, H}));
    };
    // ids: sets of T rows of K distinct experts; skew: expert k for slot k (every token on the same K experts)
    auto make_ids = [&](int T, int K, bool skew, int sets) {
      std::vector<int> h((size_t)sets * T * K);
      for (int l = 0; l < sets; ++l) for (int t = 0; t < T; ++t) {
        std::vector<int> perm(E); for (int e = 0; e < E; ++e) perm[e] = e; std::shuffle(perm.begin(), perm.end(), rng);
        for (int k = 0; k < K; ++k) h[((size_t)l * T + t) * K + k] = skew ? k : (t % 11 == 3 && k >= K / 2) ? -1 : perm[k];
      }
      CK(cudaMemcpy(wids, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    };
    int cases[][3] = {{17, 6, 0}, {32, 6, 0}, {64, 6, 0}, {64, 8, 0}, {100, 4, 1}, {128, 6, 0}, {256, 6, 0}, {256, 8, 1}, {512, 6, 0}, {512, 8, 0}};
    for (auto& cs : cases) {
      const int T = cs[0], K = cs[1]; const bool skew = cs[2];
      make_ids(T, K, skew, 1);
      for (int pairs : {32, 64}) {
        const Compared c = compare_outputs(T, [&](bf* o) { skinny(T, K, 0, wids, o); }, [&](bf* o) { wide(T, K, 0, wids, o, pairs); });
        printf("wide check T=%d K=%d skew=%d pairs=%d: rel diff wide vs skinny %.3g, NaN %d, run-to-run differs %d\n", T, K, (int)skew, pairs, c.rel, c.nan, c.nondet);
      }
    }
    char* fl; CK(cudaMalloc(&fl, 200 << 20)); CK(cudaMemset(fl, 1, 200 << 20));
    auto flushed = [&](auto&& call) {
      std::vector<float> ts;
      for (int r = 0; r < 30; ++r) {
        normal_read_kernel<<<sms * 4, 512, 0, st>>>((const uint4*)fl, (200 << 20) / 16, sink);
        CK(cudaEventRecord(e0, st)); call(r); CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r >= 5) ts.push_back(ms * 1000.f);
      }
      std::sort(ts.begin(), ts.end()); return ts[ts.size() / 2];
    };
    printf("times, us (graph40: 40 calls on rotated weights in a graph, per call; flushed: one call after an L2 flush, events)\n");
    for (int T : {32, 64, 128, 256, 512}) {
      const int K = 6;
      make_ids(T, K, false, L);
      auto idl = [&](int i) { return wids + (size_t)(i % L) * T * K; };
      const float g_w32 = time_graph([&](int i) { wide(T, K, i % L, idl(i), wo, 32); }, 40);
      const float g_w64 = time_graph([&](int i) { wide(T, K, i % L, idl(i), wo, 64); }, 40);
      const float g_k = time_graph([&](int i) { skinny(T, K, i % L, idl(i), wo); }, 40);
      const float g_s = T <= 64 ? time_graph([&](int i) { stream2(T, K, i % L, idl(i), wo); }, 40) : 0.f;
      const float f_w = flushed([&](int r) { wide(T, K, r % L, idl(r), wo); });
      const float f_k = flushed([&](int r) { skinny(T, K, r % L, idl(r), wo); });
      const float f_s = T <= 64 ? flushed([&](int r) { stream2(T, K, r % L, idl(r), wo); }) : 0.f;
      printf("T=%3d K=%d  graph40: wide32 %.1f wide64 %.1f skinny %.1f stream %.1f | flushed: wide (%d pairs) %.1f skinny %.1f stream %.1f\n",
             T, K, g_w32, g_w64, g_k, g_s, wide_pairs(T * K, E), f_w, f_k, f_s);
      if (T == 64 || T == 256) {  // per-CTA trace of one wide call after a flush, us from a stamp before it
        unsigned long long* stamps; CK(cudaMalloc(&stamps, 16));
        CK(cudaMemsetAsync(tr, 0, 8 * 1024 * 8, st));
        normal_read_kernel<<<sms * 4, 512, 0, st>>>((const uint4*)fl, (200 << 20) / 16, sink);
        stamp_kernel<<<1, 1, 0, st>>>(stamps, 0);
        wide(T, K, 0, idl(0), wo);
        stamp_kernel<<<1, 1, 0, st>>>(stamps, 1);
        CK(cudaStreamSynchronize(st));
        std::vector<unsigned long long> ht(8 * 1024); CK(cudaMemcpy(ht.data(), tr, ht.size() * 8, cudaMemcpyDeviceToHost));
        unsigned long long hs[2]; CK(cudaMemcpy(hs, stamps, 16, cudaMemcpyDeviceToHost));
        const char* names[8] = {"entry", "tiles", "1st stage", "gate_up over", "", "", "1st dn stage", "end"};
        printf("  trace wide T=%d (stamp after at %.2f us): min / median / max / CTAs\n", T, (hs[1] - hs[0]) / 1000.0);
        print_trace(ht, hs[0], sms, names, {0, 1, 2, 3, 6, 7});
        {  // consumer warp 0 of each CTA: cycles waiting for stages, cycles between a stage's arrival and its release
          std::vector<unsigned long long> w(ht.begin() + 4 * 1024, ht.begin() + 4 * 1024 + sms), b(ht.begin() + 5 * 1024, ht.begin() + 5 * 1024 + sms);
          std::sort(w.begin(), w.end()); std::sort(b.begin(), b.end());
          printf("    consumer warp 0, Mcycles: waiting for stages %.3f / %.3f / %.3f, on stages %.3f / %.3f / %.3f (min / median / max)\n",
                 w.front() / 1e6, w[sms / 2] / 1e6, w.back() / 1e6, b.front() / 1e6, b[sms / 2] / 1e6, b.back() / 1e6);
        }
        CK(cudaFree(stamps));
      }
    }
    CK(cudaDeviceSynchronize());
    printf("done\n");
    return 0;
  }
  // ---- mid T (17..64): the stream kernels with x staged per (expert, pass), against skinny ----
  if (argc > 1 && strcmp(argv[1], "mid") == 0) {
    for (auto* f : {(const void*)skinny_gate_up_kernel<bf>, (const void*)skinny_down_kernel<bf>})
      CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    // HARNESS_STREAM=two: the two launches (gate_up, down); otherwise the library's one launch.
    static const bool two_launches = getenv("HARNESS_STREAM") && strcmp(getenv("HARNESS_STREAM"), "two") == 0;
    printf("stream path: %s\n", two_launches ? "two launches" : "one launch");
    CK(cudaFuncSetAttribute(stream_experts_kernel<bf, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    CK(cudaFuncSetAttribute(stream_experts_kernel<bf, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    auto stream_pair = [&](int T, int K, int l, const int* id, bf* o) {
      StreamParams p{x, gu[l], dn[l], w, id, act, o, T, K, E, H, I, 0, y};
      cudaLaunchAttribute attr[2]; attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; attr[0].val.programmaticStreamSerializationAllowed = 1;
      attr[1].id = cudaLaunchAttributeCooperative; attr[1].val.cooperative = 1;
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = 1;
      if (!two_launches) {
        const StreamSmem lay = stream_one_launch_smem(T, K, H, I);
        p.stages = lay.fit_stages(optin); cfg.dynamicSmemBytes = lay.total(p.stages); cfg.numAttrs = 2;
        if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_experts_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_experts_kernel<bf, 2>, p));
        cfg.numAttrs = 1;
      } else {
      const StreamSmem lg(stream_x_rows(T), H), ld = stream_down_smem(T, K, I);
      p.stages = lg.fit_stages(optin); cfg.dynamicSmemBytes = lg.total(p.stages);
      if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 2>, p));
      p.stages = ld.fit_stages(optin); cfg.dynamicSmemBytes = ld.total(p.stages);
      if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 2>, p));
      }
      if (!stream_x_resident(T)) {
        cfg.gridDim = dim3(T); cfg.blockDim = dim3(256); cfg.dynamicSmemBytes = 0;
        CK(cudaLaunchKernelEx(&cfg, combine_slots_kernel<bf>, CombineParams{y, id, o, T, K, E, H}));
      }
    };
    auto skinny = [&](int T, int K, int l, const int* id, bf* o) {
      SkinnyParams p{x, gu[l], dn[l], w, id, act, y, T, K, E, H, I};
      const int smem = SkinnySmem(T * K).total_bytes;
      skinny_gate_up_kernel<bf><<<dim3(I / kSkinnyGateUpCols, E), kSkinnyThreads, smem, st>>>(p);
      cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(H / kSkinnyDownRows, E); cfg.blockDim = dim3(kSkinnyThreads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = 1;
      cfg.dynamicSmemBytes = smem;
      CK(cudaLaunchKernelEx(&cfg, skinny_down_kernel<bf>, p));
      cfg.gridDim = dim3(T); cfg.blockDim = dim3(256); cfg.dynamicSmemBytes = 0;
      CK(cudaLaunchKernelEx(&cfg, combine_slots_kernel<bf>, CombineParams{y, id, o, T, K, E, H}));
    };
    auto make_ids = [&](int T, int K, bool skew, int* dst, int sets) {
      std::vector<int> h((size_t)sets * T * K);
      for (int l = 0; l < sets; ++l) for (int t = 0; t < T; ++t) {
        std::vector<int> perm(E); for (int e = 0; e < E; ++e) perm[e] = e; std::shuffle(perm.begin(), perm.end(), rng);
        for (int k = 0; k < K; ++k) h[((size_t)l * T + t) * K + k] = skew ? k : (t % 11 == 3 && k >= K / 2) ? -1 : perm[k];
      }
      CK(cudaMemcpy(dst, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    };
    std::vector<float> hw2(TMAX * KMAX); for (auto& v : hw2) v = std::uniform_real_distribution<float>(0.1f, 1.f)(rng);
    CK(cudaMemcpy(w, hw2.data(), hw2.size() * 4, cudaMemcpyHostToDevice));
    const bool flushed_mode = argc > 2 && strcmp(argv[2], "flushed") == 0;
    if (!flushed_mode) {
    int cases[][3] = {{1, 6, 0}, {16, 6, 0}, {17, 6, 0}, {32, 6, 0}, {48, 6, 0}, {64, 6, 0}, {64, 8, 0}, {40, 4, 1}, {64, 8, 1}};
    for (auto& cs : cases) {
      const int T = cs[0], K = cs[1]; const bool skew = cs[2];
      make_ids(T, K, skew, ids, 1);
      const Compared c = compare_outputs(T, [&](bf* o) { skinny(T, K, 0, ids, o); }, [&](bf* o) { stream_pair(T, K, 0, ids, o); });
      printf("mid check T=%d K=%d skew=%d: rel diff stream vs skinny %.3g, NaN %d, run-to-run differs %d\n", T, K, (int)skew, c.rel, c.nan, c.nondet);
    }
    for (int T : {16, 24, 32, 48, 64}) for (int K : {6}) {
      make_ids(T, K, false, ids, L);
      float us_s = time_graph([&](int i) { stream_pair(T, K, i % L, ids + (i % L) * T * K, out); }, 40);
      float us_k = time_graph([&](int i) { skinny(T, K, i % L, ids + (i % L) * T * K, out); }, 40);
      printf("mid time T=%2d K=%d: stream %.1f us, skinny %.1f us\n", T, K, us_s, us_k);
    }
    }
    // bench-like: an L2 flush before each single call, events around it (what bench_layer.py does),
    // and %globaltimer stamps before / after with the per-CTA trace of the last call.
    if (flushed_mode) {
      char* fl; CK(cudaMalloc(&fl, 200 << 20)); CK(cudaMemset(fl, 1, 200 << 20));
      unsigned long long* stamps; CK(cudaMalloc(&stamps, 64));
      const char* names[8] = {"gu entry", "gu lists", "gu x staged", "gu end", "dn entry", "dn lists", "dn waited", "dn end"};
      auto flushed = [&](const char* what, int T, auto&& call, bool trace) {
        std::vector<float> ts; std::vector<double> span;
        for (int r = 0; r < 50; ++r) {
          CK(cudaMemsetAsync(tr, 0, 8 * 1024 * 8, st));
          normal_read_kernel<<<sms * 4, 512, 0, st>>>((const uint4*)fl, (200 << 20) / 16, sink);
          stamp_kernel<<<1, 1, 0, st>>>(stamps, 0);
          CK(cudaEventRecord(e0, st)); call(r); CK(cudaEventRecord(e1, st));
          stamp_kernel<<<1, 1, 0, st>>>(stamps, 1);
          CK(cudaEventSynchronize(e1)); CK(cudaStreamSynchronize(st));
          float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
          unsigned long long hs[2]; CK(cudaMemcpy(hs, stamps, 16, cudaMemcpyDeviceToHost));
          if (r >= 10) ts.push_back(ms * 1000.f), span.push_back((hs[1] - hs[0]) / 1000.0);
          if (r == 49 && trace) {
            std::vector<unsigned long long> ht(8 * 1024); CK(cudaMemcpy(ht.data(), tr, ht.size() * 8, cudaMemcpyDeviceToHost));
            printf("  trace %s T=%d (us from the stamp before; stamp after at %.2f): min / median / max\n", what, T, (hs[1] - hs[0]) / 1000.0);
            print_trace(ht, hs[0], sms, names, {0, 1, 2, 3, 4, 5, 6, 7});
          }
        }
        std::sort(ts.begin(), ts.end()); std::sort(span.begin(), span.end());
        printf("flushed %-7s T=%2d: events %.1f us, stamp to stamp %.1f us\n", what, T, ts[ts.size() / 2], span[span.size() / 2]);
      };
      for (int T : {1, 4, 16, 32, 64}) {
        const int K = 6;
        make_ids(T, K, false, ids, L);
        flushed("stream", T, [&](int r) { stream_pair(T, K, r % L, ids + (r % L) * T * K, out); }, true);
        if (T >= 16) flushed("skinny", T, [&](int r) { skinny(T, K, r % L, ids + (r % L) * T * K, out); }, false);
        float us_s = time_graph([&](int i) { stream_pair(T, K, i % L, ids + (i % L) * T * K, out); }, 40);
        printf("graph40 stream T=%2d: %.1f us\n", T, us_s);
      }
      CK(cudaDeviceSynchronize());
      printf("done\n");
      return 0;
    }
    // trace of the stream pair at T=64 K=6
    make_ids(64, 6, false, ids, L);
    for (int it = 0; it < 10; ++it) { CK(cudaMemsetAsync(tr, 0, 8 * 1024 * 8, st)); stream_pair(64, 6, it % L, ids + (it % L) * 384, out); }
    CK(cudaStreamSynchronize(st));
    std::vector<unsigned long long> ht(8 * 1024); CK(cudaMemcpy(ht.data(), tr, ht.size() * 8, cudaMemcpyDeviceToHost));
    unsigned long long t0 = ~0ull; for (int b = 0; b < sms; ++b) if (ht[b]) t0 = std::min(t0, ht[b]);
    printf("mid trace T=64 K=6 (us from first gate_up entry): event min / median / max / n\n");
    const char* names[8] = {"gu entry", "gu lists", "gu x staged", "gu end", "dn entry", "dn lists", "dn waited", "dn end"};
    print_trace(ht, t0, sms, names, {0, 1, 2, 3, 4, 5, 6, 7});
    CK(cudaDeviceSynchronize());
    printf("done\n");
    return 0;
  }
  // correctness: stream vs decode kernels on layer 0
  auto check = [&](int T, int K) {
    std::vector<int> h(T * K);
    for (int t = 0; t < T; ++t) { std::vector<int> perm(E); for (int e = 0; e < E; ++e) perm[e] = e; std::shuffle(perm.begin(), perm.end(), rng); for (int k = 0; k < K; ++k) h[t * K + k] = perm[k]; }
    CK(cudaMemcpy(ids, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    bf *o1, *o2; CK(cudaMalloc(&o1, T * H * 2)); CK(cudaMalloc(&o2, T * H * 2));
    CK(cudaMemset(o1, 0xff, T * H * 2)); CK(cudaMemset(o2, 0xff, T * H * 2));
    DecodeParams dp{x, gu[0], dn[0], w, ids, act, y, o1, cnt, T, K, E, H, I};
    const int TK = T * K, used_max = std::min(E, TK);
    const DecodeSmem gs(E, TK, 2, kGateUpRedStride), ds(E, TK, 2, kDownRedStride);
    CK(cudaFuncSetAttribute(decode_gate_up_kernel<bf, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    CK(cudaFuncSetAttribute(decode_down_kernel<bf, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    decode_gate_up_kernel<bf, 2><<<dim3(I / 16, used_max), kDecodeThreads, gs.total_bytes, st>>>(dp);
    decode_down_kernel<bf, 2><<<dim3(H / 16, used_max), kDecodeThreads, ds.total_bytes, st>>>(dp);
    CK(cudaStreamSynchronize(st));
    StreamParams p{x, gu[0], dn[0], w, ids, act, o2, T, K, E, H, I, 0};
    const StreamSmem lg(T, H), ld = stream_down_smem(T, K, I);
    p.stages = lg.fit_stages(optin);
    if (T <= 8) stream_gate_up_kernel<bf, 1><<<sms, kStreamThreads, lg.total(p.stages), st>>>(p); else stream_gate_up_kernel<bf, 2><<<sms, kStreamThreads, lg.total(p.stages), st>>>(p);
    p.stages = ld.fit_stages(optin);
    if (T <= 8) stream_down_kernel<bf, 1><<<sms, kStreamThreads, ld.total(p.stages), st>>>(p); else stream_down_kernel<bf, 2><<<sms, kStreamThreads, ld.total(p.stages), st>>>(p);
    CK(cudaStreamSynchronize(st));
    std::vector<bf> a(T * H), b(T * H);
    CK(cudaMemcpy(a.data(), o1, T * H * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(b.data(), o2, T * H * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0; int nan = 0;
    for (int i = 0; i < T * H; ++i) { double u = __bfloat162float(a[i]), v = __bfloat162float(b[i]); if (v != v) ++nan; num += (u - v) * (u - v); den += u * u; }
    printf("check T=%d K=%d: rel diff stream vs decode %.3g, NaN %d\n", T, K, sqrt(num / (den + 1e-30)), nan);
    CK(cudaFree(o1)); CK(cudaFree(o2));
  };
  check(1, 6); check(4, 6); check(16, 6); check(16, 8);
  // trace: T=1 K=6 and K=3 pair launched with PDL, last of 10 iterations
  for (int K : {6, 3}) for (int T : {1, 4}) {
    std::vector<int> h(L * T * K);
    for (int l = 0; l < L; ++l) for (int t = 0; t < T; ++t) { std::vector<int> perm(E); for (int e = 0; e < E; ++e) perm[e] = e; std::shuffle(perm.begin(), perm.end(), rng); for (int k = 0; k < K; ++k) h[(l * T + t) * K + k] = perm[k]; }
    CK(cudaMemcpy(ids, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    for (int it = 0; it < 10; ++it) {
      CK(cudaMemsetAsync(tr, 0, 8 * 1024 * 8, st));
      const int l = it % L;
      StreamParams p{x, gu[l], dn[l], w, ids + l * T * K, act, out, T, K, E, H, I, 0};
      cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = 1;
      const StreamSmem lg(T, H), ld = stream_down_smem(T, K, I);
      p.stages = lg.fit_stages(optin); cfg.dynamicSmemBytes = lg.total(p.stages);
      CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 1>, p));
      p.stages = ld.fit_stages(optin); cfg.dynamicSmemBytes = ld.total(p.stages);
      CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 1>, p));
    }
    CK(cudaStreamSynchronize(st));
    std::vector<unsigned long long> ht(8 * 1024); CK(cudaMemcpy(ht.data(), tr, ht.size() * 8, cudaMemcpyDeviceToHost));
    unsigned long long t0 = ~0ull; for (int b = 0; b < sms; ++b) if (ht[b]) t0 = std::min(t0, ht[b]);
    printf("trace T=%d K=%d (us from first gate_up entry): event min / median / max / n\n", T, K);
    const char* names[8] = {"gu entry", "gu lists", "gu x staged", "gu end", "dn entry", "dn lists", "dn waited", "dn end"};
    print_trace(ht, t0, sms, names, {0, 1, 2, 3, 4, 5, 6, 7});
  }
  for (int cap : {4, 8, 16}) run_case(1, 6, 3, cap);
  run_case(1, 6, 1, 16); run_case(1, 6, 2, 16);
  run_case(1, 3, 3, 16); run_case(1, 3, 1, 16); run_case(1, 3, 2, 16);
  run_case(4, 6, 3, 16); run_case(16, 6, 3, 16);
  // ---- fused moe kernel (route + gate_up + barrier + down, one cooperative launch) ----
  {
    float* logits; CK(cudaMalloc(&logits, L * TMAX * E * 4));
    std::vector<float> hl(L * TMAX * E); std::normal_distribution<float> nd(0.f, 2.f);
    for (auto& v : hl) v = nd(rng);
    CK(cudaMemcpy(logits, hl.data(), hl.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaFuncSetAttribute(stream_moe_kernel<bf, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    CK(cudaFuncSetAttribute(stream_moe_kernel<bf, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    int* rids; float* rw; CK(cudaMalloc(&rids, L * TMAX * KMAX * 4)); CK(cudaMalloc(&rw, L * TMAX * KMAX * 4));
    int fused_cap = 16;
    bool fused_coop = true;
    auto fused = [&](int T, int K, int n_total, int l, bf* o) {
      StreamMoeParams m{StreamParams{x, gu[l], dn[l], nullptr, nullptr, act, o, T, K, E, H, I, 0}, logits + l * TMAX * E,
                        softmax_args(T, E, K, n_total)};
      const StreamSmem lay = stream_one_launch_smem(T, K, H, I);
      m.e.stages = std::min(fused_cap, lay.fit_stages(optin));
      cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeCooperative; attr[0].val.cooperative = 1;
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = fused_coop ? 1 : 0;
      cfg.dynamicSmemBytes = lay.total(m.e.stages);
      if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_moe_kernel<bf, 1>, m)); else CK(cudaLaunchKernelEx(&cfg, stream_moe_kernel<bf, 2>, m));
    };
    auto unfused = [&](int T, int K, int n_total, int l, bf* o) {
      const allocmoe::cuda::RouteArgs a = softmax_args(T, E, K, n_total);
      const int words = allocmoe::cuda::route_block_scratch_words(T, E, K, 1, kStreamThreads / 32);
      route_only_kernel<<<1, kStreamThreads, words * 4, st>>>(logits + l * TMAX * E, a, rids + l * TMAX * KMAX, rw + l * TMAX * KMAX);
      StreamParams p{x, gu[l], dn[l], rw + l * TMAX * KMAX, rids + l * TMAX * KMAX, act, o, T, K, E, H, I, 0};
      cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st; cfg.attrs = attr; cfg.numAttrs = 1;
      const StreamSmem lg(T, H), ld = stream_down_smem(T, K, I);
      p.stages = lg.fit_stages(optin); cfg.dynamicSmemBytes = lg.total(p.stages);
      if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<bf, 2>, p));
      p.stages = ld.fit_stages(optin); cfg.dynamicSmemBytes = ld.total(p.stages);
      if (T <= 8) CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 1>, p)); else CK(cudaLaunchKernelEx(&cfg, stream_down_kernel<bf, 2>, p));
    };
    CK(cudaFuncSetAttribute(route_only_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    int cases[][3] = {{1, 6, 6}, {1, 6, 3}, {1, 6, 2}, {4, 6, 24}, {4, 6, 12}, {16, 6, 96}, {16, 6, 48}, {16, 8, 128}, {7, 6, 20}};
    for (auto& c : cases) {
      const int T = c[0], K = c[1], nt = c[2];
      bf *o1, *o2; CK(cudaMalloc(&o1, T * H * 2)); CK(cudaMalloc(&o2, T * H * 2));
      CK(cudaMemset(o1, 0xff, T * H * 2)); CK(cudaMemset(o2, 0xff, T * H * 2));
      unfused(T, K, nt, 1, o1); CK(cudaStreamSynchronize(st));
      fused(T, K, nt, 1, o2); CK(cudaStreamSynchronize(st));
      std::vector<bf> a(T * H), b(T * H);
      CK(cudaMemcpy(a.data(), o1, T * H * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(b.data(), o2, T * H * 2, cudaMemcpyDeviceToHost));
      int diff = 0, nan = 0; double den = 0;
      for (int i = 0; i < T * H; ++i) { float u = __bfloat162float(a[i]), v = __bfloat162float(b[i]); if (v != v) ++nan; if (memcmp(&a[i], &b[i], 2)) ++diff; den += u * u; }
      printf("fused check T=%d K=%d n_total=%d: %d of %d differ from unfused (bitwise), NaN %d, |ref| %.3g\n", T, K, nt, diff, T * H, nan, sqrt(den));
      CK(cudaFree(o1)); CK(cudaFree(o2));
      float uf = time_graph([&](int i) { fused(T, K, nt, i % L, out); }, 40);
      float uu = time_graph([&](int i) { unfused(T, K, nt, i % L, out); }, 40);
      printf("  T=%2d K=%d n_total=%3d: fused %.1f us, route + gate_up + down %.1f us\n", T, K, nt, uf, uu);
    }
    for (int cap : {3, 4, 6, 8}) {
      fused_cap = cap;
      for (int nt : {6, 3}) printf("  fused stages<=%d T=1 n_total=%d: %.1f us\n", cap, nt, time_graph([&](int i) { fused(1, 6, nt, i % L, out); }, 40));
      printf("  fused stages<=%d T=4 n_total=24: %.1f us\n", cap, time_graph([&](int i) { fused(4, 6, 24, i % L, out); }, 40));
    }
    fused_cap = 16;
    // launch cost in a graph: an empty kernel of the fused kernel's shape (one CTA per SM, 320
    // threads, the T=1 shared memory), plain and cooperative, and the fused kernel launched plain
    {
      const StreamSmem lay1 = stream_one_launch_smem(1, 6, H, I);
      const size_t sm1 = lay1.total(std::min(16, lay1.fit_stages(optin)));
      CK(cudaFuncSetAttribute(empty_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
      for (int coop = 0; coop < 2; ++coop)
        for (size_t by : {(size_t)0, sm1}) {
          cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeCooperative; attr[0].val.cooperative = 1;
          cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st;
          cfg.attrs = attr; cfg.numAttrs = coop; cfg.dynamicSmemBytes = by;
          float u = time_graph([&](int) { CK(cudaLaunchKernelEx(&cfg, empty_smem_kernel, sink, (int)by)); }, 40);
          printf("  launch probe: empty kernel %d CTAs x %d threads, %zu B shared, %s: %.2f us a call in a graph of 40\n",
                 sms, kStreamThreads, by, coop ? "cooperative" : "plain", u);
        }
      fused_coop = false;
      for (int nt : {6, 3}) printf("  fused plain launch T=1 n_total=%d: %.1f us a call in a graph of 40\n", nt, time_graph([&](int i) { fused(1, 6, nt, i % L, out); }, 40));
      fused_coop = true;
    }
    // bench-like timing: an L2 flush (read 200 MB) before each call, events around the call alone
    {
      char* fl; CK(cudaMalloc(&fl, 200 << 20)); CK(cudaMemset(fl, 1, 200 << 20));
      auto evt_time = [&](auto&& call) { return flushed_call_us(st, e0, e1, fl, 200 << 20, sms, sink, call, 60, 10); };

      for (int nt : {6, 3}) {
        fused_coop = true;
        float a = evt_time([&](int r) { fused(1, 6, nt, r % L, out); });
        fused_coop = false;
        float b = evt_time([&](int r) { fused(1, 6, nt, r % L, out); });
        fused_coop = true;
        float c = evt_time([&](int r) { unfused(1, 6, nt, r % L, out); });
        printf("  flushed, events: T=1 n_total=%d fused coop %.1f us, fused plain launch %.1f us, route+gate_up+down %.1f us\n", nt, a, b, c);
      }
      CK(cudaFree(fl));
    }
    // trace of the fused kernel at T=1
    for (int nt : {6, 3}) {
      unsigned long long t0;
      const auto ht = last_trace(tr, st, sms, [&](int it) { fused(1, 6, nt, it % L, out); }, t0);
      printf("fused trace T=1 n_total=%d (us from first entry): event min / median / max / n\n", nt);
      const char* names[8] = {"entry", "lists", "x staged", "gate_up end", "routed", "-", "barrier done", "end"};
      print_trace(ht, t0, sms, names, {0, 4, 1, 2, 3, 6, 7});
    }
  }
  CK(cudaDeviceSynchronize());
  printf("done\n");
}
