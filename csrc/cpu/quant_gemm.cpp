// Int8 CPU kernels: quantize_rowwise, the W8A8 GEMM and the weight-only GEMM (see kernels.h).
// This file holds the dispatch, cache blocking and threading, plus the portable scalar paths;
// the microkernels are in quant_gemm_avx2.cpp and quant_gemm_avx512.cpp (interface in
// quant_gemm_impl.h).
//
// W8A8 (AVX-512 VNNI): vpdpbusd multiplies u8 by s8, so w is packed as w + 128 (unsigned)
// and x is read in place (signed); the epilogue subtracts 128 * rowsum(x). Tasks are column
// blocks of up to kVNCmax outputs (split over rows too when there are few). x is packed once
// into contiguous 6-row panels (row sums on the way); a task packs its columns of w once, for
// all of K (the block stays in L2), then walks its rows in chunks of kVMC and K in blocks of
// kVKC: the 6x64 microkernel keeps a 64-column x kVKC slice of the packed w in L1 while
// every 6-row panel of the chunk passes over it. Int32 partial sums of a chunk live in a
// thread-local scratch; in the last K block each finished 6x64 tile goes straight through the
// fused dequant + bias epilogue.
//
// W8A8 (AVX2), GotoBLAS style: x is widened to int16 once; the output is cut into tasks of
// `rows` x kNC columns that threads take independently. A task walks K in blocks of kKC: it
// packs its kNC x kKC block of w into kNR-column int16 micro-panels (checking for -128 on the
// way), then, per kMC rows, runs the 6x16 vpmaddwd microkernel with the w micro-panel
// (16 KiB) in L1 and the kMC x kKC block of x in L2. Int32 partial sums of the task live in a
// thread-local scratch until the epilogue scales them. For M <= kGemvRows (AVX2) or
// kVGemvRows (VNNI) packing w would cost as much as the math, so a maddubs (AVX2) or
// vpdpbusd (VNNI) kernel reads w in place.
//
// Weight-only: M <= 16 streams each weight row once against all rows of x (the memory-bound
// generation case); larger M dequantizes w blocks to fp32 panels and runs a 6x16 FMA kernel
// with the same task/blocking scheme.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "kernels.h"
#include "quant_gemm_impl.h"

