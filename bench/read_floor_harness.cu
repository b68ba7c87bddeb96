// What the T=1 bars of issue 4 leave for routing and compute: kernels that do nothing but read the
// selected experts' bytes once (no routing, no arithmetic, no output), timed the two ways our benches
// time the moe op, against the floor as bench_layer.py computes it (bytes over the copy bandwidth
// measured in the same run). If such a read already misses a bar, no moe kernel can meet it in
// that measure.
//   - flushed single call: a 200 MB read, then events around one call (bench_layer.py's method);
//   - graph: 16 calls in one CUDA graph over 8 layers whose selected experts differ (decode_seq.py's
//     method: the launch of a call overlaps the previous call's tail; nothing is found in L2).
// Three readers, each one CTA per SM feeding a ring of shared memory with the copy engine as the
// fused kernels do: "read" (16 KB bulk copies of the bytes in order, the pure read), "split order"
// (the split moe kernel's units, as moe_split.cuh walks them), and "routed" (finds its experts from
// the router logits first as cheaply as a routed kernel can: load them, n rounds of a warp arg-max,
// no softmax; then reads like "read"): the least a kernel that routes pays before any compute or
// combine. Other ways to read (the ring fed with 1 KB pieces or tensor-map boxes, plain 16-byte
// loads) are compared in stream_kernel_harness.cu ("wide" and its ceilings); on these bytes the ring
// fillings came within 0.2 us of each other and the loads up to 1.2 us slower (docs/KERNELS.md,
// session 17).
// DeepSeek-V2-Lite expert shape (H=2048, I=1408, bf16: 17.3 MB an expert), n = 1..8 experts drawn
// at random out of 64 per layer.
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I csrc/cuda -o read_floor_harness bench/read_floor_harness.cu
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>
#include "experts_stream.cuh"  // bulk_copy, evict_first_policy, smem_addr
#include "tensor_map.h"
#include "harness_util.cuh"
using namespace allocmoe;
using namespace allocmoe::cuda_experts;

constexpr int kMaxExperts = 8;
constexpr int kChunk = 16384;     // bytes of a bulk copy
constexpr int kRingStages = 12;   // 192 KB of shared memory a CTA

// The selected experts of one layer: n gate_up regions of gu16 16-byte words, then n down regions.
struct ReadSet {
  const uint4* gu[kMaxExperts];
  const uint4* dn[kMaxExperts];
  unsigned gu16, dn16, n;
  const float* logits;          // kRouted: [64] router logits of the layer; the n largest name the experts
  const uint4 *gu_all, *dn_all;  // kRouted: the layer's gate_up and down
  int* picked;                  // kRouted: block 0 writes the ids it found (checked once by the host)
  __device__ const uint4* at(unsigned v) const {
    const unsigned ngu = n * gu16;
    return v < ngu ? gu[v / gu16] + v % gu16 : dn[(v - ngu) / dn16] + (v - ngu) % dn16;
  }
};

// One CTA per SM: a ring of kRingStages stages of kChunk bytes, each filled by one warp (the
// oldest stage waited for before it is filled again), in one of these orders:
//   kRead:    16 KB chunks of the bytes in order dealt round robin, one bulk copy a stage;
//   kSplit:   the split moe kernel's order (moe_split.cuh): units of (expert, 32 intermediate rows)
//             dealt round robin; per unit four groups of 8 gate + 8 up rows, each as four stages of
//             16 x 1 KB, then the unit's down columns as 8 boxes of 256 rows x 64 bytes;
//   kRouted:  kRead after finding the experts the least a routed kernel must: the 64 logits read
//             (from memory after a flush), n rounds of a warp arg-max on them.
enum Mode { kRead, kSplit, kRouted };
constexpr int kUnitRows = 32, kH = 2048, kI = 1408;
struct DownMaps { CUtensorMap cols[kMaxExperts]; };  // kSplit: each selected expert's down [H, I], 32 x 256 boxes

