// GPT sample index and blending index builders, bound into megapre._C.data.
//
// Both are single linear passes over arrays that can hold hundreds of millions of entries, so
// they run in C++ with the GIL released (other Python threads, e.g. a DataLoader's pin thread or
// a heartbeat, keep running while rank 0 builds). Inputs are validated up front: a bad document
// index raises ValueError naming the position instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace megapre::data {
namespace {

// Hand a heap buffer to numpy without a copy; numpy frees it when the array dies.
template <typename T>
py::array_t<T> adopt(std::unique_ptr<T[]> buf, std::vector<py::ssize_t> shape) {
  T* raw = buf.release();
  py::capsule owner(raw, [](void* p) { delete[] static_cast<T*>(p); });
  return py::array_t<T>(std::move(shape), raw, owner);
}

void require_1d_contiguous(const py::array& a, const char* name) {
  if (a.ndim() != 1)
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
  if (reinterpret_cast<std::uintptr_t>(a.data()) % static_cast<std::uintptr_t>(a.itemsize()) != 0)
    throw std::invalid_argument(std::string(name) + " must be aligned to its item size (copy it, e.g. "
                                "numpy.require(a, None, 'A'); IndexedDataset's .idx views are not)");
}

// Sample boundaries over the token stream formed by concatenating sizes[doc_idx[0]],
// sizes[doc_idx[1]], ...: sample k spans stream positions [k*seq, k*seq + seq] inclusive (seq + 1
// tokens; the extra token is the last label and is shared with sample k+1). Row k of the result is
// (position in doc_idx, offset in that document) of stream position k*seq, i.e. the document that
// contains it; row 0 is (0, 0). This is exactly the layout megatron-core's build_sample_idx emits
// (with add_extra_token=1, drop_last_partial_sequence=True), so caches and readers agree.
template <typename D>
std::pair<std::unique_ptr<int64_t[]>, int64_t> sample_idx_impl(const int32_t* sizes, int64_t num_sizes,
                                                               const D* doc_idx, int64_t num_docs,
                                                               int64_t seq_length) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_docs; ++i) {
    const int64_t d = static_cast<int64_t>(doc_idx[i]);
    if (d < 0 || d >= num_sizes)
      throw std::invalid_argument("build_sample_idx: doc_idx[" + std::to_string(i) + "] = " + std::to_string(d) +
                                  " is outside [0, " + std::to_string(num_sizes) + ") (len(sizes))");
    if (sizes[d] < 0)
      throw std::invalid_argument("build_sample_idx: sizes[" + std::to_string(d) + "] = " +
                                  std::to_string(sizes[d]) + " is negative");
    total += sizes[d];
  }
  const int64_t num_samples = total > 0 ? (total - 1) / seq_length : 0;
  auto out = std::make_unique<int64_t[]>(2 * (num_samples + 1));
  out[0] = 0;
  out[1] = 0;
  int64_t j = 0;          // position in doc_idx
  int64_t doc_start = 0;  // stream position of document j's first token
  for (int64_t k = 1; k <= num_samples; ++k) {
    const int64_t p = k * seq_length;  // <= total - 1, so the walk below stays inside doc_idx
    while (doc_start + sizes[doc_idx[j]] <= p) {
      doc_start += sizes[doc_idx[j]];
      ++j;
    }
    out[2 * k] = j;
    out[2 * k + 1] = p - doc_start;
  }
  return {std::move(out), num_samples};
}

py::array_t<int64_t> build_sample_idx(const py::array& sizes, const py::array& doc_idx, int64_t seq_length) {
  require_1d_contiguous(sizes, "sizes");
  require_1d_contiguous(doc_idx, "doc_idx");
  if (!sizes.dtype().is(py::dtype::of<int32_t>()))
    throw std::invalid_argument("build_sample_idx: sizes must be int32 (IndexedDataset.sequence_lengths), got " +
                                std::string(py::str(sizes.dtype())));
  if (seq_length < 1)
    throw std::invalid_argument("build_sample_idx: seq_length must be >= 1, got " + std::to_string(seq_length));
  const auto* s = static_cast<const int32_t*>(sizes.data());
  const int64_t ns = sizes.shape(0), nd = doc_idx.shape(0);
  std::pair<std::unique_ptr<int64_t[]>, int64_t> res;
  if (doc_idx.dtype().is(py::dtype::of<int32_t>())) {
    const auto* d = static_cast<const int32_t*>(doc_idx.data());
    py::gil_scoped_release nogil;
    res = sample_idx_impl(s, ns, d, nd, seq_length);
  } else if (doc_idx.dtype().is(py::dtype::of<int64_t>())) {
    const auto* d = static_cast<const int64_t*>(doc_idx.data());
    py::gil_scoped_release nogil;
    res = sample_idx_impl(s, ns, d, nd, seq_length);
  } else {
    throw std::invalid_argument("build_sample_idx: doc_idx must be int32 or int64, got " +
                                std::string(py::str(doc_idx.dtype())));
  }
  return adopt(std::move(res.first), {static_cast<py::ssize_t>(res.second + 1), 2});
}

