// Standalone harness for the route op's warp path (route_warp_kernel, csrc/cuda/routing.cuh), no
// torch: a kernel change compiles here in ~20 s and is measured on the GPU in seconds instead of
// a ~4 minute extension build. DeepSeek-V2-Lite routing (E = 64, top-6, k_base 1, fp32 logits of
// std 2) at T = 1..64 and budgets 6 / 4.5 / 3 / 2, three ways of timing each call:
//   single  the layer bench's method: a sleep kernel, then events around ONE graph replay of one
//           call (what bench/bench_layer.py reports as "route"; includes the event and graph
//           launch overhead, shown by the empty kernel's line);
//   graph   a graph of 32 calls on rotating inputs, events around it, / 32: the cost per call in
//           a captured decode step;
//   trace   %globaltimer stamps of thread 0 of every block (ROUTE_TRACE in routing.cuh), from the
//           first block's entry to the last block's: scored, pool published, cut, rows written
//           (the five stamps add ~0.1 us to the other two timings; a build with
//           -DROUTE_HARNESS_NO_TRACE leaves them out and prints zeros here).
// and three launch shapes: "cur" as route.cu launches it, "w16" (blocks of up to 16 warps),
// "wide" (8 blocks from T = 8 on). Each case also prints a hash of its outputs, the same for
// every shape and for every build of the kernel that computes the same ids and weights.
// Build on a machine with nvcc (no GPU needed) from the repository root, run on the GPU:
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I csrc/cuda -o route_kernel_harness bench/route_kernel_harness.cu
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#ifndef ROUTE_HARNESS_NO_TRACE  // -DROUTE_HARNESS_NO_TRACE: time the kernel without its stamps
#define ALLOCMOE_ROUTE_TRACE
#endif
#include "routing.cuh"
using namespace allocmoe::cuda;
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

constexpr int kE = 64, kK = 6, kBase = 1, kSets = 8, kGraphCalls = 32;

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__global__ void spin_kernel(unsigned long long ns) {
  const unsigned long long t0 = globaltimer();
  while (globaltimer() - t0 < ns) {}
}
__global__ void empty_kernel() {}
struct Shape { const char* name; int nw, nb; };
Shape launch_shape(const char* name, int T) {
  int nw;
  if (!strcmp(name, "cur")) nw = warp_path_warps_per_block(T, true);  // as route.cu on sm_90
  else if (!strcmp(name, "w16")) nw = std::min(T, 16);
  else nw = T <= 8 ? T : (T + 7) / 8;  // wide: 8 blocks
  return {name, nw, (T + nw - 1) / nw};
}

template <typename Kernel, typename... Args>
void launch(Kernel k, const Shape& s, size_t smem, cudaStream_t st, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(s.nb);
  cfg.blockDim = dim3(s.nw * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = s.nb;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = s.nb > 1 ? 1 : 0;
  CK(cudaLaunchKernelEx(&cfg, k, args...));
}

RouteArgs make_args(int T, double budget) {
  RouteArgs a{};
  a.T = T; a.E = kE; a.K = kK; a.k_base = kBase; a.scoring = kSoftmax; a.n_group = 1; a.topk_group = 1;
  a.renorm = 0; a.scale = 1.0f; a.bias = nullptr;
  const long long total = static_cast<long long>(std::floor(budget * T + 0.5));  // as alloc_total_slots
  a.extra = std::min<long long>(std::max<long long>(total, kBase * T), kK * T) - kBase * T;
  return a;
}

float median(std::vector<float> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

// Events around `launch_fn` after a 50 us sleep kernel, median of `reps`, divided by `calls`.
template <typename F>
float time_us(cudaStream_t st, int reps, int calls, F launch_fn) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  std::vector<float> v;
  for (int r = 0; r < reps + 5; ++r) {
    spin_kernel<<<1, 1, 0, st>>>(50000);
    CK(cudaEventRecord(e0, st));
    launch_fn(r);
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 5) v.push_back(ms * 1000.0f / calls);
  }
  CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
  return median(v);
}

template <typename F>
cudaGraphExec_t capture(cudaStream_t st, F body) {
  cudaGraph_t g;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  body();
  CK(cudaStreamEndCapture(st, &g));
  cudaGraphExec_t ge;
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphDestroy(g));
  return ge;
}

