// Private interface between layer_norm.cpp (dispatch, threading, scalar path) and
// layer_norm_avx2.cpp (AVX2 row functions). Plain data only: no intrinsics, no ATen.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace megapre::cpu::norm_detail {

// Forward over a block of rows. gamma and beta are never null here (the dispatcher substitutes
// ones / zeros), mean and rstd may be null (not stored). stream: use non-temporal stores for y
// and sum_out on rows whose output pointers are vector aligned (set for tensors far larger
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
  bool stream;
  DType dt;
};

// Backward over a block of rows. gamma is never null here. dgamma_part / dbeta_part passed to
// the row functions are this block's private fp32 [H] accumulators (nullptr: not wanted).
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

// Rows [r0, r1). scratch: room for H elements of dt, used to hold the rounded sum when a
// residual is fused (so the row is normalized from cache and sum_out can be streamed).
void fwd_rows_avx2(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch);
void bwd_rows_avx2(const BwdArgs& a, int64_t r0, int64_t r1, float* dgamma_part,
                   float* dbeta_part);

}  // namespace megapre::cpu::norm_detail