namespace megapre::cpu {
namespace {

using namespace qgemm;

constexpr int64_t kKC = 512;     // W8A8 K block; multiple of 16
constexpr int64_t kMC = 96;      // W8A8 rows of x kept in L2 per K block (multiple of kMR)
constexpr int64_t kNC = 128;     // task width in output columns (multiple of kNR, kFNR)
constexpr int64_t kMBmax = 512;  // most rows per task (bounds the accumulator scratch)
constexpr int64_t kFKC = 256;    // weight-only fp32 K block
constexpr int64_t kFMC = 96;     // weight-only rows of x converted at once (multiple of kFMR)
constexpr int64_t kGemvRows = 4; // W8A8 (AVX2): M up to this reads w in place
constexpr int64_t kVGemvRows = 8; // W8A8 (VNNI): M up to this reads w in place
constexpr int64_t kWoGemvRows = 16;
constexpr int64_t kVKC = 512;      // VNNI K block (bytes of x per row; multiple of 4)
constexpr int64_t kVMC = 48;       // VNNI rows per chunk (multiple of kVMR)
constexpr int64_t kVNCmax = 256;   // VNNI most columns per task (multiple of kVNR)
constexpr int64_t kVBBytes = int64_t{1} << 20;  // VNNI packed w block budget per task (L2)

static_assert(kKC % 16 == 0 && kMC % kMR == 0 && kNC % kNR == 0 && kNC % kFNR == 0 &&
                  kFMC % kFMR == 0 && kVKC % 4 == 0 && kVMC % kVMR == 0 && kVNCmax % kVNR == 0,
              "blocking constants must be multiples of the microkernel tile");

int64_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// Per-thread growable buffer, 64-byte aligned, kept across calls (at::parallel_for reuses
// its worker threads, so steady-state calls allocate nothing).
struct Scratch {
  std::vector<unsigned char> raw;
  template <typename T> T* get(int64_t n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(T) + 64;
    if (raw.size() < bytes) raw.resize(bytes);
    auto p = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t{63};
    return reinterpret_cast<T*>(p);
  }
};
thread_local Scratch tl_a, tl_b, tl_c;

// A call-wide operand copy (packed or widened x) made by the calling thread: its persistent
// scratch up to kKeepBytes, so steady-state calls neither allocate nor page-fault; a one-off
// allocation above that, so one huge call does not pin its memory for the thread's lifetime.
constexpr size_t kKeepBytes = size_t{32} << 20;
template <typename T> class CallBuffer {
 public:
  explicit CallBuffer(int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (bytes <= kKeepBytes) {
      p_ = tl_a.get<T>(n);
    } else {
      own_.reset(new T[bytes / sizeof(T)]);
      p_ = own_.get();
    }
  }
  T* get() const { return p_; }

 private:
  std::unique_ptr<T[]> own_;
  T* p_;
};

// Run f(begin, end) over [0, n) on the intra-op pool, inline when the work is tiny.
template <typename F> void run_tasks(int64_t n, int64_t work_per_task, const F& f) {
  if (n <= 0) return;
  if (n == 1 || n * work_per_task < (int64_t{1} << 16)) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, 1, f);
}

// fn(n0, n1) for blocks of `cols` output columns (rows of w) covering [0, N), shared out over
// the threads (work: the cost of one block). A fn returning bool stops its thread's remaining
// blocks by returning false.
template <typename F> void for_column_blocks(int64_t N, int64_t cols, int64_t work, const F& fn) {
  run_tasks(ceil_div(N, cols), work, [&](int64_t b, int64_t e) {
    for (int64_t n0 = b * cols; n0 < std::min(N, e * cols); n0 += cols) {
      const int64_t n1 = std::min(N, n0 + cols);
      if constexpr (std::is_void_v<decltype(fn(n0, n1))>) {
        fn(n0, n1);
      } else if (!fn(n0, n1)) {
        return;
      }
    }
  });
}

// sum_k x[k] * w[k] accumulated as Acc (int32: exact; float: in k order).
template <typename Acc, typename X> Acc dot(const X* x, const int8_t* w, int64_t K) {
  Acc acc = 0;
  for (int64_t k = 0; k < K; ++k) acc += static_cast<Acc>(x[k]) * static_cast<Acc>(w[k]);
  return acc;
}

// Output tiling shared by the blocked paths: tasks of rows x kNC columns, enough of them
// to keep every thread busy, rows a multiple of `mr`.
struct Tiling {
  int64_t rows, nb, mb;  // rows per task, column blocks, row blocks
  Tiling(int64_t M, int64_t N, int64_t mr) {
    nb = ceil_div(N, kNC);
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    int64_t m_blocks = std::max<int64_t>(ceil_div(want, nb), ceil_div(M, kMBmax));
    m_blocks = std::min(m_blocks, ceil_div(M, mr));
    rows = round_up(ceil_div(M, m_blocks), mr);
    mb = ceil_div(M, rows);
  }
};

// ---- quantize_rowwise, scalar -------------------------------------------------------------
// Round half to even for |v| <= 127 without a libm call: adding and subtracting 1.5 * 2^23
// leaves the nearest integer (ties to even) in the default rounding mode.
inline float round_small(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

template <DType D>
void quantize_rows_scalar(const void* xv, int8_t* q, float* scale, int64_t r0, int64_t r1,
                          int64_t K) {
  using T = typename Elem<D>::T;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = static_cast<const T*>(xv) + r * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(Elem<D>::load(row, k)));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[r] = amax / 127.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::min(127.f, std::max(-127.f, Elem<D>::load(row, k) * inv));
      q[r * K + k] = static_cast<int8_t>(round_small(v));
    }
  }
}

// ---- W8A8, scalar ------------------------------------------------------------------------
bool has_minus128(const int8_t* w, int64_t n) {
  std::atomic<bool> bad{false};
  run_tasks(ceil_div(n, 1 << 16), 1 << 16, [&](int64_t b, int64_t e) {
    const int64_t lo = b << 16, hi = std::min(n, e << 16);
    bool found = false;
    for (int64_t i = lo; i < hi; ++i) found |= w[i] == -128;
    if (found) bad = true;
  });
  return bad;
}

