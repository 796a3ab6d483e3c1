// Scale + mask + softmax over the last dim of [b, h, sq, sk], forward and backward
// (semantics: csrc/cpu/kernels.h).
//
// One warp (short rows) or one block per row, see detail::plan_row. Keys past the causal limit
// L = i + (sk - sq) + 1 are never read: their outputs are written as zeros. Register modes
// load the row once (16-byte vectors when aligned) and keep a bit per element saying whether
// it takes part (not causal-masked, not masked); a row with no such element gives zeros.
// Rows too long for registers use a block that makes two passes over global memory (forward:
// online max/sum, then normalize).
#include "common.cuh"

namespace megapre::cuda {
namespace {
using namespace detail;

constexpr int kFwdEpt = 32;  // also bounds the per-thread valid bitmask (uint32_t)
constexpr int kBwdEpt = 16;  // backward keeps probs and grads

struct MaskInfo {
  const bool* ptr;  // nullptr: no mask
  int64_t s0, s1, s2, s3;
};

// Number of leading keys of query row i that are not causal-masked.
__device__ __forceinline__ int valid_len(int64_t i, int sq, int sk, bool causal) {
  if (!causal) return sk;
  const int64_t lim = i + static_cast<int64_t>(sk) - sq + 1;
  return static_cast<int>(lim < 0 ? 0 : (lim > sk ? sk : lim));
}

// Mask row of flattened row index `row` (rows ordered b, h, sq), or nullptr.
__device__ __forceinline__ const bool* mask_row(const MaskInfo& mk, int64_t row, int h, int sq) {
  if (mk.ptr == nullptr) return nullptr;
  const int64_t i2 = row % sq;
  const int64_t t = row / sq;
  const int64_t i1 = t % h;
  const int64_t i0 = t / h;
  return mk.ptr + i0 * mk.s0 + i1 * mk.s1 + i2 * mk.s2;
}

// 1 / sum of exponentials; 0 for an all-masked row (sum 0: its outputs are all 0), NaN
// propagates. Matches reference.scale_mask_softmax (max of an all -inf row taken as 0).
__device__ __forceinline__ float inv_sum(float s) { return s == 0.f ? 0.f : 1.f / s; }

__device__ __forceinline__ bool takes_part(const bool* mrow, int64_t s3, int c, int L) {
  return c < L && (mrow == nullptr || !mrow[static_cast<int64_t>(c) * s3]);
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T, int VEC, int NV, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxRowThreads)
softmax_fwd_reg_kernel(const T* __restrict__ scores, MaskInfo mk, T* __restrict__ probs,
                       int64_t rows, int h, int sq, int sk, float scale, bool causal) {
  static_assert(NV * VEC <= 32, "valid bitmask is 32 bits");
  __shared__ float sh[32];
  const RowCtx rc = row_ctx<WARP>();
  const int nvec = sk / VEC;
  for (int64_t row = rc.first; row < rows; row += rc.stride) {
    const int L = valid_len(row % sq, sq, sk, causal);
    const bool* mrow = mask_row(mk, row, h, sq);
    const int64_t base = row * sk;
    float v[NV][VEC];
    uint32_t valid = 0;
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      const int c0 = vi * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
      if (vi < nvec && c0 < L) {
        load_vec<T, VEC>(scores + base + c0, v[i]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (takes_part(mrow, mk.s3, c0 + k, L)) {
            valid |= 1u << (i * VEC + k);
            v[i][k] *= scale;
            mx = fmaxf(mx, v[i][k]);
          }
        }
      }
    }
    mx = row_max<WARP>(mx, sh);
    if (mx == -INFINITY) mx = 0.f;  // nothing finite takes part: every exp below is 0
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if ((valid >> (i * VEC + k)) & 1u) {
          v[i][k] = expf(v[i][k] - mx);
          s += v[i][k];
        }
      }
    }
    s = row_sum<WARP>(s, sh);
    const float inv = inv_sum(s);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        float o[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = ((valid >> (i * VEC + k)) & 1u) ? v[i][k] * inv : 0.f;
        store_vec<T, VEC>(probs + base + static_cast<int64_t>(vi) * VEC, o);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads)
softmax_fwd_loop_kernel(const T* __restrict__ scores, MaskInfo mk, T* __restrict__ probs,
                        int64_t rows, int h, int sq, int sk, float scale, bool causal) {
  __shared__ float sh[32];
  const int nvec = sk / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int L = valid_len(row % sq, sq, sk, causal);
    const bool* mrow = mask_row(mk, row, h, sq);
    const int64_t base = row * sk;
    // Pass 1: per-thread online max and rescaled sum of exponentials.
    float m = -INFINITY, s = 0.f;
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int c0 = vi * VEC;
      if (c0 >= L) break;
      float v[VEC];
      load_vec<T, VEC>(scores + base + c0, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float x = v[k] * scale;
        // -inf adds exp(-inf) = 0 to any sum; skipping it keeps (m, s) free of inf - inf.
        if (takes_part(mrow, mk.s3, c0 + k, L) && x != -INFINITY) {
          if (x > m) {
            s = s * expf(m - x) + 1.f;
            m = x;
          } else {
            s += expf(x - m);
          }
        }
      }
    }
    float mx = row_max<false>(m, sh);
    if (mx == -INFINITY) mx = 0.f;  // nothing finite takes part: every exp below is 0
    const float total = row_sum<false>(m == -INFINITY ? 0.f : s * expf(m - mx), sh);
    const float inv = inv_sum(total);
    // Pass 2: normalize; causal-masked tail written as zeros without reading.
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int c0 = vi * VEC;
      float o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = 0.f;
      if (c0 < L) {
        float v[VEC];
        load_vec<T, VEC>(scores + base + c0, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (takes_part(mrow, mk.s3, c0 + k, L)) o[k] = expf(v[k] * scale - mx) * inv;
        }
      }
      store_vec<T, VEC>(probs + base + c0, o);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------
// dscores = scale * p * (dp - sum_j dp_j * p_j); zero past the causal limit (not read there).

template <typename T, int VEC, int NV, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxRowThreads)
softmax_bwd_reg_kernel(const T* __restrict__ dprobs, const T* __restrict__ probs,
                       T* __restrict__ dscores, int64_t rows, int sq, int sk, float scale,
                       bool causal) {
  __shared__ float sh[32];
  const RowCtx rc = row_ctx<WARP>();
  const int nvec = sk / VEC;
  for (int64_t row = rc.first; row < rows; row += rc.stride) {
    const int L = valid_len(row % sq, sq, sk, causal);
    const int64_t base = row * sk;
    float p[NV][VEC], g[NV][VEC];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      const int c0 = vi * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) p[i][k] = g[i][k] = 0.f;
      if (vi < nvec && c0 < L) {
        load_vec<T, VEC>(probs + base + c0, p[i]);
        load_vec<T, VEC>(dprobs + base + c0, g[i]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (c0 + k < L) {
            dot += g[i][k] * p[i][k];
          } else {
            p[i][k] = g[i][k] = 0.f;
          }
        }
      }
    }
    dot = row_sum<WARP>(dot, sh);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        const int c0 = vi * VEC;
        float o[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o[k] = c0 + k < L ? (scale * p[i][k]) * (g[i][k] - dot) : 0.f;
        }
        store_vec<T, VEC>(dscores + base + c0, o);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads)
