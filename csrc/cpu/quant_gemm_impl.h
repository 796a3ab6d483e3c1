// Private interface between the int8 dispatcher (quant_gemm.cpp: blocking, threading, scalar
// code) and its AVX2 microkernels (quant_gemm_avx2.cpp). Declarations only, nothing
// ISA-specific, so both translation units include it.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace megapre::cpu::qgemm {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

// ---- W8A8 packed layouts -------------------------------------------------------------------
// The blocked W8A8 kernel widens both operands to int16 while packing and multiplies with
// vpmaddwd (16 exact products per instruction, summed pairwise into int32). On AVX2 without
// VNNI this needs 2 multiply-port uops per 32 products, the same as the u8 x s8 maddubs route,
// but without maddubs's sign fix-up (a third multiply-port uop) or its int16 saturation.
// K is walked in pairs, zero padded at the end; a pair of int16 is one dword.
// A: x widened once per call to row-major int16 (rows padded to a multiple of kMR, columns to
//   an even count, padding zero); the microkernel broadcasts one dword per row and k-pair.
// B micro-panel (kNR rows of w = output columns): per k-pair the dword of each column.
constexpr int kMR = 6;
constexpr int kNR = 16;
constexpr int64_t kBPairElems = 2 * kNR;  // int16 per k-pair

// ---- AVX2 entry points (defined in quant_gemm_avx2.cpp) ----------------------------------
// Rows [r0, r1) of quantize_rowwise.
void quantize_rows_avx2(const void* x, int8_t* q, float* scale, int64_t r0, int64_t r1,
                        int64_t K, DType dt);

// Pack rows [n0, n0 + nr) (nr <= kNR) and columns [k0, k0 + kc) of w [N, K] into a B
// micro-panel of ceil(kc / 2) k-pairs. Returns false if a -128 is seen.
bool pack_b_avx2(const int8_t* w, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                 int16_t* dst);
// dst[r, :] = x[r, :] widened to int16 and zero padded to ldd columns, for r in [r0, r1).
void widen_rows_avx2(const int8_t* x, int64_t K, int64_t r0, int64_t r1, int16_t* dst,
                     int64_t ldd);
// c[kMR x kNR] (row stride ldc) = (accumulate ? c : 0) + A * B^T over kp k-pairs; A: kMR rows
// of the widened x with row stride lda, already offset to the block's first column.
void micro_int8_avx2(const int16_t* a, int64_t lda, const int16_t* b, int64_t kp, int32_t* c,
                     int64_t ldc, bool accumulate);
// out[m, n] = float(acc[m, n]) * xs[m] * ws[n] + bias[n] (bias may be null) for m < mr,
// n < nr; pointers already at the tile origin, acc/out row strides ldacc/ldo elements.
void epilogue_int8_avx2(const int32_t* acc, int64_t ldacc, const float* xs, const float* ws,
                        const float* bias, void* out, int64_t ldo, int64_t mr, int64_t nr,
                        DType dt);

// Small-M W8A8 straight from row-major w: acc[m, n - n0] = sum_k x[m, k] * w[n, k] for
// m < M <= 4, n in [n0, n1). Uses maddubs(|x|, w with the sign of x): exact because
// w != -128 and every int16 pair sum is at most 2 * 128 * 127 < 2^15. xp / uxp: x and |x|
// (u8), M rows of stride ldx, zero padded to a multiple of 32 columns. Returns false if
// w[n0:n1] holds a -128.
bool gemv_int8_avx2(const int8_t* xp, const int8_t* uxp, int64_t ldx, int64_t M,
                    const int8_t* w, int64_t K, int64_t n0, int64_t n1, int32_t* acc);

// ---- Weight-only (float x, int8 w, fp32 accumulation) ------------------------------------
// Convert n contiguous elements of dtype dt to float32.
void to_f32_avx2(const void* x, int64_t n, float* dst, DType dt);
// Small M: acc[m, n - n0] = sum_k x[m, k] * float(w[n, k]) for m < M, n in [n0, n1);
// x fp32 with row stride ldx. Each weight row is read from memory once.
void wo_gemv_avx2(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                  int64_t n0, int64_t n1, float* acc);
// Large M: B micro-panel of kFNR dequantized (unscaled) weight rows, per k kFNR floats.
constexpr int kFMR = 6;
constexpr int kFNR = 16;
void pack_fb_avx2(const int8_t* w, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                  float* dst);
// c[kFMR x kFNR] (row stride ldc) = (accumulate ? c : 0) + A * B^T over kc steps;
// A: kFMR rows of fp32 with row stride lda.
void micro_f32_avx2(const float* a, int64_t lda, const float* b, int64_t kc, float* c,
                    int64_t ldc, bool accumulate);
