// LayerNorm / RMSNorm CPU kernels: argument normalization, threading over rows, the portable
// scalar row functions, and the dgamma/dbeta reduction. The AVX2 row functions live in
// layer_norm_avx2.cpp (see layer_norm_impl.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "dtype.h"
#include "kernels.h"
#include "layer_norm_impl.h"

namespace megapre::cpu {
namespace norm_detail {
namespace {

// Outputs larger than this are written with non-temporal stores: they cannot stay in the
// caches anyway, and streaming skips the read-for-ownership of every output line.
constexpr int64_t kStreamBytes = int64_t{8} << 20;
// Rows per task are chosen so each task touches at least this many elements.
constexpr int64_t kGrainElems = int64_t{1} << 15;

int64_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// Scalar rows. Eight interleaved partial sums keep the reduction order close to the AVX2
// path and limit rounding-error growth on long rows.
template <DType D>
void fwd_rows_scalar(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  using E = Elem<D>;
  using T = typename E::T;
  const int64_t H = a.H;
  const float inv_h = 1.0f / static_cast<float>(H);
  T* sbuf = static_cast<T*>(scratch);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * H;
    T* y = static_cast<T*>(a.y) + r * H;
    const T* src = x;
    if (a.residual) {  // rounded sum s = x + residual
      const T* res = static_cast<const T*>(a.residual) + r * H;
      for (int64_t i = 0; i < H; ++i) E::store(sbuf, i, E::load(x, i) + E::load(res, i));
      src = sbuf;
    }
    float part[8] = {};
    for (int64_t i = 0; i < H; ++i) {
      float v = E::load(src, i);
      part[i & 7] += a.rms ? v * v : v;
    }
    float total = 0.0f;
    for (float p : part) total += p;
    float mu = 0.0f, var = total * inv_h;
    if (!a.rms) {  // centered second pass
      mu = total * inv_h;
      float sq[8] = {}, dev[8] = {};
      for (int64_t i = 0; i < H; ++i) {
        float d = E::load(src, i) - mu;
        dev[i & 7] += d;
        sq[i & 7] += d * d;
      }
      float sd = 0.0f, ss = 0.0f;
      for (int k = 0; k < 8; ++k) { sd += dev[k]; ss += sq[k]; }
      mu += sd * inv_h;  // refined mean, see layer_norm_avx2.cpp
      var = std::max((ss - sd * sd * inv_h) * inv_h, 0.0f);
    }
    const float rs = 1.0f / std::sqrt(var + a.eps);
    if (a.mean) a.mean[r] = mu;
    if (a.rstd) a.rstd[r] = rs;
    for (int64_t i = 0; i < H; ++i) {
      float t = (E::load(src, i) - mu) * rs;
      E::store(y, i, t * a.gamma[i] + a.beta[i]);
    }
    if (a.residual) std::memcpy(static_cast<T*>(a.sum_out) + r * H, sbuf, H * sizeof(T));
  }
}

template <DType D>
void bwd_rows_scalar(const BwdArgs& a, int64_t r0, int64_t r1, float* dg, float* db) {
  using E = Elem<D>;
  using T = typename E::T;
  const int64_t H = a.H;
  const float inv_h = 1.0f / static_cast<float>(H);
  for (int64_t r = r0; r < r1; ++r) {
    const T* dy = static_cast<const T*>(a.dy) + r * H;
    const T* x = static_cast<const T*>(a.xin) + r * H;
    T* dx = static_cast<T*>(a.dx) + r * H;
    const T* ds = a.dsum ? static_cast<const T*>(a.dsum) + r * H : nullptr;
    const float mu = a.rms ? 0.0f : a.mean[r];
    const float rs = a.rstd[r];
    float sg[8] = {}, sgx[8] = {};
    for (int64_t i = 0; i < H; ++i) {
      const float d = E::load(dy, i);
      const float xh = (E::load(x, i) - mu) * rs;
      const float g = d * a.gamma[i];
      sg[i & 7] += g;
      sgx[i & 7] += g * xh;
      if (dg) dg[i] += d * xh;
      if (db) db[i] += d;
    }
    float tg = 0.0f, tgx = 0.0f;
    for (int k = 0; k < 8; ++k) { tg += sg[k]; tgx += sgx[k]; }
    const float mg = a.rms ? 0.0f : tg * inv_h;
    const float mgx = tgx * inv_h;
    for (int64_t i = 0; i < H; ++i) {
      const float xh = (E::load(x, i) - mu) * rs;
      const float g = E::load(dy, i) * a.gamma[i];
      float v = rs * (g - mg - xh * mgx);
      if (ds) v += E::load(ds, i);
      E::store(dx, i, v);
    }
  }
}

void fwd_rows(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch, bool avx2) {
  if (avx2) return fwd_rows_avx2(a, r0, r1, scratch);
  with_dtype(a.dt, [&](auto d) { fwd_rows_scalar<decltype(d)::value>(a, r0, r1, scratch); });
}

void bwd_rows(const BwdArgs& a, int64_t r0, int64_t r1, float* dg, float* db, bool avx2) {
  if (avx2) return bwd_rows_avx2(a, r0, r1, dg, db);
  with_dtype(a.dt, [&](auto d) { bwd_rows_scalar<decltype(d)::value>(a, r0, r1, dg, db); });
}

}  // namespace
}  // namespace norm_detail

