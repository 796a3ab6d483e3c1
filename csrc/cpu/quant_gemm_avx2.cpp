// AVX2 microkernels of the int8 family: row quantization, the W8A8 packed GEMM microkernel and
// its packing / epilogue, the small-M W8A8 and weight-only kernels that read w in place, and
// the fp32 microkernel of the large-M weight-only path. Blocking and threading live in
// quant_gemm.cpp. No standard-library templates are instantiated below the target pragma, so
// no AVX2-compiled copy of a shared inline function can leak into the portable code.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dtype.h"
#include "quant_gemm_impl.h"
#include "vec_avx2.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace megapre::cpu::qgemm {
namespace {

using namespace avx2;

// An empty asm the compiler cannot look through. Placed between a product and the add that
// follows, it stops GCC from fusing them into an FMA: the reference rounds both separately.
inline __m256 opaque(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// 8 lanes at element i of p.
template <DType D> __m256 load8(const void* p, int64_t i) {
  return V8<D>::load(static_cast<const elem_t<D>*>(p) + i);
}

// Store the first n (1..8) lanes of v at element i of p.
template <DType D> void store8(void* p, int64_t i, __m256 v, int64_t n) {
  if constexpr (D == DType::F32) {
    float* dst = static_cast<float*>(p) + i;
    if (n == 8) {
      _mm256_storeu_ps(dst, v);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, v);
      std::memcpy(dst, tmp, n * sizeof(float));
    }
  } else {
    uint16_t* dst = static_cast<uint16_t*>(p) + i;
    const __m128i h = V8<D>::pack(v);
    if (n == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
    } else {
      alignas(16) uint16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      std::memcpy(dst, tmp, n * sizeof(uint16_t));
    }
  }
}

inline __m256i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline uint8_t abs_u8(int8_t v) { return static_cast<uint8_t>(v < 0 ? -static_cast<int>(v) : v); }

// ---- quantize_rowwise ----------------------------------------------------------------------
// round(x * inv) clamped to [-127, 127] for 8 lanes, as int32.
template <DType D> __m256i quant8(const void* row, int64_t k, __m256 inv) {
  __m256 v = _mm256_mul_ps(load8<D>(row, k), inv);
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(127.f)), _mm256_set1_ps(-127.f));
  return _mm256_cvttps_epi32(v);
}

template <DType D>
void quantize_rows(const void* xv, int8_t* q, float* scale, int64_t r0, int64_t r1, int64_t K) {
  using T = typename Elem<D>::T;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // packs_epi32 / packs_epi16 interleave 128-bit lanes; this puts the dwords back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = static_cast<const T*>(xv) + r * K;
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      m0 = _mm256_max_ps(m0, _mm256_and_ps(load8<D>(row, k), absmask));
      m1 = _mm256_max_ps(m1, _mm256_and_ps(load8<D>(row, k + 8), absmask));
    }
    for (; k + 8 <= K; k += 8) m0 = _mm256_max_ps(m0, _mm256_and_ps(load8<D>(row, k), absmask));
    float amax = hmax(_mm256_max_ps(m0, m1));
    for (; k < K; ++k) {
      const float a = std::fabs(Elem<D>::load(row, k));
      amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[r] = amax / 127.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    int8_t* qr = q + r * K;
    for (k = 0; k + 32 <= K; k += 32) {
      const __m256i p01 = _mm256_packs_epi32(quant8<D>(row, k, vinv), quant8<D>(row, k + 8, vinv));
      const __m256i p23 =
          _mm256_packs_epi32(quant8<D>(row, k + 16, vinv), quant8<D>(row, k + 24, vinv));
      const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), p);
    }
    for (; k < K; ++k) {
      float v = std::nearbyint(Elem<D>::load(row, k) * inv);
      v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
      qr[k] = static_cast<int8_t>(v);
    }
  }
}

// ---- W8A8 packing ----------------------------------------------------------------------------
// Transpose 4 rows of 8 dwords: out[i] holds dword i of each row in its low lane and dword
// i + 4 in its high lane.
inline void transpose4x8(const __m256i r[4], __m256i out[4]) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  out[0] = _mm256_unpacklo_epi64(t0, t2);
  out[1] = _mm256_unpackhi_epi64(t0, t2);
  out[2] = _mm256_unpacklo_epi64(t1, t3);
  out[3] = _mm256_unpackhi_epi64(t1, t3);
}

