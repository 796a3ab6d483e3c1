// AVX2/FMA/F16C helpers shared by the *_avx2.cpp kernels: fp32 <-> fp16/bf16 loads, stores and
// roundings, lane masks and horizontal reductions. One copy per ISA, so every kernel rounds the
// same way and a fix lands everywhere.
//
// The header sets the kernels' own target ("avx2,fma,f16c") around its code, so the helpers are
// AVX2 code whichever file includes them, and inline into the AVX2 (and AVX-512) kernels. Include
// it only from those translation units: nothing here is portable. Everything is in an anonymous
// namespace: each translation unit keeps its own copy, so the linker can never pick this AVX2
// code for a portable caller (or an AVX-512-compiled copy for an AVX2 one), which shared inline
// functions with external linkage would allow.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "dtype.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace megapre::cpu::avx2 {
namespace {

// Not std::min: a standard-library template instantiated under a target pragma may be the copy
// the linker keeps for the portable translation units too.
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m256i loadu256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i loadu128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

inline __m256 is_nan(__m256 v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }

// All-ones 32-bit lanes [0, k) (k may be <= 0 or >= 8): the mask of a partial maskload/store.
inline __m256i first_lanes(int64_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// bf16 round to nearest even of each fp32 lane: the result is in the upper 16 bits (the lower
// ones are garbage). kExact: a NaN keeps its upper half with the quiet bit set, the bits of
// dtype.h's f32_to_bf16; without it a NaN with a nonzero low half may round to inf, which is
// fine where every NaN comes from bf16 data (low half 0) or is the default NaN.
template <bool kExact> __m256i bf16_round_hi(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  if constexpr (kExact) r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)),
                                                _mm256_castps_si256(is_nan(v)));
  return r;
}

// ---- 8 elements in order <-> one fp32 vector ------------------------------------------------
// load(p): 8 elements at p. pack(v): 8 rounded elements (16-bit types; NaN as dtype.h).
// store(p, v): stores v rounded and returns the values as stored.
template <DType D> struct V8;

template <> struct V8<DType::F32> {
  using T = float;
  static __m256 load(const T* p) { return _mm256_loadu_ps(p); }
  static __m256 store(T* p, __m256 v) {
    _mm256_storeu_ps(p, v);
    return v;
  }
};

template <> struct V8<DType::F16> {
  using T = uint16_t;
  static __m256 load(const T* p) { return _mm256_cvtph_ps(loadu128(p)); }
  static __m128i pack(__m256 v) { return _mm256_cvtps_ph(v, kRne); }
  static __m256 store(T* p, __m256 v) {
    const __m128i h = pack(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return _mm256_cvtph_ps(h);
  }
};

template <> struct V8<DType::BF16> {
  using T = uint16_t;
  static __m256 load(const T* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(loadu128(p)), 16));
  }
  // The rounded bf16 in the low half of each 32-bit lane.
  static __m256i round(__m256 v) { return _mm256_srli_epi32(bf16_round_hi<true>(v), 16); }
  static __m128i narrow(__m256i r) {
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  }
  static __m128i pack(__m256 v) { return narrow(round(v)); }
  static __m256 store(T* p, __m256 v) {
    const __m256i r = round(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(r));
    return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
  }
};