template <DType D>
void epilogue_int8_scalar(int32_t acc, float xs, float ws, const float* bias, int64_t n,
                          void* out, int64_t idx) {
  float v = static_cast<float>(acc) * xs * ws;
  if (bias) v = v + bias[n];
  Elem<D>::store(static_cast<typename Elem<D>::T*>(out), idx, v);
}

template <DType D>
void int8_gemm_scalar(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                      const float* bias, void* out, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kRows = 32;  // w rows per task, reused from cache for every row of x
  for_column_blocks(N, kRows, kRows * M * K, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = n0; n < n1; ++n) {
        const int32_t acc = dot<int32_t>(x + m * K, w + n * K, K);
        epilogue_int8_scalar<D>(acc, xs[m], ws[n], bias, n, out, m * N + n);
      }
    }
  });
}

// Small-M W8A8 over blocks of 64 output columns: gemv(n0, n1, acc) fills acc [M, n1 - n0]
// (false on a -128 weight), the epilogue scales it into out. Returns false on a -128 weight.
template <typename Gemv>
bool gemv_by_columns(const float* xs, const float* ws, const float* bias, void* out, int64_t M,
                     int64_t N, int64_t K, DType dt, const Gemv& gemv) {
  constexpr int64_t kRows = 64;
  const int64_t esz = elem_size(dt);
  std::atomic<bool> bad{false};
  for_column_blocks(N, kRows, kRows * M * K, [&](int64_t n0, int64_t n1) {
    int32_t* acc = tl_c.get<int32_t>(M * kRows);
    if (!gemv(n0, n1, acc)) {
      bad = true;
      return false;
    }
    epilogue_int8_avx2(acc, n1 - n0, xs, ws + n0, bias ? bias + n0 : nullptr,
                       static_cast<char*>(out) + n0 * esz, N, M, n1 - n0, dt);
    return true;
  });
  return !bad;
}

// ---- W8A8, AVX2 --------------------------------------------------------------------------
bool int8_gemv_avx2(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                    const float* bias, void* out, int64_t M, int64_t N, int64_t K, DType dt) {
  // Zero-padded copies of x and |x| so the kernel reads whole 32-byte chunks.
  const int64_t ldx = round_up(std::max<int64_t>(K, 1), 32);
  std::vector<int8_t> xp(M * ldx, 0);
  std::vector<uint8_t> uxp(M * ldx, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const int v = x[m * K + k];
      xp[m * ldx + k] = static_cast<int8_t>(v);
      uxp[m * ldx + k] = static_cast<uint8_t>(v < 0 ? -v : v);
    }
  }
  const auto* uxp8 = reinterpret_cast<const int8_t*>(uxp.data());
  return gemv_by_columns(xs, ws, bias, out, M, N, K, dt, [&](int64_t n0, int64_t n1, int32_t* acc) {
    return gemv_int8_avx2(xp.data(), uxp8, ldx, M, w, K, n0, n1, acc);
  });
}

