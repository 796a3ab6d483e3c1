// LayerNorm / RMSNorm forward and backward (semantics: csrc/cpu/kernels.h).
//
// Rows are independent; each row is owned by one warp (short rows) or one block, chosen by
// detail::plan_row. When the row fits, it is loaded once into registers (16-byte vector loads
// when every pointer is 16-byte aligned and H is a multiple of the vector width) and the
// statistics are computed in two passes over registers (mean, then sum of squared deviations:
// no cancellation). Longer rows use a block that re-reads the row per pass (L2-resident).
// Backward: each worker (warp or block, a fixed set of rows) keeps per-column partial sums of
// dgamma/dbeta for the columns it owns and writes them to its own workspace row; a second
// kernel adds the workspace rows in a fixed order, so results are deterministic.
#include "common.cuh"

namespace megapre::cuda {
namespace {
using namespace detail;

constexpr int kFwdEpt = 32;  // elements per thread kept in registers, forward
constexpr int kBwdEpt = 16;  // backward keeps dy, xhat and two accumulators per element

template <int N> __device__ __forceinline__ void load_gamma(const float* g, int64_t col,
                                                            float (&out)[N]) {
  if (g != nullptr) {
    load_f32<N>(g + col, out);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = 1.f;
  }
}

template <int N> __device__ __forceinline__ void store_f32(float* p, const float (&in)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      *reinterpret_cast<float4*>(p + k) = make_float4(in[k], in[k + 1], in[k + 2], in[k + 3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = in[k];
  }
}

// ---- forward -----------------------------------------------------------------------------------

template <typename T, int VEC, int NV, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxRowThreads)
norm_fwd_reg_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                    T* __restrict__ sum_out, const float* __restrict__ gamma,
                    const float* __restrict__ beta, float* __restrict__ mean_out,
                    float* __restrict__ rstd_out, int64_t rows, int H, float eps, bool rms) {
  __shared__ float sh[32];
  const RowCtx rc = row_ctx<WARP>();
  const int nvec = H / VEC;
  for (int64_t row = rc.first; row < rows; row += rc.stride) {
    const int64_t base = row * H;
    float v[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        const int64_t off = base + static_cast<int64_t>(vi) * VEC;
        load_vec<T, VEC>(x + off, v[i]);
        if (res != nullptr) {
          float r[VEC];
          load_vec<T, VEC>(res + off, r);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[i][k] = round_to<T>(v[i][k] + r[k]);
          store_vec<T, VEC>(sum_out + off, v[i]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;  // padding: adds nothing to the sum
      }
    }

    float mean = 0.f;
    if (!rms) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) s += v[i][k];
      }
      mean = row_sum<WARP>(s, sh) / static_cast<float>(H);
    }
    // Second pass over registers: sum of squared deviations (rms: plain sum of squares).
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (rc.tid + i * rc.nthreads < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[i][k] - mean;
          q += d * d;
        }
      }
    }
    const float rstd = 1.f / sqrtf(row_sum<WARP>(q, sh) / static_cast<float>(H) + eps);
    if (rc.tid == 0) {
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        const int64_t col = static_cast<int64_t>(vi) * VEC;
        float g[VEC], b[VEC], o[VEC];
        load_gamma<VEC>(gamma, col, g);
        if (beta != nullptr) {
          load_f32<VEC>(beta + col, b);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) b[k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = (v[i][k] - mean) * rstd * g[k] + b[k];
        store_vec<T, VEC>(y + base + col, o);
      }
    }
  }
}

