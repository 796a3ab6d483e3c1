// Private interface between the softmax dispatcher (softmax.cpp, portable flags) and the vector
// row kernels (softmax_avx2.cpp / softmax_avx512.cpp, each compiled under its own target
// pragma). Only plain types cross this boundary so no inline code compiled for AVX2 or AVX-512
// can leak into the portable translation unit.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace megapre::cpu::softmax_impl {

// Floats of per-thread scratch a forward row of length sk needs: the row as whole 16-element
// chunks on the output's alignment grid (a partial head chunk, full chunks, a partial tail).
inline int64_t work_floats(int64_t sk) { return (sk / 16 + 2) * 16; }

// Forward for one row of sk elements of type dt. Only the first n (0 <= n <= sk) keys take part
// (the causal prefix); probs[n..sk) are written as zeros. mrow: n mask bytes, nonzero = masked,
// or nullptr for no mask; keys after the last unmasked one are skipped like causal ones.
// work: work_floats(sk) floats. A row with no finite-max candidate (every key masked or -inf)
// is written as zeros. stream: write y with non-temporal stores
// (for outputs much larger than the cache); call stream_fence() before the data is handed on.
void fwd_row_avx2(const void* x, const uint8_t* mrow, void* y, int64_t n, int64_t sk,
                  float scale, DType dt, float* work, bool stream);

// Backward for one row: dx[j] = scale * p[j] * (dy[j] - sum_{k<n} dy[k] * p[k]) for j < n,
// dx[n..sk) = 0 (the causally skipped keys; n may be 0). stream: as for fwd_row_avx2.
void bwd_row_avx2(const void* dy, const void* p, void* dx, int64_t n, int64_t sk, float scale,
                  DType dt, bool stream);

// The same two rows for CPUs with AVX-512 F/BW/VL (softmax_avx512.cpp); same arguments.
void fwd_row_avx512(const void* x, const uint8_t* mrow, void* y, int64_t n, int64_t sk,
                    float scale, DType dt, float* work, bool stream);
void bwd_row_avx512(const void* dy, const void* p, void* dx, int64_t n, int64_t sk, float scale,
                    DType dt, bool stream);

// Orders this thread's earlier non-temporal stores before its later stores (sfence).
void stream_fence();

}  // namespace megapre::cpu::softmax_impl
