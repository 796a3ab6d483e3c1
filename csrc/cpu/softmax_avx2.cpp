// AVX2/FMA/F16C row kernels for the fused scale + mask + softmax (see softmax_impl.h).
// Everything after the target pragma is compiled for AVX2; only the entry points declared in
// softmax_impl.h are visible outside this file.
//
// Rows are processed in chunks of 16 elements held as two fp32 vectors. Chunks sit on a grid
// aligned to the output row (a short head chunk first), so full chunks are aligned loads and
// stores and whole cache lines can be streamed. Within a chunk the lanes follow the element
// type's cheapest conversion order (bf16: even elements, then odd ones); everything between a
// chunk's load and its store is elementwise or a reduction, so the order never shows.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dtype.h"
#include "softmax_impl.h"
#include "vec_avx2.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "softmax_rows.h"

namespace megapre::cpu::softmax_impl {
namespace {

using namespace avx2;

constexpr float kInf = __builtin_inff();

// Chunks are vec_avx2.h's 16-element pairs (bf16: even elements, then odd ones).
template <DType D> using Chunk = V16<D>;
template <DType D> using Elt = elem_t<D>;

// Copies k < 16 elements as at most four fixed-size moves (a variable-length memcpy call
// costs more than a whole chunk of math).
template <class T> inline void copy_few(T* dst, const T* src, int64_t k) {
  int64_t i = 0;
  if (k & 8) {
    std::memcpy(dst, src, 8 * sizeof(T));
    i = 8;
  }
  if (k & 4) {
    std::memcpy(dst + i, src + i, 4 * sizeof(T));
    i += 4;
  }
  if (k & 2) {
    std::memcpy(dst + i, src + i, 2 * sizeof(T));
    i += 2;
  }
  if (k & 1) dst[i] = src[i];
}

// All-ones 16-bit words [0, k), 0 <= k <= 16.
inline __m256i first_words(int64_t k) {
  alignas(32) static constexpr int16_t kOnesThenZeros[32] = {
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
  return loadu256(kOnesThenZeros + kChunk - k);
}

// Partial chunks (k < 16 elements at the ends of a row). Lanes past k load as 0. Where the
// alignment allows, they are masked loads (vpmaskmov never touches masked-off lanes); the
// fallback goes through a stack buffer, which costs a store-forwarding stall -- several per
// row, enough to slow rows of a few hundred keys by a third.
template <DType D> Pair load_part(const Elt<D>* p, int64_t k) {
  if constexpr (D == DType::F32) {
    return {_mm256_maskload_ps(p, first_lanes(k)), _mm256_maskload_ps(p + 8, first_lanes(k - 8))};
  } else {
    if (reinterpret_cast<uintptr_t>(p) % 4 == 0) {
      // The 32-bit lanes holding elements [0, k): for odd k the last one also holds element
      // k, which lies in the same aligned 4 bytes (so on a mapped page) and is cleared.
      const __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), first_words(k + 1));
      return Chunk<D>::unpack(_mm256_and_si256(v, first_words(k)));
    }
    Elt<D> buf[kChunk] = {};
    copy_few(buf, p, k);
    return Chunk<D>::load(buf);
  }
}

template <DType D> void store_part(Elt<D>* p, Pair v, int64_t k) {
  if constexpr (D == DType::F32) {
    _mm256_maskstore_ps(p, first_lanes(k), v.a);
    _mm256_maskstore_ps(p + 8, first_lanes(k - 8), v.b);
  } else {
    Elt<D> buf[kChunk];  // whole-store then narrower loads: these forward without a stall
    Chunk<D>::store(buf, v);
    copy_few(p, buf, k);
  }
}

// Mask bytes of a partial chunk of k < 16 keys at m (nullptr: none masked), with the lanes
// past k marked masked too (dead).
inline __m128i partial_mask_bytes(const uint8_t* m, int64_t k) {
  alignas(16) static constexpr uint8_t kZerosThenOnes[32] = {
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
      1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  const __m128i dead = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kZerosThenOnes + kChunk - k));
  if (m == nullptr) return dead;
  if (reinterpret_cast<uintptr_t>(m) % 4 == 0) {
    // The 32-bit lanes holding bytes [0, k); bytes past k in the last one (same aligned 4
    // bytes, so a mapped page) are overridden by dead.
    const __m128i lanes = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(k)), _mm_setr_epi32(0, 4, 8, 12));
    return _mm_or_si128(_mm_maskload_epi32(reinterpret_cast<const int*>(m), lanes), dead);
  }
  uint8_t mb[kChunk] = {};
  copy_few(mb, m, k);
  return _mm_or_si128(loadu128(mb), dead);
}

