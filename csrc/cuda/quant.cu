// Int8 kernels (semantics: csrc/cpu/kernels.h): per-row quantization, the dequantization
// epilogue of the tensor-core W8A8 GEMM, a CUDA-core W8A8 GEMM (__dp4a, exact int32
// accumulation), the weight-only small-M GEMV and the weight dequantization used for large M.
//
// Rounding-sensitive arithmetic uses the explicit IEEE intrinsics (__fmul_rn, __fadd_rn,
// __fdiv_rn): they are never contracted into FMAs nor approximated under --use_fast_math, so
// quantization is bit-identical to the CPU kernel and the epilogue keeps the documented
// multiplication order.
#include "common.cuh"

namespace megapre::cuda {
namespace {
using namespace detail;

// out = float(acc) * xs * ws (+ bias), in that order.
__device__ __forceinline__ float dequant(int32_t acc, float xs, float ws, const float* bias,
                                         int64_t n) {
  const float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), xs), ws);
  return bias != nullptr ? __fadd_rn(v, bias[n]) : v;
}

__device__ __forceinline__ int int4_word(const int4& v, int q) {
  return q == 0 ? v.x : (q == 1 ? v.y : (q == 2 ? v.z : v.w));
}

// Byte j (0..3) of a packed word as a signed value.
__device__ __forceinline__ float s8_to_float(int word, int j) {
  return static_cast<float>(static_cast<int8_t>((word >> (8 * j)) & 0xff));
}

// 16 bytes row[k .. k+16) with zeros past K, packed little-endian like an int4 load.
__device__ __forceinline__ int4 load16_guarded(const int8_t* row, int64_t k, int64_t K) {
  uint32_t wd[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    if (k + b < K) wd[b >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(row[k + b])) << (8 * (b & 3));
  }
  return make_int4(static_cast<int>(wd[0]), static_cast<int>(wd[1]), static_cast<int>(wd[2]),
                   static_cast<int>(wd[3]));
}

// ---- quantize_rowwise -----------------------------------------------------------------------
// One block per row: pass 1 max|x|, pass 2 quantize (the row is re-read from L1/L2).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
quantize_rowwise_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                        float* __restrict__ scale, int64_t rows, int K) {
  __shared__ float sh[32];
  const int nvec = K / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * K;
    float amax = 0.f;
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      float v[VEC];
      load_vec<T, VEC>(x + base + static_cast<int64_t>(vi) * VEC, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) amax = fmaxf(amax, fabsf(v[k]));
    }
    amax = row_max<false>(amax, sh);
    const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
    if (threadIdx.x == 0) scale[row] = __fdiv_rn(amax, 127.f);
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int64_t off = base + static_cast<int64_t>(vi) * VEC;
      float v[VEC];
      load_vec<T, VEC>(x + off, v);
      Pack<int8_t, VEC> pk;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int r = __float2int_rn(__fmul_rn(v[k], inv));  // round half to even
        pk.v[k] = static_cast<int8_t>(min(127, max(-127, r)));
      }
      *reinterpret_cast<Pack<int8_t, VEC>*>(q + off) = pk;
    }
  }
}

// ---- dequantization epilogue ------------------------------------------------------------------
constexpr int kEltThreads = 256;

template <typename T, bool VEC4>
__global__ void __launch_bounds__(kEltThreads)
dequant_epilogue_kernel(const int32_t* __restrict__ acc, const float* __restrict__ xs,
                        const float* __restrict__ ws, const float* __restrict__ bias,
                        T* __restrict__ out, int64_t M, int64_t N) {
  const int64_t total = M * N;
  const int64_t groups = VEC4 ? total / 4 : total;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += step) {
    if constexpr (VEC4) {
      const int64_t e = g * 4;  // N % 4 == 0: the 4 elements share a row
      const int64_t m = e / N, n = e % N;
      const int4 a = *reinterpret_cast<const int4*>(acc + e);
      const float xm = xs[m];
      Pack<T, 4> pk;
      pk.v[0] = from_float<T>(dequant(a.x, xm, ws[n], bias, n));
      pk.v[1] = from_float<T>(dequant(a.y, xm, ws[n + 1], bias, n + 1));
      pk.v[2] = from_float<T>(dequant(a.z, xm, ws[n + 2], bias, n + 2));
      pk.v[3] = from_float<T>(dequant(a.w, xm, ws[n + 3], bias, n + 3));
      *reinterpret_cast<Pack<T, 4>*>(out + e) = pk;
    } else {
      const int64_t m = g / N, n = g % N;
      out[g] = from_float<T>(dequant(acc[g], xs[m], ws[n], bias, n));
    }
  }
}

