// Private interface between layer_norm.cpp (dispatch, threading, scalar path) and
// layer_norm_avx2.cpp (AVX2 row functions). Plain data and portable inline helpers only: no
// intrinsics, no ATen (the AVX2 TU includes this before its target pragma).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace megapre::cpu::norm_detail {

// The AVX2 code works on blocks of 16 elements. For bf16 a block is held as two fp32 vectors
// [even elements | odd elements], which makes the bf16 <-> fp32 conversion a shift and a mask
// (no cross-lane shuffles). Per-column float32 arrays (gamma, beta, dgamma/dbeta partials) are
// kept in the same order, padded with zeros to a whole number of blocks.
inline int64_t padded_h(int64_t H) { return (H + 15) & ~int64_t{15}; }
inline int64_t layout_index(int64_t h, DType dt, bool avx2) {
  if (!avx2 || dt != DType::BF16) return h;
  const int64_t j = h & 15;
  return (h & ~int64_t{15}) + ((j & 1) ? 8 : 0) + (j >> 1);
}

// Forward over a block of rows. gamma and beta are never null here: padded_h(H) floats in
// layout order (the dispatcher substitutes ones / zeros). mean and rstd may be null (not
// stored). affine_finite: gamma and beta hold no inf/NaN. stream: use non-temporal stores for
// y and sum_out on rows whose output pointers are 32-byte aligned (set for tensors far larger
// than the caches, where write-allocate would double the write traffic).
struct FwdArgs {
  const void* x;
  const void* residual;  // nullptr: no fused add
  void* y;
  void* sum_out;
  const float* gamma;
  const float* beta;
  float* mean;
  float* rstd;
  int64_t H;
  float eps;
  bool rms;
  bool affine_finite;
  bool stream;
  DType dt;
};

// Backward over a block of rows. gamma: padded_h(H) floats in layout order, never null.
// dgamma_part / dbeta_part given to the row functions are the block's private fp32
// accumulators (padded_h(H), layout order, zero on entry; nullptr: not wanted).
struct BwdArgs {
  const void* dy;
  const void* dsum;  // nullptr: nothing to add into dx
  const void* xin;
  const float* gamma;
  const float* mean;  // unused when rms
  const float* rstd;
  void* dx;
  int64_t H;
  bool rms;
  bool stream;
  DType dt;
};

// Rows [r0, r1). scratch: padded_h(H) elements of dt, holding the rounded sum when a residual
// is fused (the row is then normalized from cache and sum_out can be streamed).
void fwd_rows_avx2(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch);
void bwd_rows_avx2(const BwdArgs& a, int64_t r0, int64_t r1, float* dgamma_part,
                   float* dbeta_part);

}  // namespace megapre::cpu::norm_detail