bool int8_gemm_blocked_avx2(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                            const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                            DType dt) {
  const Tiling t(M, N, kMR);
  const int64_t esz = elem_size(dt);
  // x widened to int16 once (rows padded to whole micro-panels): the microkernel broadcasts
  // from it directly, so no column block of w has to repack x.
  // A fresh allocation this size is a fresh mmap whose page faults cost about as much as
  // widening itself, hence the kept scratch (CallBuffer).
  const int64_t ldx = round_up(std::max<int64_t>(K, 1), 16), Mp = round_up(M, kMR);
  const CallBuffer<int16_t> x16buf(Mp * ldx);
  int16_t* x16 = x16buf.get();
  run_tasks(ceil_div(M, 64), 64 * K / 16, [&](int64_t b, int64_t e) {
    widen_rows_avx2(x, K, b * 64, std::min(M, e * 64), x16, ldx);
  });
  std::fill(x16 + M * ldx, x16 + Mp * ldx, int16_t{0});
  std::atomic<bool> bad{false};
  run_tasks(t.nb * t.mb, t.rows * kNC * K, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e && !bad; ++task) {
      const int64_t m0 = (task % t.mb) * t.rows, m1 = std::min(M, m0 + t.rows);
      const int64_t n0 = (task / t.mb) * kNC, n1 = std::min(N, n0 + kNC);
      const int64_t npan = ceil_div(n1 - n0, kNR), ldc = npan * kNR;
      int32_t* C = tl_c.get<int32_t>(round_up(m1 - m0, kMR) * ldc);
      // At least one K block, so that K == 0 still zeroes the accumulators.
      for (int64_t pc = 0; pc == 0 || pc < K; pc += kKC) {
        const int64_t kc = std::min(kKC, K - pc), kp = ceil_div(kc, 2);
        int16_t* B = tl_b.get<int16_t>(npan * kp * kBPairElems);
        bool ok = true;
        for (int64_t j = 0; j < npan; ++j)
          ok &= pack_b_avx2(w, K, n0 + j * kNR, std::min<int64_t>(kNR, n1 - n0 - j * kNR), pc, kc,
                            B + j * kp * kBPairElems);
        if (!ok) {
          bad = true;
          return;
        }
        // Rows in chunks of kMC: their x block stays in L2 while every w micro-panel (L1)
        // passes over it.
        for (int64_t ic = m0; ic < m1; ic += kMC) {
          const int64_t ipan = ceil_div(std::min(kMC, m1 - ic), kMR);
          for (int64_t j = 0; j < npan; ++j)
            for (int64_t i = 0; i < ipan; ++i)
              micro_int8_avx2(x16 + (ic + i * kMR) * ldx + pc, ldx, B + j * kp * kBPairElems,
                              kp, C + (ic - m0 + i * kMR) * ldc + j * kNR, ldc, pc > 0);
        }
      }
      epilogue_int8_avx2(C, ldc, xs + m0, ws + n0, bias ? bias + n0 : nullptr,
                         static_cast<char*>(out) + (m0 * N + n0) * esz, N, m1 - m0, n1 - n0, dt);
    }
  });
  return !bad;
}

// ---- W8A8, AVX-512 VNNI ------------------------------------------------------------------
// Row sums of x (rows of stride ldx), in parallel.
std::vector<int32_t> rowsums(const int8_t* x, int64_t ldx, int64_t M, int64_t K) {
  std::vector<int32_t> rs(M);
  run_tasks(ceil_div(M, 64), 64 * K / 8, [&](int64_t b, int64_t e) {
    rowsum_avx512(x, ldx, K, b * 64, std::min(M, e * 64), rs.data());
  });
  return rs;
}