// Long rows: one block per row, three passes over global memory (two for rms). No
// __restrict__: pass 2/3 re-read sum_out, which this thread wrote in pass 1.
template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads)
norm_fwd_loop_kernel(const T* x, const T* res, T* y, T* sum_out, const float* gamma,
                     const float* beta, float* mean_out, float* rstd_out, int64_t rows, int H,
                     float eps, bool rms) {
  __shared__ float sh[32];
  const int nvec = H / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * H;
    const T* src = res != nullptr ? sum_out : x;  // the normalized input s
    float acc = 0.f;
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int64_t off = base + static_cast<int64_t>(vi) * VEC;
      float v[VEC];
      load_vec<T, VEC>(x + off, v);
      if (res != nullptr) {
        float r[VEC];
        load_vec<T, VEC>(res + off, r);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = round_to<T>(v[k] + r[k]);
        store_vec<T, VEC>(sum_out + off, v);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc += rms ? v[k] * v[k] : v[k];
    }
    float mean = 0.f, rstd;
    if (!rms) {
      mean = row_sum<false>(acc, sh) / static_cast<float>(H);
      float q = 0.f;
      for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
        float v[VEC];
        load_vec<T, VEC>(src + base + static_cast<int64_t>(vi) * VEC, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[k] - mean;
          q += d * d;
        }
      }
      rstd = 1.f / sqrtf(row_sum<false>(q, sh) / static_cast<float>(H) + eps);
    } else {
      rstd = 1.f / sqrtf(row_sum<false>(acc, sh) / static_cast<float>(H) + eps);
    }
    if (threadIdx.x == 0) {
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int64_t col = static_cast<int64_t>(vi) * VEC;
      float v[VEC], g[VEC], o[VEC];
      load_vec<T, VEC>(src + base + col, v);
      load_gamma<VEC>(gamma, col, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[k] = (v[k] - mean) * rstd * g[k] + (beta != nullptr ? beta[col + k] : 0.f);
      }
      store_vec<T, VEC>(y + base + col, o);
    }
  }
}

template <typename T, int VEC>
void norm_fwd_launch(const T* x, const T* res, T* y, T* sum_out, const float* gamma,
                     const float* beta, float* mean, float* rstd, int64_t rows, int H,
                     float eps, bool rms, cudaStream_t stream) {
  const RowPlan p = plan_row(H / VEC, VEC, kFwdEpt);
  if (p.mode == RowMode::kLoop) {
    norm_fwd_loop_kernel<T, VEC><<<grid_for(rows, 1), p.threads, 0, stream>>>(
        x, res, y, sum_out, gamma, beta, mean, rstd, rows, H, eps, rms);
    check_launch("norm_fwd_loop");
    return;
  }
  const bool warp = p.mode == RowMode::kWarp;
  dispatch_nv(p.nv, [&](auto nvc) {
    constexpr int NV = decltype(nvc)::value;
    if constexpr (NV * VEC <= kFwdEpt) {
      if (warp) {
        norm_fwd_reg_kernel<T, VEC, NV, true>
            <<<grid_for(rows, kWarpRowsPerBlock), p.threads, 0, stream>>>(
                x, res, y, sum_out, gamma, beta, mean, rstd, rows, H, eps, rms);
      } else {
        norm_fwd_reg_kernel<T, VEC, NV, false><<<grid_for(rows, 1), p.threads, 0, stream>>>(
            x, res, y, sum_out, gamma, beta, mean, rstd, rows, H, eps, rms);
      }
      check_launch(warp ? "norm_fwd_warp" : "norm_fwd_block");
    } else {
      throw std::runtime_error("megapre CUDA norm_fwd: inconsistent launch plan");
    }
  });
}

// ---- backward -----------------------------------------------------------------------------------
// xhat = (s - mean) * rstd (rms: s * rstd), g = dy * gamma,
// dx = (g - mean(g) - xhat * mean(g * xhat)) * rstd + dsum   (rms: without the mean(g) term),
// dgamma = sum_rows dy * xhat, dbeta = sum_rows dy.
// ws layout: [2][workers][H] (dgamma partials, then dbeta partials), or nullptr.