// out[m, n] = acc[m, n] * ws[n] + bias[n] for m < mr, n < nr (pointers at the tile origin).
void epilogue_f32_avx2(const float* acc, int64_t ldacc, const float* ws, const float* bias,
                       void* out, int64_t ldo, int64_t mr, int64_t nr, DType dt);

// ---- AVX-512 VNNI entry points (defined in quant_gemm_avx512.cpp) -------------------------
// vpdpbusd multiplies unsigned by signed bytes and adds each group of 4 products into an
// int32 lane, without saturation. The unsigned operand is u = w + 128 (in [1, 255] for valid
// weights: B packing stores it, the small-M kernel flips the sign bit of w as it loads), the
// signed one is x (packed into row panels, or a zero-padded copy for small M), so
//   sum_k u[n,k] * x[m,k] = sum_k w[n,k] * x[m,k] + 128 * rowsum[m],  rowsum[m] = sum_k x[m,k],
// and the epilogue subtracts 128 * rowsum[m]. All sums wrap modulo 2^32, so the result is the
// exact int32 dot product whenever that fits in int32 (the kernel's contract).
// B micro-panel: kVNR rows of w (output columns), per k-quad q the 4 bytes u[n, 4q..4q+3]
// of each column n in order (kVNR dwords = 4 zmm); zero bytes beyond N and K, so padding
// contributes nothing whatever x holds there.
constexpr int kVMR = 6;
constexpr int kVNR = 64;
constexpr int64_t kVQuadBytes = 4 * kVNR;  // bytes per k-quad of a B micro-panel

void quantize_rows_avx512(const void* x, int8_t* q, float* scale, int64_t r0, int64_t r1,
                          int64_t K, DType dt);
// sum[r] = sum_k x[r, k] for r in [r0, r1) (x rows of stride ldx, K valid bytes each).
void rowsum_avx512(const int8_t* x, int64_t ldx, int64_t K, int64_t r0, int64_t r1,
                   int32_t* sum);
// Pack rows [n0, n0 + nr) (nr <= kVNR) of w [N, K], all of K, into one B micro-panel of
// ceil(K / 4) quads. Returns false if a -128 is seen.
bool pack_b_vnni(const int8_t* w, int64_t K, int64_t n0, int64_t nr, uint8_t* dst);
// A panels: kVMR rows of x per panel, per k-quad the 4 bytes of each row in order (24 bytes),
// zero past K and past M. Packs rows [m0, m1) (m0 a multiple of kVMR) of x [M, K] into the
// panels m0 / kVMR .. of dst (each ceil(K / 4) * 24 bytes) and sets rowsum[m0 .. m1).
void pack_a_vnni(const int8_t* x, int64_t K, int64_t m0, int64_t m1, int8_t* dst,
                 int32_t* rowsum);
// c[kVMR x kVNR] (row stride ldc) = (accumulate ? c : 0) + sum over kq quads of u * x;
// a: an A panel at the block's first quad; b: the B micro-panel at the same quad.
void micro_vnni(const int8_t* a, const uint8_t* b, int64_t kq, int32_t* c, int64_t ldc,
                bool accumulate);
// out[m, n] = float(acc[m, n] - 128 * rowsum[m]) * xs[m] * ws[n] + bias[n] for m < mr,
// n < nr (pointers at the tile origin; rowsum and xs indexed by tile row).
void epilogue_vnni(const int32_t* acc, int64_t ldacc, const int32_t* rowsum, const float* xs,
                   const float* ws, const float* bias, void* out, int64_t ldo, int64_t mr,
                   int64_t nr, DType dt);
// Small-M W8A8 straight from row-major w (read in place, each row once per 4 rows of x):
// acc[m, n - n0] = sum_k x[m, k] * w[n, k] (exact, correction applied) for m < M, n in
// [n0, n1). xp: M rows of stride ldx (a multiple of 64), zero padded; rowsum: their row
// sums. Returns false if w[n0:n1] holds a -128.
bool gemv_vnni(const int8_t* xp, int64_t ldx, int64_t M, const int32_t* rowsum,
               const int8_t* w, int64_t K, int64_t n0, int64_t n1, int32_t* acc);
// Weight-only small M: as wo_gemv_avx2 (acc[m, n - n0] = sum_k x[m, k] * float(w[n, k])),
// 16 lanes wide, with software prefetch of the weight rows that follow.
void wo_gemv_avx512(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                    int64_t n0, int64_t n1, float* acc);

}  // namespace megapre::cpu::qgemm
