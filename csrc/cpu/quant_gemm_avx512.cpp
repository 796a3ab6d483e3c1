// AVX-512 (F/BW/VL/VNNI) microkernels of the int8 family: row quantization, the W8A8 vpdpbusd
// GEMM (packing, 6x64 microkernel, epilogue), the small-M W8A8 and weight-only kernels that
// read w in place. Blocking and threading live in quant_gemm.cpp; the arithmetic contract of
// each entry point is in quant_gemm_impl.h. As in quant_gemm_avx2.cpp, the portable headers
// are included before the target pragma, the AVX-512 helpers (vec_avx512.h) have internal
// linkage and no standard-library template is instantiated below it, so no AVX-512 copy of a
// shared inline function can leak into portable code.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dtype.h"
#include "quant_gemm_impl.h"
#include "vec_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
// GCC 12's AVX-512 conversion intrinsics start from `__m256i __Y = __Y;` (an undefined
// value) and -Wall flags that inside the system header; nothing in this file is uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace megapre::cpu::qgemm {
namespace {

using namespace avx512;

// An empty asm the compiler cannot look through: keeps a product and the add that follows
// from being fused into an FMA (the reference rounds both).
inline __m512 opaque(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

inline __m512i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// ---- dtype-generic 16-lane loads / stores at element i of p (vec_avx512.h) -------------------
template <DType D> __m512 load16(const void* p, int64_t i, __mmask16 m) {
  return V16<D>::load(static_cast<const elem_t<D>*>(p) + i, m);
}

// NaNs with dtype.h's exact bits, as the AVX2 and scalar epilogues store them.
template <DType D> void store16(void* p, int64_t i, __m512 v, __mmask16 m) {
  V16<D>::template store<true>(static_cast<elem_t<D>*>(p) + i, v, m);
}

// ---- quantize_rowwise -------------------------------------------------------------------------
// round(x * inv) clamped to [-127, 127] for 16 lanes, narrowed to int8 (same operations and
// order as the AVX2 and scalar paths, so the bits agree).
template <DType D> __m128i quant16(const void* row, int64_t k, __m512 inv, __mmask16 m) {
  __m512 v = _mm512_mul_ps(load16<D>(row, k, m), inv);
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(127.f)), _mm512_set1_ps(-127.f));
  return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
}

template <DType D>
void quantize_rows(const void* xv, int8_t* q, float* scale, int64_t r0, int64_t r1, int64_t K) {
  using T = typename Elem<D>::T;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = static_cast<const T*>(xv) + r * K;
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(load16<D>(row, k, 0xffff)));
      m1 = _mm512_max_ps(m1, _mm512_abs_ps(load16<D>(row, k + 16, 0xffff)));
    }
    for (; k < K; k += 16)  // masked-off lanes load as 0, which cannot raise the max
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(load16<D>(row, k, mask16(K - k))));
    const float amax = hmax(_mm512_max_ps(m0, m1));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[r] = amax / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    int8_t* qr = q + r * K;
    for (k = 0; k + 64 <= K; k += 64) {
      const __m128i a = quant16<D>(row, k, vinv, 0xffff), b = quant16<D>(row, k + 16, vinv, 0xffff);
      const __m128i c = quant16<D>(row, k + 32, vinv, 0xffff), d = quant16<D>(row, k + 48, vinv, 0xffff);
      const __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set_m128i(b, a)), _mm256_set_m128i(d, c), 1);
      _mm512_storeu_si512(qr + k, v);
    }
    for (; k < K; k += 16) {
      const __mmask16 m = mask16(K - k);
      _mm_mask_storeu_epi8(qr + k, m, quant16<D>(row, k, vinv, m));
    }
  }
}

// ---- W8A8 packing ---------------------------------------------------------------------------
// In-place transpose of 16 x 16 dwords: on return r[i] holds dword i of every input row.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane l: dword 4l + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);   // lanes 0, 2
    const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);   // lanes 1, 3
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);       // dword j      (lane 0)
    r[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);   // dword 8 + j  (lane 2)
    r[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);   // dword 4 + j  (lane 1)
    r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);  // dword 12 + j (lane 3)
  }
}

// 16 rows of w (row 0 at w, nr of them valid) x 64 bytes from k0 (kb valid) -> quads
// [0, ceil(kb / 4)) of one 16-column group, at dst with a stride of kVQuadBytes per quad.
// Invalid bytes become 0; `low` collects the unsigned minimum of the valid ones (0 = -128).
inline void pack_group(const int8_t* w, int64_t K, int64_t nr, int64_t kb, uint8_t* dst,
                       __m512i& low) {
  const __mmask64 m = mask64(kb);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    if (i < nr) {
      r[i] = _mm512_maskz_mov_epi8(m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + i * K), flip));
      low = _mm512_mask_min_epu8(low, m, low, r[i]);
    } else {
      r[i] = _mm512_setzero_si512();
    }
  }
  transpose16x16(r);
  const int64_t nq = (kb + 3) / 4;
  for (int q = 0; q < nq; ++q)
    _mm512_storeu_si512(dst + q * kVQuadBytes, r[q]);
}