bool int8_gemv_vnni(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                    const float* bias, void* out, int64_t M, int64_t N, int64_t K, DType dt) {
  // x zero padded to whole 64-byte chunks: past K the kernel multiplies w + 128 by 0.
  const int64_t ldx = round_up(std::max<int64_t>(K, 1), 64);
  std::vector<int8_t> xp(M * ldx, 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(xp.data() + m * ldx, x + m * K, K);
  const std::vector<int32_t> rs = rowsums(xp.data(), ldx, M, K);
  return gemv_by_columns(xs, ws, bias, out, M, N, K, dt, [&](int64_t n0, int64_t n1, int32_t* acc) {
    return gemv_vnni(xp.data(), ldx, M, rs.data(), w, K, n0, n1, acc);
  });
}

// Tasks of the VNNI blocked GEMM: column blocks of nc, split over rows only when there are
// too few of them to keep every thread busy (each row split repacks its columns of w).
struct VTiling {
  int64_t nc, nb, rows, mb;
  VTiling(int64_t M, int64_t N, int64_t Kq) {
    const int64_t fit = kVBBytes / (std::max<int64_t>(Kq, 1) * 4) / kVNR * kVNR;
    nc = std::min(kVNCmax, std::max<int64_t>(kVNR, fit));
    nb = ceil_div(N, nc);
    const int64_t threads = at::get_num_threads();
    int64_t m_blocks = nb < 2 * threads ? ceil_div(2 * threads, nb) : 1;
    m_blocks = std::min(m_blocks, ceil_div(M, kVMR));
    rows = round_up(ceil_div(M, m_blocks), kVMR);
    mb = ceil_div(M, rows);
  }
};

bool int8_gemm_blocked_vnni(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
                            const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                            DType dt) {
  const int64_t Kq = ceil_div(K, 4), apanel = Kq * 4 * kVMR, bpanel = Kq * kVQuadBytes;
  // x packed once into 6-row panels (shared by every task), row sums on the way.
  const int64_t Mp = round_up(M, kVMR);
  const CallBuffer<int8_t> Abuf(Mp / kVMR * apanel);
  int8_t* A = Abuf.get();
  std::vector<int32_t> rs(Mp, 0);
  run_tasks(ceil_div(M, 8 * kVMR), 8 * kVMR * K / 4, [&](int64_t b, int64_t e) {
    pack_a_vnni(x, K, b * 8 * kVMR, std::min(M, e * 8 * kVMR), A, rs.data());
  });
  const VTiling t(M, N, Kq);
  const int64_t esz = elem_size(dt);
  std::atomic<bool> bad{false};
  run_tasks(t.nb * t.mb, t.rows * t.nc * K, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e && !bad; ++task) {
      const int64_t m0 = (task % t.mb) * t.rows, m1 = std::min(M, m0 + t.rows);
      const int64_t n0 = (task / t.mb) * t.nc, n1 = std::min(N, n0 + t.nc);
      const int64_t npan = ceil_div(n1 - n0, kVNR), ldc = npan * kVNR;
      uint8_t* B = tl_b.get<uint8_t>(npan * bpanel);
      bool ok = true;
      for (int64_t j = 0; j < npan; ++j)
        ok &= pack_b_vnni(w, K, n0 + j * kVNR, std::min<int64_t>(kVNR, n1 - n0 - j * kVNR),
                          B + j * bpanel);
      if (!ok) {
        bad = true;
        return;
      }
      int32_t* C = tl_c.get<int32_t>(kVMC * ldc);
      char* o = static_cast<char*>(out);
      for (int64_t ic = m0; ic < m1; ic += kVMC) {
        const int64_t mc = std::min(kVMC, m1 - ic), ipan = ceil_div(mc, kVMR);
        const int8_t* Ai = A + (ic / kVMR) * apanel;
        if (Kq == 0) {  // no products: the output is the (scaled zero plus) bias
          std::fill(C, C + kVMC * ldc, 0);
          epilogue_vnni(C, ldc, rs.data() + ic, xs + ic, ws + n0, bias ? bias + n0 : nullptr,
                        o + (ic * N + n0) * esz, N, mc, n1 - n0, dt);
        }
        for (int64_t pc = 0; pc < Kq; pc += kVKC / 4) {
          const int64_t kq = std::min(kVKC / 4, Kq - pc);
          const bool last = pc + kq == Kq;
          for (int64_t j = 0; j < npan; ++j) {
            const uint8_t* Bj = B + j * bpanel + pc * kVQuadBytes;
            const int64_t c0 = n0 + j * kVNR, nr = std::min<int64_t>(kVNR, n1 - c0);
            for (int64_t i = 0; i < ipan; ++i) {
              int32_t* Ct = C + i * kVMR * ldc + j * kVNR;
              micro_vnni(Ai + i * apanel + pc * 4 * kVMR, Bj, kq, Ct, ldc, pc > 0);
              // The tile's last K block: dequantize it now, while it is in L1, so the output
              // stores overlap the next tiles' arithmetic.
              if (last) {
                const int64_t r0 = ic + i * kVMR, mr = std::min<int64_t>(kVMR, m1 - r0);
                epilogue_vnni(Ct, ldc, rs.data() + r0, xs + r0, ws + c0,
                              bias ? bias + c0 : nullptr, o + (r0 * N + c0) * esz, N, mr, nr, dt);
              }
            }
          }
        }
      }
    }
  });
  return !bad;
}