// ---- W8A8 GEMM on CUDA cores: 64x64 output tiles -------------------------------------------
// 256 threads; thread (tx, ty) computes rows ty + 16 i, columns tx + 16 j (i, j < 4). K is
// staged 64 bytes (16 packed words) at a time for both operands; rows padded to 17 words so
// the column reads of Bs hit 16 distinct banks.
constexpr int kTile = 64;
constexpr int kTileWords = 16;  // 64 bytes of K per stage

template <bool ALIGNED>
__device__ __forceinline__ int load_word(const int8_t* p, bool row_ok, int64_t row_off, int k,
                                         int K) {
  if (!row_ok || k >= K) return 0;
  if constexpr (ALIGNED) {  // K % 4 == 0 and p 4-byte aligned: k + 4 <= K
    return *reinterpret_cast<const int*>(p + row_off + k);
  } else {
    uint32_t w = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if (k + b < K) w |= static_cast<uint32_t>(static_cast<uint8_t>(p[row_off + k + b])) << (8 * b);
    }
    return static_cast<int>(w);
  }
}

template <bool ALIGNED>
__global__ void __launch_bounds__(256)
int8_gemm_tiled_kernel(const int8_t* __restrict__ x, const float* __restrict__ xs,
                       const int8_t* __restrict__ w, const float* __restrict__ ws,
                       const float* __restrict__ bias, void* __restrict__ out, int64_t M, int N,
                       int K, DType out_dt) {
  __shared__ int As[kTile][kTileWords + 1];
  __shared__ int Bs[kTile][kTileWords + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t mtiles = (M + kTile - 1) / kTile;
  for (int64_t mt = blockIdx.y; mt < mtiles; mt += gridDim.y) {
    const int64_t m0 = mt * kTile;
    int acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0;
    }
    for (int k0 = 0; k0 < K; k0 += 4 * kTileWords) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int wi = tid + 256 * r;
        const int row = wi >> 4, kw = wi & 15;
        const int64_t m = m0 + row, n = n0 + row;
        As[row][kw] = load_word<ALIGNED>(x, m < M, m * K, k0 + 4 * kw, K);
        Bs[row][kw] = load_word<ALIGNED>(w, n < N, n * K, k0 + 4 * kw, K);
      }
      __syncthreads();
#pragma unroll
      for (int kw = 0; kw < kTileWords; ++kw) {
        int a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][kw];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[tx + 16 * j][kw];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n < N) store_as(out, m * N + n, dequant(acc[i][j], xs[m], ws[n], bias, n), out_dt);
      }
    }
  }
}

// ---- small-M kernels (M <= 16): stream each weight row once ---------------------------------
// Block = 8 warps; warp owns NPW consecutive output columns. x (MT >= M rows, zero padded) is
// staged in shared memory one K-chunk at a time; each lane reads 16 weight bytes per step
// (one 512-byte coalesced request per warp and column) and keeps MT x NPW accumulators; a
// butterfly over the warp finishes each dot product.
constexpr int kGemvWarps = 8;
template <int MT> constexpr int gemv_npw() { return MT <= 4 ? 4 : 2; }

