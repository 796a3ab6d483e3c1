// The chunk grid of the vector softmax rows (softmax_avx2.cpp, softmax_avx512.cpp): scalar
// bookkeeping only, the same for every ISA. Include it after the file's target pragma, so its
// templates are compiled (and inline) like the row code that instantiates them; the anonymous
// namespace keeps each file's copy its own.
#pragma once
#include <cstdint>

namespace megapre::cpu::softmax_impl {
namespace {

constexpr int64_t kChunk = 16;
constexpr uintptr_t kLineBytes = 64;

// exp2_nonpos (2^t for t <= 0) of every ISA: t is clamped at kExp2Min, rounded to an integer n
// by adding kExp2Magic = 1.5 * 2^23 + 127 (which leaves n + 127 in the low mantissa bits), and
// 2^(t - n) is this degree-5 minimax polynomial, highest power first. One set of constants, so
// the ISAs round alike.
constexpr float kExp2Min = -127.0f;
constexpr float kExp2Magic = 12583039.0f;
constexpr float kExp2Poly[6] = {1.326471916e-03f, 9.671513923e-03f, 5.550733954e-02f,
                                2.402224243e-01f, 6.931470037e-01f, 1.0f};

// Elements before y reaches a chunk boundary (kChunk elements' worth of bytes), in [0, 16).
template <class T> int64_t grid_head(const T* y) {
  constexpr uintptr_t bytes = kChunk * sizeof(T);
  const uintptr_t off = reinterpret_cast<uintptr_t>(y) % bytes;
  return static_cast<int64_t>((bytes - off) % bytes / sizeof(T));
}

// Calls fn(j, k) for consecutive chunks [j, j + k) covering [0, len): first a head chunk of
// `head` elements (so that later chunks start on the grid), then full chunks, then the rest.
// Two calls with the same head agree on every chunk start below the shorter len.
template <class Fn> void for_chunks(int64_t head, int64_t len, const Fn& fn) {
  int64_t j = head < len ? head : len;
  if (j > 0) fn(int64_t{0}, j);
  for (; j + kChunk <= len; j += kChunk) fn(j, kChunk);
  if (j < len) fn(j, len - j);
}

// Writes a row of sk outputs chunk by chunk: value(j, k) gives chunk [j, j + k); part(j, k, v)
// stores a partial chunk, full(j, v, nt) a full one, non-temporally when nt. With stream, nt is
// set for the full chunks whose cache line lies entirely inside the row: written to memory
// without first being read into the cache (no read-for-ownership), which pays off when the
// output is larger than the cache. A line is written either entirely streamed or entirely
// cached, because mixing both kinds in one line flushes a partial write-combining buffer.
template <class T, class Value, class Part, class Full>
void write_row_chunks(T* y, int64_t sk, int64_t head, bool stream, const Value& value,
                      const Part& part, const Full& full) {
  const auto base = reinterpret_cast<uintptr_t>(y);
  const uintptr_t line_lo = (base + kLineBytes - 1) & ~(kLineBytes - 1);
  const uintptr_t line_hi = (base + static_cast<uintptr_t>(sk) * sizeof(T)) & ~(kLineBytes - 1);
  stream = stream && base % sizeof(T) == 0;  // chunks on the grid are then aligned
  for_chunks(head, sk, [&](int64_t j, int64_t k) {
    const auto v = value(j, k);
    if (k < kChunk) return part(j, k, v);
    const uintptr_t at = base + static_cast<uintptr_t>(j) * sizeof(T);
    full(j, v, stream && at >= line_lo && at + kChunk * sizeof(T) <= line_hi);
  });
}

}  // namespace
}  // namespace megapre::cpu::softmax_impl
