// Raw-pointer CPU kernel interface. The torch-facing glue (csrc/cpu/ops_cpu.cpp) validates,
// makes inputs contiguous and calls these; kernels never see at::Tensor, so each family can be
// tested and tuned on its own. Threading (at::parallel_for) lives inside the family's .cpp.
#pragma once
#include <cstdint>

namespace megapre {

// Element type of the floating-point buffers passed as void*. Statistics, scales, gamma/beta
// and bias are always float32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

namespace cpu {

// Which vector ISA the CPU kernels use. kAuto picks the best the CPU has: AVX-512 VNNI
// (int8 kernels; the other families run their AVX2 code under it), else AVX2+FMA+F16C, else
// the portable scalar code.
enum class Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512Vnni = 3 };
void set_isa(Isa isa);        // tests force each ISA in turn to cover every path
bool use_avx2();              // resolved choice: AVX2 (or better) code runs
bool use_avx512vnni();        // resolved choice: the AVX-512 VNNI int8 code runs
const char* isa_name();       // "avx512vnni", "avx2" or "scalar": what runs now
bool cpu_has_avx2();          // hardware capability (AVX2 && FMA && F16C)
bool cpu_has_avx512vnni();    // AVX-512 F/BW/VL/VNNI, zmm state enabled by the OS, and AVX2

// ---- LayerNorm / RMSNorm over rows of length H --------------------------------------------
// x, residual, y, sum_out: [rows, H] of dtype dt. residual == nullptr: no fused add, sum_out
// unused. Otherwise s = x + residual (rounded to dt) is written to sum_out and normalized.
// gamma/beta: [H] float32 or nullptr (no affine / no bias). mean, rstd: [rows] float32;
// mean == nullptr when rms. LayerNorm: y = (s - mean) * rstd * gamma + beta,
// rstd = 1/sqrt(var + eps) with biased variance. RMSNorm: y = s * rstd * gamma,
// rstd = 1/sqrt(mean(s^2) + eps). All arithmetic in float32.
void norm_fwd(const void* x, const void* residual, void* y, void* sum_out, const float* gamma,
              const float* beta, float* mean, float* rstd, int64_t rows, int64_t H, float eps,
              bool rms, DType dt);

// dy, dsum, xin, dx: [rows, H] of dtype dt. xin is the normalized input (the sum when a
// residual was fused). dsum: incoming grad of the sum output or nullptr; it is added into dx.
// dgamma/dbeta: [H] float32 outputs or nullptr (not wanted). gamma may be nullptr (no affine).
void norm_bwd(const void* dy, const void* dsum, const void* xin, const float* gamma,
              const float* mean, const float* rstd, void* dx, float* dgamma, float* dbeta,
              int64_t rows, int64_t H, bool rms, DType dt);

// ---- Scale + mask + softmax over the last dim of [b, h, sq, sk] ------------------------------
// scores/probs contiguous. mask: bool, element (i0,i1,i2,i3) at mask[i0*ms[0] + i1*ms[1] +
// i2*ms[2] + i3*ms[3]] (strides may be 0 for broadcast), True = masked; nullptr = no mask.
// causal: key j is masked for query i when j > i + (sk - sq) (bottom-right aligned, equal to
// the usual upper-triangular mask when sq == sk); kernels skip that part. A row with every key
// masked gives all zeros. probs = softmax(scores * scale) with masked entries exactly 0.
void softmax_fwd(const void* scores, const bool* mask, const int64_t* mask_strides, void* probs,
                 int64_t b, int64_t h, int64_t sq, int64_t sk, float scale, bool causal, DType dt);
// dscores = scale * probs * (dprobs - sum_j(dprobs * probs)); zero where masked.
void softmax_bwd(const void* dprobs, const void* probs, void* dscores, int64_t b, int64_t h,
                 int64_t sq, int64_t sk, float scale, bool causal, DType dt);

// ---- Bias + GELU (tanh approximation) over rows of length H -------------------------------
// x, y: [rows, H] of dtype dt; bias: [H] float32 or nullptr. In float32: v = x + bias,
// u = sqrt(2/pi) * (v + 0.044715 v^3), y = 0.5 v (1 + tanh(u)) = v * sigmoid(2u)
// (Megatron's fused bias-GELU; equal to torch's gelu(v, approximate='tanh')).
void bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t H, DType dt);
// dy, x, dx: [rows, H] of dtype dt. dx = dy * gelu'(v) with v as above (recomputed from x, so
// only x is kept for backward). dbias: float32 [H] or nullptr; the column sums of dx as
// stored in dt (what autograd of the unfused x + bias gives), accumulated in float32 in a
// fixed order, so results do not depend on the thread count.
void bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                   int64_t rows, int64_t H, DType dt);

// ---- Int8 ----------------------------------------------------------------------------------
// Symmetric per-row quantization of x [rows, K]: amax = max|x|, inv = amax > 0 ? 127/amax : 0,
// q = clamp(round_half_even(x * inv), -127, 127), scale = amax / 127 (float32).
void quantize_rowwise(const void* x, int8_t* q, float* scale, int64_t rows, int64_t K, DType dt);

// W8A8: out[m, n] = float(sum_k x[m,k] * w[n,k]) * xs[m] * ws[n] + bias[n]  (int32 accumulate,
// that multiplication order, bias optional), stored as out_dt. x [M, K], w [N, K] row-major.
// Weights must lie in [-127, 127]; returns false (output unspecified) if a -128 is seen.
bool int8_gemm(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
               const float* bias, void* out, int64_t M, int64_t N, int64_t K, DType out_dt);

// Weight-only: out[m, n] = (sum_k float(x[m,k]) * float(w[n,k])) * ws[n] + bias[n], float32
// accumulation, x and out of dtype dt. Fast path for small M (generation); any M works.
void weight_only_int8_gemm(const void* x, const int8_t* w, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, int64_t K, DType dt);

}  // namespace cpu
}  // namespace megapre
