// CUDA implementation of torch.ops.allocmoe.experts (contract: docs/OPS.md).
//
// Six paths, chosen on the host from shapes only (never from the routing data, so no sync):
//   - stream (experts_stream.cuh): T <= kStreamMaxTokens (64) on the standard case (bf16/fp16,
//     silu, no biases, contiguous weights, H and I multiples of 32; E <= 512 past T*K = 320) on
//     sm_90: two persistent launches (three past 16 tokens) that feed the selected experts'
//     weights through bulk copies into a deep shared-memory ring; memory-bound, aims at the
//     bandwidth floor. Auto takes it up to kStreamAutoMaxTokens only: past 16 tokens it beat
//     skinny in the kernel harness (bench/stream_kernel_harness.cu mid, DeepSeek-V2-Lite shape:
//     T=32 362 vs 373 us, T=64 388 vs 402) but not in the layer bench (same run, route and L2
//     flush included: T=32 399.9 vs 389.3, T=64 404.4 vs 406.2; Qwen1.5 T=64 373.3 vs 367.6;
//     OLMoE T=64 301.2 vs 296.4), so past 16 tokens it is reached only when forced.
//   - decode (experts_decode.cuh): the same cases before sm_90 (or when x does not fit in
//     shared memory); streams each used expert's weights once with 16-byte loads.
//   - wide (experts_wide.cuh): past 16 tokens up to kWideMaxAvgSlots per expert on sm_90 with
//     I % 64 == 0 and H % 128 == 0 (and cooperative launch); one persistent launch in which the
//     weights of 128-row items come through tensor-map copies into a shared-memory ring while
//     consumer warps multiply (warp specialisation), down items starting as soon as their
//     tile's gate_up items are done; memory-bound up to a few hundred tokens.
//   - skinny (experts_skinny.cuh): mid T (a few dozen tokens per expert on average) on the
//     standard case where wide does not run; weights on the wide MMA side, each expert's tokens
//     on the narrow side, every expert's weights streamed once; memory-bound.
//   - prefill (experts_prefill.cuh): larger T on the standard case; device-side alignment and
//     two grouped tensor-core GEMMs with 128-token tiles.
//   - generic (below): everything else (fp32, swiglu_oai, biases, any strides); one thread per
//     output element, simple and correct, not fast.
// The environment variable ALLOCMOE_EXPERTS_PATH=stream|decode|skinny|prefill|generic|wide forces
// a path (read on every call; tests use it to run every path at every T). A forced fast path on a
// non-standard case falls back to generic; a forced decode or skinny past its slot limit falls
// back to prefill; a forced stream path it cannot take (T, T*K, device) falls back to decode; a
// forced wide path it cannot take (device, H, I, tensor maps) falls back to skinny or prefill.
// All paths are deterministic run to run (fixed summation orders, no floating-point atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <string>
#include <string_view>

#include "common/arg_checks.h"
#include "common/env_choice.h"
#include "device_info.h"
#include "experts_decode.cuh"
#include "experts_prefill.cuh"
#include "experts_skinny.cuh"
#include "experts_stream.cuh"
#include "experts_wide.cuh"
#include "tensor_map.h"
#include "validation.h"

