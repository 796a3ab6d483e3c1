// Private interface between the bias-GELU dispatcher (gelu.cpp, portable flags) and its AVX2
// rows (gelu_avx2.cpp, compiled under a target pragma). Plain types only, so no AVX2 code can
// leak into the portable translation unit.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace megapre::cpu::gelu_impl {

// y[0..n) = gelu(x + bias) for one row (bias: n floats or nullptr).
void fwd_row_avx2(const void* x, const float* bias, void* y, int64_t n, DType dt);

// dx[0..n) = dy * gelu'(x + bias) for one row; when colsum is not null, the stored dx values
// are added into colsum[0..n) (float32).
void bwd_row_avx2(const void* dy, const void* x, const float* bias, void* dx, float* colsum,
                  int64_t n, DType dt);

}  // namespace megapre::cpu::gelu_impl