template <typename T, int VEC, int NV, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxRowThreads)
norm_bwd_reg_kernel(const T* __restrict__ dy, const T* __restrict__ dsum,
                    const T* __restrict__ xin, const float* __restrict__ gamma,
                    const float* __restrict__ mean, const float* __restrict__ rstd,
                    T* __restrict__ dx, float* __restrict__ ws, int64_t rows, int H,
                    int64_t workers, bool rms) {
  __shared__ float sh[32];
  const RowCtx rc = row_ctx<WARP>();
  // Warp mode: the last block may hold warps beyond the worker count (warp-uniform exit; warp
  // mode has no block barriers). Block mode: gridDim.x == workers, never taken.
  if (rc.first >= workers) return;
  const int nvec = H / VEC;
  float acc_g[NV][VEC], acc_b[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc_g[i][k] = acc_b[i][k] = 0.f;
  }

  for (int64_t row = rc.first; row < rows; row += workers) {
    const int64_t base = row * H;
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];
    float d[NV][VEC], xh[NV][VEC];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        const int64_t col = static_cast<int64_t>(vi) * VEC;
        float g[VEC];
        load_vec<T, VEC>(dy + base + col, d[i]);
        load_vec<T, VEC>(xin + base + col, xh[i]);
        load_gamma<VEC>(gamma, col, g);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[i][k] = (xh[i][k] - mu) * rs;
          const float gd = d[i][k] * g[k];
          s1 += gd;
          s2 += gd * xh[i][k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) d[i][k] = xh[i][k] = 0.f;
      }
    }
    const float m1 = rms ? 0.f : row_sum<WARP>(s1, sh) / static_cast<float>(H);
    const float m2 = row_sum<WARP>(s2, sh) / static_cast<float>(H);

#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        const int64_t col = static_cast<int64_t>(vi) * VEC;
        float g[VEC], ds[VEC], o[VEC];
        load_gamma<VEC>(gamma, col, g);
        if (dsum != nullptr) {
          load_vec<T, VEC>(dsum + base + col, ds);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) ds[k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o[k] = (d[i][k] * g[k] - m1 - xh[i][k] * m2) * rs + ds[k];
          acc_g[i][k] += d[i][k] * xh[i][k];
          acc_b[i][k] += d[i][k];
        }
        store_vec<T, VEC>(dx + base + col, o);
      }
    }
  }

  if (ws != nullptr) {
    float* wg = ws + rc.first * H;
    float* wb = ws + (workers + rc.first) * H;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = rc.tid + i * rc.nthreads;
      if (vi < nvec) {
        const int64_t col = static_cast<int64_t>(vi) * VEC;
        store_f32<VEC>(wg + col, acc_g[i]);
        store_f32<VEC>(wb + col, acc_b[i]);
      }
    }
  }
}

// Long rows: block per row, two passes; partial sums accumulate in this block's workspace row
// (each thread only touches its own columns, so no synchronization is needed).
template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads)
norm_bwd_loop_kernel(const T* __restrict__ dy, const T* __restrict__ dsum,
                     const T* __restrict__ xin, const float* __restrict__ gamma,
                     const float* __restrict__ mean, const float* __restrict__ rstd,
                     T* __restrict__ dx, float* __restrict__ ws, int64_t rows, int H,
                     bool rms) {
  __shared__ float sh[32];
  const int nvec = H / VEC;
  const int64_t workers = gridDim.x;
  float* wg = ws != nullptr ? ws + static_cast<int64_t>(blockIdx.x) * H : nullptr;
  float* wb = ws != nullptr ? ws + (workers + blockIdx.x) * H : nullptr;
  if (ws != nullptr) {
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        wg[static_cast<int64_t>(vi) * VEC + k] = 0.f;
        wb[static_cast<int64_t>(vi) * VEC + k] = 0.f;
      }
    }
  }
  for (int64_t row = blockIdx.x; row < rows; row += workers) {
    const int64_t base = row * H;
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];
    float s1 = 0.f, s2 = 0.f;
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int64_t col = static_cast<int64_t>(vi) * VEC;
      float d[VEC], xv[VEC], g[VEC];
      load_vec<T, VEC>(dy + base + col, d);
      load_vec<T, VEC>(xin + base + col, xv);
      load_gamma<VEC>(gamma, col, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float gd = d[k] * g[k];
        s1 += gd;
        s2 += gd * ((xv[k] - mu) * rs);
      }
    }
    const float m1 = rms ? 0.f : row_sum<false>(s1, sh) / static_cast<float>(H);
    const float m2 = row_sum<false>(s2, sh) / static_cast<float>(H);
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      const int64_t col = static_cast<int64_t>(vi) * VEC;
      float d[VEC], xv[VEC], g[VEC], o[VEC];
      load_vec<T, VEC>(dy + base + col, d);
      load_vec<T, VEC>(xin + base + col, xv);
      load_gamma<VEC>(gamma, col, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xh = (xv[k] - mu) * rs;
        const float ds = dsum != nullptr ? to_float(dsum[base + col + k]) : 0.f;
        o[k] = (d[k] * g[k] - m1 - xh * m2) * rs + ds;
        if (ws != nullptr) {
          wg[col + k] += d[k] * xh;
          wb[col + k] += d[k];
        }
      }
      store_vec<T, VEC>(dx + base + col, o);
    }
  }
}

