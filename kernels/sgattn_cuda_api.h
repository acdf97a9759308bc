// Host API of the CUDA kernels (kernels/cuda_launch.cu): plain pointers,
// strides and sizes, no framework types. The torch bindings (csrc/cuda_ops.cpp)
// call only these functions, so they compile without nvcc.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda_plan.h"

namespace sgattn {

// Attention forward; partial/importance both null when importance is not needed.
cudaError_t attention_forward(DType dtype, const AttnParams& p, const AttnPlan& plan, float* partial,
                              float* importance, cudaStream_t stream);
// Attention backward (dq, dk, dv of g) from the forward's g.out and p.lse; g.delta is scratch.
cudaError_t attention_backward(DType dtype, const AttnParams& p, const AttnPlan& plan, const AttnBwdArgs& g,
                               cudaStream_t stream);
// Reallocation forward; 16-byte vector loads when C and the pointers allow.
cudaError_t realloc_forward(DType dtype, const ReallocArgs& a, cudaStream_t stream);
// Reallocation backward; inv [G,B,N] int64, dots [G,B,N] fp32 and rowsums [G,B,M] fp32 are scratch.
cudaError_t realloc_backward(DType dtype, const ReallocArgs& a, const void* grad, void* dx, int64_t* inv,
                             float* dots, float* rowsums, void* dweights, void* dbiases, int64_t num_weights,
                             cudaStream_t stream);
// cudaSuccess when the current device can run these kernels (a kernel image or PTX
// for its architecture is present); cudaErrorNoKernelImageForDevice otherwise.
cudaError_t probe_kernel_image();

}  // namespace sgattn
