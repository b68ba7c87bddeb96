// Standalone harness for the split moe kernel (csrc/cuda/moe_split.cuh), no torch: checks it
// against the stream moe kernel (moe_stream.cuh: same routing, another summation order, so a
// relative difference, not bitwise), then times both on the DeepSeek-V2-Lite shape (8 layers of
// weights rotated so nothing is served from L2): calls in a CUDA graph, single calls after an L2
// flush (events), and a per-CTA %globaltimer trace of the split kernel at T=1. Built with
// -DALLOCMOE_STREAM_WAITS it also prints the cycles each CTA's producer waits on empty stages and
// its consumers on full ones, for both kernels (the counters slow them: read their timings apart).
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I csrc/cuda -o split_kernel_harness bench/split_kernel_harness.cu
#define ALLOCMOE_STREAM_TRACE
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "moe_split.cuh"
#include "moe_stream.cuh"
#include "harness_util.cuh"
using namespace allocmoe;
using namespace allocmoe::cuda_experts;

int main() {
  const int E = 64, H = 2048, I = 1408, L = 8, TMAX = 4;
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  int optin = 0; CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  const int sms = prop.multiProcessorCount;
  printf("%s sms=%d\n", prop.name, sms);
  unsigned long long* tr; CK(cudaGetSymbolAddress(reinterpret_cast<void**>(&tr), g_stream_trace));
  const size_t gu_n = (size_t)E * 2 * I * H, dn_n = (size_t)E * H * I;
  std::vector<bf*> gu(L), dn(L);
  std::vector<CUtensorMap> maps(L);
  for (int l = 0; l < L; ++l) {
    CK(cudaMalloc(&gu[l], gu_n * 2)); CK(cudaMalloc(&dn[l], dn_n * 2));
    fill<<<1024, 256>>>(gu[l], gu_n, 17 * l + 1); fill<<<1024, 256>>>(dn[l], dn_n, 31 * l + 7);
    if (!cuda::encode_weight_map(&maps[l], dn[l], E, H, I, kSplitRows, kSplitBoxRows, false, 64)) { printf("encode failed\n"); return 1; }
  }
  bf *x, *out; void* act; float *logits, *partial; int* sink;
  CK(cudaMalloc(&x, TMAX * H * 2)); fill<<<64, 256>>>(x, TMAX * H, 99);
  CK(cudaMalloc(&out, TMAX * H * 2)); CK(cudaMalloc(&act, TMAX * 8 * I * 2)); CK(cudaMalloc(&sink, 4));
  CK(cudaMalloc(&partial, (size_t)sms * TMAX * H * 4));
  CK(cudaMalloc(&logits, L * TMAX * E * 4));
  std::mt19937 rng(5); std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> hl(L * TMAX * E); for (auto& v : hl) v = nd(rng);
  CK(cudaMemcpy(logits, hl.data(), hl.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaFuncSetAttribute(split_moe_kernel<bf>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  CK(cudaFuncSetAttribute(stream_moe_kernel<bf, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  auto args = [&](int T, int K, int nt) {
    return cuda::RouteArgs{T, E, K, 1, cuda::kSoftmax, 1, 1, 0, 1.0f, nullptr, (long long)nt - T};
  };
  auto coop_cfg = [&](size_t smem) {
    static cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeCooperative; attr[0].val.cooperative = 1;
    cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(sms); cfg.blockDim = dim3(kStreamThreads); cfg.stream = st;
    cfg.attrs = attr; cfg.numAttrs = 1; cfg.dynamicSmemBytes = smem; return cfg;
  };
  auto split = [&](int T, int K, int nt, int l, bf* o) {
    const StreamSmem lay = SplitSmem::stream(T, H);
    SplitParams sp{StreamParams{x, gu[l], dn[l], nullptr, nullptr, nullptr, o, T, K, E, H, I, lay.fit_stages(optin)},
                   logits + l * TMAX * E, args(T, K, nt), partial};
    cudaLaunchConfig_t cfg = coop_cfg(lay.total(sp.e.stages));
    CK(cudaLaunchKernelEx(&cfg, split_moe_kernel<bf>, sp, maps[l]));
  };
  auto stream = [&](int T, int K, int nt, int l, bf* o) {
    StreamMoeParams m{StreamParams{x, gu[l], dn[l], nullptr, nullptr, act, o, T, K, E, H, I, 0}, logits + l * TMAX * E,
                      args(T, K, nt)};
    const StreamSmem lay = stream_one_launch_smem(T, K, H, I);
    m.e.stages = lay.fit_stages(optin);
    cudaLaunchConfig_t cfg = coop_cfg(lay.total(m.e.stages));
    CK(cudaLaunchKernelEx(&cfg, stream_moe_kernel<bf, 1>, m));
  };

  char* fl; CK(cudaMalloc(&fl, 200 << 20)); CK(cudaMemset(fl, 1, 200 << 20));
  auto flushed_us = [&](auto&& call) { return flushed_call_us(st, e0, e1, fl, 200 << 20, sms, sink, call, 40, 8); };

  const int cases[][3] = {{1, 6, 6}, {1, 6, 3}, {4, 6, 24}, {4, 6, 12}, {2, 8, 16}};
  for (auto& c : cases) {
    const int T = c[0], K = c[1], nt = c[2];
    bf *o1, *o2; CK(cudaMalloc(&o1, T * H * 2)); CK(cudaMalloc(&o2, T * H * 2));
    CK(cudaMemset(o1, 0xff, T * H * 2)); CK(cudaMemset(o2, 0xff, T * H * 2));
    stream(T, K, nt, 1, o1); split(T, K, nt, 1, o2); CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
    std::vector<bf> a(T * H), b(T * H);
    CK(cudaMemcpy(a.data(), o1, T * H * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(b.data(), o2, T * H * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0; int nan = 0;
    for (int i = 0; i < T * H; ++i) { const double u = __bfloat162float(a[i]), v = __bfloat162float(b[i]); if (v != v) ++nan; num += (u - v) * (u - v); den += u * u; }
    const float gs = graph_us(st, e0, e1, [&](int i) { split(T, K, nt, i % L, out); }, 16);
    const float gf = graph_us(st, e0, e1, [&](int i) { stream(T, K, nt, i % L, out); }, 16);
    const float fs = flushed_us([&](int r) { split(T, K, nt, r % L, out); });
    const float ff = flushed_us([&](int r) { stream(T, K, nt, r % L, out); });
    printf("T=%d K=%d n_total=%2d: split vs stream rel diff %.2e NaN %d | graph of 16: split %.1f us, stream %.1f | flushed single: split %.1f, stream %.1f\n",
           T, K, nt, sqrt(num / den), nan, gs, gf, fs, ff);
    CK(cudaFree(o1)); CK(cudaFree(o2));
  }
  const char* names[8] = {"entry", "lists", "unit 1 gu done", "unit 1 done", "routed", "units done", "barrier done", "end"};
#ifdef ALLOCMOE_STREAM_WAITS
  unsigned long long* wt; CK(cudaGetSymbolAddress(reinterpret_cast<void**>(&wt), g_stream_wait));
  int khz = 0; CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  // Ring waits of one call (after ten), us at the reported clock: min / median / max over the CTAs.
  const auto waits = [&](const char* what, auto&& run) {
    for (int it = 0; it < 10; ++it) run(it);
    CK(cudaMemsetAsync(wt, 0, 2 * 1024 * 8, st)); run(3); CK(cudaStreamSynchronize(st));
    std::vector<unsigned long long> hw(2 * 1024); CK(cudaMemcpy(hw.data(), wt, hw.size() * 8, cudaMemcpyDeviceToHost));
    for (int who = 0; who < 2; ++who) {
      std::vector<double> v(hw.begin() + who * 1024, hw.begin() + who * 1024 + sms);
      std::sort(v.begin(), v.end());
      printf("    %s: %s waits %.2f / %.2f / %.2f us\n", what, who ? "consumers on full stages" : "producer on empty stages",
             v.front() / khz * 1e3, v[sms / 2] / khz * 1e3, v.back() / khz * 1e3);
    }
  };
#else
  const auto waits = [](const char*, auto&&) {};
#endif
  for (int nt : {6, 3}) {
    unsigned long long t0;
    const auto ht = last_trace(tr, st, sms, [&](int it) { split(1, 6, nt, it % L, out); }, t0);
    printf("split trace T=1 n_total=%d (us from first entry): event min / median / max\n", nt);
    print_trace(ht, t0, sms, names, {0, 4, 1, 2, 3, 5, 6, 7});
    waits("split", [&](int it) { split(1, 6, nt, it % L, out); });
    waits("stream", [&](int it) { stream(1, 6, nt, it % L, out); });
  }
  printf("done\n");
}