// ---- weight-only, scalar -----------------------------------------------------------------
template <DType D>
void weight_only_scalar(const void* xv, const int8_t* w, const float* ws, const float* bias,
                        void* out, int64_t M, int64_t N, int64_t K) {
  using T = typename Elem<D>::T;
  // fp16/bf16 x is converted once up front; fp32 x is read in place.
  std::vector<float> xbuf;
  const float* xf = reinterpret_cast<const float*>(xv);
  if constexpr (D != DType::F32) {
    xbuf.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = Elem<D>::load(static_cast<const T*>(xv), i);
    xf = xbuf.data();
  }
  constexpr int64_t kRows = 16;  // w rows per task: stay in cache while every x row passes
  for_column_blocks(N, kRows, kRows * M * K, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = n0; n < n1; ++n) {
        float v = dot<float>(xf + m * K, w + n * K, K) * ws[n];
        if (bias) v = v + bias[n];
        Elem<D>::store(static_cast<T*>(out), m * N + n, v);
      }
    }
  });
}

// ---- weight-only, AVX2 / AVX-512 ---------------------------------------------------------
void weight_only_gemv_vec(const void* x, const int8_t* w, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, int64_t K, DType dt, bool avx512) {
  std::vector<float> xbuf;
  const float* xf = static_cast<const float*>(x);
  if (dt != DType::F32) {
    xbuf.resize(M * K);
    to_f32_avx2(x, M * K, xbuf.data(), dt);
    xf = xbuf.data();
  }
  constexpr int64_t kRows = 64;
  const int64_t esz = elem_size(dt);
  run_tasks(ceil_div(N, kRows), kRows * M * K, [&](int64_t b, int64_t e) {
    // Up to 3 rows of x make one pass over w, so the kernel takes the thread's whole range at
    // once (its prefetch then runs across block boundaries). From 4 rows on, x comes in
    // chunks that reread w, so blocks of kRows rows keep w in L2 between chunks.
    const int64_t step = M <= 3 ? (e - b) * kRows : kRows;
    float* acc = tl_c.get<float>(M * step);
    for (int64_t n0 = b * kRows; n0 < std::min(N, e * kRows); n0 += step) {
      const int64_t n1 = std::min(N, n0 + step);
      if (avx512)
        wo_gemv_avx512(xf, K, M, w, K, n0, n1, acc);
      else
        wo_gemv_avx2(xf, K, M, w, K, n0, n1, acc);
      epilogue_f32_avx2(acc, n1 - n0, ws + n0, bias ? bias + n0 : nullptr,
                        static_cast<char*>(out) + n0 * esz, N, M, n1 - n0, dt);
    }
  });
}

void weight_only_blocked_avx2(const void* x, const int8_t* w, const float* ws, const float* bias,
                              void* out, int64_t M, int64_t N, int64_t K, DType dt) {
  const Tiling t(M, N, kFMR);
  const int64_t esz = elem_size(dt);
  run_tasks(t.nb * t.mb, t.rows * kNC * K, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t m0 = (task % t.mb) * t.rows, m1 = std::min(M, m0 + t.rows);
      const int64_t n0 = (task / t.mb) * kNC, n1 = std::min(N, n0 + kNC);
      const int64_t npan = ceil_div(n1 - n0, kFNR), ldc = npan * kFNR;
      float* C = tl_c.get<float>(round_up(m1 - m0, kFMR) * ldc);
      for (int64_t pc = 0; pc == 0 || pc < K; pc += kFKC) {
        const int64_t kc = std::min(kFKC, K - pc);
        float* B = tl_b.get<float>(npan * kc * kFNR);
        for (int64_t j = 0; j < npan; ++j)
          pack_fb_avx2(w, K, n0 + j * kFNR, std::min<int64_t>(kFNR, n1 - n0 - j * kFNR), pc, kc,
                       B + j * kc * kFNR);
        for (int64_t ic = m0; ic < m1; ic += kFMC) {
          const int64_t mc = std::min(kFMC, m1 - ic);
          int64_t mfull = mc / kFMR * kFMR;
          // fp32 x is read in place except for a partial last panel; fp16/bf16 rows are
          // converted once per block. Copies are zero padded to whole kFMR-row panels.
          const float* A;
          int64_t lda;
          float* tail = nullptr;
          if (dt == DType::F32) {
            A = static_cast<const float*>(x) + ic * K + pc;
            lda = K;
            if (mfull < mc) tail = tl_a.get<float>(kFMR * kc);
          } else {
            float* Ab = tl_a.get<float>(round_up(mc, kFMR) * kc);
            A = Ab;
            lda = kc;
            mfull = round_up(mc, kFMR);
            for (int64_t r = 0; r < mfull; ++r) {
              if (r < mc)
                to_f32_avx2(static_cast<const char*>(x) + ((ic + r) * K + pc) * esz, kc,
                            Ab + r * kc, dt);
              else
                std::fill(Ab + r * kc, Ab + (r + 1) * kc, 0.f);
            }
          }
          if (tail) {
            std::fill(tail, tail + kFMR * kc, 0.f);
            for (int64_t r = mfull; r < mc; ++r)
              std::copy(A + r * lda, A + r * lda + kc, tail + (r - mfull) * kc);
          }
          for (int64_t j = 0; j < npan; ++j) {
            const float* Bj = B + j * kc * kFNR;
            float* Cj = C + (ic - m0) * ldc + j * kFNR;
            for (int64_t i = 0; i < mfull; i += kFMR)
              micro_f32_avx2(A + i * lda, lda, Bj, kc, Cj + i * ldc, ldc, pc > 0);
            if (tail) micro_f32_avx2(tail, kc, Bj, kc, Cj + mfull * ldc, ldc, pc > 0);
          }
        }
      }
      epilogue_f32_avx2(C, ldc, ws + n0, bias ? bias + n0 : nullptr,
                        static_cast<char*>(out) + (m0 * N + n0) * esz, N, m1 - m0, n1 - n0, dt);
    }
  });
}

}  // namespace

