// AVX2/FMA/F16C rows for bias + GELU (see kernels.h for the semantics). Eight elements per
// step; a row's last n % 8 elements go through the same code via zero-padded copies, so every
// element gets identical arithmetic. exp is a degree-7 polynomial after range reduction by
// ln 2 (relative error ~1e-7), which is what makes this faster than a libm/Sleef tanh.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dtype.h"
#include "gelu_impl.h"
#include "vec_avx2.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace megapre::cpu::gelu_impl {
namespace {

using namespace avx2;  // V8: 8 elements of each dtype <-> fp32

// ---- math --------------------------------------------------------------------------------
// e^t for t in [-87, 88] (clamped); inputs above 88 are handled by the caller.
__m256 exp8(__m256 t) {
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = t - n ln2 in two steps (ln2 split into a short high part and the rest)
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), t);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// s = sigmoid(2u), u = sqrt(2/pi) v (1 + 0.044715 v^2); du = du/dv when wanted. s is 0 where
// e^{-2u} overflows (v -> -inf), as 1 / (1 + inf) in the scalar code.
__m256 sigmoid2u(__m256 v, __m256* du) {
  const __m256 k = _mm256_set1_ps(0.7978845608028654f);
  const __m256 c = _mm256_set1_ps(0.044715f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 v2 = _mm256_mul_ps(v, v);
  const __m256 u = _mm256_mul_ps(_mm256_mul_ps(k, v), _mm256_fmadd_ps(c, v2, one));
  if (du) *du = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_set1_ps(3.0f * 0.044715f), v2, one));
  const __m256 t = _mm256_mul_ps(_mm256_set1_ps(-2.0f), u);
  const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(t)));
  return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(88.0f), _CMP_GT_OQ), s);
}

__m256 load_bias(const float* bias) {
  return bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
}

template <DType D> void fwd8(const typename V8<D>::T* x, const float* bias, typename V8<D>::T* y) {
  const __m256 v = _mm256_add_ps(V8<D>::load(x), load_bias(bias));
  V8<D>::store(y, _mm256_mul_ps(v, sigmoid2u(v, nullptr)));
}

template <DType D>
void bwd8(const typename V8<D>::T* dy, const typename V8<D>::T* x, const float* bias,
          typename V8<D>::T* dx, float* colsum) {
  const __m256 v = _mm256_add_ps(V8<D>::load(x), load_bias(bias));
  __m256 du;
  const __m256 s = sigmoid2u(v, &du);
  // gelu'(v) = s + 2 v s (1 - s) du
  const __m256 one_minus = _mm256_sub_ps(_mm256_set1_ps(1.0f), s);
  const __m256 slope = _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(v, v), s),
                                     _mm256_mul_ps(one_minus, du));
  const __m256 stored = V8<D>::store(dx, _mm256_mul_ps(V8<D>::load(dy), _mm256_add_ps(s, slope)));
  if (colsum) _mm256_storeu_ps(colsum, _mm256_add_ps(_mm256_loadu_ps(colsum), stored));
}

template <DType D> void fwd_row(const void* x_, const float* bias, void* y_, int64_t n) {
  using T = typename V8<D>::T;
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) fwd8<D>(x + i, bias ? bias + i : nullptr, y + i);
  if (i == n) return;
  const int64_t k = n - i;
  T xt[8] = {}, yt[8];
  float bt[8] = {};
  std::memcpy(xt, x + i, k * sizeof(T));
  if (bias) std::memcpy(bt, bias + i, k * sizeof(float));
  fwd8<D>(xt, bt, yt);
  std::memcpy(y + i, yt, k * sizeof(T));
}

template <DType D>
void bwd_row(const void* dy_, const void* x_, const float* bias, void* dx_, float* colsum,
             int64_t n) {
  using T = typename V8<D>::T;
  const T* dy = static_cast<const T*>(dy_);
  const T* x = static_cast<const T*>(x_);
  T* dx = static_cast<T*>(dx_);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    bwd8<D>(dy + i, x + i, bias ? bias + i : nullptr, dx + i, colsum ? colsum + i : nullptr);
  }
  if (i == n) return;
  const int64_t k = n - i;
  T dyt[8] = {}, xt[8] = {}, dxt[8];
  float bt[8] = {}, ct[8] = {};
  std::memcpy(dyt, dy + i, k * sizeof(T));
  std::memcpy(xt, x + i, k * sizeof(T));
  if (bias) std::memcpy(bt, bias + i, k * sizeof(float));
  if (colsum) std::memcpy(ct, colsum + i, k * sizeof(float));
  bwd8<D>(dyt, xt, bt, dxt, colsum ? ct : nullptr);
  std::memcpy(dx + i, dxt, k * sizeof(T));
  if (colsum) std::memcpy(colsum + i, ct, k * sizeof(float));
}

}  // namespace

void fwd_row_avx2(const void* x, const float* bias, void* y, int64_t n, DType dt) {
  with_dtype(dt, [&](auto d) { fwd_row<decltype(d)::value>(x, bias, y, n); });
}

void bwd_row_avx2(const void* dy, const void* x, const float* bias, void* dx, float* colsum,
                  int64_t n, DType dt) {
  with_dtype(dt, [&](auto d) { bwd_row<decltype(d)::value>(dy, x, bias, dx, colsum, n); });
}

}  // namespace megapre::cpu::gelu_impl

#pragma GCC pop_options