// dgamma[h] = sum_p ws[p][h], dbeta[h] = sum_p ws[workers + p][h], in a fixed order:
// thread (tx, ty) adds p = ty, ty + 16, ... ; then the 16 partials are added in order of ty.
constexpr int kColTx = 32, kColTy = 16;
__global__ void __launch_bounds__(kColTx * kColTy)
norm_bwd_colsum_kernel(const float* __restrict__ ws, float* __restrict__ dgamma,
                       float* __restrict__ dbeta, int64_t workers, int H) {
  float* out = blockIdx.y == 0 ? dgamma : dbeta;
  if (out == nullptr) return;  // block-uniform, before any barrier
  __shared__ float sh[kColTy][kColTx + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTx + tx;
  const float* src = ws + static_cast<int64_t>(blockIdx.y) * workers * H;
  float s = 0.f;
  if (col < H) {
    for (int64_t p = ty; p < workers; p += kColTy) s += src[p * H + col];
  }
  sh[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < H) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < kColTy; ++i) t += sh[i][tx];
    out[col] = t;
  }
}

int64_t norm_bwd_workers(int64_t rows, int64_t H) {
  if (rows <= 0) return 0;
  const int64_t cap = H <= 1024 ? 2048 : 512;
  int64_t w = (rows + 7) / 8;                        // >= 8 rows per worker amortizes partials
  w = std::max(w, std::min<int64_t>(rows, 256));      // but keep enough workers to fill the GPU
  return std::min(w, cap);
}

template <typename T, int VEC>
void norm_bwd_launch(const T* dy, const T* dsum, const T* xin, const float* gamma,
                     const float* mean, const float* rstd, T* dx, float* ws, int64_t rows,
                     int H, bool rms, cudaStream_t stream) {
  const RowPlan p = plan_row(H / VEC, VEC, kBwdEpt);
  const bool want = ws != nullptr;
  const int64_t pw = want ? norm_bwd_workers(rows, H) : 0;
  if (p.mode == RowMode::kLoop) {
    const unsigned grid = want ? static_cast<unsigned>(pw) : grid_for(rows, 1);
    norm_bwd_loop_kernel<T, VEC><<<grid, p.threads, 0, stream>>>(dy, dsum, xin, gamma, mean,
                                                                  rstd, dx, ws, rows, H, rms);
    check_launch("norm_bwd_loop");
    return;
  }
  const bool warp = p.mode == RowMode::kWarp;
  const int per_block = warp ? kWarpRowsPerBlock : 1;
  const unsigned grid = want ? static_cast<unsigned>((pw + per_block - 1) / per_block)
                             : grid_for(rows, per_block);
  const int64_t workers = want ? pw : static_cast<int64_t>(grid) * per_block;
  dispatch_nv(p.nv, [&](auto nvc) {
    constexpr int NV = decltype(nvc)::value;
    if constexpr (NV * VEC <= kBwdEpt) {
      if (warp) {
        norm_bwd_reg_kernel<T, VEC, NV, true><<<grid, p.threads, 0, stream>>>(
            dy, dsum, xin, gamma, mean, rstd, dx, ws, rows, H, workers, rms);
      } else {
        norm_bwd_reg_kernel<T, VEC, NV, false><<<grid, p.threads, 0, stream>>>(
            dy, dsum, xin, gamma, mean, rstd, dx, ws, rows, H, workers, rms);
      }
      check_launch(warp ? "norm_bwd_warp" : "norm_bwd_block");
    } else {
      throw std::runtime_error("megapre CUDA norm_bwd: inconsistent launch plan");
    }
  });
}

