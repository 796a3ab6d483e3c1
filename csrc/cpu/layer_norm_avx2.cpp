// AVX2/FMA/F16C row functions for LayerNorm / RMSNorm (see kernels.h for the semantics).
// Each row is read from memory once: the first pass pulls it into L1/L2 and the remaining
// passes (variance, output) re-read it from cache. Outputs may be streamed (layer_norm_impl.h).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "layer_norm_impl.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace megapre::cpu::norm_detail {
namespace {

// 8 lanes of dtype D <-> 8 fp32 lanes. pack/unpack convert between fp32 and the raw storage
// vector (bit-exact with dtype.h: round to nearest even, NaN stays a quiet NaN).
template <DType D> struct Vec;

template <> struct Vec<DType::F32> {
  using T = float;
  using Raw = __m256;
  static constexpr int kAlign = 32;
  static Raw load_raw(const T* p) { return _mm256_loadu_ps(p); }
  static void store_raw(T* p, Raw v) { _mm256_storeu_ps(p, v); }
  static void stream_raw(T* p, Raw v) { _mm256_stream_ps(p, v); }
  static __m256 unpack(Raw v) { return v; }
  static Raw pack(__m256 v) { return v; }
};

template <> struct Vec<DType::F16> {
  using T = uint16_t;
  using Raw = __m128i;
  static constexpr int kAlign = 16;
  static Raw load_raw(const T* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static void store_raw(T* p, Raw v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  static void stream_raw(T* p, Raw v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), v); }
  static __m256 unpack(Raw v) { return _mm256_cvtph_ps(v); }
  static Raw pack(__m256 v) {
    __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // The hardware keeps NaN payload bits; dtype.h returns the canonical sign|0x7e00.
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
    return _mm_andnot_si128(_mm_and_si128(nan16, _mm_set1_epi16(0x01ff)), h);
  }
};

template <> struct Vec<DType::BF16> {
  using T = uint16_t;
  using Raw = __m128i;
  static constexpr int kAlign = 16;
  static Raw load_raw(const T* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static void store_raw(T* p, Raw v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  static void stream_raw(T* p, Raw v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), v); }
  static __m256 unpack(Raw v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  static Raw pack(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    r = _mm256_blendv_epi8(r, quiet_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    r = _mm256_srli_epi32(r, 16);
    // packus works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7] -> reorder the quads.
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(r);
  }
};

template <DType D> __m256 load(const typename Vec<D>::T* p) {
  return Vec<D>::unpack(Vec<D>::load_raw(p));
}
template <DType D> void store(typename Vec<D>::T* p, __m256 v, bool nt) {
  if (nt) Vec<D>::stream_raw(p, Vec<D>::pack(v));
  else Vec<D>::store_raw(p, Vec<D>::pack(v));
}
// Partial vectors for the last H % 8 elements: zero padded on load.
template <class T> void load_partial(T* buf8, const T* p, int n) {
  std::memset(buf8, 0, 8 * sizeof(T));
  std::memcpy(buf8, p, n * sizeof(T));
}
template <DType D> __m256 load_n(const typename Vec<D>::T* p, int n) {
  alignas(32) typename Vec<D>::T buf[8];
  load_partial(buf, p, n);
  return load<D>(buf);
}
template <DType D> void store_n(typename Vec<D>::T* p, int n, __m256 v) {
  alignas(32) typename Vec<D>::T buf[8];
  store<D>(buf, v, false);
  std::memcpy(p, buf, n * sizeof(buf[0]));
}
__m256 lane_mask(int n) {  // first n lanes all-ones
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class P> bool aligned(const P* p, int a) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(a - 1)) == 0;
}

// Calls body(i, lane) for every full vector i, lane = i / 8 % 4 as a compile-time constant
// (4 independent accumulators, so reductions over a cached row are not bound by FMA latency).
// Returns where the remainder starts.
template <int U> using Lane = std::integral_constant<int, U>;
template <class Body> int64_t for_vectors(int64_t H, Body&& body) {
  int64_t i = 0;
  for (; i + 32 <= H; i += 32) {
    body(i, Lane<0>{});
    body(i + 8, Lane<1>{});
    body(i + 16, Lane<2>{});
    body(i + 24, Lane<3>{});
  }
  for (; i + 8 <= H; i += 8) body(i, Lane<0>{});
  return i;
}
float reduce(__m256 acc[4]) {
  return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}
void zero(__m256 acc[4]) {
  for (int k = 0; k < 4; ++k) acc[k] = _mm256_setzero_ps();
}

template <DType D, bool kRms, bool kRes>
void fwd_rows(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  using T = typename Vec<D>::T;
  const int64_t H = a.H;
  const int64_t Hv = H & ~int64_t{7};
  const int tail = static_cast<int>(H - Hv);
  const float inv_h = 1.0f / static_cast<float>(H);
  T* sbuf = static_cast<T*>(scratch);
  bool any_nt = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * H;
    T* y = static_cast<T*>(a.y) + r * H;
    const T* src = x;  // the row being normalized (x, or the rounded sum in sbuf)
    __m256 acc[4];
    zero(acc);
    // Pass 1: sum (LayerNorm) or sum of squares (RMSNorm); forms the rounded sum if fused.
    auto accumulate = [](__m256 v, __m256& ac) {
      ac = kRms ? _mm256_fmadd_ps(v, v, ac) : _mm256_add_ps(ac, v);
    };
    if constexpr (kRes) {
      const T* res = static_cast<const T*>(a.residual) + r * H;
      for_vectors(H, [&](int64_t i, auto u) {
        auto raw = Vec<D>::pack(_mm256_add_ps(load<D>(x + i), load<D>(res + i)));
        Vec<D>::store_raw(sbuf + i, raw);
        accumulate(Vec<D>::unpack(raw), acc[u]);
      });
      if (tail) {  // padding lanes are 0 + 0 and add nothing
        __m256 s = _mm256_add_ps(load_n<D>(x + Hv, tail), load_n<D>(res + Hv, tail));
        store_n<D>(sbuf + Hv, tail, s);
        accumulate(load_n<D>(sbuf + Hv, tail), acc[1]);
      }
      src = sbuf;
    } else {
      for_vectors(H, [&](int64_t i, auto u) { accumulate(load<D>(x + i), acc[u]); });
      if (tail) accumulate(load_n<D>(x + Hv, tail), acc[1]);
    }
    float mu = 0.0f, var;
    if constexpr (kRms) {
      var = reduce(acc) * inv_h;
    } else {
      // Pass 2 (from cache): centered sum of squares and sum of deviations.
      mu = reduce(acc) * inv_h;
      const __m256 vmu = _mm256_set1_ps(mu);
      __m256 dev[4];
      zero(acc);
      zero(dev);
      for_vectors(H, [&](int64_t i, auto u) {
        __m256 d = _mm256_sub_ps(load<D>(src + i), vmu);
        dev[u] = _mm256_add_ps(dev[u], d);
        acc[u] = _mm256_fmadd_ps(d, d, acc[u]);
      });
      if (tail) {
        __m256 d = _mm256_and_ps(_mm256_sub_ps(load_n<D>(src + Hv, tail), vmu), lane_mask(tail));
        dev[1] = _mm256_add_ps(dev[1], d);
        acc[1] = _mm256_fmadd_ps(d, d, acc[1]);
      }
      // The deviations' sum is small and accurate: it refines the mean (fp32 sums of large
      // offsets lose digits) and corrects the variance to be taken around the refined mean.
      const float sd = reduce(dev);
      mu += sd * inv_h;
      var = (reduce(acc) - sd * sd * inv_h) * inv_h;
      if (var < 0.0f) var = 0.0f;
    }
    const float rs = 1.0f / std::sqrt(var + a.eps);
    if (a.mean) a.mean[r] = mu;
    if (a.rstd) a.rstd[r] = rs;

    // Pass 3: y = (s - mean) * rstd * gamma + beta, and copy the sum out next to it.
    T* so = kRes ? static_cast<T*>(a.sum_out) + r * H : nullptr;
    const bool nt = a.stream && aligned(y, Vec<D>::kAlign) && (!kRes || aligned(so, Vec<D>::kAlign));
    any_nt |= nt;
    const __m256 vmu = _mm256_set1_ps(mu), vrs = _mm256_set1_ps(rs);
    auto out = [&](__m256 v, int64_t i) {
      __m256 t = kRms ? _mm256_mul_ps(v, vrs) : _mm256_mul_ps(_mm256_sub_ps(v, vmu), vrs);
      return _mm256_fmadd_ps(t, _mm256_loadu_ps(a.gamma + i), _mm256_loadu_ps(a.beta + i));
    };
    for (int64_t i = 0; i < Hv; i += 8) {
      auto raw = Vec<D>::load_raw(src + i);
      store<D>(y + i, out(Vec<D>::unpack(raw), i), nt);
      if constexpr (kRes) {
        if (nt) Vec<D>::stream_raw(so + i, raw);
        else Vec<D>::store_raw(so + i, raw);
      }
    }
    if (tail) {
      alignas(32) float g[8] = {}, b[8] = {};
      std::memcpy(g, a.gamma + Hv, tail * sizeof(float));
      std::memcpy(b, a.beta + Hv, tail * sizeof(float));
      __m256 t = load_n<D>(src + Hv, tail);
      t = kRms ? _mm256_mul_ps(t, vrs) : _mm256_mul_ps(_mm256_sub_ps(t, vmu), vrs);
      store_n<D>(y + Hv, tail, _mm256_fmadd_ps(t, _mm256_load_ps(g), _mm256_load_ps(b)));
      if constexpr (kRes) std::memcpy(so + Hv, src + Hv, tail * sizeof(T));
    }
  }
  if (any_nt) _mm_sfence();  // make streamed stores visible before the threads join
}

template <DType D, bool kRms, bool kDsum, bool kDg, bool kDb>
void bwd_rows(const BwdArgs& a, int64_t r0, int64_t r1, float* dg, float* db) {
  using T = typename Vec<D>::T;
  const int64_t H = a.H;
  const int64_t Hv = H & ~int64_t{7};
  const int tail = static_cast<int>(H - Hv);
  const float inv_h = 1.0f / static_cast<float>(H);
  const float* gamma = a.gamma;
  // The tail is handled in 8-wide scratch copies so it shares the vector code exactly.
  alignas(32) float gt[8] = {}, dgt[8] = {}, dbt[8] = {};
  if (tail) std::memcpy(gt, gamma + Hv, tail * sizeof(float));
  bool any_nt = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* dy = static_cast<const T*>(a.dy) + r * H;
    const T* x = static_cast<const T*>(a.xin) + r * H;
    T* dx = static_cast<T*>(a.dx) + r * H;
    const __m256 vmu = _mm256_set1_ps(kRms ? 0.0f : a.mean[r]);
    const __m256 vrs = _mm256_set1_ps(a.rstd[r]);
    auto xhat = [&](__m256 xv) {
      return kRms ? _mm256_mul_ps(xv, vrs) : _mm256_mul_ps(_mm256_sub_ps(xv, vmu), vrs);
    };
    // Pass 1: sum(g), sum(g * xhat) with g = dy * gamma; this block's dgamma/dbeta partials.
    __m256 sg[4], sgx[4];
    zero(sg);
    zero(sgx);
    auto pass1 = [&](__m256 dyv, __m256 xh, const float* gp, float* dgp, float* dbp, auto u) {
      __m256 g = _mm256_mul_ps(dyv, _mm256_loadu_ps(gp));
      if constexpr (!kRms) sg[u] = _mm256_add_ps(sg[u], g);
      sgx[u] = _mm256_fmadd_ps(g, xh, sgx[u]);
      if constexpr (kDg) _mm256_storeu_ps(dgp, _mm256_fmadd_ps(dyv, xh, _mm256_loadu_ps(dgp)));
      if constexpr (kDb) _mm256_storeu_ps(dbp, _mm256_add_ps(dyv, _mm256_loadu_ps(dbp)));
    };
    for_vectors(H, [&](int64_t i, auto u) {
      pass1(load<D>(dy + i), xhat(load<D>(x + i)), gamma + i, dg + i, db + i, u);
    });
    if (tail) {  // padded dy lanes are 0, so they add nothing
      if constexpr (kDg) std::memcpy(dgt, dg + Hv, tail * sizeof(float));
      if constexpr (kDb) std::memcpy(dbt, db + Hv, tail * sizeof(float));
      pass1(load_n<D>(dy + Hv, tail), xhat(load_n<D>(x + Hv, tail)), gt, dgt, dbt, Lane<1>{});
      if constexpr (kDg) std::memcpy(dg + Hv, dgt, tail * sizeof(float));
      if constexpr (kDb) std::memcpy(db + Hv, dbt, tail * sizeof(float));
    }
    const float rs = a.rstd[r];
    const float mg = kRms ? 0.0f : reduce(sg) * inv_h;
    const float mgx = reduce(sgx) * inv_h;
    // Pass 2 (from cache): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ dsum].
    const __m256 cx = _mm256_set1_ps(-rs * mgx), c0 = _mm256_set1_ps(-rs * mg);
    const T* ds = kDsum ? static_cast<const T*>(a.dsum) + r * H : nullptr;
    auto dxv = [&](__m256 dyv, __m256 xv, __m256 gv) {
      __m256 g = _mm256_mul_ps(dyv, gv);
      return _mm256_fmadd_ps(g, vrs, _mm256_fmadd_ps(xhat(xv), cx, c0));
    };
    const bool nt = a.stream && aligned(dx, Vec<D>::kAlign);
    any_nt |= nt;
    for (int64_t i = 0; i < Hv; i += 8) {
      __m256 d = dxv(load<D>(dy + i), load<D>(x + i), _mm256_loadu_ps(gamma + i));
      if constexpr (kDsum) d = _mm256_add_ps(d, load<D>(ds + i));
      store<D>(dx + i, d, nt);
    }
    if (tail) {
      __m256 d = dxv(load_n<D>(dy + Hv, tail), load_n<D>(x + Hv, tail), _mm256_load_ps(gt));
      if constexpr (kDsum) d = _mm256_add_ps(d, load_n<D>(ds + Hv, tail));
      store_n<D>(dx + Hv, tail, d);
    }
  }
  if (any_nt) _mm_sfence();
}