void norm_fwd(const void* x, const void* residual, void* y, void* sum_out, const float* gamma,
              const float* beta, float* mean, float* rstd, int64_t rows, int64_t H, float eps,
              bool rms, DType dt) {
  using namespace norm_detail;
  if (rows <= 0 || H <= 0) return;  // the glue fills the statistics of empty rows (NaN)
  const bool avx2 = use_avx2();
  // gamma / beta in the row code's column order, padded, with ones / zeros when absent.
  const int64_t Hp = padded_h(H);
  std::unique_ptr<float[]> params(new float[2 * Hp]());
  float* gl = params.get();
  float* bl = gl + Hp;
  bool affine_finite = true;
  for (int64_t h = 0; h < H; ++h) {
    const int64_t k = layout_index(h, dt, avx2);
    gl[k] = gamma ? gamma[h] : 1.0f;
    bl[k] = beta ? beta[h] : 0.0f;
    affine_finite = affine_finite && std::isfinite(gl[k]) && std::isfinite(bl[k]);
  }
  const int64_t esz = elem_size(dt);
  FwdArgs a{x, residual, y, sum_out, gl, bl, mean, rstd, H, eps, rms, affine_finite,
            rows * H * esz >= kStreamBytes, dt};
  const int64_t grain = std::max<int64_t>(1, kGrainElems / H);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<char[]> scratch;
    if (residual) scratch.reset(new char[Hp * esz]);
    fwd_rows(a, r0, r1, scratch.get(), avx2);
  });
}

void norm_bwd(const void* dy, const void* dsum, const void* xin, const float* gamma,
              const float* mean, const float* rstd, void* dx, float* dgamma, float* dbeta,
              int64_t rows, int64_t H, bool rms, DType dt) {
  using namespace norm_detail;
  if (H <= 0) return;
  if (rows <= 0) {  // column sums over no rows
    if (dgamma) std::fill(dgamma, dgamma + H, 0.0f);
    if (dbeta) std::fill(dbeta, dbeta + H, 0.0f);
    return;
  }
  const bool avx2 = use_avx2();
  const int64_t Hp = padded_h(H);
  std::unique_ptr<float[]> gl(new float[Hp]());
  for (int64_t h = 0; h < H; ++h) gl[layout_index(h, dt, avx2)] = gamma ? gamma[h] : 1.0f;
  const int64_t esz = elem_size(dt);
  BwdArgs a{dy, dsum, xin, gl.get(), mean, rstd, dx, H, rms,
            rows * H * esz >= kStreamBytes, dt};

  // Fixed row blocks, one per thread: block c owns rows [c*rows/n, (c+1)*rows/n) and its own
  // fp32 dgamma/dbeta partials (layout order), which are then summed in block order. The
  // result depends only on n (thread count and problem size), not on scheduling.
  const int64_t min_rows = std::max<int64_t>(1, kGrainElems / H);
  const int64_t n = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (rows + min_rows - 1) / min_rows));
  const bool grads = dgamma || dbeta;
  // Layout: [block][dgamma | dbeta][Hp]; each block zeroes its own slices (first touch).
  std::unique_ptr<float[]> part;
  if (grads) part.reset(new float[static_cast<size_t>(n) * 2 * Hp]);
  auto slice = [&](int64_t c, int which) { return part.get() + (2 * c + which) * Hp; };
  at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* dg = dgamma ? slice(c, 0) : nullptr;
      float* db = dbeta ? slice(c, 1) : nullptr;
      if (dg) std::fill(dg, dg + Hp, 0.0f);
      if (db) std::fill(db, db + Hp, 0.0f);
      bwd_rows(a, c * rows / n, (c + 1) * rows / n, dg, db, avx2);
    }
  });
  if (!grads) return;
  at::parallel_for(0, H, 4096, [&](int64_t h0, int64_t h1) {
    auto column_sum = [&](float* out, int which) {
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t k = layout_index(h, dt, avx2);
        float s = 0.0f;
        for (int64_t c = 0; c < n; ++c) s += slice(c, which)[k];
        out[h] = s;
      }
    };
    if (dgamma) column_sum(dgamma, 0);
    if (dbeta) column_sum(dbeta, 1);
  });
}

}  // namespace megapre::cpu
