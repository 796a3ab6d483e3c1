// Scalar float16 / bfloat16 <-> float32 conversions and the runtime-dtype dispatch shared by
// the CPU kernels (portable code: no intrinsics here, so it can be included before an AVX2 or
// AVX-512 target pragma).
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace megapre::cpu {

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  return from_bits(u);
}

// Round to nearest even, with overflow to inf and gradual underflow.
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);        // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);       // overflow -> inf
  if (a < 0x38800000u) {                                                    // subnormal / zero
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);                // rounds to 0
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) - 1 ... value = m * 2^(e-150); want units of 2^-24
    // units of 2^-24: m * 2^(e - 150 + 24) = m >> (126 - e)
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (r >> 13));
}

template <DType D> struct Elem;
template <> struct Elem<DType::F32> {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
  static void store(T* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Elem<DType::BF16> {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return bf16_to_f32(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};
template <> struct Elem<DType::F16> {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return f16_to_f32(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
};

// ---- runtime dtype -> template argument ------------------------------------------------------
// Dt<D>::value is D as a constant; a plain struct (no member functions), so nothing of it is
// compiled differently under a target pragma.
template <DType D> struct Dt {
  static constexpr DType value = D;
};

// f(Dt<D>{}) for D = dt: the one place a DType picks a template instantiation. Call sites read
// `with_dtype(dt, [&](auto d) { kernel<decltype(d)::value>(...); })`; the lambda is inlined,
// so this costs what a hand-written switch did. DType has exactly these three values (the glue
// makes them from a checked torch dtype).
template <class F> [[gnu::always_inline]] inline decltype(auto) with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(Dt<DType::F32>{});
    case DType::F16: return f(Dt<DType::F16>{});
    case DType::BF16: return f(Dt<DType::BF16>{});
  }
  __builtin_unreachable();
}

// Element type of a DType's buffers.
template <DType D> using elem_t = typename Elem<D>::T;

}  // namespace megapre::cpu
