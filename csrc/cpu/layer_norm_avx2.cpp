// AVX2/FMA/F16C row functions for LayerNorm / RMSNorm (see kernels.h for the semantics).
// Each row is read from memory once: the first pass pulls it into L1/L2 and the remaining
// passes (variance, output) re-read it from cache. Rows are processed in blocks of 16
// elements (see layer_norm_impl.h for the bf16 block order); the last H % 16 elements go
// through the same block code via zero-padded copies.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "layer_norm_impl.h"
#include "vec_avx2.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace megapre::cpu::norm_detail {
namespace {

using namespace avx2;

// Blocks are vec_avx2.h's 16-element pairs, bf16 in the block order of layer_norm_impl.h.
template <DType D> using Blk = V16<D>;

float reduce(const Pair acc[2]) { return hsum(acc[0] + acc[1]); }
bool finite(float v) { return (to_bits(v) & 0x7f800000u) != 0x7f800000u; }

// Stores a block rounded to D; streamed (non-temporal, p 32-byte aligned) when nt.
template <DType D, bool kExact> void put(elem_t<D>* p, Pair v, bool nt) {
  if (nt) Blk<D>::template stream<kExact>(p, v);
  else Blk<D>::template store<kExact>(p, v);
}

// 16 raw elements (sum_out is a bit copy of the rounded sum).
template <class T> void copy16(T* dst, const T* src, bool nt) {
  for (size_t k = 0; k < sizeof(T) / 2; ++k) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src) + k);
    if (nt) _mm256_stream_si256(reinterpret_cast<__m256i*>(dst) + k, v);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst) + k, v);
  }
}

// Zero-padded 16-element copy of a row's last n < 16 elements.
template <class T> void pad16(T* buf, const T* p, int n) {
  std::memset(buf, 0, 16 * sizeof(T));
  std::memcpy(buf, p, n * sizeof(T));
}

// All-ones lanes for the first n elements of a block, in block order.
template <DType D> Pair tail_mask(int n) {
  using T = typename Blk<D>::T;
  const T one = D == DType::F32 ? T(1) : static_cast<T>(D == DType::F16 ? 0x3c00 : 0x3f80);
  alignas(32) T buf[16] = {};
  for (int j = 0; j < n; ++j) buf[j] = one;
  Pair v = Blk<D>::load(buf);
  const __m256 z = _mm256_setzero_ps();
  return {_mm256_cmp_ps(v.a, z, _CMP_NEQ_UQ), _mm256_cmp_ps(v.b, z, _CMP_NEQ_UQ)};
}

template <bool B> using Bool = std::integral_constant<bool, B>;
template <int U> using Lane = std::integral_constant<int, U>;

// body(i, lane) for every full block; two blocks per step alternate between two accumulator
// pairs, giving 4 independent FMA chains so reductions over a cached row are not
// latency-bound. Hb is a multiple of 16.
template <class Body> void for_blocks(int64_t Hb, Body&& body) {
  int64_t i = 0;
  for (; i + 32 <= Hb; i += 32) {
    body(i, Lane<0>{});
    body(i + 16, Lane<1>{});
  }
  if (i < Hb) body(i, Lane<0>{});
}

template <class P> bool aligned32(const P* p) {
  return (reinterpret_cast<uintptr_t>(p) & 31u) == 0;
}

// A row of H elements: Hb of them in whole blocks, then a tail of H - Hb < 16.
struct RowShape {
  int64_t H, Hb;
  int tail;
  float inv_h;
  explicit RowShape(int64_t h)
      : H(h), Hb(h & ~int64_t{15}), tail(static_cast<int>(h - Hb)),
        inv_h(1.0f / static_cast<float>(h)) {}
};