softmax_bwd_loop_kernel(const T* __restrict__ dprobs, const T* __restrict__ probs,
                        T* __restrict__ dscores, int64_t rows, int sq, int sk, float scale,
                        bool causal) {
  __shared__ float sh[32];
  const int nvec = sk / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int L = valid_len(row % sq, sq, sk, causal);
    const int64_t base = row * sk;
    float dot = 0.f;
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int c0 = vi * VEC;
      if (c0 >= L) break;
      float p[VEC], g[VEC];
      load_vec<T, VEC>(probs + base + c0, p);
      load_vec<T, VEC>(dprobs + base + c0, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (c0 + k < L) dot += g[k] * p[k];
      }
    }
    dot = row_sum<false>(dot, sh);
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int c0 = vi * VEC;
      float o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = 0.f;
      if (c0 < L) {
        float p[VEC], g[VEC];
        load_vec<T, VEC>(probs + base + c0, p);
        load_vec<T, VEC>(dprobs + base + c0, g);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (c0 + k < L) o[k] = (scale * p[k]) * (g[k] - dot);
        }
      }
      store_vec<T, VEC>(dscores + base + c0, o);
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

template <typename T, int VEC>
void softmax_fwd_launch(const T* scores, const MaskInfo& mk, T* probs, int64_t rows, int h,
                        int sq, int sk, float scale, bool causal, cudaStream_t stream) {
  const RowPlan p = plan_row(sk / VEC, VEC, kFwdEpt);
  if (p.mode == RowMode::kLoop) {
    softmax_fwd_loop_kernel<T, VEC><<<grid_for(rows, 1), p.threads, 0, stream>>>(
        scores, mk, probs, rows, h, sq, sk, scale, causal);
    check_launch("softmax_fwd_loop");
    return;
  }
  const bool warp = p.mode == RowMode::kWarp;
  dispatch_nv(p.nv, [&](auto nvc) {
    constexpr int NV = decltype(nvc)::value;
    if constexpr (NV * VEC <= kFwdEpt) {
      if (warp) {
        softmax_fwd_reg_kernel<T, VEC, NV, true>
            <<<grid_for(rows, kWarpRowsPerBlock), p.threads, 0, stream>>>(
                scores, mk, probs, rows, h, sq, sk, scale, causal);
      } else {
        softmax_fwd_reg_kernel<T, VEC, NV, false><<<grid_for(rows, 1), p.threads, 0, stream>>>(
            scores, mk, probs, rows, h, sq, sk, scale, causal);
      }
      check_launch(warp ? "softmax_fwd_warp" : "softmax_fwd_block");
    } else {
      throw std::runtime_error("megapre CUDA softmax_fwd: inconsistent launch plan");
    }
  });
}