template <int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
int8_gemm_smallm_kernel(const int8_t* __restrict__ x, const float* __restrict__ xs,
                        const int8_t* __restrict__ w, const float* __restrict__ ws,
                        const float* __restrict__ bias, void* __restrict__ out, int M, int N,
                        int K, DType out_dt) {
  constexpr int NPW = gemv_npw<MT>();
  constexpr int KC = (32768 / MT) < 4096 ? (32768 / MT) : 4096;  // x bytes per row per chunk
  static_assert(KC % 512 == 0, "chunk must be a whole number of warp steps");
  __shared__ __align__(16) int8_t xsh[MT * KC];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nb = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * NPW;
  int acc[MT][NPW];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int c = 0; c < NPW; ++c) acc[m][c] = 0;
  }
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = min(KC, K - k0);  // K % 16 == 0, so kc % 16 == 0
    __syncthreads();                 // previous chunk fully consumed
    for (int idx = threadIdx.x; idx < MT * (KC / 16); idx += blockDim.x) {
      const int m = idx / (KC / 16), c16 = (idx % (KC / 16)) * 16;
      int4 v = make_int4(0, 0, 0, 0);
      if (m < M && c16 < kc) {
        v = *reinterpret_cast<const int4*>(x + static_cast<int64_t>(m) * K + k0 + c16);
      }
      reinterpret_cast<int4*>(xsh)[idx] = v;
    }
    __syncthreads();
    for (int kk = lane * 16; kk < kc; kk += 512) {
      int4 wv[NPW];
#pragma unroll
      for (int c = 0; c < NPW; ++c) {
        const int64_t n = nb + c;
        wv[c] = n < N ? *reinterpret_cast<const int4*>(w + n * K + k0 + kk) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int4 xv = *reinterpret_cast<const int4*>(xsh + m * KC + kk);
#pragma unroll
        for (int c = 0; c < NPW; ++c) {
          acc[m][c] = __dp4a(xv.x, wv[c].x, acc[m][c]);
          acc[m][c] = __dp4a(xv.y, wv[c].y, acc[m][c]);
          acc[m][c] = __dp4a(xv.z, wv[c].z, acc[m][c]);
          acc[m][c] = __dp4a(xv.w, wv[c].w, acc[m][c]);
        }
      }
    }
  }
  // MT * NPW <= 32: lane (m * NPW + c) stores output (m, nb + c).
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int c = 0; c < NPW; ++c) {
      const int total = warp_sum_int(acc[m][c]);
      const int64_t n = nb + c;
      if (lane == m * NPW + c && m < M && n < N) {
        store_as(out, static_cast<int64_t>(m) * N + n, dequant(total, xs[m], ws[n], bias, n),
                 out_dt);
      }
    }
  }
}

// Weight-only: x (dtype T) staged as float32 in shared memory with 4 floats of padding after
// every 16 (row stride 20 per 16) so the per-lane float4 reads of 16-element groups are free of
// bank conflicts. w_vec: K % 16 == 0 and w 16-byte aligned (int4 weight loads).
template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
wo_gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ ws,
               const float* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
               bool w_vec) {
  constexpr int NPW = gemv_npw<MT>();
  constexpr int KC = (8192 / MT) < 4096 ? (8192 / MT) : 4096;  // x elements per row per chunk
  constexpr int RS = KC / 16 * 20;                             // padded row stride (floats)
  static_assert(KC % 512 == 0, "chunk must be a whole number of warp steps");
  __shared__ __align__(16) float xsh[MT * RS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nb = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * NPW;
  float acc[MT][NPW];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int c = 0; c < NPW; ++c) acc[m][c] = 0.f;
  }
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = min(KC, K - k0);
    __syncthreads();  // previous chunk fully consumed
    for (int idx = threadIdx.x; idx < MT * KC; idx += blockDim.x) {
      const int m = idx / KC, k = idx % KC;
      const float v = (m < M && k < kc) ? to_float(x[static_cast<int64_t>(m) * K + k0 + k]) : 0.f;
      xsh[m * RS + (k >> 4) * 20 + (k & 15)] = v;
    }
    __syncthreads();
    for (int kk = lane * 16; kk < kc; kk += 512) {
      int4 wv[NPW];
#pragma unroll
      for (int c = 0; c < NPW; ++c) {
        const int64_t n = nb + c;
        if (n >= N) {
          wv[c] = make_int4(0, 0, 0, 0);
        } else if (w_vec) {
          wv[c] = *reinterpret_cast<const int4*>(w + n * K + k0 + kk);
        } else {
          wv[c] = load16_guarded(w + n * K, static_cast<int64_t>(k0) + kk, K);
        }
      }
      const float* xg = xsh + (kk >> 4) * 20;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float wf[NPW][4];
#pragma unroll
        for (int c = 0; c < NPW; ++c) {
          const int word = int4_word(wv[c], q);
#pragma unroll
          for (int j = 0; j < 4; ++j) wf[c][j] = s8_to_float(word, j);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float4 xv = *reinterpret_cast<const float4*>(xg + m * RS + 4 * q);
#pragma unroll
          for (int c = 0; c < NPW; ++c) {
            acc[m][c] += xv.x * wf[c][0];
            acc[m][c] += xv.y * wf[c][1];
            acc[m][c] += xv.z * wf[c][2];
            acc[m][c] += xv.w * wf[c][3];
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int c = 0; c < NPW; ++c) {
      const float total = warp_sum(acc[m][c]);
      const int64_t n = nb + c;
      if (lane == m * NPW + c && m < M && n < N) {
        float v = __fmul_rn(total, ws[n]);
        if (bias != nullptr) v = __fadd_rn(v, bias[n]);
        out[static_cast<int64_t>(m) * N + n] = from_float<T>(v);
      }
    }
  }
}