// ---- 16 elements <-> a pair of fp32 vectors ---------------------------------------------------
// Within a pair the lanes follow the element type's cheapest conversion order: element order
// for fp32/fp16, for bf16 the even elements in `a` and the odd ones in `b` (the bf16 <-> fp32
// conversion is then a shift and a mask, no cross-lane shuffle). Code between a load and a
// store that is elementwise or a reduction never sees the order; per-column operands (gamma,
// mask lanes) must follow it.
struct Pair {
  __m256 a, b;
};
inline Pair zero_pair() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Pair splat(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline Pair operator+(Pair x, Pair y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline Pair operator-(Pair x, Pair y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
inline Pair operator*(Pair x, Pair y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline Pair operator&(Pair x, Pair y) { return {_mm256_and_ps(x.a, y.a), _mm256_and_ps(x.b, y.b)}; }
inline Pair fmadd(Pair x, Pair y, Pair z) {
  return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
}
inline Pair loadf(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void storef(float* p, Pair v) {
  _mm256_storeu_ps(p, v.a);
  _mm256_storeu_ps(p + 8, v.b);
}
inline float hsum(Pair v) { return hsum(_mm256_add_ps(v.a, v.b)); }

// All-ones lanes where the low 8 of the mask bytes are nonzero.
inline __m256 mask8(__m128i bytes) {
  const __m256i w = _mm256_cvtepu8_epi32(bytes);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}

// Lanes {first 8, last 8} (element order) whose mask byte is nonzero.
inline Pair mask16_in_order(__m128i bytes) { return {mask8(bytes), mask8(_mm_srli_si128(bytes, 8))}; }

// load(p) / unpack(bits): 16 elements as a Pair. store / stream<kExact>(p, v): round to nearest
// even and store 16 elements, stream non-temporally (p 32-byte aligned); kExact gives NaNs the
// exact bits of dtype.h (without it, see bf16_round_hi; fp16 keeps the NaN payload).
// round_store: store and return the values as rounded. masked(bytes): the lanes, in load
// order, whose byte of 16 mask bytes is nonzero.
template <DType D> struct V16;

template <> struct V16<DType::F32> {
  using T = float;
  static Pair load(const T* p) { return loadf(p); }
  template <bool kExact = false> static void store(T* p, Pair v) { storef(p, v); }
  template <bool kExact = false> static void stream(T* p, Pair v) {
    _mm256_stream_ps(p, v.a);
    _mm256_stream_ps(p + 8, v.b);
  }
  template <bool kExact = false> static Pair round_store(T* p, Pair v) {
    storef(p, v);
    return v;
  }
  static Pair masked(__m128i bytes) { return mask16_in_order(bytes); }
};

// Shared by the two 16-bit types: their 16 elements are one 256-bit vector.
template <class Self> struct Half16 {
  using T = uint16_t;
  static Pair load(const T* p) { return Self::unpack(loadu256(p)); }
  template <bool kExact = false> static void store(T* p, Pair v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), Self::template pack<kExact>(v));
  }
  template <bool kExact = false> static void stream(T* p, Pair v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), Self::template pack<kExact>(v));
  }
  template <bool kExact = false> static Pair round_store(T* p, Pair v) {
    const __m256i h = Self::template pack<kExact>(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    return Self::unpack(h);
  }
};

template <> struct V16<DType::F16> : Half16<V16<DType::F16>> {
  static Pair load(const T* p) {  // two 128-bit loads: no cross-lane extract
    return {_mm256_cvtph_ps(loadu128(p)), _mm256_cvtph_ps(loadu128(p + 8))};
  }
  static Pair unpack(__m256i v) {
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(v)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1))};
  }
  template <bool kExact = false> static __m256i pack(Pair v) {
    __m256i h = _mm256_set_m128i(_mm256_cvtps_ph(v.b, kRne), _mm256_cvtps_ph(v.a, kRne));
    if constexpr (kExact) {  // hardware keeps NaN payload bits; dtype.h gives sign|0x7e00
      __m256i n = _mm256_packs_epi32(_mm256_castps_si256(is_nan(v.a)),
                                     _mm256_castps_si256(is_nan(v.b)));
      n = _mm256_permute4x64_epi64(n, 0xd8);
      h = _mm256_andnot_si256(_mm256_and_si256(n, _mm256_set1_epi16(0x01ff)), h);
    }
    return h;
  }
  static Pair masked(__m128i bytes) { return mask16_in_order(bytes); }
};

template <> struct V16<DType::BF16> : Half16<V16<DType::BF16>> {
  static __m256i hi_mask() { return _mm256_set1_epi32(static_cast<int>(0xffff0000u)); }
  static Pair unpack(__m256i v) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask()))};
  }
  template <bool kExact = false> static __m256i pack(Pair v) {
    return _mm256_or_si256(_mm256_srli_epi32(bf16_round_hi<kExact>(v.a), 16),
                           _mm256_and_si256(bf16_round_hi<kExact>(v.b), hi_mask()));
  }
  // The odd element's mask word is already the top half of its lane; the even one's is
  // shifted up there (blendv reads only the sign bit).
  static Pair masked(__m128i bytes) {
    const __m256i w = _mm256_cmpgt_epi16(_mm256_cvtepu8_epi16(bytes), _mm256_setzero_si256());
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), _mm256_castsi256_ps(w)};
  }
};

}  // namespace
}  // namespace megapre::cpu::avx2

#pragma GCC pop_options