// ---- W8A8 x packing ----------------------------------------------------------------------------
// Panel layout: per k-quad q, the dword x[m0 + r, 4q .. 4q + 3] of rows r = 0..5 in order
// (24 bytes), zero past K and past the valid rows. Contiguous, so the microkernel's
// broadcasts walk one stream; rows of x 4 KiB apart would otherwise share L1 sets.
// S = the panel's dword sequence, S[s] = row s % 6, dword s / 6. Output zmm j holds
// S[16j .. 16j + 15]; vpermt2d picks from a pair of rows, so j is assembled from the pairs
// (0,1), (2,3), (4,5) with masked blends.
struct APackPlan {
  __m512i idx[kVMR];
  __mmask16 pair[kVMR][3];
  APackPlan() {
    for (int j = 0; j < kVMR; ++j) {
      alignas(64) int32_t v[16];
      __mmask16 m[3] = {0, 0, 0};
      for (int l = 0; l < 16; ++l) {
        const int s = 16 * j + l, r = s % kVMR, d = s / kVMR;
        v[l] = d + (r % 2) * 16;
        m[r / 2] = static_cast<__mmask16>(m[r / 2] | (1u << l));
      }
      idx[j] = _mm512_load_si512(v);
      for (int p = 0; p < 3; ++p) pair[j][p] = m[p];
    }
  }
};

// Rows [0, mr) of x (row stride K) into one panel of ceil(K / 4) quads; rowsum[r] for r < mr.
void pack_a(const int8_t* x, int64_t K, int64_t mr, int8_t* dst, int32_t* rowsum,
            const APackPlan& plan) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sum[kVMR];
  for (int r = 0; r < kVMR; ++r) sum[r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 km = mask64(K - k);
    __m512i row[kVMR];
    for (int r = 0; r < kVMR; ++r) {
      row[r] = r < mr ? _mm512_maskz_loadu_epi8(km, x + r * K + k) : _mm512_setzero_si512();
      sum[r] = _mm512_dpbusd_epi32(sum[r], ones, row[r]);
    }
    // Quads [k / 4, k / 4 + nq) of the panel: 24 * nq bytes.
    const int64_t nq = (imin(64, K - k) + 3) / 4, bytes = 24 * nq;
    int8_t* d = dst + (k / 4) * 24;
    for (int j = 0; j < kVMR && 64 * j < bytes; ++j) {
      const __m512i p01 = _mm512_permutex2var_epi32(row[0], plan.idx[j], row[1]);
      const __m512i p23 = _mm512_permutex2var_epi32(row[2], plan.idx[j], row[3]);
      const __m512i p45 = _mm512_permutex2var_epi32(row[4], plan.idx[j], row[5]);
      __m512i o = _mm512_mask_blend_epi32(plan.pair[j][1], p01, p23);
      o = _mm512_mask_blend_epi32(plan.pair[j][2], o, p45);
      _mm512_mask_storeu_epi8(d + 64 * j, mask64(bytes - 64 * j), o);
    }
  }
  for (int r = 0; r < mr; ++r) rowsum[r] = hsum(sum[r]);
}

// ---- W8A8 microkernel -------------------------------------------------------------------------
// 6 x 64 int32 tile: per k-quad, 4 loads of B (u8, 16 columns x 4 k each), 6 broadcasts of
// a dword of packed x (s8), 24 vpdpbusd. Named accumulators so that GCC keeps all of them in
// zmm registers (24 + 4 B + 1 broadcast of the 32).
#define MEGAPRE_ROW(r)                                   \
  do {                                                   \
    const __m512i av = bcast32(a + 4 * r);               \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, b0, av);     \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, b1, av);     \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, b2, av);     \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, b3, av);     \
  } while (0)

void micro(const int8_t* a, const uint8_t* b, int64_t kq, int32_t* c, int64_t ldc,
           bool accumulate) {
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
  __m512i c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
  __m512i c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
  for (int64_t q = 0; q < kq; ++q, b += kVQuadBytes, a += 4 * kVMR) {
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
    MEGAPRE_ROW(0);
    MEGAPRE_ROW(1);
    MEGAPRE_ROW(2);
    MEGAPRE_ROW(3);
    MEGAPRE_ROW(4);
    MEGAPRE_ROW(5);
  }
  const __m512i out[kVMR][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13},
                                {c20, c21, c22, c23}, {c30, c31, c32, c33},
                                {c40, c41, c42, c43}, {c50, c51, c52, c53}};
  for (int m = 0; m < kVMR; ++m) {
    for (int h = 0; h < 4; ++h) {
      int32_t* p = c + m * ldc + h * 16;
      __m512i v = out[m][h];
      if (accumulate) v = _mm512_add_epi32(v, _mm512_loadu_si512(p));
      _mm512_storeu_si512(p, v);
    }
  }
}
#undef MEGAPRE_ROW

