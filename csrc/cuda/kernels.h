// Raw-pointer CUDA kernel interface. The .cu files implement these and include only CUDA
// headers (fast nvcc builds); the torch glue (csrc/cuda/ops_cuda.cpp) validates tensors,
// allocates outputs and calls them on the current stream. Semantics are exactly those of the
// CPU kernels in csrc/cpu/kernels.h (same names, same argument meaning).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "../cpu/kernels.h"  // megapre::DType

namespace megapre::cuda {

void norm_fwd(const void* x, const void* residual, void* y, void* sum_out, const float* gamma,
              const float* beta, float* mean, float* rstd, int64_t rows, int64_t H, float eps,
              bool rms, DType dt, cudaStream_t stream);

// dgamma/dbeta: float32 [H] outputs or nullptr. workspace: float32 scratch of
// norm_bwd_workspace_floats(rows, H) elements (partial column sums), or nullptr when neither
// dgamma nor dbeta is wanted.
int64_t norm_bwd_workspace_floats(int64_t rows, int64_t H);
void norm_bwd(const void* dy, const void* dsum, const void* xin, const float* gamma,
              const float* mean, const float* rstd, void* dx, float* dgamma, float* dbeta,
              float* workspace, int64_t rows, int64_t H, bool rms, DType dt, cudaStream_t stream);

void softmax_fwd(const void* scores, const bool* mask, const int64_t* mask_strides, void* probs,
                 int64_t b, int64_t h, int64_t sq, int64_t sk, float scale, bool causal, DType dt,
                 cudaStream_t stream);
void softmax_bwd(const void* dprobs, const void* probs, void* dscores, int64_t b, int64_t h,
                 int64_t sq, int64_t sk, float scale, bool causal, DType dt, cudaStream_t stream);

void bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t H, DType dt,
                   cudaStream_t stream);
// dx only; the glue sums dx over rows for the bias gradient.
void bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, int64_t rows,
                   int64_t H, DType dt, cudaStream_t stream);

void quantize_rowwise(const void* x, int8_t* q, float* scale, int64_t rows, int64_t K, DType dt,
                      cudaStream_t stream);

// Dequantization epilogue for an int32 product acc [M, N] (from the tensor-core GEMM):
// out = float(acc) * xs[m] * ws[n] + bias[n], stored as out_dt.
void int8_dequant_epilogue(const int32_t* acc, const float* xs, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, DType out_dt, cudaStream_t stream);
// Whole W8A8 GEMM on CUDA cores for shapes the tensor-core path does not take (tiny or
// unaligned). Same semantics as megapre::cpu::int8_gemm.
void int8_gemm_simt(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                    const float* bias, void* out, int64_t M, int64_t N, int64_t K, DType out_dt,
                    cudaStream_t stream);

// Weight-only int8 for small M (M <= 16): one pass over the weights, x kept on chip.
void weight_only_int8_gemv(const void* x, const int8_t* w, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, int64_t K, DType dt,
                           cudaStream_t stream);
// w_out[n, k] = w[n, k] * ws[n] as dtype dt (large-M weight-only path: dequantize, then GEMM).
void dequantize_rowwise(const int8_t* w, const float* ws, void* w_out, int64_t N, int64_t K,
                        DType dt, cudaStream_t stream);

}  // namespace megapre::cuda