template <typename T, int VEC>
void softmax_bwd_launch(const T* dprobs, const T* probs, T* dscores, int64_t rows, int sq,
                        int sk, float scale, bool causal, cudaStream_t stream) {
  const RowPlan p = plan_row(sk / VEC, VEC, kBwdEpt);
  if (p.mode == RowMode::kLoop) {
    softmax_bwd_loop_kernel<T, VEC><<<grid_for(rows, 1), p.threads, 0, stream>>>(
        dprobs, probs, dscores, rows, sq, sk, scale, causal);
    check_launch("softmax_bwd_loop");
    return;
  }
  const bool warp = p.mode == RowMode::kWarp;
  dispatch_nv(p.nv, [&](auto nvc) {
    constexpr int NV = decltype(nvc)::value;
    if constexpr (NV * VEC <= kBwdEpt) {
      if (warp) {
        softmax_bwd_reg_kernel<T, VEC, NV, true>
            <<<grid_for(rows, kWarpRowsPerBlock), p.threads, 0, stream>>>(
                dprobs, probs, dscores, rows, sq, sk, scale, causal);
      } else {
        softmax_bwd_reg_kernel<T, VEC, NV, false><<<grid_for(rows, 1), p.threads, 0, stream>>>(
            dprobs, probs, dscores, rows, sq, sk, scale, causal);
      }
      check_launch(warp ? "softmax_bwd_warp" : "softmax_bwd_block");
    } else {
      throw std::runtime_error("megapre CUDA softmax_bwd: inconsistent launch plan");
    }
  });
}

void check_dims(int64_t b, int64_t h, int64_t sq, int64_t sk, const char* op) {
  if (h > INT32_MAX || sq > INT32_MAX || sk > INT32_MAX || b < 0) {
    throw std::runtime_error(std::string("megapre CUDA ") + op + ": dimension too large");
  }
}

}  // namespace

void softmax_fwd(const void* scores, const bool* mask, const int64_t* mask_strides, void* probs,
                 int64_t b, int64_t h, int64_t sq, int64_t sk, float scale, bool causal, DType dt,
                 cudaStream_t stream) {
  const int64_t rows = b * h * sq;
  if (rows <= 0 || sk <= 0) return;
  check_dims(b, h, sq, sk, "softmax_fwd");
  MaskInfo mk{mask, 0, 0, 0, 0};
  if (mask != nullptr) {
    mk.s0 = mask_strides[0];
    mk.s1 = mask_strides[1];
    mk.s2 = mask_strides[2];
    mk.s3 = mask_strides[3];
  }
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const T* st = static_cast<const T*>(scores);
    T* pt = static_cast<T*>(probs);
    if (sk % kVec == 0 && aligned16(st) && aligned16(pt)) {
      softmax_fwd_launch<T, kVec>(st, mk, pt, rows, static_cast<int>(h), static_cast<int>(sq),
                                  static_cast<int>(sk), scale, causal, stream);
    } else {
      softmax_fwd_launch<T, 1>(st, mk, pt, rows, static_cast<int>(h), static_cast<int>(sq),
                               static_cast<int>(sk), scale, causal, stream);
    }
  });
}

void softmax_bwd(const void* dprobs, const void* probs, void* dscores, int64_t b, int64_t h,
                 int64_t sq, int64_t sk, float scale, bool causal, DType dt,
                 cudaStream_t stream) {
  const int64_t rows = b * h * sq;
  if (rows <= 0 || sk <= 0) return;
  check_dims(b, h, sq, sk, "softmax_bwd");
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const T* gt = static_cast<const T*>(dprobs);
    const T* pt = static_cast<const T*>(probs);
    T* dt_out = static_cast<T*>(dscores);
    if (sk % kVec == 0 && aligned16(gt) && aligned16(pt) && aligned16(dt_out)) {
      softmax_bwd_launch<T, kVec>(gt, pt, dt_out, rows, static_cast<int>(sq),
                                  static_cast<int>(sk), scale, causal, stream);
    } else {
      softmax_bwd_launch<T, 1>(gt, pt, dt_out, rows, static_cast<int>(sq), static_cast<int>(sk),
                               scale, causal, stream);
    }
  });
}

}  // namespace megapre::cuda