template <DType D, bool kRms, bool kRes>
void fwd_rows(const FwdArgs& a, int64_t r0, int64_t r1, void* scratch) {
  using B = Blk<D>;
  using T = typename B::T;
  const auto [H, Hb, tail, inv_h] = RowShape(a.H);
  const float* gamma = a.gamma;
  const float* beta = a.beta;
  T* sbuf = static_cast<T*>(scratch);
  const Pair tmask = tail_mask<D>(tail);
  alignas(32) T xt[16], rt[16], yt[16];
  bool any_nt = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * H;
    const T* res = kRes ? static_cast<const T*>(a.residual) + r * H : nullptr;
    T* y = static_cast<T*>(a.y) + r * H;
    if (tail) {
      pad16(xt, x + Hb, tail);
      if constexpr (kRes) pad16(rt, res + Hb, tail);
    }
    // Pass 1: sum (LayerNorm) or sum of squares (RMSNorm). Padded lanes are zero.
    Pair acc[2];
    auto accumulate = [&](Pair v, auto u) {
      acc[u] = kRms ? fmadd(v, v, acc[u]) : acc[u] + v;
    };
    const T* src;       // full blocks of the row being normalized
    const T* src_tail;  // its zero-padded last block
    float total;
    if constexpr (kRes) {
      // s = x + residual rounded to dt, kept in sbuf (cache) for the later passes.
      auto pass1 = [&](auto exact) {
        acc[0] = acc[1] = zero_pair();
        auto body = [&](const T* xp, const T* rp, T* sp, auto u) {
          Pair s = B::load(xp) + B::load(rp);
          accumulate(B::template round_store<decltype(exact)::value>(sp, s), u);
        };
        for_blocks(Hb, [&](int64_t i, auto u) { body(x + i, res + i, sbuf + i, u); });
        if (tail) body(xt, rt, sbuf + Hb, Lane<0>{});
        return reduce(acc);
      };
      total = pass1(Bool<false>{});
      // A NaN/inf sum may hold NaNs: redo with dtype.h's exact NaN rounding.
      if (!finite(total)) total = pass1(Bool<true>{});
      src = sbuf;
      src_tail = sbuf + Hb;
    } else {
      acc[0] = acc[1] = zero_pair();
      for_blocks(Hb, [&](int64_t i, auto u) { accumulate(B::load(x + i), u); });
      if (tail) accumulate(B::load(xt), Lane<0>{});
      total = reduce(acc);
      src = x;
      src_tail = xt;
    }
    float mu = 0.0f, var;
    if constexpr (kRms) {
      var = total * inv_h;
    } else {
      // Pass 2 (from cache): centered sum of squares and sum of deviations. The deviations'
      // sum is small and accurate: it refines the mean (fp32 sums of large offsets lose
      // digits) and corrects the variance to be taken around the refined mean.
      mu = total * inv_h;
      const Pair vmu = splat(mu);
      Pair dev[2] = {zero_pair(), zero_pair()}, sq[2] = {zero_pair(), zero_pair()};
      auto body = [&](Pair d, auto u) {
        dev[u] = dev[u] + d;
        sq[u] = fmadd(d, d, sq[u]);
      };
      for_blocks(Hb, [&](int64_t i, auto u) { body(B::load(src + i) - vmu, u); });
      if (tail) body((B::load(src_tail) - vmu) & tmask, Lane<0>{});
      const float sd = reduce(dev);
      mu += sd * inv_h;
      var = (reduce(sq) - sd * sd * inv_h) * inv_h;
      if (var < 0.0f) var = 0.0f;
    }
    const float rs = 1.0f / __builtin_sqrtf(var + a.eps);
    if (a.mean) a.mean[r] = mu;
    if (a.rstd) a.rstd[r] = rs;

    // Pass 3: y = (s - mean) * rstd * gamma + beta, and the sum copied out next to it.
    T* so = kRes ? static_cast<T*>(a.sum_out) + r * H : nullptr;
    const bool nt = a.stream && aligned32(y) && (!kRes || aligned32(so));
    any_nt |= nt;
    const Pair vmu = splat(mu), vrs = splat(rs);
    auto pass3 = [&](auto exact) {
      constexpr bool kExact = decltype(exact)::value;
      auto out = [&](const T* sp, int64_t i) {
        Pair t = kRms ? B::load(sp) * vrs : (B::load(sp) - vmu) * vrs;
        return fmadd(t, loadf(gamma + i), loadf(beta + i));
      };
      for_blocks(Hb, [&](int64_t i, auto) { put<D, kExact>(y + i, out(src + i, i), nt); });
      // Separate loop: interleaving two half-line streamed outputs defeats write combining.
      if constexpr (kRes) {
        for (int64_t i = 0; i < Hb; i += 16) copy16(so + i, sbuf + i, nt);
      }
      if (tail) {
        B::template store<kExact>(yt, out(src_tail, Hb));
        std::memcpy(y + Hb, yt, tail * sizeof(T));
        if constexpr (kRes) std::memcpy(so + Hb, sbuf + Hb, tail * sizeof(T));
      }
    };
    // Finite statistics and affine parameters prove y has no NaN (inf at worst).
    if (finite(mu) && finite(rs) && rs > 0.0f && a.affine_finite) pass3(Bool<false>{});
    else pass3(Bool<true>{});
  }
  if (any_nt) _mm_sfence();  // make streamed stores visible before the threads join
}