namespace allocmoe {
namespace cuda_experts {
namespace {

// Largest T that takes the decode path in auto mode (measured on H100 at the DeepSeek-V2-Lite
// shape: skinny is as fast at T=16 and faster from T=32 on, docs/KERNELS.md), and the largest
// T*K it can take at all (its slot list lives in shared memory).
constexpr int64_t kDecodeMaxTokens = 16;
// Largest T that takes the stream path in auto mode (see the header: past it skinny is as fast).
constexpr int64_t kStreamAutoMaxTokens = 16;
constexpr int64_t kDecodeMaxSlots = 4096;
// Auto mode takes the skinny path above kDecodeMaxTokens while the average expert gets at most
// this many slots (T*K/E); past it the 128-token tiles of the prefill path fill up (measured at
// the DeepSeek-V2-Lite shape: skinny 1.17x faster than prefill at 48 slots per expert, T=512;
// not measured past that, where kSkinnyMaxSlots binds first for E=64).
constexpr int64_t kSkinnyMaxAvgSlots = 64;
// Auto mode takes the wide path instead of skinny where it fits (sm_90, I % 64 == 0, H % 128 ==
// 0) up to this many slots per expert on average: measured at the DeepSeek-V2-Lite shape
// (bench/stream_kernel_harness.cu wide, H100, us per call in a graph, wide / skinny): T=32 354 /
// 378, T=64 368 / 398, T=128 373 / 408, T=256 400 / 436, T=512 (48 per expert) 454 / 515.
constexpr int64_t kWideMaxAvgSlots = 48;
// Most experts the fast paths take (the decode bitmap and the align kernel's counters).
constexpr int kMaxExpertsFast = 4096;

// Error messages go through ALLOCMOE_CHECK (csrc/common/check.h): TORCH_CHECK formatting an
// integer crashed the process on the H100 machine (SIGSEGV in std::ostream::_M_insert<long>).

// ---------------------------------------------------------------------------------------------
// generic path
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct GenericParams {
  const scalar_t* x;  // hidden [T, H], contiguous
  const scalar_t* gate_up;
  int64_t gu_s0, gu_s1, gu_s2;
  const scalar_t* down;
  int64_t dn_s0, dn_s1, dn_s2;
  const scalar_t* gate_up_bias;  // nullable
  int64_t gub_s0, gub_s1;
  const scalar_t* down_bias;  // nullable
  int64_t db_s0, db_s1;
  const float* weights;  // [T, K] contiguous
  const int* ids;        // [T, K] contiguous
  scalar_t* act;         // [T*K, I] scratch
  scalar_t* out;         // [T, H]
  int64_t T, K, E, H, I;
  bool swiglu_oai;
  float alpha, limit;
};

// act[slot, j] for one (slot, j) per thread; grid (T*K, ceil(I / 128)).
template <typename scalar_t>
__global__ void __launch_bounds__(128) generic_act_kernel(GenericParams<scalar_t> p) {
  const int64_t slot = blockIdx.x;
  const int64_t j = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  const int e = p.ids[slot];
  if (e < 0 || e >= p.E || j >= p.I) return;
  const int64_t t = slot / p.K;
  const int64_t rg = p.swiglu_oai ? 2 * j : j;          // gate row
  const int64_t ru = p.swiglu_oai ? 2 * j + 1 : p.I + j;  // up row
  const scalar_t* wg = p.gate_up + e * p.gu_s0 + rg * p.gu_s1;
  const scalar_t* wu = p.gate_up + e * p.gu_s0 + ru * p.gu_s1;
  const scalar_t* x = p.x + t * p.H;
  float gate = 0.f, up = 0.f;
  for (int64_t h = 0; h < p.H; ++h) {
    const float xv = static_cast<float>(x[h]);
    gate += static_cast<float>(wg[h * p.gu_s2]) * xv;
    up += static_cast<float>(wu[h * p.gu_s2]) * xv;
  }
  if (p.gate_up_bias != nullptr) {
    gate += static_cast<float>(p.gate_up_bias[e * p.gub_s0 + rg * p.gub_s1]);
    up += static_cast<float>(p.gate_up_bias[e * p.gub_s0 + ru * p.gub_s1]);
  }
  float a;
  if (p.swiglu_oai) {
    gate = fminf(gate, p.limit);
    up = fminf(fmaxf(up, -p.limit), p.limit);
    a = (up + 1.f) * gate / (1.f + expf(-p.alpha * gate));
  } else {
    a = gate / (1.f + expf(-gate)) * up;
  }
  p.act[slot * p.I + j] = static_cast<scalar_t>(a);  // rounded to the input dtype, as the contract says
}

// out[t, h] for one (t, h) per thread, slots summed in order; grid (T, ceil(H / 128)).
template <typename scalar_t>
__global__ void __launch_bounds__(128) generic_down_kernel(GenericParams<scalar_t> p) {
  const int64_t t = blockIdx.x;
  const int64_t h = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  if (h >= p.H) return;
  float acc = 0.f;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t slot = t * p.K + k;
    const int e = p.ids[slot];
    if (e < 0 || e >= p.E) continue;
    const scalar_t* w = p.down + e * p.dn_s0 + h * p.dn_s1;
    const scalar_t* a = p.act + slot * p.I;
    float s = 0.f;
    for (int64_t j = 0; j < p.I; ++j) s += static_cast<float>(w[j * p.dn_s2]) * static_cast<float>(a[j]);
    if (p.down_bias != nullptr) s += static_cast<float>(p.down_bias[e * p.db_s0 + h * p.db_s1]);
    acc += p.weights[slot] * s;
  }
  p.out[t * p.H + h] = static_cast<scalar_t>(acc);
}

void run_generic(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& weights,
                 const at::Tensor& ids, const std::optional<at::Tensor>& gate_up_bias,
                 const std::optional<at::Tensor>& down_bias, bool swiglu_oai, double alpha, double limit,
                 at::Tensor& out, cudaStream_t stream) {
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  at::Tensor act = at::empty({T * K, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "allocmoe_experts_generic", [&] {
    GenericParams<scalar_t> p{};
    p.x = x.data_ptr<scalar_t>();
    p.gate_up = gate_up.data_ptr<scalar_t>();
    p.gu_s0 = gate_up.stride(0), p.gu_s1 = gate_up.stride(1), p.gu_s2 = gate_up.stride(2);
    p.down = down.data_ptr<scalar_t>();
    p.dn_s0 = down.stride(0), p.dn_s1 = down.stride(1), p.dn_s2 = down.stride(2);
    if (gate_up_bias.has_value()) {
      p.gate_up_bias = gate_up_bias->data_ptr<scalar_t>();
      p.gub_s0 = gate_up_bias->stride(0), p.gub_s1 = gate_up_bias->stride(1);
    }
    if (down_bias.has_value()) {
      p.down_bias = down_bias->data_ptr<scalar_t>();
      p.db_s0 = down_bias->stride(0), p.db_s1 = down_bias->stride(1);
    }
    p.weights = weights.data_ptr<float>();
    p.ids = ids.data_ptr<int>();
    p.act = act.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.T = T, p.K = K, p.E = E, p.H = H, p.I = I;
    p.swiglu_oai = swiglu_oai;
    p.alpha = static_cast<float>(alpha), p.limit = static_cast<float>(limit);
    generic_act_kernel<scalar_t><<<dim3(T * K, (I + 127) / 128), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    generic_down_kernel<scalar_t><<<dim3(T, (H + 127) / 128), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// fast paths
// ---------------------------------------------------------------------------------------------

// Carves 256-byte aligned pieces out of one scratch allocation (one allocator call per op).
struct Scratch {
  int64_t bytes = 0;
  int64_t take(int64_t n) {
    const int64_t at = bytes;
    bytes += (n + 255) / 256 * 256;
    return at;
  }
};

using cuda::set_smem_limit;

// The slot combine (out[t] = sum of y over t's slots) as a programmatic dependent launch after
// the grid that wrote y: it may become resident while that grid drains and waits for it.
template <typename Elem>
void launch_combine(const CombineParams& c, cudaStream_t stream) {
  cudaLaunchAttribute pdl{};
  pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl.val.programmaticStreamSerializationAllowed = 1;
  const cudaLaunchConfig_t cfg{dim3(c.T), dim3(256), 0, stream, &pdl, 1};
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, combine_slots_kernel<Elem>, c));
}

template <typename T, int NT>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const int TK = p.T * p.K, used_max = std::min(p.E, TK);
  const DecodeSmem gate_up_smem(p.E, TK, NT, kGateUpRedStride), down_smem(p.E, TK, NT, kDownRedStride);
  static bool gate_up_done[64] = {}, down_done[64] = {};
  const int most_slots = static_cast<int>(kDecodeMaxSlots);
  set_smem_limit(reinterpret_cast<const void*>(&decode_gate_up_kernel<T, NT>),
                 DecodeSmem(kMaxExpertsFast, most_slots, NT, kGateUpRedStride).total_bytes, gate_up_done);
  set_smem_limit(reinterpret_cast<const void*>(&decode_down_kernel<T, NT>),
                 DecodeSmem(kMaxExpertsFast, most_slots, NT, kDownRedStride).total_bytes, down_done);
  decode_gate_up_kernel<T, NT>
      <<<dim3(p.I / kDecodeRows, used_max), kDecodeThreads, gate_up_smem.total_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Programmatic dependent launch (see experts_decode.cuh); captured into CUDA graphs as such.
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.H / kDecodeRows, used_max);
  cfg.blockDim = dim3(kDecodeThreads);
  cfg.dynamicSmemBytes = down_smem.total_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_down_kernel<T, NT>, p));
}

