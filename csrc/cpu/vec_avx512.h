// AVX-512 (F/BW/VL) helpers shared by the *_avx512.cpp kernels: masked fp32 <-> fp16/bf16 loads
// and stores of 16 elements, lane masks and horizontal reductions. As with vec_avx2.h, the
// header sets its own target around its code (the AVX-512 kernels' F/BW/VL plus AVX2, so the
// helpers inline into every AVX-512 translation unit, VNNI ones included), is for those
// translation units only, and keeps everything in an anonymous namespace so no AVX-512 copy of
// a helper can be linked into other code.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "dtype.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// False alarms: GCC 12's AVX-512 intrinsic headers start some results from an undefined vector
// (`__m256i __Y = __Y;`), and it checks the zmm-return ABI before applying the target pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace megapre::cpu::avx512 {
namespace {

// Not std::min (see vec_avx2.h).
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes [0, k) of a 16-lane mask, 0 <= k <= 16.
inline __mmask16 first16(int64_t k) { return static_cast<__mmask16>((1u << k) - 1u); }
// Lanes [0, n) for any n >= 0 (all 16 from n = 16 on).
inline __mmask16 mask16(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xffff) : first16(n); }
// Bytes [0, n) of a 64-byte mask, n in [0, 64].
inline __mmask64 mask64(int64_t n) { return n >= 64 ? ~__mmask64{0} : ((__mmask64{1} << n) - 1); }
constexpr __mmask16 kAll16 = 0xffff;

// Horizontal sums / max. (GCC 12's _mm512_reduce_* trip -Wuninitialized inside its own
// headers, so these fold the halves with shuffles instead.)
inline __m256i hi256(__m512i v) { return _mm512_castsi512_si256(_mm512_shuffle_i64x2(v, v, 0xee)); }
inline int32_t hsum(__m512i v) {
  __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(v), hi256(v));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
inline float hsum(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castsi256_ps(hi256(u)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(v), _mm256_castsi256_ps(hi256(u)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// ---- 16 elements in order <-> one fp32 vector ---------------------------------------------
// load(p, m): lanes in m, the others 0 (masked-off bytes are never touched). store<kExact>(p,
// v, m): round to nearest even and store the lanes in m. stream<kExact>(p, v): all 16,
// non-temporally (p 64-byte aligned for fp32, 32-byte for the 16-bit types). kExact: NaNs get
// dtype.h's exact bits; without it a bf16 NaN with a nonzero low half may round to inf, fine
// where every NaN comes from bf16 data or is the default NaN.
template <DType D> struct V16;

template <> struct V16<DType::F32> {
  using T = float;
  static __m512 load(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  template <bool kExact = false> static void store(T* p, __m512 v, __mmask16 m) {
    _mm512_mask_storeu_ps(p, m, v);
  }
  template <bool kExact = false> static void stream(T* p, __m512 v) { _mm512_stream_ps(p, v); }
};

// Shared by the two 16-bit types: 16 elements are one 256-bit vector.
template <class Self> struct Half16 {
  using T = uint16_t;
  template <bool kExact = false> static void store(T* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, Self::template pack<kExact>(v));
  }
  template <bool kExact = false> static void stream(T* p, __m512 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), Self::template pack<kExact>(v));
  }
};

template <> struct V16<DType::F16> : Half16<V16<DType::F16>> {
  static __m512 load(const T* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  // Hardware rounding; a NaN keeps its payload (exactness is not needed by the callers).
  template <bool kExact = false> static __m256i pack(__m512 v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
};

template <> struct V16<DType::BF16> : Half16<V16<DType::BF16>> {
  static __m512 load(const T* p, __mmask16 m) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // Round to nearest even (add 0x7fff plus the lsb of the kept half), then narrow each lane's
  // top half; kExact: a NaN keeps its top half with the quiet bit set.
  template <bool kExact = false> static __m256i pack(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    if constexpr (kExact) {
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    }
    return _mm512_cvtepi32_epi16(r);
  }
};

}  // namespace
}  // namespace megapre::cpu::avx512

#pragma GCC diagnostic pop
#pragma GCC pop_options