// 16 k (8 k-pairs) of kNR rows of w (w at row 0, first k), widened to int16. Output pair p,
// column c at dst + p * kBPairElems + c * 2.
void pack_b_block16(const int8_t* w, int64_t K, int16_t* dst, __m128i& bad) {
  const __m128i m128 = _mm_set1_epi8(-128);
  for (int half = 0; half < 2; ++half) {
    __m256i r[8], lo[4], hi[4];
    for (int i = 0; i < 8; ++i) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (half * 8 + i) * K));
      bad = _mm_or_si128(bad, _mm_cmpeq_epi8(v, m128));
      r[i] = _mm256_cvtepi8_epi16(v);
    }
    transpose4x8(r, lo);
    transpose4x8(r + 4, hi);
    for (int g = 0; g < 4; ++g) {
      auto* d0 = reinterpret_cast<__m256i*>(dst + g * kBPairElems + half * 16);
      auto* d1 = reinterpret_cast<__m256i*>(dst + (g + 4) * kBPairElems + half * 16);
      _mm256_storeu_si256(d0, _mm256_permute2x128_si256(lo[g], hi[g], 0x20));
      _mm256_storeu_si256(d1, _mm256_permute2x128_si256(lo[g], hi[g], 0x31));
    }
  }
}

// ---- W8A8 microkernel ------------------------------------------------------------------------
// acc += sum over the 4 bytes of each dword of a * b, with ua = |a| and the sign of a moved
// onto b (exact: b != -128, pair sums < 2^15). Used by the small-M kernel.
inline __m256i dot4(__m256i acc, __m256i ua, __m256i a, __m256i b, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(b, a)), ones));
}

// The 6 x 16 microkernels (W8A8 and weight-only): per k step, 2 loads of B, 6 broadcasts of
// A, 12 multiply-adds into a 6 x 16 tile, added to (accumulate) or stored over c (row stride
// ldc). Named accumulators (not an array) so that GCC keeps all 16 ymm registers without
// spilling. Op supplies the types and the per-step operations:
//   W8A8 (Int8Tile): a step is a k-pair, a broadcast is a dword = 2 int16 of one row of the
//     widened x, a multiply-add is vpmaddwd + vpaddd into int32 lanes;
//   weight-only (F32Tile): a step is one k, the multiply-add an FMA.
struct Int8Tile {
  using A = int16_t;
  using B = int16_t;
  using C = int32_t;
  using V = __m256i;
  static constexpr int kAStep = 2;                  // A elements per step
  static constexpr int64_t kBStep = kBPairElems;  // B elements per step
  static V zero() { return _mm256_setzero_si256(); }
  static V load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void store(void* p, V v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static V add(V x, V y) { return _mm256_add_epi32(x, y); }
  static V bcast(const A* p) { return bcast32(p); }
  static V madd(V acc, V a, V b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
};

struct F32Tile {
  using A = float;
  using B = float;
  using C = float;
  using V = __m256;
  static constexpr int kAStep = 1;
  static constexpr int64_t kBStep = kFNR;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }
  static void store(void* p, V v) { _mm256_storeu_ps(static_cast<float*>(p), v); }
  static V add(V x, V y) { return _mm256_add_ps(x, y); }
  static V bcast(const A* p) { return _mm256_broadcast_ss(p); }
  static V madd(V acc, V a, V b) { return _mm256_fmadd_ps(a, b, acc); }
};

template <class Op>
void micro_6x16(const typename Op::A* a, int64_t lda, const typename Op::B* b, int64_t steps,
                typename Op::C* c, int64_t ldc, bool accumulate) {
  using V = typename Op::V;
  constexpr int kLanes = sizeof(V) / sizeof(typename Op::C);
  constexpr int kBHalf = sizeof(V) / sizeof(typename Op::B);  // B elements in one vector
  V c00 = Op::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  V c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const typename Op::A *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda,
                       *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t k = 0; k < Op::kAStep * steps; k += Op::kAStep, b += Op::kBStep) {
    const V b0 = Op::load(b), b1 = Op::load(b + kBHalf);
    V av = Op::bcast(a0 + k);
    c00 = Op::madd(c00, av, b0);
    c01 = Op::madd(c01, av, b1);
    av = Op::bcast(a1 + k);
    c10 = Op::madd(c10, av, b0);
    c11 = Op::madd(c11, av, b1);
    av = Op::bcast(a2 + k);
    c20 = Op::madd(c20, av, b0);
    c21 = Op::madd(c21, av, b1);
    av = Op::bcast(a3 + k);
    c30 = Op::madd(c30, av, b0);
    c31 = Op::madd(c31, av, b1);
    av = Op::bcast(a4 + k);
    c40 = Op::madd(c40, av, b0);
    c41 = Op::madd(c41, av, b1);
    av = Op::bcast(a5 + k);
    c50 = Op::madd(c50, av, b0);
    c51 = Op::madd(c51, av, b1);
  }
  const V out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int m = 0; m < 6; ++m) {
    for (int h = 0; h < 2; ++h) {
      typename Op::C* p = c + m * ldc + h * kLanes;
      V v = out[m][h];
      if (accumulate) v = Op::add(v, Op::load(p));
      Op::store(p, v);
    }
  }
}