// Backward, one row at a time: pass 1 accumulates the row sums and the block's dgamma/dbeta
// partials, pass 2 writes dx from cache. (Pairing rows to halve the partials' read-modify-
// write measured slower: it doubles the concurrent streams.)
template <DType D, bool kRms, bool kDsum, bool kDg, bool kDb>
void bwd_rows(const BwdArgs& a, int64_t r0, int64_t r1, float* dg, float* db) {
  using B = Blk<D>;
  using T = typename B::T;
  const auto [H, Hb, tail, inv_h] = RowShape(a.H);
  const float* gamma = a.gamma;
  alignas(32) T dyt[16], xt[16], dst[16], dxt[16];
  bool any_nt = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* dy = static_cast<const T*>(a.dy) + r * H;
    const T* x = static_cast<const T*>(a.xin) + r * H;
    const T* ds = kDsum ? static_cast<const T*>(a.dsum) + r * H : nullptr;
    T* dx = static_cast<T*>(a.dx) + r * H;
    if (tail) {  // padded dy lanes are 0, so they add nothing in pass 1
      pad16(dyt, dy + Hb, tail);
      pad16(xt, x + Hb, tail);
      if constexpr (kDsum) pad16(dst, ds + Hb, tail);
    }
    const float mu = (kRms || !a.mean) ? 0.0f : a.mean[r];
    const float rs = a.rstd[r];
    const Pair vmu = splat(mu), vrs = splat(rs);
    auto xhat = [&](const T* xp) { return kRms ? B::load(xp) * vrs : (B::load(xp) - vmu) * vrs; };

    // Pass 1: sum(g), sum(g * xhat) with g = dy * gamma; dgamma/dbeta partials; sum(dsum)
    // (only to prove the output NaN-free; it also pulls dsum into cache for pass 2).
    Pair sg[2] = {zero_pair(), zero_pair()}, sgx[2] = {zero_pair(), zero_pair()};
    Pair sds[2] = {zero_pair(), zero_pair()};
    auto body1 = [&](const T* dyp, const T* xp, const T* dsp, int64_t i, auto u) {
      const Pair d = B::load(dyp), xh = xhat(xp);
      const Pair g = d * loadf(gamma + i);
      if constexpr (!kRms) sg[u] = sg[u] + g;
      sgx[u] = fmadd(g, xh, sgx[u]);
      if constexpr (kDg) storef(dg + i, fmadd(d, xh, loadf(dg + i)));
      if constexpr (kDb) storef(db + i, d + loadf(db + i));
      if constexpr (kDsum) sds[u] = sds[u] + B::load(dsp);
    };
    for_blocks(Hb, [&](int64_t i, auto u) { body1(dy + i, x + i, kDsum ? ds + i : ds, i, u); });
    if (tail) body1(dyt, xt, dst, Hb, Lane<0>{});
    const float tg = reduce(sg), tgx = reduce(sgx);

    // Pass 2 (from cache): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ dsum].
    const float cx = -rs * (tgx * inv_h), c0 = -rs * (tg * inv_h);
    const Pair vcx = splat(cx), vc0 = splat(c0);
    const bool nt = a.stream && aligned32(dx);
    any_nt |= nt;
    auto pass2 = [&](auto exact) {
      constexpr bool kExact = decltype(exact)::value;
      auto dxb = [&](const T* dyp, const T* xp, const T* dsp, int64_t i) {
        const Pair g = B::load(dyp) * loadf(gamma + i);
        Pair v = fmadd(g, vrs, fmadd(xhat(xp), vcx, vc0));
        if constexpr (kDsum) v = v + B::load(dsp);
        return v;
      };
      for_blocks(Hb, [&](int64_t i, auto) {
        put<D, kExact>(dx + i, dxb(dy + i, x + i, kDsum ? ds + i : ds, i), nt);
      });
      if (tail) {
        B::template store<kExact>(dxt, dxb(dyt, xt, dst, Hb));
        std::memcpy(dx + Hb, dxt, tail * sizeof(T));
      }
    };
    // Finite sums prove every g, g * xhat and dsum element finite, so dx has no NaN.
    const bool clean = finite(tg) && finite(tgx) && finite(mu) && finite(rs) && finite(cx) &&
                       finite(c0) && (!kDsum || finite(reduce(sds)));
    if (clean) pass2(Bool<false>{});
    else pass2(Bool<true>{});
  }
  if (any_nt) _mm_sfence();
}

// Runtime bools -> template arguments.
template <class F> void with_bool(bool b, F&& f) {
  if (b) f(Bool<true>{});
  else f(Bool<false>{});
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
  with_dtype(a.dt, [&](auto d) { fwd_dt<decltype(d)::value>(a, r0, r1, scratch); });
}

void bwd_rows_avx2(const BwdArgs& a, int64_t r0, int64_t r1, float* dgamma_part,
                   float* dbeta_part) {
  with_dtype(a.dt, [&](auto d) {
    bwd_dt<decltype(d)::value>(a, r0, r1, dgamma_part, dbeta_part);
  });
}

}  // namespace megapre::cpu::norm_detail

#pragma GCC pop_options