template <typename Elem>
void run_decode(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& weights,
                const at::Tensor& ids, at::Tensor& out, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  Scratch s;
  const int64_t act_at = s.take((int64_t)T * K * I * x.element_size());
  const int64_t y_at = s.take((int64_t)T * K * H * 4);
  const int64_t cnt_at = s.take((int64_t)(H / kDecodeRows) * 4);
  at::Tensor scratch = at::empty({s.bytes}, x.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  DecodeParams p{x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), weights.data_ptr<float>(), ids.data_ptr<int>(),
                 base + act_at, reinterpret_cast<float*>(base + y_at), out.data_ptr(),
                 reinterpret_cast<int*>(base + cnt_at), T, K, E, H, I};
  // n tiles of 8 pairs per pass: a used expert gets at most T pairs when a row holds each
  // expert once (route's output); more pairs (repeated ids) take extra passes.
  if (T <= 8) launch_decode<Elem, 1>(p, stream);
  else if (T <= 16) launch_decode<Elem, 2>(p, stream);
  else if (T <= 32) launch_decode<Elem, 4>(p, stream);
  else launch_decode<Elem, 8>(p, stream);
}

using cuda::DeviceInfo;

// Ring depth of a stream launch (layouts: stream_one_launch_smem, or stream_gate_up_smem /
// stream_down_smem for the two launches).
int stream_stages(const StreamSmem& lay, const DeviceInfo& d) { return lay.fit_stages(d.smem_optin); }