template <Mode M>
__global__ void __launch_bounds__(32) read_ring(const ReadSet s_in, const __grid_constant__ DownMaps maps) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) uint64_t full[kRingStages];
  const int lane = threadIdx.x;
  ReadSet s = s_in;
  if constexpr (M == kRouted) {
    const auto key = [](float x) { const uint32_t u = __float_as_uint(x); return u & 0x80000000u ? ~u : u | 0x80000000u; };
    uint32_t ka = key(s.logits[lane]), kb = key(s.logits[lane + 32]);
    for (unsigned j = 0; j < s.n; ++j) {
      const uint32_t m = __reduce_max_sync(~0u, max(ka, kb));
      const int id = static_cast<int>(__reduce_min_sync(~0u, ka == m ? lane : kb == m ? lane + 32 : 64));
      s.gu[j] = s.gu_all + (size_t)id * s.gu16, s.dn[j] = s.dn_all + (size_t)id * s.dn16;
      if (id == lane) ka = 0;
      if (id == lane + 32) kb = 0;
      if (blockIdx.x == 0 && lane == 0) s.picked[j] = id;
    }
  }
  if (lane == 0) {
    for (int i = 0; i < kRingStages; ++i) mbar_init(smem_addr(full + i), 1);
    mbar_init_fence();
  }
  __syncwarp();
  const uint64_t policy = evict_first_policy();
  const unsigned per16 = kChunk / 16, nchunks = s.n * (s.gu16 + s.dn16) / per16;
  int k = 0;
  const auto stage = [&](auto&& fill) {
    const int st = k % kRingStages;
    if (k >= kRingStages) mbar_wait(smem_addr(full + st), ((k / kRingStages) - 1) & 1);
    if (lane == 0) mbar_arrive_expect_tx(smem_addr(full + st), kChunk);
    __syncwarp();
    fill(smem_addr(ring + st * kChunk), smem_addr(full + st));
    ++k;
  };
  if constexpr (M == kSplit) {
    const int per = kI / kUnitRows;
    for (unsigned u = blockIdx.x; u < s.n * per; u += gridDim.x) {
      const int j = u / per, row0 = (u % per) * kUnitRows;
      for (int r = row0; r < row0 + kUnitRows; r += 8)
        for (int q = 0; q < 4; ++q)
          stage([&](uint32_t dst, uint32_t bar) {
            const int row = lane < 8 ? r + lane : kI + r + lane - 8;
            if (lane < 16) bulk_copy(dst + lane * 1024, s.gu[j] + row * 256 + q * 64, 1024, bar, policy);
          });
      for (int h0 = 0; h0 < kH; h0 += 256)
        stage([&](uint32_t dst, uint32_t bar) { if (lane == 0) tma_load_3d(dst, &maps.cols[j], row0, h0, 0, bar, policy); });
    }
  } else {
    for (unsigned c = blockIdx.x; c < nchunks; c += gridDim.x)
      stage([&](uint32_t dst, uint32_t bar) { if (lane == 0) bulk_copy(dst, s.at(c * per16), kChunk, bar, policy); });
  }
  if (lane == 0)
    for (int j = std::max(0, k - kRingStages); j < k; ++j) mbar_wait(smem_addr(full + j % kRingStages), (j / kRingStages) & 1);
}

__global__ void empty_kernel() {}