// ---- public entry points -----------------------------------------------------------------
void quantize_rowwise(const void* x, int8_t* q, float* scale, int64_t rows, int64_t K,
                      DType dt) {
  const bool avx512 = use_avx512vnni(), avx2 = use_avx2();
  run_tasks(rows, K, [&](int64_t r0, int64_t r1) {
    if (avx512) return qgemm::quantize_rows_avx512(x, q, scale, r0, r1, K, dt);
    if (avx2) return qgemm::quantize_rows_avx2(x, q, scale, r0, r1, K, dt);
    with_dtype(dt, [&](auto d) {
      quantize_rows_scalar<decltype(d)::value>(x, q, scale, r0, r1, K);
    });
  });
}

bool int8_gemm(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
               const float* bias, void* out, int64_t M, int64_t N, int64_t K, DType out_dt) {
  if (N == 0) return true;
  if (M == 0) return !has_minus128(w, N * K);  // nothing to compute; still validate w
  if (use_avx512vnni()) {
    return M <= kVGemvRows ? int8_gemv_vnni(x, xs, w, ws, bias, out, M, N, K, out_dt)
                          : int8_gemm_blocked_vnni(x, xs, w, ws, bias, out, M, N, K, out_dt);
  }
  if (use_avx2()) {
    return M <= kGemvRows ? int8_gemv_avx2(x, xs, w, ws, bias, out, M, N, K, out_dt)
                          : int8_gemm_blocked_avx2(x, xs, w, ws, bias, out, M, N, K, out_dt);
  }
  if (has_minus128(w, N * K)) return false;
  with_dtype(out_dt, [&](auto d) {
    int8_gemm_scalar<decltype(d)::value>(x, xs, w, ws, bias, out, M, N, K);
  });
  return true;
}

void weight_only_int8_gemm(const void* x, const int8_t* w, const float* ws, const float* bias,
                           void* out, int64_t M, int64_t N, int64_t K, DType dt) {
  if (M == 0 || N == 0) return;
  if (use_avx2()) {
    if (M <= kWoGemvRows)
      return weight_only_gemv_vec(x, w, ws, bias, out, M, N, K, dt, use_avx512vnni());
    return weight_only_blocked_avx2(x, w, ws, bias, out, M, N, K, dt);
  }
  with_dtype(dt, [&](auto d) {
    weight_only_scalar<decltype(d)::value>(x, w, ws, bias, out, M, N, K);
  });
}

}  // namespace megapre::cpu