bool stream_fits(int64_t T, int64_t K, int64_t E, int64_t H, int64_t I, const DeviceInfo& d) {
  if (d.major < 9 || T > kStreamMaxTokens || T * K > kStreamMaxSlots || H > 65536 || I > 65536) return false;
  if (T * K > kStreamThreads && E > kStreamMaxExperts) return false;  // the counting list builder's limit
  const int t = static_cast<int>(T);
  return stream_stages(stream_gate_up_smem(t, static_cast<int>(H)), d) >= kStreamMinStages &&
         stream_stages(stream_down_smem(t, static_cast<int>(K), static_cast<int>(I)), d) >= kStreamMinStages;
}

// One launch (stream_experts_kernel: each expert's down work starts as soon as its act is complete
// grid-wide, stream_ready.cuh) or two (gate_up, then down once the whole gate_up grid is done).
// Measured on H100, DeepSeek-V2-Lite shape, us, one / two:
//   bench/stream_kernel_harness.cu mid flushed (experts alone after an L2 flush): T=1 41.6 / 44.5,
//   T=4 117.2 / 118.6; T=16 304.4 / 292.0, T=64 434.7 / 401.0 (where act is staged next to the
//   weights, one launch has to use the double-size stages in gate_up too: 3 instead of 8 stages);
//   bench/bench_layer.py (route op, then experts; one launch at T*K <= 32): T=1 46.5 / 46.5,
//   T=1 half budget 31.4 / 28.8, T=4 122.1 / 120.7. The layer loses what the kernel alone gains.
//   Why (bench/cold_start_probe.py, session 9): not the cooperative attribute (a plain launch,
//   tried: within 0.4 us at T=1, 1 us slower at T=4); mostly what the bench's L2 flush also
//   evicts (code, constants, counters), which the bigger one-launch kernel refetches behind the
//   route kernel: us one / two at T=1 after the flush 45.2 / 45.6 (half budget 29.9 / 28.4),
//   after the flush + a tiny call of the same op 43.6 / 45.0, after a sleep 42.6 / 44.3.
// So auto keeps the two launches; ALLOCMOE_STREAM_LAUNCHES=one|two forces either (tests run both).
// A forced one launch that cannot run (cooperative launch, ring depth) runs the two.
bool use_one_stream_launch(const StreamParams& p, const DeviceInfo& d) {
  const int forced = env_choice("allocmoe.experts", "ALLOCMOE_STREAM_LAUNCHES", {"auto", "one", "two"});
  return forced == 1 && d.coop && stream_stages(stream_one_launch_smem(p.T, p.K, p.H, p.I), d) >= kStreamMinStages;
}