template <DType D> Pair load_any(const Elt<D>* p, int64_t k) {
  return k == kChunk ? Chunk<D>::load(p) : load_part<D>(p, k);
}

// A row of sk outputs (see write_row_chunks): partial chunks through store_part.
template <DType D, class Value>
void write_row(Elt<D>* y, int64_t sk, int64_t head, bool stream, const Value& value) {
  write_row_chunks(
      y, sk, head, stream, value, [&](int64_t j, int64_t k, Pair v) { store_part<D>(y + j, v, k); },
      [&](int64_t j, Pair v, bool nt) {
        if (nt) Chunk<D>::stream(y + j, v);
        else Chunk<D>::store(y + j, v);
      });
}

// 2^t for t <= 0 (or NaN), fp32, within 2e-7 relative. Scores are pre-multiplied by
// scale*log2(e), so exp needs no range-reduction multiply: adding 1.5*2^23 + 127 rounds t to
// an integer n and leaves n + 127 -- the biased exponent of 2^n -- in the low mantissa bits,
// r = t - n lies in [-0.5, 0.5], and 2^r is a degree-5 minimax polynomial. t is clamped at
// -127, where the exponent field is 0 and the result exactly 0: masked keys (t = -inf) come
// out as exact zeros, and results below ~1e-38, invisible next to the row maximum's 2^0 = 1,
// are flushed. NaN propagates (max returns its second operand on NaN).
inline __m256 exp2_nonpos(__m256 t) {
  t = _mm256_max_ps(_mm256_set1_ps(kExp2Min), t);
  const __m256 magic = _mm256_set1_ps(kExp2Magic);
  const __m256 big = _mm256_add_ps(t, magic);
  const __m256 r = _mm256_sub_ps(t, _mm256_sub_ps(big, magic));
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2Poly[i]));
  const __m256 pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(big), 23));
  return _mm256_mul_ps(p, pow2n);
}

