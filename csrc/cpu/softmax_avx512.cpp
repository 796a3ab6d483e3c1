// AVX-512 (F/BW/VL) row kernels for the fused scale + mask + softmax (see softmax_impl.h): the
// algorithm of softmax_avx2.cpp with a 16-element chunk in one zmm register. Row ends, mask
// bytes and the dead lanes of partial chunks go through opmask registers (masked loads and
// stores never touch masked-off bytes), so no chunk needs a stack buffer and masking a key is
// one masked move instead of a blend. Same exp2, same roundings: results equal the AVX2 rows
// up to the order of the row reductions (max, sum, dot).
// Everything after the target pragma is compiled for AVX-512; no standard-library template is
// instantiated below it (the linker could keep that copy for the portable code).
#include <immintrin.h>

#include <cstdint>

#include "dtype.h"
#include "softmax_impl.h"
#include "vec_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// False alarms: GCC's AVX-512 intrinsic headers start some results from an undefined vector,
// and it checks the zmm-return ABI of the lambdas below before applying the target pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "softmax_rows.h"

namespace megapre::cpu::softmax_impl {
namespace {

constexpr float kInf = __builtin_inff();

using namespace avx512;

// Chunks are vec_avx512.h's 16 lanes in element order.
template <DType D> using Chunk = V16<D>;
template <DType D> using Elt = elem_t<D>;

// Lanes among `live` whose mask byte at m is nonzero (True = masked).
inline __mmask16 hidden(const uint8_t* m, __mmask16 live) {
  return _mm_mask_test_epi8_mask(live, _mm_maskz_loadu_epi8(live, m), _mm_set1_epi8(-1));
}

// A row of sk outputs (see write_row_chunks): partial chunks through masked stores.
template <DType D, class Value>
void write_row(Elt<D>* y, int64_t sk, int64_t head, bool stream, const Value& value) {
  write_row_chunks(
      y, sk, head, stream, value,
      [&](int64_t j, int64_t k, __m512 v) { Chunk<D>::store(y + j, v, first16(k)); },
      [&](int64_t j, __m512 v, bool nt) {
        if (nt) Chunk<D>::stream(y + j, v);
        else Chunk<D>::store(y + j, v, kAll16);
      });
}

// 2^t for t <= 0 (or NaN): the same steps and constants as exp2_nonpos in softmax_avx2.cpp.
inline __m512 exp2_nonpos(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(kExp2Min), t);
  const __m512 magic = _mm512_set1_ps(kExp2Magic);
  const __m512 big = _mm512_add_ps(t, magic);
  const __m512 r = _mm512_sub_ps(t, _mm512_sub_ps(big, magic));
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Poly[i]));
  const __m512 pow2n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(big), 23));
  return _mm512_mul_ps(p, pow2n);
}

// Index + 1 of the last unmasked key among the first n (0 when all are masked).
inline int64_t live_prefix(const uint8_t* m, int64_t n) {
  for (; n >= 64; n -= 64) {
    const __m512i v = _mm512_loadu_si512(m + n - 64);
    const uint64_t live = _mm512_cmpeq_epi8_mask(v, _mm512_setzero_si512());
    if (live != 0) return n - 64 + (64 - __builtin_clzll(live));
  }
  while (n > 0 && m[n - 1] != 0) --n;
  return n;
}

// Whether any of the n mask bytes at m is nonzero (padding masks leave none in the live prefix).
inline bool any_masked(const uint8_t* m, int64_t n) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    if (_mm512_test_epi8_mask(_mm512_loadu_si512(m + j), _mm512_set1_epi8(-1)) != 0) return true;
  }
  const __mmask64 rest = n - j == 0 ? 0 : ~__mmask64{0} >> (64 - (n - j));
  return _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(rest, m + j), _mm512_set1_epi8(-1)) != 0;
}