template <typename Elem, int NT>
void launch_stream(StreamParams p, const DeviceInfo& d, cudaStream_t stream) {
  static bool one_done[64] = {}, gate_up_done[64] = {}, down_done[64] = {};
  // Programmatic dependent launches (captured into CUDA graphs as such): the kernel starts while
  // the routing grid drains (and down while gate_up drains). The one launch is also cooperative:
  // its CTAs wait for each other's experts (stream_ready.cuh).
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeCooperative;
  attr[1].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(d.sms);
  cfg.blockDim = dim3(kStreamThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (use_one_stream_launch(p, d)) {
    set_smem_limit(reinterpret_cast<const void*>(&stream_experts_kernel<Elem, NT>), d.smem_optin, one_done);
    const StreamSmem lay = stream_one_launch_smem(p.T, p.K, p.H, p.I);
    p.stages = stream_stages(lay, d);
    cfg.dynamicSmemBytes = lay.total(p.stages);
    cfg.numAttrs = 2;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, stream_experts_kernel<Elem, NT>, p));
    cfg.numAttrs = 1;
  } else {
    set_smem_limit(reinterpret_cast<const void*>(&stream_gate_up_kernel<Elem, NT>), d.smem_optin, gate_up_done);
    set_smem_limit(reinterpret_cast<const void*>(&stream_down_kernel<Elem, NT>), d.smem_optin, down_done);
    const StreamSmem gate_up_smem = stream_gate_up_smem(p.T, p.H), down_smem = stream_down_smem(p.T, p.K, p.I);
    p.stages = stream_stages(gate_up_smem, d);
    cfg.dynamicSmemBytes = gate_up_smem.total(p.stages);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, stream_gate_up_kernel<Elem, NT>, p));
    p.stages = stream_stages(down_smem, d);
    cfg.dynamicSmemBytes = down_smem.total(p.stages);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, stream_down_kernel<Elem, NT>, p));
  }
  if (p.y != nullptr)  // the expert-major down phase wrote y: sum each token's slots
    launch_combine<Elem>(CombineParams{p.y, p.ids, p.out, p.T, p.K, p.E, p.H}, stream);
}

template <typename Elem>
void run_stream(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& weights,
                const at::Tensor& ids, at::Tensor& out, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  // One scratch allocation: act, then (expert-major down phase, T > kStreamXRows) y.
  const bool by_expert = !stream_x_resident(T);
  Scratch s;
  const int64_t act_at = s.take((int64_t)T * K * I * x.element_size());
  const int64_t y_at = by_expert ? s.take((int64_t)T * K * H * 4) : 0;
  at::Tensor scratch = at::empty({s.bytes}, x.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  const StreamParams p{x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), weights.data_ptr<float>(),
                       ids.data_ptr<int>(), base + act_at, out.data_ptr(), T, K, E, H, I, 0,
                       by_expert ? reinterpret_cast<float*>(base + y_at) : nullptr};
  const DeviceInfo& d = cuda::device_info(x.get_device());
  if (stream_pairs_per_pass(T) == 8) launch_stream<Elem, 1>(p, d, stream);
  else launch_stream<Elem, 2>(p, d, stream);
}

template <typename Elem>
void run_skinny(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& weights,
                const at::Tensor& ids, at::Tensor& out, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  Scratch s;
  const int64_t act_at = s.take((int64_t)T * K * I * x.element_size());
  const int64_t y_at = s.take((int64_t)T * K * H * 4);
  at::Tensor scratch = at::empty({s.bytes}, x.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  const SkinnyParams p{x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), weights.data_ptr<float>(), ids.data_ptr<int>(),
                       base + act_at, reinterpret_cast<float*>(base + y_at), T, K, E, H, I};
  static bool gate_up_done[64] = {}, down_done[64] = {};
  const int most = SkinnySmem(static_cast<int>(kSkinnyMaxSlots)).total_bytes;
  set_smem_limit(reinterpret_cast<const void*>(&skinny_gate_up_kernel<Elem>), most, gate_up_done);
  set_smem_limit(reinterpret_cast<const void*>(&skinny_down_kernel<Elem>), most, down_done);
  const int smem = SkinnySmem(T * K).total_bytes;
  skinny_gate_up_kernel<Elem><<<dim3((I + kSkinnyGateUpCols - 1) / kSkinnyGateUpCols, E), kSkinnyThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // down and combine are programmatic dependent launches (captured into CUDA graphs as such):
  // each may start while the grid before it drains and waits for it before reading its output.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((H + kSkinnyDownRows - 1) / kSkinnyDownRows, E);
  cfg.blockDim = dim3(kSkinnyThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, skinny_down_kernel<Elem>, p));
  launch_combine<Elem>(CombineParams{p.y, p.ids, out.data_ptr(), T, K, E, H}, stream);
}