template <DType D>
void epilogue_int8(const int32_t* acc, int64_t ldacc, const float* xs, const float* ws,
                   const float* bias, void* out, int64_t ldo, int64_t mr, int64_t nr) {
  for (int64_t m = 0; m < mr; ++m) {
    const __m256 xsm = _mm256_set1_ps(xs[m]);
    for (int64_t n = 0; n < nr; n += 8) {
      const int64_t w = imin(8, nr - n);
      const __m256i mask = first_lanes(w);
      __m256 f = _mm256_cvtepi32_ps(_mm256_maskload_epi32(acc + m * ldacc + n, mask));
      f = _mm256_mul_ps(_mm256_mul_ps(f, xsm), _mm256_maskload_ps(ws + n, mask));
      if (bias) f = _mm256_add_ps(opaque(f), _mm256_maskload_ps(bias + n, mask));
      store8<D>(out, m * ldo + n, f, w);
    }
  }
}

// ---- small-M W8A8 ----------------------------------------------------------------------------
// acc[m * ldacc + r] for MB rows of x and R rows of w (w at the first row, row stride K).
template <int MB, int R>
void gemv_int8_block(const int8_t* xp, const int8_t* uxp, int64_t ldx, const int8_t* w,
                     int64_t K, int32_t* acc, int64_t ldacc, __m256i& bad) {
  const __m256i ones = _mm256_set1_epi16(1), m128 = _mm256_set1_epi8(-128);
  __m256i c[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) c[m][r] = _mm256_setzero_si256();
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      bad = _mm256_or_si256(bad, _mm256_cmpeq_epi8(wv, m128));
      for (int m = 0; m < MB; ++m) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + m * ldx + k));
        const __m256i ua = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(uxp + m * ldx + k));
        c[m][r] = dot4(c[m][r], ua, av, wv, ones);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int8_t* wr = w + r * K;
    int tail_bad = 0;
    for (int64_t k = K32; k < K; ++k) tail_bad |= wr[k] == -128;
    if (tail_bad) bad = m128;
    for (int m = 0; m < MB; ++m) {
      int32_t s = hsum(c[m][r]);
      for (int64_t k = K32; k < K; ++k) s += static_cast<int32_t>(xp[m * ldx + k]) * wr[k];
      acc[m * ldacc + r] = s;
    }
  }
}

template <int MB, int R>
void gemv_int8_rows(const int8_t* xp, const int8_t* uxp, int64_t ldx, const int8_t* w,
                    int64_t K, int64_t n0, int64_t n1, int32_t* acc, int64_t ldacc,
                    __m256i& bad) {
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    gemv_int8_block<MB, R>(xp, uxp, ldx, w + n * K, K, acc + (n - n0), ldacc, bad);
  for (; n < n1; ++n) gemv_int8_block<MB, 1>(xp, uxp, ldx, w + n * K, K, acc + (n - n0), ldacc, bad);
}

