#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
__global__ void k(float* x) { x[threadIdx.x] = 1.f; }
void launch(at::Tensor x) { k<<<1, 32, 0, c10::cuda::getCurrentCUDAStream()>>>(x.data_ptr<float>()); C10_CUDA_KERNEL_LAUNCH_CHECK(); }