// ---- dequantize_rowwise -------------------------------------------------------------------------
template <typename T, bool VEC4>
__global__ void __launch_bounds__(kEltThreads)
dequantize_rowwise_kernel(const int8_t* __restrict__ w, const float* __restrict__ ws,
                          T* __restrict__ out, int64_t N, int64_t K) {
  const int64_t total = N * K;
  const int64_t groups = VEC4 ? total / 4 : total;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += step) {
    if constexpr (VEC4) {
      const int64_t e = g * 4;  // K % 4 == 0: the 4 elements share a row
      const float s = ws[e / K];
      const int word = *reinterpret_cast<const int*>(w + e);
      Pack<T, 4> pk;
#pragma unroll
      for (int j = 0; j < 4; ++j) pk.v[j] = from_float<T>(__fmul_rn(s8_to_float(word, j), s));
      *reinterpret_cast<Pack<T, 4>*>(out + e) = pk;
    } else {
      out[g] = from_float<T>(__fmul_rn(static_cast<float>(w[g]), ws[g / K]));
    }
  }
}

unsigned elt_grid(int64_t work) { return grid_for(work, kEltThreads); }

int small_m_tile(int64_t M) {
  int mt = 1;
  while (mt < M) mt *= 2;
  return mt;
}

template <typename F> void dispatch_mt(int mt, F&& f) {
  switch (mt) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
    case 16: f(std::integral_constant<int, 16>{}); return;
  }
  throw std::runtime_error("megapre CUDA: small-M kernels need M <= 16");
}

void check_int(int64_t v, const char* what) {
  if (v > INT32_MAX) throw std::runtime_error(std::string("megapre CUDA ") + what + " too large");
}

bool aligned_to(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

}  // namespace

void quantize_rowwise(const void* x, int8_t* q, float* scale, int64_t rows, int64_t K, DType dt,
                      cudaStream_t stream) {
  if (rows <= 0) return;
  if (K <= 0) {  // empty rows: amax = 0, scale = 0
    check_cuda(cudaMemsetAsync(scale, 0, rows * sizeof(float), stream), "quantize_rowwise memset");
    return;
  }
  check_int(K, "quantize_rowwise K");
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const T* xt = static_cast<const T*>(x);
    const int Ki = static_cast<int>(K);
    const bool vec_ok = K % kVec == 0 && aligned16(xt) && aligned_to(q, kVec);
    const int64_t nvec = vec_ok ? K / kVec : K;
    const int threads = static_cast<int>(std::min<int64_t>(kMaxRowThreads, (nvec + 31) / 32 * 32));
    if (vec_ok) {
      quantize_rowwise_kernel<T, kVec><<<grid_for(rows, 1), threads, 0, stream>>>(xt, q, scale,
                                                                                  rows, Ki);
    } else {
      quantize_rowwise_kernel<T, 1><<<grid_for(rows, 1), threads, 0, stream>>>(xt, q, scale,
                                                                               rows, Ki);
    }
    check_launch("quantize_rowwise");
  });
}

