// AVX2/FMA/F16C row kernels for the fused scale + mask + softmax (see softmax_impl.h).
// Everything after the target pragma is compiled for AVX2; only the two entry points declared
// in softmax_impl.h are visible outside this file.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "softmax_impl.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace megapre::cpu::softmax_impl {
namespace {

// ---- 8-lane loads/stores with fp32 in registers -------------------------------------------
template <DType D> struct Vec;

template <> struct Vec<DType::F32> {
  using T = float;
  static __m256 load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static void stream(T* p, __m256 v) { _mm256_stream_ps(p, v); }
};

template <> struct Vec<DType::BF16> {
  using T = uint16_t;
  static __m256 load(const T* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even exactly like f32_to_bf16: add 0x7fff plus the lsb of the kept half,
  // and NaN keeps its top bits with the quiet bit set.
  static __m128i pack(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    r = _mm256_srli_epi32(r, 16);
    const __m256i qnan = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, qnan, is_nan);
    // Every lane is <= 0xffff, so the unsigned-saturating pack is a plain narrowing.
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static void store(T* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack(v)); }
  static void stream(T* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), pack(v)); }
};

template <> struct Vec<DType::F16> {
  using T = uint16_t;
  static __m256 load(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m128i pack(__m256 v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(T* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack(v)); }
  static void stream(T* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), pack(v)); }
};

// Tails of fewer than 8 elements go through a small stack buffer so the same vector math (and
// therefore the same rounding) applies to every element of a row.
template <DType D> __m256 load_part(const typename Vec<D>::T* p, int64_t k) {
  typename Vec<D>::T buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(k) * sizeof(buf[0]));
  return Vec<D>::load(buf);
}

template <DType D> void store_part(typename Vec<D>::T* p, __m256 v, int64_t k) {
  typename Vec<D>::T buf[8];
  Vec<D>::store(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(k) * sizeof(buf[0]));
}

// All-ones lanes for lanes [0, k).
inline __m256 first_lanes(int64_t k) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), iota));
}

constexpr uintptr_t kLineBytes = 64;

// Elements before p reaches a cache-line boundary (buffers are at least element-aligned).
template <class T> int64_t to_line_boundary(const T* p) {
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) % kLineBytes;
  return off == 0 ? 0 : static_cast<int64_t>((kLineBytes - off) / sizeof(T));
}

// Writes one output row: y[j] = value(j..) for j < n and zeros for [n, sk). value(j, k) gives
// the 8 lanes starting at j, of which only the first k (< 8 near the end of the valid part) may
// be read from the inputs. With stream, whole cache lines go out with non-temporal stores: the
// row is written to memory without first being read into the cache (no read-for-ownership),
// which pays off when the output is larger than the cache. Lines are written either entirely
// streamed or entirely cached (ragged row ends use plain stores), because mixing both kinds in
// one line flushes a partial write-combining buffer.
template <DType D, class Value>
void write_row(typename Vec<D>::T* y, int64_t n, int64_t sk, bool stream, const Value& value) {
  auto lanes = [&](int64_t j, int64_t k) {  // elements [j, j + k) of the row, zeros from n on
    if (j >= n) return _mm256_setzero_ps();
    if (j + k <= n) return value(j, k);
    return _mm256_and_ps(value(j, n - j), first_lanes(n - j));
  };
  auto plain = [&](int64_t j, int64_t end) {
    for (; j + 8 <= end; j += 8) Vec<D>::store(y + j, lanes(j, 8));
    if (j < end) store_part<D>(y + j, lanes(j, end - j), end - j);
  };
  if (!stream) return plain(0, sk);
  constexpr int64_t kLine = static_cast<int64_t>(kLineBytes / sizeof(y[0]));
  const int64_t head = std::min(sk, to_line_boundary(y));
  plain(0, head);
  int64_t j = head;
  for (; j + kLine <= sk; j += kLine) {
    for (int64_t v = j; v < j + kLine; v += 8) Vec<D>::stream(y + v, lanes(v, 8));
  }
  plain(j, sk);
}