// Keys after the last unmasked one take no part in the row (padding masks hide a tail of
// keys): returns the index of that key + 1, 0 when all n are masked.
inline int64_t live_prefix(const uint8_t* m, int64_t n) {
  for (; n >= 32; n -= 32) {
    const __m256i v = loadu256(m + n - 32);
    const auto live = static_cast<uint32_t>(
        _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
    if (live != 0) return n - 32 + (32 - __builtin_clz(live));
  }
  while (n > 0 && m[n - 1] != 0) --n;
  return n;
}

// Whether any of the n mask bytes at m is nonzero. A padding mask leaves none in the live
// prefix, and pass 1 then skips the mask entirely.
inline bool any_masked(const uint8_t* m, int64_t n) {
  if (n < 32) {
    for (int64_t j = 0; j < n; ++j) {
      if (m[j] != 0) return true;
    }
    return false;
  }
  for (int64_t j = 0; j + 32 < n; j += 32) {
    const __m256i v = loadu256(m + j);
    if (!_mm256_testz_si256(v, v)) return true;
  }
  const __m256i v = loadu256(m + n - 32);  // the last 32, overlapping the loop's
  return !_mm256_testz_si256(v, v);
}

// ---- forward ---------------------------------------------------------------------------------
// Pass 1 converts, scales (by scale*log2 e), masks (-inf) and stores the row into work in
// chunk order while tracking the max; pass 2 replaces work by 2^(work - max) and sums it;
// pass 3 writes work / sum and the zero tail. The source row is read once and the output
// written once; the repeated passes touch only the cached fp32 work row.
template <DType D>
void fwd_row(const Elt<D>* x, const uint8_t* m, Elt<D>* y, int64_t n, int64_t sk, float scale,
             float* work, bool stream) {
  const int64_t head = grid_head(y);
  if (m != nullptr) {
    n = live_prefix(m, n);  // the masked tail is written as zeros, like causal
    if (!any_masked(m, n)) m = nullptr;
  }
  const __m256 vc = _mm256_set1_ps(static_cast<float>(scale * 1.4426950408889634));
  const __m256 ninf = _mm256_set1_ps(-kInf);
  Pair mx = {ninf, ninf};
  float* w = work;
  for_chunks(head, n, [&](int64_t j, int64_t k) {
    Pair v = load_any<D>(x + j, k);
    v.a = _mm256_mul_ps(v.a, vc);
    v.b = _mm256_mul_ps(v.b, vc);
    if (k < kChunk) {  // lanes past k are dead: -inf, like masked keys
      const Pair dead = Chunk<D>::masked(partial_mask_bytes(m == nullptr ? nullptr : m + j, k));
      v.a = _mm256_blendv_ps(v.a, ninf, dead.a);
      v.b = _mm256_blendv_ps(v.b, ninf, dead.b);
    } else if (m != nullptr) {
      const Pair hid = Chunk<D>::masked(loadu128(m + j));
      v.a = _mm256_blendv_ps(v.a, ninf, hid.a);
      v.b = _mm256_blendv_ps(v.b, ninf, hid.b);
    }
    _mm256_storeu_ps(w, v.a);
    _mm256_storeu_ps(w + 8, v.b);
    w += kChunk;
    mx.a = _mm256_max_ps(mx.a, v.a);
    mx.b = _mm256_max_ps(mx.b, v.b);
  });
  const float row_max = hmax(_mm256_max_ps(mx.a, mx.b));
  if (row_max == -kInf) {
    // Nothing to normalize (all masked, or all -inf): a zero row instead of 0/0 = NaN. (A NaN
    // score may leave row_max NaN: the row then comes out NaN, as in torch.)
    write_row<D>(y, sk, head, stream, [](int64_t, int64_t) { return zero_pair(); });
    return;
  }

  const __m256 vmax = _mm256_set1_ps(row_max);
  Pair s = zero_pair();
  for (float* p = work; p < w; p += kChunk) {
    const __m256 a = exp2_nonpos(_mm256_sub_ps(_mm256_loadu_ps(p), vmax));
    const __m256 b = exp2_nonpos(_mm256_sub_ps(_mm256_loadu_ps(p + 8), vmax));
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
    s.a = _mm256_add_ps(s.a, a);
    s.b = _mm256_add_ps(s.b, b);
  }

  const __m256 inv = _mm256_set1_ps(1.0f / hsum(_mm256_add_ps(s.a, s.b)));
  const float* p = work;
  write_row<D>(y, sk, head, stream, [&](int64_t j, int64_t) {
    if (j >= n) return zero_pair();
    const Pair v = {_mm256_mul_ps(_mm256_loadu_ps(p), inv), _mm256_mul_ps(_mm256_loadu_ps(p + 8), inv)};
    p += kChunk;
    return v;
  });
}

// ---- backward --------------------------------------------------------------------------------
// dx = p * (dy * scale - <dy, p> * scale): one pass for the dot product, one for the output.
template <DType D>
void bwd_row(const Elt<D>* dy, const Elt<D>* p, Elt<D>* dx, int64_t n, int64_t sk, float scale,
             bool stream) {
  const int64_t head = grid_head(dx);
  Pair d = zero_pair();
  for_chunks(head, n, [&](int64_t j, int64_t k) {
    const Pair g = load_any<D>(dy + j, k), pv = load_any<D>(p + j, k);
    d.a = _mm256_fmadd_ps(g.a, pv.a, d.a);
    d.b = _mm256_fmadd_ps(g.b, pv.b, d.b);
  });
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 dot = _mm256_set1_ps(hsum(_mm256_add_ps(d.a, d.b)) * scale);
  write_row<D>(dx, sk, head, stream, [&](int64_t j, int64_t k) {
    if (j >= n) return zero_pair();
    const int64_t kin = imin(k, n - j);  // lanes past n load as p = 0, so give 0
    const Pair g = load_any<D>(dy + j, kin), pv = load_any<D>(p + j, kin);
    return Pair{_mm256_mul_ps(pv.a, _mm256_fmsub_ps(g.a, vscale, dot)),
                _mm256_mul_ps(pv.b, _mm256_fmsub_ps(g.b, vscale, dot))};
  });
}

template <DType D> using Ptr = Elt<D>*;
template <DType D> using CPtr = const Elt<D>*;

}  // namespace

void stream_fence() { _mm_sfence(); }

void fwd_row_avx2(const void* x, const uint8_t* mrow, void* y, int64_t n, int64_t sk,
                  float scale, DType dt, float* work, bool stream) {
  with_dtype(dt, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    fwd_row<D>(static_cast<CPtr<D>>(x), mrow, static_cast<Ptr<D>>(y), n, sk, scale, work, stream);
  });
}

void bwd_row_avx2(const void* dy, const void* p, void* dx, int64_t n, int64_t sk, float scale,
                  DType dt, bool stream) {
  with_dtype(dt, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    bwd_row<D>(static_cast<CPtr<D>>(dy), static_cast<CPtr<D>>(p), static_cast<Ptr<D>>(dx), n, sk,
               scale, stream);
  });
}

}  // namespace megapre::cpu::softmax_impl

#pragma GCC pop_options
