// Fused scale + mask + softmax over the last dim of [b, h, sq, sk] (CPU): threading, mask/causal
// row set-up, dispatch between the portable scalar rows below and the vector rows in
// softmax_avx2.cpp / softmax_avx512.cpp. Semantics: csrc/cpu/kernels.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dtype.h"
#include "kernels.h"
#include "softmax_impl.h"

namespace megapre::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Elements one parallel task should cover at least, so a thread hand-off is worth it.
constexpr int64_t kGrainElems = 32768;

// Outputs at least this large cannot stay cached for their consumer anyway, so the AVX2 rows
// write them with non-temporal stores, which skip reading each destination line first.
constexpr int64_t kStreamBytes = 16 << 20;

size_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// Which row kernels run: the portable ones below, softmax_avx2.cpp's or softmax_avx512.cpp's.
// The AVX-512 rows need only AVX-512 F/BW/VL, all part of the ISA setting's AVX-512 VNNI level.
enum class Rows { kScalar, kAvx2, kAvx512 };

Rows pick_rows() {
  if (use_avx512vnni()) return Rows::kAvx512;
  return use_avx2() ? Rows::kAvx2 : Rows::kScalar;
}

// ---- portable rows: same three passes as the AVX2 version (see softmax_impl.h) ---------------
template <DType D>
void fwd_row_scalar(const typename Elem<D>::T* x, const uint8_t* m, typename Elem<D>::T* y,
                    int64_t n, int64_t sk, float scale, float* work) {
  float row_max = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    float v = (m != nullptr && m[j] != 0) ? kNegInf : Elem<D>::load(x, j) * scale;
    work[j] = v;
    row_max = v > row_max ? v : row_max;
  }
  if (row_max == kNegInf) {  // every key masked or -inf: zeros, not 0/0
    std::memset(y, 0, static_cast<size_t>(sk) * sizeof(y[0]));
    return;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    work[j] = std::exp(work[j] - row_max);
    sum += work[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) Elem<D>::store(y, j, work[j] * inv);
  if (n < sk) std::memset(y + n, 0, static_cast<size_t>(sk - n) * sizeof(y[0]));
}

template <DType D>
void bwd_row_scalar(const typename Elem<D>::T* dy, const typename Elem<D>::T* p,
                    typename Elem<D>::T* dx, int64_t n, int64_t sk, float scale) {
  float dot = 0.f;
  for (int64_t j = 0; j < n; ++j) dot += Elem<D>::load(dy, j) * Elem<D>::load(p, j);
  for (int64_t j = 0; j < n; ++j)
    Elem<D>::store(dx, j, Elem<D>::load(p, j) * scale * (Elem<D>::load(dy, j) - dot));
  if (n < sk) std::memset(dx + n, 0, static_cast<size_t>(sk - n) * sizeof(dx[0]));
}

void fwd_row(Rows rows, bool stream, const void* x, const uint8_t* m, void* y, int64_t n,
             int64_t sk, float scale, DType dt, float* work) {
  if (rows == Rows::kAvx512)
    return softmax_impl::fwd_row_avx512(x, m, y, n, sk, scale, dt, work, stream);
  if (rows == Rows::kAvx2) return softmax_impl::fwd_row_avx2(x, m, y, n, sk, scale, dt, work, stream);
  with_dtype(dt, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    using T = elem_t<D>;
    fwd_row_scalar<D>(static_cast<const T*>(x), m, static_cast<T*>(y), n, sk, scale, work);
  });
}

void bwd_row(Rows rows, bool stream, const void* dy, const void* p, void* dx, int64_t n,
             int64_t sk, float scale, DType dt) {
  if (rows == Rows::kAvx512) return softmax_impl::bwd_row_avx512(dy, p, dx, n, sk, scale, dt, stream);
  if (rows == Rows::kAvx2) return softmax_impl::bwd_row_avx2(dy, p, dx, n, sk, scale, dt, stream);
  with_dtype(dt, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    using T = elem_t<D>;
    bwd_row_scalar<D>(static_cast<const T*>(dy), static_cast<const T*>(p), static_cast<T*>(dx), n,
                      sk, scale);
  });
}