// All-ones lanes where the 8 mask bytes at m are nonzero (True = masked).
inline __m256 masked_lanes(const uint8_t* m) {
  __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) in fp32 to about 1-2 ulp: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2 so
// n*ln2_hi is exact), exp(r) = 1 + r + r^2*P(r) with P a degree-4 relative-error least-squares
// fit on Chebyshev nodes (max relative error 4e-9), then scaled by 2^n built in the exponent
// field. Inputs are clamped to [-88, 88]; for x <= -88 (including -inf) n is -127, whose
// exponent field is 0, so the result is exactly 0 -- that flushes results below ~1e-38, which
// a softmax cannot see next to the row maximum's exp(0) = 1. NaN propagates.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);  // this operand order keeps NaN: min/max
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);  // return their second operand on NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.375140739e-03f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.368915878e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166953266e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666651815e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999998808e-01f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// ---- forward ---------------------------------------------------------------------------------
// Pass 1 scales, masks (-inf) and stores the row into work while tracking the max; pass 2
// replaces work by exp(work - max) and sums it; pass 3 writes work / sum. The source row is read
// once and the output written once; the repeated passes touch only the cached work row.
template <DType D>
void fwd_row(const typename Vec<D>::T* x, const uint8_t* m, typename Vec<D>::T* y, int64_t n,
             int64_t sk, float scale, float* work, bool stream) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx0 = ninf, mx1 = ninf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 a = _mm256_mul_ps(Vec<D>::load(x + j), vscale);
    __m256 b = _mm256_mul_ps(Vec<D>::load(x + j + 8), vscale);
    if (m) {
      a = _mm256_blendv_ps(a, ninf, masked_lanes(m + j));
      b = _mm256_blendv_ps(b, ninf, masked_lanes(m + j + 8));
    }
    _mm256_storeu_ps(work + j, a);
    _mm256_storeu_ps(work + j + 8, b);
    mx0 = _mm256_max_ps(mx0, a);
    mx1 = _mm256_max_ps(mx1, b);
  }
  for (; j < n; j += 8) {
    const int64_t k = n - j < 8 ? n - j : 8;
    __m256 a = _mm256_mul_ps(k == 8 ? Vec<D>::load(x + j) : load_part<D>(x + j, k), vscale);
    __m256 dead = _mm256_andnot_ps(first_lanes(k), _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
    if (m) {
      uint8_t mb[8] = {};
      std::memcpy(mb, m + j, static_cast<size_t>(k));
      dead = _mm256_or_ps(dead, masked_lanes(mb));
    }
    a = _mm256_blendv_ps(a, ninf, dead);
    _mm256_storeu_ps(work + j, a);  // the padding lanes land in work's rounded-up tail
    mx0 = _mm256_max_ps(mx0, a);
  }
  const float row_max = hmax(_mm256_max_ps(mx0, mx1));
  if (row_max == -std::numeric_limits<float>::infinity()) {
    // Nothing to normalize (all masked, or all -inf): a zero row instead of 0/0 = NaN. (A NaN
    // score may leave row_max NaN: the row then comes out NaN, as in torch.)
    write_row<D>(y, 0, sk, stream, [](int64_t, int64_t) { return _mm256_setzero_ps(); });
    return;
  }

  const int64_t nv = (n + 7) / 8 * 8;
  const __m256 vmax = _mm256_set1_ps(row_max);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  j = 0;
  for (; j + 16 <= nv; j += 16) {
    __m256 a = exp256(_mm256_sub_ps(_mm256_loadu_ps(work + j), vmax));
    __m256 b = exp256(_mm256_sub_ps(_mm256_loadu_ps(work + j + 8), vmax));
    _mm256_storeu_ps(work + j, a);
    _mm256_storeu_ps(work + j + 8, b);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
  }
  if (j < nv) {
    __m256 a = exp256(_mm256_sub_ps(_mm256_loadu_ps(work + j), vmax));
    _mm256_storeu_ps(work + j, a);
    s0 = _mm256_add_ps(s0, a);
  }

  const __m256 inv = _mm256_set1_ps(1.0f / hsum(_mm256_add_ps(s0, s1)));
  // work has 8 floats of slack past n, so a full-vector read at any j < n stays inside it
  write_row<D>(y, n, sk, stream, [&](int64_t i, int64_t) {
    return _mm256_mul_ps(_mm256_loadu_ps(work + i), inv);
  });
}