int main() {
  const int E = 64, H = 2048, I = 1408, L = 8;
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  printf("%s sms=%d\n", prop.name, sms);
  const size_t gu_n = (size_t)E * 2 * I * H, dn_n = (size_t)E * H * I;
  const unsigned gu16 = 2 * I * H * 2 / 16, dn16 = H * I * 2 / 16;
  static_assert(kChunk % 16 == 0, "");
  if ((gu16 * 16) % kChunk || (dn16 * 16) % kChunk) { printf("chunk does not divide a region\n"); return 1; }
  std::vector<bf*> gu(L), dn(L);
  for (int l = 0; l < L; ++l) {
    CK(cudaMalloc(&gu[l], gu_n * 2)); CK(cudaMalloc(&dn[l], dn_n * 2));
    fill<<<1024, 256>>>(gu[l], gu_n, 17 * l + 1); fill<<<1024, 256>>>(dn[l], dn_n, 31 * l + 7);
  }
  std::mt19937 rng(11);
  std::vector<std::vector<int>> pick(L);
  for (auto& p : pick) { p.resize(E); std::iota(p.begin(), p.end(), 0); std::shuffle(p.begin(), p.end(), rng); }
  // Router logits per layer whose n largest name the experts pick[l][0..n-1].
  std::vector<float> hl(L * E);
  std::uniform_real_distribution<float> low(-6.f, -1.f);
  for (int l = 0; l < L; ++l)
    for (int e = 0; e < E; ++e) hl[l * E + e] = low(rng);
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < kMaxExperts; ++j) hl[l * E + pick[l][j]] = 8.f - j;
  float* logits; CK(cudaMalloc(&logits, hl.size() * 4));
  int* picked; CK(cudaMalloc(&picked, kMaxExperts * 4));
  CK(cudaMemcpy(logits, hl.data(), hl.size() * 4, cudaMemcpyHostToDevice));
  const auto set_of = [&](int l, int n) {
    ReadSet s{};
    s.gu16 = gu16, s.dn16 = dn16, s.n = n;
    s.logits = logits + l * E, s.picked = picked;
    s.gu_all = reinterpret_cast<const uint4*>(gu[l]), s.dn_all = reinterpret_cast<const uint4*>(dn[l]);
    for (int j = 0; j < n; ++j) {
      s.gu[j] = reinterpret_cast<const uint4*>(gu[l] + (size_t)pick[l][j] * 2 * I * H);
      s.dn[j] = reinterpret_cast<const uint4*>(dn[l] + (size_t)pick[l][j] * H * I);
    }
    return s;
  };
  std::vector<DownMaps> maps(L);
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < kMaxExperts; ++j)
      if (!cuda::encode_weight_map(&maps[l].cols[j], dn[l] + (size_t)pick[l][j] * H * I, 1, H, I, kUnitRows, 256, false, 64)) {
        printf("encode failed\n");
        return 1;
      }
  int* sink; CK(cudaMalloc(&sink, 4));
  using Reader = void (*)(const ReadSet, const DownMaps);
  const Reader readers[] = {read_ring<kRead>, read_ring<kSplit>, read_ring<kRouted>};  // in the order of Mode
  for (auto fn : readers) CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kRingStages * kChunk));
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));

  // The copy ceiling as bench/timing.py measures it: a 1 GiB device-to-device copy, bytes read + written.
  const size_t cb = 1ull << 30;
  char *ca, *cbuf; CK(cudaMalloc(&ca, cb)); CK(cudaMalloc(&cbuf, cb)); CK(cudaMemset(ca, 1, cb));
  std::vector<float> ct;
  for (int r = 0; r < 12; ++r) {
    CK(cudaEventRecord(e0, st)); CK(cudaMemcpyAsync(cbuf, ca, cb, cudaMemcpyDeviceToDevice, st)); CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r >= 2) ct.push_back(ms);
  }
  std::sort(ct.begin(), ct.end());
  const double copy_bw = 2.0 * cb / (ct[ct.size() / 2] * 1e-3);
  CK(cudaFree(ca)); CK(cudaFree(cbuf));

  char* fl; CK(cudaMalloc(&fl, 200 << 20)); CK(cudaMemset(fl, 1, 200 << 20));
  auto flushed_us = [&](auto&& call) { return flushed_call_us(st, e0, e1, fl, 200 << 20, sms, sink, call, 40, 8); };
  const auto read = [&](int mode, int l, int n) {
    readers[mode]<<<sms, 32, kRingStages * kChunk, st>>>(set_of(l, n), maps[l]);
    CK(cudaGetLastError());
  };
  for (int l = 0; l < L; ++l) {  // the routed reader finds the experts the others are given
    std::vector<int> hp(kMaxExperts);
    read(kRouted, l, kMaxExperts);
    CK(cudaMemcpyAsync(hp.data(), picked, kMaxExperts * 4, cudaMemcpyDeviceToHost, st)); CK(cudaStreamSynchronize(st));
    for (int j = 0; j < kMaxExperts; ++j)
      if (hp[j] != pick[l][j]) { printf("routed reader picked expert %d, not %d\n", hp[j], pick[l][j]); return 1; }
  }
  const float ef = flushed_us([&](int) { empty_kernel<<<sms, 32, 0, st>>>(); });
  const float eg = graph_us(st, e0, e1, [&](int) { empty_kernel<<<sms, 32, 0, st>>>(); }, 16);
  printf("copy bandwidth %.0f GB/s (1 GiB device to device, bytes read + written); empty kernel: flushed single %.2f us, "
         "graph %.2f us a call\n\n", copy_bw / 1e9, ef, eg);
  printf("us a call, flushed single / graph of 16 (x the floor = bytes / copy bandwidth)\n");
  printf("| experts | MB | floor | read | split order | routed |\n|---|---|---|---|---|---|\n");
  float f[3][kMaxExperts + 1] = {}, g[3][kMaxExperts + 1] = {}, floor_us[kMaxExperts + 1] = {};
  for (int n : {1, 2, 3, 4, 6, 8}) {
    const double bytes = (double)n * (gu16 + dn16) * 16;
    floor_us[n] = static_cast<float>(bytes / copy_bw * 1e6);
    printf("| %d | %.1f | %.1f |", n, bytes / 1e6, floor_us[n]);
    for (int m = 0; m < 3; ++m) {
      f[m][n] = flushed_us([&](int r) { read(m, r % L, n); });
      g[m][n] = graph_us(st, e0, e1, [&](int i) { read(m, i % L, n); }, 16);
      printf(" %.1f (%.3fx) / %.1f (%.3fx) |", f[m][n], f[m][n] / floor_us[n], g[m][n], g[m][n] / floor_us[n]);
    }
    printf("\n");
  }
  CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
  printf("\nissue 4's T=1 bars (factor x floor) against the pure read and the routed read of the same bytes:\n");
  const float bars[][2] = {{6, 1.15f}, {3, 1.25f}};
  for (auto& b : bars) {
    const int n = static_cast<int>(b[0]);
    const float bar = b[1] * floor_us[n];
    printf("  %d experts: bar %.1f us (%.2fx); read flushed %.1f us (%+.1f), graph %.1f (%+.1f); routed read flushed "
           "%.1f (%+.1f), graph %.1f (%+.1f)\n", n, bar, b[1], f[kRead][n], f[kRead][n] - bar, g[kRead][n],
           g[kRead][n] - bar, f[kRouted][n], f[kRouted][n] - bar, g[kRouted][n], g[kRouted][n] - bar);
  }
  printf("done\n");
}