// ---- scheduling ------------------------------------------------------------------------------
// Parallel tasks over the b*h*sq rows. Causal rows cost O(q), so a causal task pairs query q
// with query sq-1-q of the same head: every task then costs about the same, chunks of tasks do
// too, and the threads finish together even for a single head.
int64_t task_count(int64_t bh, int64_t sq, bool causal) {
  return bh * (causal ? (sq + 1) / 2 : sq);
}

template <class Fn>
void rows_of_task(int64_t t, int64_t sq, bool causal, const Fn& fn) {
  if (!causal) {
    fn(t / sq, t % sq);
    return;
  }
  const int64_t half = (sq + 1) / 2;
  const int64_t bh = t / half, q = t % half;
  fn(bh, q);
  if (sq - 1 - q != q) fn(bh, sq - 1 - q);
}

// Visits the rows of tasks [t0, t1) in order as fn(bh, q, next_bh, next_q), where (next_bh,
// next_q) is the row visited after this one (next_bh = -1 at the end), so fn can prefetch it.
template <class Fn>
void visit_rows(int64_t t0, int64_t t1, int64_t sq, bool causal, const Fn& fn) {
  int64_t bh0 = -1, q0 = -1;
  for (int64_t t = t0; t < t1; ++t) {
    rows_of_task(t, sq, causal, [&](int64_t bh, int64_t q) {
      if (bh0 >= 0) fn(bh0, q0, bh, q);
      bh0 = bh;
      q0 = q;
    });
  }
  if (bh0 >= 0) fn(bh0, q0, int64_t{-1}, int64_t{-1});
}

// Requests the start of a row that is read next. Causal rows read only a prefix of each row,
// a broken stream that the hardware prefetchers pick up late, so without this every row start
// waits on memory. Longer rows are left to the hardware once it has caught on.
void prefetch_prefix(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  bytes = std::min<size_t>(bytes, 4096);
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// Hands out chunks of tasks to whichever thread asks next. Unlike a static split, a thread that
// is slow or descheduled (the machine is shared) does not leave its half waiting: the other
// threads finish it.
class TaskQueue {
 public:
  TaskQueue(int64_t tasks, int64_t grain) : tasks_(tasks), grain_(grain) {}
  bool next(int64_t& t0, int64_t& t1) {
    t0 = next_.fetch_add(grain_, std::memory_order_relaxed);
    if (t0 >= tasks_) return false;
    t1 = std::min(tasks_, t0 + grain_);
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t tasks_, grain_;
};

// Runs worker(queue) on up to at::get_num_threads() threads (inline when that is one, or when
// called from inside a parallel region) until the queue of row tasks is drained.
template <class Worker>
void parallel_tasks(int64_t bh, int64_t sq, int64_t sk, bool causal, const Worker& worker) {
  const int64_t tasks = task_count(bh, sq, causal);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / sk);
  TaskQueue queue(tasks, grain);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (tasks + grain - 1) / grain);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(queue); });
}

// Non-temporal output stores (vector rows only) for outputs too big to stay cached.
bool use_stream(Rows rows, int64_t b, int64_t h, int64_t sq, int64_t sk, DType dt) {
  return rows != Rows::kScalar && b * h * sq * sk * static_cast<int64_t>(elem_size(dt)) >= kStreamBytes;
}

// Keys of query q that survive the causal cut: j <= q + (sk - sq).
int64_t valid_keys(int64_t q, int64_t sq, int64_t sk, bool causal) {
  if (!causal) return sk;
  return std::clamp<int64_t>(q + sk - sq + 1, 0, sk);
}

}  // namespace