// ---- backward --------------------------------------------------------------------------------
template <DType D>
void bwd_row(const typename Vec<D>::T* dy, const typename Vec<D>::T* p, typename Vec<D>::T* dx,
             int64_t n, int64_t sk, float scale, bool stream) {
  __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    d0 = _mm256_fmadd_ps(Vec<D>::load(dy + j), Vec<D>::load(p + j), d0);
    d1 = _mm256_fmadd_ps(Vec<D>::load(dy + j + 8), Vec<D>::load(p + j + 8), d1);
  }
  for (; j < n; j += 8) {
    const int64_t k = n - j < 8 ? n - j : 8;
    __m256 a = k == 8 ? Vec<D>::load(dy + j) : load_part<D>(dy + j, k);
    __m256 b = k == 8 ? Vec<D>::load(p + j) : load_part<D>(p + j, k);
    d0 = _mm256_fmadd_ps(a, b, d0);
  }
  const __m256 dot = _mm256_set1_ps(hsum(_mm256_add_ps(d0, d1)));
  const __m256 vscale = _mm256_set1_ps(scale);
  write_row<D>(dx, n, sk, stream, [&](int64_t i, int64_t k) {
    const __m256 g = _mm256_sub_ps(k == 8 ? Vec<D>::load(dy + i) : load_part<D>(dy + i, k), dot);
    const __m256 pv = k == 8 ? Vec<D>::load(p + i) : load_part<D>(p + i, k);
    return _mm256_mul_ps(_mm256_mul_ps(pv, vscale), g);
  });
}

template <DType D> using Ptr = typename Vec<D>::T*;
template <DType D> using CPtr = const typename Vec<D>::T*;

}  // namespace

void stream_fence() { _mm_sfence(); }

void fwd_row_avx2(const void* x, const uint8_t* mrow, void* y, int64_t n, int64_t sk,
                  float scale, DType dt, float* work, bool stream) {
  switch (dt) {
    case DType::F32:
      return fwd_row<DType::F32>(static_cast<CPtr<DType::F32>>(x), mrow,
                                 static_cast<Ptr<DType::F32>>(y), n, sk, scale, work, stream);
    case DType::F16:
      return fwd_row<DType::F16>(static_cast<CPtr<DType::F16>>(x), mrow,
                                 static_cast<Ptr<DType::F16>>(y), n, sk, scale, work, stream);
    case DType::BF16:
      return fwd_row<DType::BF16>(static_cast<CPtr<DType::BF16>>(x), mrow,
                                  static_cast<Ptr<DType::BF16>>(y), n, sk, scale, work, stream);
  }
}

void bwd_row_avx2(const void* dy, const void* p, void* dx, int64_t n, int64_t sk, float scale,
                  DType dt, bool stream) {
  switch (dt) {
    case DType::F32:
      return bwd_row<DType::F32>(static_cast<CPtr<DType::F32>>(dy),
                                 static_cast<CPtr<DType::F32>>(p),
                                 static_cast<Ptr<DType::F32>>(dx), n, sk, scale, stream);
    case DType::F16:
      return bwd_row<DType::F16>(static_cast<CPtr<DType::F16>>(dy),
                                 static_cast<CPtr<DType::F16>>(p),
                                 static_cast<Ptr<DType::F16>>(dx), n, sk, scale, stream);
    case DType::BF16:
      return bwd_row<DType::BF16>(static_cast<CPtr<DType::BF16>>(dy),
                                  static_cast<CPtr<DType::BF16>>(p),
                                  static_cast<Ptr<DType::BF16>>(dx), n, sk, scale, stream);
  }
}

}  // namespace megapre::cpu::softmax_impl

#pragma GCC pop_options
