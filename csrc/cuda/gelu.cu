// Bias + GELU (tanh approximation), forward and backward (semantics: csrc/cpu/kernels.h).
// Element-wise, grid-stride; the math is in float32 whatever the storage type. The bias
// gradient (column sums of dx) is reduced by the torch glue (csrc/cuda/ops_cuda.cpp).
#include "common.cuh"

namespace megapre::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 256;

// sigmoid(2u), u = sqrt(2/pi) v (1 + 0.044715 v^2); expf overflow gives 0 (v -> -inf).
__device__ __forceinline__ float sigmoid2u(float v, float* du) {
  const float v2 = v * v;
  const float u = 0.7978845608028654f * v * (1.0f + 0.044715f * v2);
  if (du) *du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * v2);
  return 1.0f / (1.0f + expf(-2.0f * u));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
bias_gelu_fwd_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y,
                     int64_t total, int64_t H) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const float v = to_float(x[i]) + (bias ? bias[i % H] : 0.0f);
    y[i] = from_float<T>(v * sigmoid2u(v, nullptr));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                     const float* __restrict__ bias, T* __restrict__ dx, int64_t total,
                     int64_t H) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const float v = to_float(x[i]) + (bias ? bias[i % H] : 0.0f);
    float du;
    const float s = sigmoid2u(v, &du);
    dx[i] = from_float<T>(to_float(dy[i]) * (s + 2.0f * v * s * (1.0f - s) * du));
  }
}

}  // namespace

void bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t H, DType dt,
                   cudaStream_t stream) {
  const int64_t total = rows * H;
  if (total <= 0) return;
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_gelu_fwd_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), bias, static_cast<T*>(y), total, H);
    check_launch("bias_gelu_fwd");
  });
}

void bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, int64_t rows,
                   int64_t H, DType dt, cudaStream_t stream) {
  const int64_t total = rows * H;
  if (total <= 0) return;
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_gelu_bwd_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(dx), total, H);
    check_launch("bias_gelu_bwd");
  });
}

}  // namespace megapre::cuda