void softmax_fwd(const void* scores, const bool* mask, const int64_t* mask_strides, void* probs,
                 int64_t b, int64_t h, int64_t sq, int64_t sk, float scale, bool causal,
                 DType dt) {
  if (b <= 0 || h <= 0 || sq <= 0 || sk <= 0) return;
  const Rows rows = pick_rows();
  const bool stream = use_stream(rows, b, h, sq, sk, dt);
  const size_t row_bytes = static_cast<size_t>(sk) * elem_size(dt);
  const auto* x = static_cast<const char*>(scores);
  auto* y = static_cast<char*>(probs);
  const auto* mk = reinterpret_cast<const uint8_t*>(mask);  // bytes: nonzero = True
  int64_t ms[4] = {h * sq * sk, sq * sk, sk, 1};  // no strides given: a full contiguous mask
  if (mask_strides != nullptr) std::copy(mask_strides, mask_strides + 4, ms);
  const bool gather = mk != nullptr && ms[3] != 0 && ms[3] != 1;

  parallel_tasks(b * h, sq, sk, causal, [&](TaskQueue& queue) {
    std::vector<float> work(static_cast<size_t>(softmax_impl::work_floats(sk)));
    std::vector<uint8_t> mrow_buf(gather ? static_cast<size_t>(sk) : 0);
    auto mask_base = [&](int64_t bh, int64_t q) {
      return mk + (bh / h) * ms[0] + (bh % h) * ms[1] + q * ms[2];
    };
    auto one_row = [&](int64_t bh, int64_t q, int64_t next_bh, int64_t next_q) {
      if (next_bh >= 0) {
        const int64_t next_n = valid_keys(next_q, sq, sk, causal);
        prefetch_prefix(x + static_cast<size_t>(next_bh * sq + next_q) * row_bytes,
                        static_cast<size_t>(next_n) * elem_size(dt));
        if (mk != nullptr && ms[3] == 1) prefetch_prefix(mask_base(next_bh, next_q), next_n);
      }
      const int64_t row = bh * sq + q;
      const void* xr = x + static_cast<size_t>(row) * row_bytes;
      void* yr = y + static_cast<size_t>(row) * row_bytes;
      int64_t n = valid_keys(q, sq, sk, causal);
      const uint8_t* mrow = nullptr;
      if (mk != nullptr && n > 0) {
        const uint8_t* base = mask_base(bh, q);
        if (ms[3] == 1) {
          mrow = base;  // the usual case: the mask row is contiguous along sk
        } else if (ms[3] == 0) {
          if (base[0] != 0) n = 0;  // one flag for the whole row
        } else {
          for (int64_t j = 0; j < n; ++j) mrow_buf[j] = base[j * ms[3]];
          mrow = mrow_buf.data();
        }
      }
      fwd_row(rows, stream, xr, mrow, yr, n, sk, scale, dt, work.data());
    };
    for (int64_t t0, t1; queue.next(t0, t1);) visit_rows(t0, t1, sq, causal, one_row);
    if (stream) softmax_impl::stream_fence();
  });
}

void softmax_bwd(const void* dprobs, const void* probs, void* dscores, int64_t b, int64_t h,
                 int64_t sq, int64_t sk, float scale, bool causal, DType dt) {
  if (b <= 0 || h <= 0 || sq <= 0 || sk <= 0) return;
  const Rows rows = pick_rows();
  const bool stream = use_stream(rows, b, h, sq, sk, dt);
  const size_t row_bytes = static_cast<size_t>(sk) * elem_size(dt);
  const auto* dy = static_cast<const char*>(dprobs);
  const auto* p = static_cast<const char*>(probs);
  auto* dx = static_cast<char*>(dscores);

  parallel_tasks(b * h, sq, sk, causal, [&](TaskQueue& queue) {
    auto one_row = [&](int64_t bh, int64_t q, int64_t next_bh, int64_t next_q) {
      if (next_bh >= 0) {
        const size_t next_off = static_cast<size_t>(next_bh * sq + next_q) * row_bytes;
        const size_t next_bytes = valid_keys(next_q, sq, sk, causal) * elem_size(dt);
        prefetch_prefix(dy + next_off, next_bytes);
        prefetch_prefix(p + next_off, next_bytes);
      }
      const size_t off = static_cast<size_t>(bh * sq + q) * row_bytes;
      bwd_row(rows, stream, dy + off, p + off, dx + off, valid_keys(q, sq, sk, causal), sk,
              scale, dt);
    };
    for (int64_t t0, t1; queue.next(t0, t1);) visit_rows(t0, t1, sq, causal, one_row);
    if (stream) softmax_impl::stream_fence();
  });
}

}  // namespace megapre::cpu