template <DType D>
void epilogue_v(const int32_t* acc, int64_t ldacc, const int32_t* rowsum, const float* xs,
                const float* ws, const float* bias, void* out, int64_t ldo, int64_t mr,
                int64_t nr) {
  for (int64_t m = 0; m < mr; ++m) {
    // 128 * rowsum wraps like the accumulation did; the difference is the exact dot product.
    const __m512i corr = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(rowsum[m]) << 7));
    const __m512 xsm = _mm512_set1_ps(xs[m]);
    for (int64_t n = 0; n < nr; n += 16) {
      const __mmask16 k = mask16(nr - n);
      const __m512i s = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, acc + m * ldacc + n), corr);
      __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), xsm), _mm512_maskz_loadu_ps(k, ws + n));
      if (bias) f = _mm512_add_ps(opaque(f), _mm512_maskz_loadu_ps(k, bias + n));
      store16<D>(out, m * ldo + n, f, k);
    }
  }
}

// ---- small-M W8A8 -----------------------------------------------------------------------------
// acc[m * ldacc + r] for MB rows of x and R rows of w (w at the first row, row stride K).
template <int MB, int R>
void gemv_block(const int8_t* xp, int64_t ldx, const int32_t* rowsum, const int8_t* w, int64_t K,
                int32_t* acc, int64_t ldacc, __m512i& low) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i c[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) c[m][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    // Past K, w loads as 0 (u = 128) and meets the zero padding of x.
    const __mmask64 km = mask64(K - k);
    for (int r = 0; r < R; ++r) {
      const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, w + r * K + k), flip);
      low = _mm512_min_epu8(low, u);
      for (int m = 0; m < MB; ++m)
        c[m][r] = _mm512_dpbusd_epi32(c[m][r], u, _mm512_loadu_si512(xp + m * ldx + k));
    }
  }
  for (int m = 0; m < MB; ++m) {
    const uint32_t corr = static_cast<uint32_t>(rowsum[m]) << 7;
    for (int r = 0; r < R; ++r) {
      const uint32_t s = static_cast<uint32_t>(hsum(c[m][r]));
      acc[m * ldacc + r] = static_cast<int32_t>(s - corr);
    }
  }
}

template <int MB, int R>
void gemv_rows(const int8_t* xp, int64_t ldx, const int32_t* rowsum, const int8_t* w, int64_t K,
               int64_t n0, int64_t n1, int32_t* acc, int64_t ldacc, __m512i& low) {
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    gemv_block<MB, R>(xp, ldx, rowsum, w + n * K, K, acc + (n - n0), ldacc, low);
  for (; n < n1; ++n) gemv_block<MB, 1>(xp, ldx, rowsum, w + n * K, K, acc + (n - n0), ldacc, low);
}

// ---- weight-only ------------------------------------------------------------------------------
inline __m512 load_w16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// acc[m * ldacc + r] = dot(x row m, w row r) for MB x R (fp32 accumulation, 16 lanes each).
// Each of the R rows is its own DRAM stream; a software prefetch runs kPrefetch bytes ahead
// in every row and, near a row's end, wraps onto the same row of the next block (`next`, or
// null for none), so the next block's streams are already in flight when it starts.
constexpr int64_t kPrefetch = 512;

template <int MB, int R>
void wo_block(const float* x, int64_t ldx, const int8_t* w, int64_t K, float* acc, int64_t ldacc,
              const int8_t* next) {
  __m512 c[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) c[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 km = mask16(K - k);
    if ((k & 63) == 0) {
      const int64_t pk = k + kPrefetch;
      for (int r = 0; r < R; ++r) {
        const int8_t* p = pk < K ? w + r * K + pk : (next ? next + r * K + (pk - K) : nullptr);
        if (p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_w16(w + r * K + k, km);
      for (int m = 0; m < MB; ++m)
        c[m][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, x + m * ldx + k), wv, c[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m * ldacc + r] = hsum(c[m][r]);
}

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

}  // namespace

// ---- exported entry points ---------------------------------------------------------------------
void quantize_rows_avx512(const void* x, int8_t* q, float* scale, int64_t r0, int64_t r1,
                          int64_t K, DType dt) {
  with_dtype(dt, [&](auto d) { quantize_rows<decltype(d)::value>(x, q, scale, r0, r1, K); });
}

void rowsum_avx512(const int8_t* x, int64_t ldx, int64_t K, int64_t r0, int64_t r1,
                   int32_t* sum) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = x + r * ldx;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512(row + k));
      s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_loadu_si512(row + k + 64));
    }
    for (; k < K; k += 64)
      s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_maskz_loadu_epi8(mask64(K - k), row + k));
    sum[r] = hsum(_mm512_add_epi32(s0, s1));
  }
}