// Greedy blending. Sample s (prefix length n = s + 1 after it) goes to one dataset; count[i] is
// how many samples dataset i has had so far.
//
// Default rule (Tijdeman's chairman assignment, 1980): among datasets whose lag weight*n - count
// is at least b = 1/(2k-2), pick the one whose lag would soonest reach 1 - b, i.e. the smallest
// (count + 1 - b) / weight. This keeps |count - weight * n| <= 1 - b < 1 for every dataset at every
// prefix: the mixture is exact to within one sample everywhere. The plain "most behind" rule
// (megatron-core's, with n clamped to 1 at the start) can drift to ~1.7 samples with 3+ datasets;
// it is kept as megatron_compatible=True to reproduce Megatron's blend bit for bit.
template <bool kMegatron>
void blend_impl(const double* w, int64_t n, int64_t size, int16_t* dataset_index, int64_t* sample_index) {
  std::vector<int64_t> count(n, 0);
  const double b = n > 1 ? 1.0 / (2.0 * static_cast<double>(n - 1)) : 0.0;
  for (int64_t s = 0; s < size; ++s) {
    int64_t best = 0;
    if constexpr (kMegatron) {
      const double target = static_cast<double>(s > 1 ? s : 1);
      double best_lag = w[0] * target - static_cast<double>(count[0]);
      for (int64_t i = 1; i < n; ++i) {
        const double lag = w[i] * target - static_cast<double>(count[i]);
        if (lag > best_lag) {
          best_lag = lag;
          best = i;
        }
      }
    } else if (n > 1) {
      // Lags sum to 1, so the largest is >= 1/k >= b: someone is eligible. Should rounding make
      // nobody eligible (k = 2, both lags 0.5 - eps), fall back to the largest lag.
      const double target = static_cast<double>(s + 1);
      double best_deadline = std::numeric_limits<double>::infinity();
      double max_lag = -std::numeric_limits<double>::infinity();
      int64_t most_behind = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double lag = w[i] * target - static_cast<double>(count[i]);
        if (lag > max_lag) {
          max_lag = lag;
          most_behind = i;
        }
        if (w[i] <= 0.0 || lag < b) continue;
        const double deadline = (static_cast<double>(count[i]) + 1.0 - b) / w[i];
        if (deadline < best_deadline) {
          best_deadline = deadline;
          best = i;
        }
      }
      if (best_deadline == std::numeric_limits<double>::infinity()) best = most_behind;
    }
    dataset_index[s] = static_cast<int16_t>(best);
    sample_index[s] = count[best]++;
  }
}

py::tuple build_blending_indices(const py::array& weights, int64_t size, bool megatron_compatible) {
  require_1d_contiguous(weights, "weights");
  if (!weights.dtype().is(py::dtype::of<double>()))
    throw std::invalid_argument("build_blending_indices: weights must be float64");
  const int64_t n = weights.shape(0);
  if (n < 1 || n > 32767)
    throw std::invalid_argument("build_blending_indices: need 1..32767 datasets, got " + std::to_string(n));
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const auto* w = static_cast<const double*>(weights.data());
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(w[i]) || w[i] < 0.0)
      throw std::invalid_argument("build_blending_indices: weights[" + std::to_string(i) +
                                  "] must be finite and >= 0");
    sum += w[i];
  }
  if (std::abs(sum - 1.0) > 1e-6)
    throw std::invalid_argument("build_blending_indices: weights must sum to 1 (normalize them), sum is " +
                                std::to_string(sum));
  auto dataset_index = std::make_unique<int16_t[]>(size);
  auto sample_index = std::make_unique<int64_t[]>(size);
  {
    py::gil_scoped_release nogil;
    if (megatron_compatible)
      blend_impl<true>(w, n, size, dataset_index.get(), sample_index.get());
    else
      blend_impl<false>(w, n, size, dataset_index.get(), sample_index.get());
  }
  return py::make_tuple(adopt(std::move(dataset_index), {static_cast<py::ssize_t>(size)}),
                        adopt(std::move(sample_index), {static_cast<py::ssize_t>(size)}));
}

void bind(py::module_& m) {
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        "GPT sample index: int64 [num_samples + 1, 2] rows of (doc_idx position, offset); "
        "num_samples = (tokens in doc_idx - 1) // seq_length");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        py::arg("megatron_compatible") = false,
        "Greedy blend: (dataset_index int16[size], dataset_sample_index int64[size])");
}

Register reg(&bind);

}  // namespace
}  // namespace megapre::data