void check_dims(int64_t H, const char* op) {
  if (H > INT32_MAX) {
    throw std::runtime_error(std::string("megapre CUDA ") + op + ": H too large");
  }
}

}  // namespace

void norm_fwd(const void* x, const void* residual, void* y, void* sum_out, const float* gamma,
              const float* beta, float* mean, float* rstd, int64_t rows, int64_t H, float eps,
              bool rms, DType dt, cudaStream_t stream) {
  if (rows <= 0 || H <= 0) return;
  check_dims(H, "norm_fwd");
  if (rms) beta = nullptr;  // RMSNorm has no bias
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const T* xt = static_cast<const T*>(x);
    const T* rt = static_cast<const T*>(residual);
    T* yt = static_cast<T*>(y);
    T* st = static_cast<T*>(sum_out);
    const bool vec_ok = H % kVec == 0 && aligned16(xt) && aligned16(yt) &&
                        (rt == nullptr || (aligned16(rt) && aligned16(st))) &&
                        (gamma == nullptr || aligned16(gamma)) &&
                        (beta == nullptr || aligned16(beta));
    if (vec_ok) {
      norm_fwd_launch<T, kVec>(xt, rt, yt, st, gamma, beta, mean, rstd, rows,
                               static_cast<int>(H), eps, rms, stream);
    } else {
      norm_fwd_launch<T, 1>(xt, rt, yt, st, gamma, beta, mean, rstd, rows, static_cast<int>(H),
                            eps, rms, stream);
    }
  });
}

int64_t norm_bwd_workspace_floats(int64_t rows, int64_t H) {
  if (rows <= 0 || H <= 0) return 0;
  return 2 * norm_bwd_workers(rows, H) * H;
}

void norm_bwd(const void* dy, const void* dsum, const void* xin, const float* gamma,
              const float* mean, const float* rstd, void* dx, float* dgamma, float* dbeta,
              float* workspace, int64_t rows, int64_t H, bool rms, DType dt,
              cudaStream_t stream) {
  if (H <= 0) return;
  check_dims(H, "norm_bwd");
  const bool want = dgamma != nullptr || dbeta != nullptr;
  if (rows <= 0) {  // no rows: parameter gradients are zero
    if (dgamma != nullptr) check_cuda(cudaMemsetAsync(dgamma, 0, H * sizeof(float), stream),
                                      "norm_bwd memset");
    if (dbeta != nullptr) check_cuda(cudaMemsetAsync(dbeta, 0, H * sizeof(float), stream),
                                     "norm_bwd memset");
    return;
  }
  if (want && workspace == nullptr) {
    throw std::runtime_error("megapre CUDA norm_bwd: workspace required for dgamma/dbeta");
  }
  float* ws = want ? workspace : nullptr;
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const T* dyt = static_cast<const T*>(dy);
    const T* dst = static_cast<const T*>(dsum);
    const T* xt = static_cast<const T*>(xin);
    T* dxt = static_cast<T*>(dx);
    const bool vec_ok = H % kVec == 0 && aligned16(dyt) && aligned16(xt) && aligned16(dxt) &&
                        (dst == nullptr || aligned16(dst)) &&
                        (gamma == nullptr || aligned16(gamma)) &&
                        (ws == nullptr || aligned16(ws));
    if (vec_ok) {
      norm_bwd_launch<T, kVec>(dyt, dst, xt, gamma, mean, rstd, dxt, ws, rows,
                               static_cast<int>(H), rms, stream);
    } else {
      norm_bwd_launch<T, 1>(dyt, dst, xt, gamma, mean, rstd, dxt, ws, rows, static_cast<int>(H),
                            rms, stream);
    }
  });
  if (want) {
    const dim3 block(kColTx, kColTy);
    const dim3 grid(static_cast<unsigned>((H + kColTx - 1) / kColTx), 2);
    norm_bwd_colsum_kernel<<<grid, block, 0, stream>>>(ws, dgamma, dbeta,
                                                       norm_bwd_workers(rows, H),
                                                       static_cast<int>(H));
    check_launch("norm_bwd_colsum");
  }
}

}  // namespace megapre::cuda