// The align kernel's lists and tile table, act (rows in sorted order) and y, carved out of one
// scratch allocation (kept alive by `scratch` until the launches are queued): the prefill and
// wide paths.
PrefillParams aligned_params(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                             const at::Tensor& weights, const at::Tensor& ids, at::Tensor& out, int max_tiles,
                             at::Tensor& scratch) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  const int64_t TK = (int64_t)T * K;
  Scratch s;
  const int64_t sorted_at = s.take(TK * 4), slot_row_at = s.take(TK * 4);
  const int64_t offset_at = s.take((int64_t)(E + 1) * 4);
  const int64_t texp_at = s.take((int64_t)max_tiles * 4), trow_at = s.take((int64_t)max_tiles * 4);
  const int64_t tdone_at = s.take((int64_t)max_tiles * 4), ntiles_at = s.take(4), next_at = s.take(4);
  const int64_t act_at = s.take(TK * I * x.element_size()), y_at = s.take(TK * H * 4);
  scratch = at::empty({s.bytes}, x.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  auto ints = [base](int64_t at) { return reinterpret_cast<int*>(base + at); };
  return PrefillParams{x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), weights.data_ptr<float>(),
                       ids.data_ptr<int>(), ints(sorted_at), ints(offset_at), ints(texp_at), ints(trow_at),
                       ints(ntiles_at), ints(tdone_at), ints(next_at), ints(slot_row_at), base + act_at,
                       reinterpret_cast<float*>(base + y_at), out.data_ptr(), T, K, E, H, I};
}

template <typename Elem>
void run_prefill(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& weights,
                 const at::Tensor& ids, at::Tensor& out, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  const int max_tiles = prefill_max_tiles((int64_t)T * K, E);
  at::Tensor scratch;
  const PrefillParams p = aligned_params(x, gate_up, down, weights, ids, out, max_tiles, scratch);
  prefill_align_kernel<<<1, kAlignThreads, 3 * E * sizeof(int), stream>>>(p, kBM);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  prefill_gate_up_kernel<Elem><<<dim3((I + kBN / 2 - 1) / (kBN / 2), max_tiles), kGemmThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  prefill_down_kernel<Elem><<<dim3((H + kBN - 1) / kBN, max_tiles), kGemmThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_slots_kernel<Elem><<<T, 256, 0, stream>>>(CombineParams{p.y, p.ids, p.out, T, K, E, H});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool wide_fits(int64_t T, int64_t K, int64_t E, int64_t H, int64_t I, const DeviceInfo& d) {
  return d.major >= 9 && d.coop && I % kWideGateUpBoxRows == 0 && H % kWideRows == 0 && H <= INT_MAX / 2 &&
         wide_fit_stages(d.smem_optin, wide_pairs(T * K, E)) >= kWideMinStages;
}

template <typename Elem, int kPairs>
void launch_wide(const PrefillParams& p, const CUtensorMap& gate_up_map, const CUtensorMap& down_map,
                 const DeviceInfo& d, cudaStream_t stream) {
  const int stages = wide_fit_stages(d.smem_optin, kPairs), smem = wide_smem_bytes(stages, kPairs);
  static bool smem_done[64] = {};
  set_smem_limit(reinterpret_cast<const void*>(&wide_kernel<Elem, kPairs>), smem, smem_done);
  // All three are programmatic dependent launches (captured into CUDA graphs as such): each may
  // become resident while the grid before it drains, and waits for it before reading its output
  // (the combine through launch_combine). The experts launch is also cooperative: its down items
  // wait for gate_up items of other CTAs, so every CTA must be resident.
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeCooperative;
  attr[1].val.cooperative = 1;
  const cudaLaunchConfig_t align{dim3(1), dim3(kAlignThreads), 3 * p.E * sizeof(int), stream, attr, 1};
  const cudaLaunchConfig_t experts{dim3(d.sms), dim3(kStreamThreads), static_cast<size_t>(smem), stream, attr, 2};
  C10_CUDA_CHECK(cudaLaunchKernelEx(&align, prefill_align_kernel, p, kPairs));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&experts, wide_kernel<Elem, kPairs>, p, gate_up_map, down_map, stages));
  launch_combine<Elem>(CombineParams{p.y, p.ids, p.out, p.T, p.K, p.E, p.H, p.slot_row, p.weights}, stream);
}