// ---- weight-only ------------------------------------------------------------------------------
inline __m256 load_w8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// acc[m * ldacc + r] = dot(x row m, w row r) for MB x R (fp32 accumulation, 8 lanes each).
// Each of the R rows is its own DRAM stream; a software prefetch runs kPrefetch bytes ahead
// in every row and, near a row's end, wraps onto the same row of the next block (`next`, or
// null for none), so the next block's streams are already in flight when it starts.
constexpr int64_t kPrefetch = 512;

template <int MB, int R>
void wo_block(const float* x, int64_t ldx, const int8_t* w, int64_t K, float* acc, int64_t ldacc,
              const int8_t* next) {
  __m256 c[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) c[m][r] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    if ((k & 63) == 0) {
      const int64_t pk = k + kPrefetch;
      for (int r = 0; r < R; ++r) {
        const int8_t* p = pk < K ? w + r * K + pk : (next ? next + r * K + (pk - K) : nullptr);
        if (p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load_w8(w + r * K + k);
      for (int m = 0; m < MB; ++m)
        c[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, c[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(c[m][r]);
      for (int64_t k = K8; k < K; ++k) s += x[m * ldx + k] * static_cast<float>(w[r * K + k]);
      acc[m * ldacc + r] = s;
    }
  }
}

// Rows [n0, n1) of w against MB rows of x; R rows at a time so each w row is read once
// for the MB rows (and from L1/L2 for further m chunks).
template <int MB, int R>
void wo_rows(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
             float* acc, int64_t ldacc) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const int8_t* next = n + 2 * R <= n1 ? w + (n + R) * K : nullptr;
    wo_block<MB, R>(x, ldx, w + n * K, K, acc + (n - n0), ldacc, next);
  }
  for (; n < n1; ++n) wo_block<MB, 1>(x, ldx, w + n * K, K, acc + (n - n0), ldacc, nullptr);
}

// 8x8 fp32 transpose in registers.
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

template <DType D>
void epilogue_f32(const float* acc, int64_t ldacc, const float* ws, const float* bias, void* out,
                  int64_t ldo, int64_t mr, int64_t nr) {
  for (int64_t m = 0; m < mr; ++m) {
    for (int64_t n = 0; n < nr; n += 8) {
      const int64_t w = imin(8, nr - n);
      const __m256i mask = first_lanes(w);
      __m256 f = _mm256_mul_ps(_mm256_maskload_ps(acc + m * ldacc + n, mask),
                               _mm256_maskload_ps(ws + n, mask));
      if (bias) f = _mm256_add_ps(opaque(f), _mm256_maskload_ps(bias + n, mask));
      store8<D>(out, m * ldo + n, f, w);
    }
  }
}

template <DType D> void to_f32(const void* x, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<D>(x, i));
  for (; i < n; ++i) dst[i] = Elem<D>::load(static_cast<const typename Elem<D>::T*>(x), i);
}

}  // namespace

// ---- exported entry points ---------------------------------------------------------------------
void quantize_rows_avx2(const void* x, int8_t* q, float* scale, int64_t r0, int64_t r1,
                        int64_t K, DType dt) {
  with_dtype(dt, [&](auto d) { quantize_rows<decltype(d)::value>(x, q, scale, r0, r1, K); });
}

bool pack_b_avx2(const int8_t* w, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                 int16_t* dst) {
  const int64_t P = ceil_div(kc, 2);
  __m128i bad = _mm_setzero_si128();
  int64_t p = 0;
  if (nr == kNR)
    for (; (p + 8) * 2 <= kc; p += 8)
      pack_b_block16(w + n0 * K + k0 + p * 2, K, dst + p * kBPairElems, bad);
  bool ok = _mm_testz_si128(bad, bad);
  for (; p < P; ++p) {
    for (int64_t c = 0; c < kNR; ++c) {
      for (int64_t e = 0; e < 2; ++e) {
        const int64_t k = p * 2 + e;
        const int8_t v = c < nr && k < kc ? w[(n0 + c) * K + k0 + k] : 0;
        ok &= v != -128;
        dst[p * kBPairElems + c * 2 + e] = v;
      }
    }
  }
  return ok;
}