bool pack_b_vnni(const int8_t* w, int64_t K, int64_t n0, int64_t nr, uint8_t* dst) {
  __m512i low = _mm512_set1_epi8(static_cast<char>(0xff));
  for (int g = 0; g < kVNR / 16; ++g) {
    const int64_t gr = imin(16, nr - g * 16);
    if (gr <= 0) {  // columns past N: zero quads
      for (int64_t q = 0; q < (K + 3) / 4; ++q)
        _mm512_storeu_si512(dst + q * kVQuadBytes + g * 64, _mm512_setzero_si512());
      continue;
    }
    const int8_t* wg = w + (n0 + g * 16) * K;
    for (int64_t k = 0; k < K; k += 64)
      pack_group(wg + k, K, gr, imin(64, K - k), dst + (k / 4) * kVQuadBytes + g * 64, low);
  }
  // Valid bytes hold w + 128, which is 0 exactly for w == -128.
  return _mm512_test_epi8_mask(low, low) == ~__mmask64{0};
}

void pack_a_vnni(const int8_t* x, int64_t K, int64_t m0, int64_t m1, int8_t* dst,
                 int32_t* rowsum) {
  static const APackPlan plan;
  const int64_t panel = (K + 3) / 4 * 4 * kVMR;
  for (int64_t m = m0; m < m1; m += kVMR)
    pack_a(x + m * K, K, imin(kVMR, m1 - m), dst + (m / kVMR) * panel, rowsum + m, plan);
}

void micro_vnni(const int8_t* a, const uint8_t* b, int64_t kq, int32_t* c, int64_t ldc,
                bool accumulate) {
  micro(a, b, kq, c, ldc, accumulate);
}

void epilogue_vnni(const int32_t* acc, int64_t ldacc, const int32_t* rowsum, const float* xs,
                   const float* ws, const float* bias, void* out, int64_t ldo, int64_t mr,
                   int64_t nr, DType dt) {
  with_dtype(dt, [&](auto d) {
    epilogue_v<decltype(d)::value>(acc, ldacc, rowsum, xs, ws, bias, out, ldo, mr, nr);
  });
}

bool gemv_vnni(const int8_t* xp, int64_t ldx, int64_t M, const int32_t* rowsum,
               const int8_t* w, int64_t K, int64_t n0, int64_t n1, int32_t* acc) {
  __m512i low = _mm512_set1_epi8(static_cast<char>(0xff));
  const int64_t ld = n1 - n0;
  // Chunks of 4 rows of x, then the remainder; later chunks reread the same w rows from L2.
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    gemv_rows<4, 4>(xp + m * ldx, ldx, rowsum + m, w, K, n0, n1, acc + m * ld, ld, low);
  switch (M - m) {
    case 1: gemv_rows<1, 8>(xp + m * ldx, ldx, rowsum + m, w, K, n0, n1, acc + m * ld, ld, low); break;
    case 2: gemv_rows<2, 6>(xp + m * ldx, ldx, rowsum + m, w, K, n0, n1, acc + m * ld, ld, low); break;
    case 3: gemv_rows<3, 4>(xp + m * ldx, ldx, rowsum + m, w, K, n0, n1, acc + m * ld, ld, low); break;
    default: break;
  }
  // Every loaded byte is w + 128 (or 128 past K): a 0 anywhere means a -128 weight.
  return _mm512_test_epi8_mask(low, low) == ~__mmask64{0};
}

void wo_gemv_avx512(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                    int64_t n0, int64_t n1, float* acc) {
  const int64_t ld = n1 - n0;
  // Chunks of 4 rows of x, then the remainder; later chunks reread the same w rows from
  // L1/L2 (the first chunk brought them in).
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) wo_rows<4, 4>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld);
  switch (M - m) {
    case 1: wo_rows<1, 16>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld); break;
    case 2: wo_rows<2, 6>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld); break;
    case 3: wo_rows<3, 4>(x + m * ldx, ldx, w, K, n0, n1, acc + m * ld, ld); break;
    default: break;
  }
}

}  // namespace megapre::cpu::qgemm

#pragma GCC diagnostic pop
#pragma GCC pop_options
