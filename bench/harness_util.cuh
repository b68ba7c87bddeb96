// Helpers shared by the standalone kernel harnesses in bench/ (no torch): error checks, random bf16
// weights, an L2 flush, and the per-call time of `iters` calls captured in one CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <cstdio>
#include <cstdlib>
#include <vector>

using bf = __nv_bfloat16;
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

// Deterministic pseudo-random values in [-0.025, 0.025) (never zeros: they hide unwritten outputs).
__global__ void fill(bf* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * 0.05f);
  }
}
// An L2 flush as torch.sum does it: ordinary loads, so the flushed lines stay at normal priority.
__global__ void normal_read_kernel(const uint4* src, size_t n, int* sink) {
  uint32_t a = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = src[i];
    a ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (a == 0x12345678u) sink[0] = 1;
}

// us per call: body(i) for i < iters captured in one graph on st, replayed 7 times, median.
template <typename Body>
float graph_us(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, Body&& body, int iters) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < iters; ++i) body(i);
  CK(cudaStreamEndCapture(st, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, st));
  CK(cudaStreamSynchronize(st));
  std::vector<float> ts;
  for (int r = 0; r < 7; ++r) {
    CK(cudaEventRecord(e0, st)); CK(cudaGraphLaunch(ge, st)); CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms * 1000.f / iters);
  }
  CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
  std::sort(ts.begin(), ts.end());
  return ts[3];
}

// us of one call after an L2 flush (normal_read_kernel over fl_bytes at fl), events around the call
// alone: median over runs, the first `warm` dropped. call(r) launches run r.
template <typename Call>
float flushed_call_us(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, const void* fl, size_t fl_bytes, int sms, int* sink,
                      Call&& call, int runs, int warm) {
  std::vector<float> ts;
  for (int r = 0; r < runs; ++r) {
    normal_read_kernel<<<sms * 4, 512, 0, st>>>(static_cast<const uint4*>(fl), fl_bytes / 16, sink);
    CK(cudaEventRecord(e0, st)); call(r); CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= warm) ts.push_back(ms * 1000.f);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// Per-event min / median / max / count over the CTAs of a %globaltimer trace, in us after t0.
static void print_trace(const std::vector<unsigned long long>& ht, unsigned long long t0, int sms,
                        const char* const* names, std::initializer_list<int> events) {
  for (int ev : events) {
    std::vector<double> v;
    for (int b = 0; b < sms; ++b) if (ht[ev * 1024 + b] != 0 && ht[ev * 1024 + b] >= t0) v.push_back((ht[ev * 1024 + b] - t0) / 1000.0);
    std::sort(v.begin(), v.end());
    if (v.empty()) { printf("    %-14s -\n", names[ev]); continue; }
    printf("    %-14s %7.2f %7.2f %7.2f  %zu\n", names[ev], v.front(), v[v.size() / 2], v.back(), v.size());
  }
}

// Runs run(it) ten times, clearing the trace (8 events x 1024 CTAs at tr) before each; returns the
// last run's trace, with t0 its first CTA's entry stamp (event 0).
template <typename Run>
std::vector<unsigned long long> last_trace(unsigned long long* tr, cudaStream_t st, int sms, Run&& run,
                                           unsigned long long& t0) {
  for (int it = 0; it < 10; ++it) { CK(cudaMemsetAsync(tr, 0, 8 * 1024 * 8, st)); run(it); }
  CK(cudaStreamSynchronize(st));
  std::vector<unsigned long long> ht(8 * 1024);
  CK(cudaMemcpy(ht.data(), tr, ht.size() * 8, cudaMemcpyDeviceToHost));
  t0 = ~0ull;
  for (int b = 0; b < sms; ++b) if (ht[b]) t0 = std::min(t0, ht[b]);
  return ht;
}