void widen_rows_avx2(const int8_t* x, int64_t K, int64_t r0, int64_t r1, int16_t* dst,
                     int64_t ldd) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* src = x + r * K;
    int16_t* d = dst + r * ldd;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k),
                          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    for (; k < K; ++k) d[k] = src[k];
    for (; k < ldd; ++k) d[k] = 0;
  }
}

void micro_int8_avx2(const int16_t* a, int64_t lda, const int16_t* b, int64_t kp, int32_t* c,
                     int64_t ldc, bool accumulate) {
  micro_6x16<Int8Tile>(a, lda, b, kp, c, ldc, accumulate);
}

void epilogue_int8_avx2(const int32_t* acc, int64_t ldacc, const float* xs, const float* ws,
                        const float* bias, void* out, int64_t ldo, int64_t mr, int64_t nr,
                        DType dt) {
  with_dtype(dt, [&](auto d) {
    epilogue_int8<decltype(d)::value>(acc, ldacc, xs, ws, bias, out, ldo, mr, nr);
  });
}

bool gemv_int8_avx2(const int8_t* xp, const int8_t* uxp, int64_t ldx, int64_t M,
                    const int8_t* w, int64_t K, int64_t n0, int64_t n1, int32_t* acc) {
  __m256i bad = _mm256_setzero_si256();
  const int64_t ld = n1 - n0;
  switch (M) {
    case 1: gemv_int8_rows<1, 8>(xp, uxp, ldx, w, K, n0, n1, acc, ld, bad); break;
    case 2: gemv_int8_rows<2, 4>(xp, uxp, ldx, w, K, n0, n1, acc, ld, bad); break;
    case 3: gemv_int8_rows<3, 2>(xp, uxp, ldx, w, K, n0, n1, acc, ld, bad); break;
    default: gemv_int8_rows<4, 2>(xp, uxp, ldx, w, K, n0, n1, acc, ld, bad); break;
  }
  return _mm256_testz_si256(bad, bad);
}

void to_f32_avx2(const void* x, int64_t n, float* dst, DType dt) {
  with_dtype(dt, [&](auto d) { to_f32<decltype(d)::value>(x, n, dst); });
}

void wo_gemv_avx2(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                  int64_t n0, int64_t n1, float* acc) {
  const int64_t ld = n1 - n0;
  // Chunks of 4 rows of x, then the remainder; every chunk rereads the same w rows, which
  // are still in L1/L2 from the first chunk.
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) wo_rows<4, 3>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld);
  switch (M - m) {
    case 1: wo_rows<1, 8>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld); break;
    case 2: wo_rows<2, 6>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld); break;
    case 3: wo_rows<3, 4>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld); break;
    default: break;
  }
}

void pack_fb_avx2(const int8_t* w, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                  float* dst) {
  int64_t k = 0;
  if (nr == kFNR) {
    for (; k + 8 <= kc; k += 8) {
      for (int half = 0; half < 2; ++half) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load_w8(w + (n0 + half * 8 + i) * K + k0 + k);
        transpose8x8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kFNR + half * 8, r[i]);
      }
    }
  }
  for (; k < kc; ++k)
    for (int64_t c = 0; c < kFNR; ++c)
      dst[k * kFNR + c] = c < nr ? static_cast<float>(w[(n0 + c) * K + k0 + k]) : 0.f;
}

void micro_f32_avx2(const float* a, int64_t lda, const float* b, int64_t kc, float* c,
                    int64_t ldc, bool accumulate) {
  micro_6x16<F32Tile>(a, lda, b, kc, c, ldc, accumulate);
}

void epilogue_f32_avx2(const float* acc, int64_t ldacc, const float* ws, const float* bias,
                       void* out, int64_t ldo, int64_t mr, int64_t nr, DType dt) {
  with_dtype(dt, [&](auto d) {
    epilogue_f32<decltype(d)::value>(acc, ldacc, ws, bias, out, ldo, mr, nr);
  });
}

}  // namespace megapre::cpu::qgemm

#pragma GCC pop_options