void int8_dequant_epilogue(const int32_t* acc, const float* xs, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, DType out_dt, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  dispatch_float(out_dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = static_cast<T*>(out);
    if (N % 4 == 0 && aligned16(acc) && aligned_to(o, 4 * sizeof(T))) {
      dequant_epilogue_kernel<T, true><<<elt_grid(M * N / 4), kEltThreads, 0, stream>>>(
          acc, xs, ws, bias, o, M, N);
    } else {
      dequant_epilogue_kernel<T, false><<<elt_grid(M * N), kEltThreads, 0, stream>>>(
          acc, xs, ws, bias, o, M, N);
    }
    check_launch("int8_dequant_epilogue");
  });
}

void int8_gemm_simt(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                    const float* bias, void* out, int64_t M, int64_t N, int64_t K, DType out_dt,
                    cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  check_int(N, "int8_gemm N");
  check_int(K, "int8_gemm K");
  const int Ni = static_cast<int>(N), Ki = static_cast<int>(K);
  if (M <= 16 && K % 16 == 0 && aligned16(x) && aligned16(w)) {
    dispatch_mt(small_m_tile(M), [&](auto mtc) {
      constexpr int MT = decltype(mtc)::value;
      constexpr int cols = kGemvWarps * gemv_npw<MT>();
      const unsigned grid = static_cast<unsigned>((N + cols - 1) / cols);
      int8_gemm_smallm_kernel<MT><<<grid, kGemvWarps * 32, 0, stream>>>(
          x, xs, w, ws, bias, out, static_cast<int>(M), Ni, Ki, out_dt);
      check_launch("int8_gemm_smallm");
    });
    return;
  }
  const int64_t mtiles = (M + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile),
                  static_cast<unsigned>(std::min<int64_t>(mtiles, 65535)));
  if (K % 4 == 0 && aligned_to(x, 4) && aligned_to(w, 4)) {
    int8_gemm_tiled_kernel<true><<<grid, 256, 0, stream>>>(x, xs, w, ws, bias, out, M, Ni, Ki,
                                                           out_dt);
  } else {
    int8_gemm_tiled_kernel<false><<<grid, 256, 0, stream>>>(x, xs, w, ws, bias, out, M, Ni, Ki,
                                                            out_dt);
  }
  check_launch("int8_gemm_tiled");
}

void weight_only_int8_gemv(const void* x, const int8_t* w, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, int64_t K, DType dt,
                           cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  if (M > 16) throw std::runtime_error("megapre CUDA weight_only_int8_gemv: M must be <= 16");
  check_int(N, "weight_only_int8_gemv N");
  check_int(K, "weight_only_int8_gemv K");
  const bool w_vec = K % 16 == 0 && aligned16(w);
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_mt(small_m_tile(M), [&](auto mtc) {
      constexpr int MT = decltype(mtc)::value;
      constexpr int cols = kGemvWarps * gemv_npw<MT>();
      const unsigned grid = static_cast<unsigned>((N + cols - 1) / cols);
      wo_gemv_kernel<T, MT><<<grid, kGemvWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), w, ws, bias, static_cast<T*>(out), static_cast<int>(M),
          static_cast<int>(N), static_cast<int>(K), w_vec);
      check_launch("weight_only_int8_gemv");
    });
  });
}

void dequantize_rowwise(const int8_t* w, const float* ws, void* w_out, int64_t N, int64_t K,
                        DType dt, cudaStream_t stream) {
  if (N <= 0 || K <= 0) return;
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = static_cast<T*>(w_out);
    if (K % 4 == 0 && aligned_to(w, 4) && aligned_to(o, 4 * sizeof(T))) {
      dequantize_rowwise_kernel<T, true><<<elt_grid(N * K / 4), kEltThreads, 0, stream>>>(
          w, ws, o, N, K);
    } else {
      dequantize_rowwise_kernel<T, false><<<elt_grid(N * K), kEltThreads, 0, stream>>>(
          w, ws, o, N, K);
    }
    check_launch("dequantize_rowwise");
  });
}

}  // namespace megapre::cuda