// Returns false, having launched nothing, when the driver cannot encode the weights' tensor maps.
template <typename Elem>
bool run_wide(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& weights,
              const at::Tensor& ids, at::Tensor& out, cudaStream_t stream) {
  const int T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2, K = ids.size(1);
  CUtensorMap gate_up_map, down_map;
  if (!encode_wide_maps(&gate_up_map, &down_map, gate_up.data_ptr(), down.data_ptr(), E, H, I)) return false;
  const int pairs = wide_pairs((int64_t)T * K, E);
  at::Tensor scratch;
  const PrefillParams p =
      aligned_params(x, gate_up, down, weights, ids, out, prefill_max_tiles((int64_t)T * K, E, pairs), scratch);
  const DeviceInfo& d = cuda::device_info(x.get_device());
  if (pairs == 32) launch_wide<Elem, 32>(p, gate_up_map, down_map, d, stream);
  else launch_wide<Elem, 64>(p, gate_up_map, down_map, d, stream);
  return true;
}

// Validation of ids (only when validation is on): one single-CTA kernel finds the first flat
// index whose id is outside [-1, E) and its value, one 8-byte copy brings them to the host (one
// sync, no ATen reductions), and the message names the slot.
constexpr int kCheckThreads = 1024;
__global__ void __launch_bounds__(kCheckThreads) find_bad_id_kernel(const int* __restrict__ ids, int n, int E,
                                                                    int* __restrict__ found) {
  __shared__ int first;
  if (threadIdx.x == 0) first = INT_MAX;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kCheckThreads) {
    const int e = ids[i];
    if (e < -1 || e >= E) atomicMin(&first, i);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    found[0] = first;
    found[1] = first == INT_MAX ? 0 : ids[first];
  }
}

