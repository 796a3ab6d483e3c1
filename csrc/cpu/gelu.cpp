// Bias + GELU (tanh approximation) CPU kernels: threading over blocks of rows, the portable
// scalar rows, and the dbias reduction. The AVX2 rows live in gelu_avx2.cpp (gelu_impl.h).
// Semantics: csrc/cpu/kernels.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dtype.h"
#include "gelu_impl.h"
#include "kernels.h"

namespace megapre::cpu {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
// A block of rows covers at least this many elements (worth a thread hand-off) ...
constexpr int64_t kGrainElems = int64_t{1} << 15;
// ... and there are at most this many blocks, which bounds the dbias partial sums to
// kMaxBlocks * H floats. Blocks depend only on the shape, never on the thread count.
constexpr int64_t kMaxBlocks = 64;

// sigmoid(2u) with u = sqrt(2/pi) (v + 0.044715 v^3); exp overflow gives 0 (v -> -inf).
inline float sigmoid2u(float v, float* du_dv) {
  const float v2 = v * v;
  const float u = kSqrt2OverPi * v * (1.0f + kCubic * v2);
  if (du_dv) *du_dv = kSqrt2OverPi * (1.0f + 3.0f * kCubic * v2);
  return 1.0f / (1.0f + std::exp(-2.0f * u));
}

template <DType D>
void fwd_row_scalar(const void* x_, const float* bias, void* y_, int64_t n) {
  using E = Elem<D>;
  const auto* x = static_cast<const typename E::T*>(x_);
  auto* y = static_cast<typename E::T*>(y_);
  for (int64_t i = 0; i < n; ++i) {
    const float v = E::load(x, i) + (bias ? bias[i] : 0.0f);
    E::store(y, i, v * sigmoid2u(v, nullptr));
  }
}

template <DType D>
void bwd_row_scalar(const void* dy_, const void* x_, const float* bias, void* dx_, float* colsum,
                    int64_t n) {
  using E = Elem<D>;
  using T = typename E::T;
  const T* dy = static_cast<const T*>(dy_);
  const T* x = static_cast<const T*>(x_);
  T* dx = static_cast<T*>(dx_);
  for (int64_t i = 0; i < n; ++i) {
    const float v = E::load(x, i) + (bias ? bias[i] : 0.0f);
    float du;
    const float s = sigmoid2u(v, &du);
    E::store(dx, i, E::load(dy, i) * (s + 2.0f * v * s * (1.0f - s) * du));
    if (colsum) colsum[i] += E::load(dx, i);
  }
}

using FwdRow = void (*)(const void*, const float*, void*, int64_t);
using BwdRow = void (*)(const void*, const void*, const float*, void*, float*, int64_t);

FwdRow pick_fwd(DType dt) {
  return with_dtype(dt, [](auto d) -> FwdRow { return fwd_row_scalar<decltype(d)::value>; });
}

BwdRow pick_bwd(DType dt) {
  return with_dtype(dt, [](auto d) -> BwdRow { return bwd_row_scalar<decltype(d)::value>; });
}

int64_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

int64_t rows_per_block(int64_t rows, int64_t H) {
  const int64_t by_grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1));
  const int64_t by_count = (rows + kMaxBlocks - 1) / kMaxBlocks;
  return std::max(by_grain, by_count);
}

}  // namespace

void bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t H, DType dt) {
  if (rows <= 0 || H <= 0) return;
  const bool vec = use_avx2();
  const FwdRow scalar = pick_fwd(dt);
  const int64_t es = elem_size(dt);
  const int64_t rpb = rows_per_block(rows, H);
  const int64_t blocks = (rows + rpb - 1) / rpb;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t r = b0 * rpb; r < std::min(rows, b1 * rpb); ++r) {
      const auto* xr = static_cast<const char*>(x) + r * H * es;
      auto* yr = static_cast<char*>(y) + r * H * es;
      if (vec) {
        gelu_impl::fwd_row_avx2(xr, bias, yr, H, dt);
      } else {
        scalar(xr, bias, yr, H);
      }
    }
  });
}

void bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                   int64_t rows, int64_t H, DType dt) {
  if (H <= 0) return;
  if (dbias) std::fill(dbias, dbias + H, 0.0f);
  if (rows <= 0) return;
  const bool vec = use_avx2();
  const BwdRow scalar = pick_bwd(dt);
  const int64_t es = elem_size(dt);
  const int64_t rpb = rows_per_block(rows, H);
  const int64_t blocks = (rows + rpb - 1) / rpb;
  // One float32 partial row per block; each block zeroes and fills its own.
  std::vector<float> partial(dbias ? static_cast<size_t>(blocks * H) : 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* colsum = dbias ? partial.data() + b * H : nullptr;
      for (int64_t r = b * rpb; r < std::min(rows, (b + 1) * rpb); ++r) {
        const int64_t off = r * H * es;
        const auto* dyr = static_cast<const char*>(dy) + off;
        const auto* xr = static_cast<const char*>(x) + off;
        auto* dxr = static_cast<char*>(dx) + off;
        if (vec) {
          gelu_impl::bwd_row_avx2(dyr, xr, bias, dxr, colsum, H, dt);
        } else {
          scalar(dyr, xr, bias, dxr, colsum, H);
        }
      }
    }
  });
  if (!dbias) return;
  at::parallel_for(0, H, 1024, [&](int64_t h0, int64_t h1) {
    for (int64_t b = 0; b < blocks; ++b) {  // block order: deterministic
      const float* p = partial.data() + b * H;
      for (int64_t h = h0; h < h1; ++h) dbias[h] += p[h];
    }
  });
}

}  // namespace megapre::cpu
