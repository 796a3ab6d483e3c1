// Shared device helpers for the megapre CUDA kernels: dtype conversion, 16-byte vector
// loads/stores, warp/block reductions, launch planning for row-wise kernels and error checks.
// Only CUDA headers here (no torch), so the .cu files compile quickly.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels.h"

namespace megapre::cuda::detail {

// ---- errors ---------------------------------------------------------------------------------
// Called right after every launch: turns a launch failure into an exception naming the kernel.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("megapre CUDA kernel '") + kernel +
                             "' failed: " + cudaGetErrorString(err));
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("megapre CUDA '") + what + "' failed: " +
                             cudaGetErrorString(err));
  }
}

// ---- dtype dispatch ---------------------------------------------------------------------------
template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with T the storage type of dt (float, __half or __nv_bfloat16).
template <typename F> void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(TypeTag<float>{}); return;
    case DType::F16: f(TypeTag<__half>{}); return;
    case DType::BF16: f(TypeTag<__nv_bfloat16>{}); return;
  }
  throw std::runtime_error("megapre CUDA: unknown dtype");
}

// Calls f(std::integral_constant<int, NV>{}) for NV in {1, 2, 4, 8}.
template <typename F> void dispatch_nv(int nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
  }
  throw std::runtime_error("megapre CUDA: bad vectors-per-thread");
}

// ---- conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round a float to T and back (the value a T buffer would hold).
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Store v as dtype dt into out[i]; for kernels whose output dtype is a runtime value.
__device__ __forceinline__ void store_as(void* out, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::F32: static_cast<float*>(out)[i] = v; break;
    case DType::F16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
  }
}

// ---- vector memory access -----------------------------------------------------------------------
// N elements of T moved as one access (16 bytes when sizeof(T) * N == 16).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pk.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// N float32 values (gamma/beta) at an address aligned to 4 * N bytes when N % 4 == 0.
template <int N> __device__ __forceinline__ void load_f32(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + k);
      out[k] = f.x; out[k + 1] = f.y; out[k + 2] = f.z; out[k + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = p[k];
  }
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---- reductions -----------------------------------------------------------------------------
// Butterfly (xor) reductions: partners always add/compare the same two values, so every lane
// ends with a bit-identical result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Reduction over the threads that share a row: one warp (WARP) or the whole block. Block form:
// blockDim.x is a multiple of 32, every thread of the block must call it (uniform control
// flow), sh holds >= 32 floats. The leading barrier lets consecutive calls reuse sh. Every
// thread gets the same (bit-identical) result.
template <bool WARP> __device__ __forceinline__ float row_sum(float v, float* sh) {
  v = warp_sum(v);
  if constexpr (WARP) {
    return v;
  } else {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? sh[lane] : 0.f);
  }
}
template <bool WARP> __device__ __forceinline__ float row_max(float v, float* sh) {
  v = warp_max(v);
  if constexpr (WARP) {
    return v;
  } else {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? sh[lane] : -INFINITY);
  }
}

// Position of the calling thread among the threads that own one row, and the first row /
// row stride of its grid-stride loop. Warp mode: blockDim.x == kWarpRowsPerBlock * 32.
constexpr int kWarpRowsPerBlock = 4;
struct RowCtx {
  int tid;        // index among the row's threads
  int nthreads;   // threads per row
  int64_t first;  // first row (worker index)
  int64_t stride; // number of workers
};
template <bool WARP> __device__ __forceinline__ RowCtx row_ctx() {
  RowCtx c;
  if constexpr (WARP) {
    c.tid = threadIdx.x & 31;
    c.nthreads = 32;
    c.first = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    c.stride = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  } else {
    c.tid = threadIdx.x;
    c.nthreads = blockDim.x;
    c.first = blockIdx.x;
    c.stride = gridDim.x;
  }
  return c;
}

// ---- launch planning for row-wise kernels ------------------------------------------------
// A row holds nvec vectors of `vec` elements. Register modes keep the row in registers,
// nv vectors per thread (nv in {1,2,4,8}, nv * vec <= ept_max elements per thread):
//   kWarp:  one warp per row (rows packed kWarpRowsPerBlock per block),
//   kBlock: one block of `threads` (multiple of 32, <= kMaxRowThreads) per row,
//   kLoop:  row too long for registers: one block of kLoopThreads per row, re-reading the row
//           from global memory (L2-resident) once per pass.
enum class RowMode { kWarp, kBlock, kLoop };
struct RowPlan {
  RowMode mode;
  int nv;
  int threads;
};
constexpr int kMaxRowThreads = 512;
constexpr int kLoopThreads = 512;

inline RowPlan plan_row(int64_t nvec, int vec, int ept_max) {
  int nv_cap = ept_max / vec;
  if (nv_cap > 8) nv_cap = 8;
  if (nv_cap < 1) nv_cap = 1;
  for (int nv = 1; nv <= nv_cap; nv *= 2) {
    if (nvec <= 32 * nv) return {RowMode::kWarp, nv, 32 * kWarpRowsPerBlock};
  }
  for (int nv = 1; nv <= nv_cap; nv *= 2) {
    const int64_t t = (nvec + nv - 1) / nv;
    if (t <= kMaxRowThreads) return {RowMode::kBlock, nv, static_cast<int>((t + 31) / 32 * 32)};
  }
  return {RowMode::kLoop, 0, kLoopThreads};
}

// Grid size for a grid-stride loop over `rows` rows with `rows_per_block` rows per block.
constexpr int64_t kMaxGrid = int64_t(1) << 20;
inline unsigned grid_for(int64_t rows, int rows_per_block) {
  int64_t g = (rows + rows_per_block - 1) / rows_per_block;
  if (g > kMaxGrid) g = kMaxGrid;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g);
}

}  // namespace megapre::cuda::detail