int main() {
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const int Ts[] = {1, 2, 4, 8, 16, 32, 64};
  const double budgets[] = {6.0, 4.5, 3.0, 2.0};
  const char* shapes[] = {"cur", "w16", "wide"};
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> h(kSets * 64 * kE);
  for (auto& x : h) x = nd(rng);
  float *logits, *w; int32_t* ids; unsigned long long* trace;
  CK(cudaMalloc(&logits, h.size() * 4));
  CK(cudaMemcpy(logits, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&w, 64 * kK * 4)); CK(cudaMalloc(&ids, 64 * kK * 4));
#ifdef ALLOCMOE_ROUTE_TRACE
  CK(cudaGetSymbolAddress(reinterpret_cast<void**>(&trace), g_route_trace));
#else
  CK(cudaMalloc(&trace, 5 * 64 * 8));  // stays zero
#endif
  for (int c : {0, 1}) {
    auto k = c ? route_warp_kernel<2, true, float> : route_warp_kernel<2, false, float>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }

  // The floor of each method: an empty kernel.
  {
    cudaGraphExec_t g1 = capture(st, [&] { empty_kernel<<<1, 32, 0, st>>>(); });
    cudaGraphExec_t gn = capture(st, [&] { for (int i = 0; i < kGraphCalls; ++i) empty_kernel<<<1, 32, 0, st>>>(); });
    const float s = time_us(st, 200, 1, [&](int) { CK(cudaGraphLaunch(g1, st)); });
    const float g = time_us(st, 100, kGraphCalls, [&](int) { CK(cudaGraphLaunch(gn, st)); });
    printf("empty kernel: single %.2f us, graph %.2f us/call\n", s, g);
  }
  printf("%4s %5s %5s %3sx%-2s %8s %8s %6s %6s %6s %6s  %s\n", "T", "bud", "shape", "nb", "nw", "single", "graph", "scored",
         "pub", "cut", "end", "hash");
  for (int T : Ts)
    for (double b : budgets)
      for (const char* sn : shapes) {
        const Shape s = launch_shape(sn, T);
        if (s.nb > 8 || s.nw > 32) continue;
        const RouteArgs a = make_args(T, b);
        const size_t smem = static_cast<size_t>(warp_path_smem_words(a, s.nw)) * 4;
        auto call = [&](int set, cudaStream_t stream) {
          const float* lp = logits + (size_t)(set % kSets) * 64 * kE;
          if (s.nb > 1) launch(route_warp_kernel<2, true, float>, s, smem, stream, lp, a, w, ids);
          else launch(route_warp_kernel<2, false, float>, s, smem, stream, lp, a, w, ids);
        };
        // Outputs of set 0, hashed (FNV-1a over ids and weight bits).
        CK(cudaMemset(ids, 0xff, 64 * kK * 4)); CK(cudaMemset(w, 0xff, 64 * kK * 4));
        call(0, st);
        CK(cudaStreamSynchronize(st));
        CK(cudaGetLastError());
        std::vector<uint32_t> hi(T * kK), hw(T * kK);
        CK(cudaMemcpy(hi.data(), ids, T * kK * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hw.data(), w, T * kK * 4, cudaMemcpyDeviceToHost));
        uint32_t hash = 2166136261u;
        int slots = 0;
        for (int i = 0; i < T * kK; ++i) {
          hash = (hash ^ hi[i]) * 16777619u;
          hash = (hash ^ hw[i]) * 16777619u;
          slots += static_cast<int32_t>(hi[i]) >= 0;
        }
        std::vector<cudaGraphExec_t> g1;
        for (int i = 0; i < kSets; ++i) g1.push_back(capture(st, [&] { call(i, st); }));
        cudaGraphExec_t gn = capture(st, [&] { for (int i = 0; i < kGraphCalls; ++i) call(i, st); });
        const float ts = time_us(st, 200, 1, [&](int r) { CK(cudaGraphLaunch(g1[r % kSets], st)); });
        const float tg = time_us(st, 100, kGraphCalls, [&](int) { CK(cudaGraphLaunch(gn, st)); });
        // Trace: launches after a sleep, medians over runs of the latest stamp of each event.
        std::vector<float> ev[4];
        std::vector<unsigned long long> hs(5 * 64);
        for (int r = 0; r < 105; ++r) {
          CK(cudaMemsetAsync(trace, 0, 5 * 64 * 8, st));
          spin_kernel<<<1, 1, 0, st>>>(20000);
          call(r, st);
          CK(cudaMemcpyAsync(hs.data(), trace, 5 * 64 * 8, cudaMemcpyDeviceToHost, st));
          CK(cudaStreamSynchronize(st));
          unsigned long long t0 = ~0ull;
          for (int bk = 0; bk < s.nb; ++bk) t0 = std::min(t0, hs[bk]);
          for (int e = 1; e < 5; ++e) {
            unsigned long long te = 0;
            for (int bk = 0; bk < s.nb; ++bk) te = std::max(te, hs[e * 64 + bk]);
            if (r >= 5) ev[e - 1].push_back(te > t0 ? (te - t0) / 1000.0f : 0.0f);
          }
        }
        printf("%4d %5.2f %5s %3dx%-2d %8.2f %8.2f %6.2f %6.2f %6.2f %6.2f  %08x (%d slots)\n", T, b, sn, s.nb, s.nw,
               ts, tg, median(ev[0]), median(ev[1]), median(ev[2]), median(ev[3]), hash, slots);
        for (auto g : g1) CK(cudaGraphExecDestroy(g));
        CK(cudaGraphExecDestroy(gn));
      }
  CK(cudaDeviceSynchronize());
  printf("done\n");
  return 0;
}