// Runtime bools -> template arguments.
template <class F> void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

template <DType D> void fwd_dt(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  with_bool(a.rms, [&](auto rms) {
    with_bool(a.residual != nullptr, [&](auto res) {
      fwd_rows<D, decltype(rms)::value, decltype(res)::value>(a, r0, r1, scratch);
    });
  });
}

template <DType D>
void bwd_dt(const BwdArgs& a, int64_t r0, int64_t r1, float* dg, float* db) {
  with_bool(a.rms, [&](auto rms) {
    with_bool(a.dsum != nullptr, [&](auto ds) {
      with_bool(dg != nullptr, [&](auto wg) {
        with_bool(db != nullptr, [&](auto wb) {
          bwd_rows<D, decltype(rms)::value, decltype(ds)::value, decltype(wg)::value,
                   decltype(wb)::value>(a, r0, r1, dg, db);
        });
      });
    });
  });
}

}  // namespace

void fwd_rows_avx2(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  switch (a.dt) {
    case DType::F32: return fwd_dt<DType::F32>(a, r0, r1, scratch);
    case DType::F16: return fwd_dt<DType::F16>(a, r0, r1, scratch);
    case DType::BF16: return fwd_dt<DType::BF16>(a, r0, r1, scratch);
  }
}

void bwd_rows_avx2(const BwdArgs& a, int64_t r0, int64_t r1, float* dgamma_part,
                   float* dbeta_part) {
  switch (a.dt) {
    case DType::F32: return bwd_dt<DType::F32>(a, r0, r1, dgamma_part, dbeta_part);
    case DType::F16: return bwd_dt<DType::F16>(a, r0, r1, dgamma_part, dbeta_part);
    case DType::BF16: return bwd_dt<DType::BF16>(a, r0, r1, dgamma_part, dbeta_part);
  }
}

}  // namespace megapre::cpu::norm_detail

#pragma GCC pop_options