// ---- rows: the passes of softmax_avx2.cpp ------------------------------------------------------
template <DType D>
void fwd_row(const Elt<D>* x, const uint8_t* m, Elt<D>* y, int64_t n, int64_t sk, float scale,
             float* work, bool stream) {
  const int64_t head = grid_head(y);
  if (m != nullptr) {
    n = live_prefix(m, n);
    if (!any_masked(m, n)) m = nullptr;
  }
  const __m512 vc = _mm512_set1_ps(static_cast<float>(scale * 1.4426950408889634));
  const __m512 ninf = _mm512_set1_ps(-kInf);
  __m512 mx = ninf;
  float* w = work;
  for_chunks(head, n, [&](int64_t j, int64_t k) {
    const __mmask16 live = first16(k);
    __mmask16 dead = static_cast<__mmask16>(~live);
    if (m != nullptr) dead = static_cast<__mmask16>(dead | hidden(m + j, live));
    const __m512 v = _mm512_mask_mov_ps(_mm512_mul_ps(Chunk<D>::load(x + j, live), vc), dead, ninf);
    _mm512_storeu_ps(w, v);
    w += kChunk;
    mx = _mm512_max_ps(mx, v);
  });
  const float row_max = _mm512_reduce_max_ps(mx);
  if (row_max == -kInf) {  // all masked or all -inf: zeros, not 0/0
    write_row<D>(y, sk, head, stream, [](int64_t, int64_t) { return _mm512_setzero_ps(); });
    return;
  }

  const __m512 vmax = _mm512_set1_ps(row_max);
  __m512 s = _mm512_setzero_ps();
  for (float* p = work; p < w; p += kChunk) {
    const __m512 e = exp2_nonpos(_mm512_sub_ps(_mm512_loadu_ps(p), vmax));
    _mm512_storeu_ps(p, e);
    s = _mm512_add_ps(s, e);
  }

  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(s));
  const float* p = work;
  write_row<D>(y, sk, head, stream, [&](int64_t j, int64_t) {
    if (j >= n) return _mm512_setzero_ps();
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(p), inv);
    p += kChunk;
    return v;
  });
}

template <DType D>
void bwd_row(const Elt<D>* dy, const Elt<D>* p, Elt<D>* dx, int64_t n, int64_t sk, float scale,
             bool stream) {
  const int64_t head = grid_head(dx);
  __m512 d = _mm512_setzero_ps();
  for_chunks(head, n, [&](int64_t j, int64_t k) {
    const __mmask16 live = first16(k);
    d = _mm512_fmadd_ps(Chunk<D>::load(dy + j, live), Chunk<D>::load(p + j, live), d);
  });
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(d) * scale);
  write_row<D>(dx, sk, head, stream, [&](int64_t j, int64_t k) {
    if (j >= n) return _mm512_setzero_ps();
    const __mmask16 live = first16(imin(k, n - j));  // lanes past n load as p = 0, so give 0
    const __m512 g = Chunk<D>::load(dy + j, live), pv = Chunk<D>::load(p + j, live);
    return _mm512_mul_ps(pv, _mm512_fmsub_ps(g, vscale, dot));
  });
}

template <DType D> using Ptr = Elt<D>*;
template <DType D> using CPtr = const Elt<D>*;

}  // namespace

void fwd_row_avx512(const void* x, const uint8_t* mrow, void* y, int64_t n, int64_t sk,
                    float scale, DType dt, float* work, bool stream) {
  with_dtype(dt, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    fwd_row<D>(static_cast<CPtr<D>>(x), mrow, static_cast<Ptr<D>>(y), n, sk, scale, work, stream);
  });
}

void bwd_row_avx512(const void* dy, const void* p, void* dx, int64_t n, int64_t sk, float scale,
                    DType dt, bool stream) {
  with_dtype(dt, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    bwd_row<D>(static_cast<CPtr<D>>(dy), static_cast<CPtr<D>>(p), static_cast<Ptr<D>>(dx), n, sk,
               scale, stream);
  });
}

}  // namespace megapre::cpu::softmax_impl

#pragma GCC diagnostic pop
#pragma GCC pop_options