void check_ids_in_range(const at::Tensor& ids, int64_t E) {
  const int n = static_cast<int>(ids.numel()), K = static_cast<int>(ids.size(1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor found = at::empty({2}, ids.options());
  find_bad_id_kernel<<<1, kCheckThreads, 0, stream>>>(ids.data_ptr<int>(), n, static_cast<int>(E),
                                                       found.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int host[2] = {INT_MAX, 0};
  C10_CUDA_CHECK(cudaMemcpyAsync(host, found.data_ptr<int>(), sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  ALLOCMOE_CHECK(host[0] == INT_MAX, "allocmoe.experts: ids[", host[0] / K, ", ", host[0] % K, "] = ", host[1],
                 " is out of range [-1, E=", E, ")");
}

enum class Path { kAuto, kStream, kDecode, kSkinny, kPrefill, kGeneric, kWide };

Path forced_path() {  // choices in the order of Path
  return static_cast<Path>(env_choice("allocmoe.experts", "ALLOCMOE_EXPERTS_PATH",
                                      {"auto", "stream", "decode", "skinny", "prefill", "generic", "wide"}));
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The tensor-core paths' preconditions: everything else goes to the generic path.
bool fast_path_ok(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, bool has_bias,
                  Activation activation) {
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2;
  return (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) && activation == Activation::kSilu &&
         !has_bias && gate_up.is_contiguous() && down.is_contiguous() && H % 32 == 0 && I % 32 == 0 &&
         aligned16(x) && aligned16(gate_up) && aligned16(down) && E <= kMaxExpertsFast &&
         // int indexing inside the kernels and grid limits
         T * std::max<int64_t>(H, I) * 8 < (int64_t(1) << 31) && E * 2 * I * H < (int64_t(1) << 62);
}

}  // namespace
}  // namespace cuda_experts

at::Tensor experts_cuda(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
                        const at::Tensor& weights, const at::Tensor& ids, const std::optional<at::Tensor>& gate_up_bias,
                        const std::optional<at::Tensor>& down_bias, c10::string_view activation_name,
                        double swiglu_alpha, double swiglu_limit) {
  using namespace cuda_experts;
  const Activation activation =
      check_experts_args(hidden, gate_up, down, weights, ids, gate_up_bias, down_bias, activation_name);
  ALLOCMOE_CHECK(hidden.is_cuda(), "allocmoe.experts (CUDA): hidden must be a CUDA tensor, got ", hidden.device());
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up.size(0), K = ids.size(1);
  ALLOCMOE_CHECK(T * K < (int64_t(1) << 31), "allocmoe.experts (CUDA): T*K must be < 2^31, got T=", T, ", K=", K);
  const c10::cuda::CUDAGuard guard(hidden.device());
  // Data-dependent check (a device-to-host sync; off by default on CUDA), before any launch.
  if (validation_enabled() && T * K > 0) check_ids_in_range(ids.contiguous(), E);
  at::Tensor out = at::empty({T, H}, hidden.options());
  if (T == 0 || H == 0) return out;
  if (K == 0) return out.zero_();
  const at::Tensor x = hidden.contiguous(), w = weights.contiguous(), id = ids.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const Path forced = forced_path();
  const bool fast = fast_path_ok(x, gate_up, down, gate_up_bias.has_value() || down_bias.has_value(), activation);
  Path path = Path::kGeneric;
  if (fast && forced != Path::kGeneric) {
    const bool decode_fits = T * K <= kDecodeMaxSlots, skinny_fits = T * K <= kSkinnyMaxSlots;
    const cuda::DeviceInfo& dev = cuda::device_info(x.get_device());
    const bool stream_ok = stream_fits(T, K, E, H, gate_up.size(1) / 2, dev);
    if (forced == Path::kStream) path = stream_ok ? Path::kStream : decode_fits ? Path::kDecode : Path::kPrefill;
    else if (forced == Path::kWide)
      path = wide_fits(T, K, E, H, gate_up.size(1) / 2, dev) ? Path::kWide : skinny_fits ? Path::kSkinny : Path::kPrefill;
    else if (forced == Path::kDecode) path = decode_fits ? Path::kDecode : Path::kPrefill;
    else if (forced == Path::kSkinny) path = skinny_fits ? Path::kSkinny : Path::kPrefill;
    else if (forced == Path::kPrefill) path = Path::kPrefill;
    else if (stream_ok && T <= kStreamAutoMaxTokens) path = Path::kStream;
    else if (T <= kDecodeMaxTokens && decode_fits) path = Path::kDecode;
    else if (T * K <= kWideMaxAvgSlots * E && wide_fits(T, K, E, H, gate_up.size(1) / 2, dev)) path = Path::kWide;
    else if (skinny_fits && T * K <= kSkinnyMaxAvgSlots * E) path = Path::kSkinny;
    else path = Path::kPrefill;
  }
  if (path == Path::kWide) {  // falls back when the tensor maps cannot be encoded
    const bool ran = x.scalar_type() == at::kBFloat16 ? run_wide<__nv_bfloat16>(x, gate_up, down, w, id, out, stream)
                                                      : run_wide<__half>(x, gate_up, down, w, id, out, stream);
    if (ran) return out;
    path = T * K <= kSkinnyMaxSlots ? Path::kSkinny : Path::kPrefill;
  }
  if (path == Path::kGeneric) {
    run_generic(x, gate_up, down, w, id, gate_up_bias, down_bias, activation == Activation::kSwigluOai, swiglu_alpha,
                swiglu_limit, out, stream);
  } else if (x.scalar_type() == at::kBFloat16) {
    if (path == Path::kStream) run_stream<__nv_bfloat16>(x, gate_up, down, w, id, out, stream);
    else if (path == Path::kDecode) run_decode<__nv_bfloat16>(x, gate_up, down, w, id, out, stream);
    else if (path == Path::kSkinny) run_skinny<__nv_bfloat16>(x, gate_up, down, w, id, out, stream);
    else run_prefill<__nv_bfloat16>(x, gate_up, down, w, id, out, stream);
  } else {
    if (path == Path::kStream) run_stream<__half>(x, gate_up, down, w, id, out, stream);
    else if (path == Path::kDecode) run_decode<__half>(x, gate_up, down, w, id, out, stream);
    else if (path == Path::kSkinny) run_skinny<__half>(x, gate_up, down, w, id, out, stream);
    else run_prefill<__half>(x, gate_up, down, w, id, out, stream);
  }
  return out;
}

}  // namespace allocmoe

TORCH_LIBRARY_IMPL(allocmoe, CUDA, m) { m.impl("experts", &allocmoe::experts_cuda); }
