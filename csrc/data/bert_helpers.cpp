// BERT sentence-pair mapping: which consecutive sentences of a document form one training sample.
//
// A BERT corpus stores one sequence per sentence; a document is a run of sentences (the indexed
// dataset's document index). For every usable document, epoch after epoch, consecutive sentences
// are packed greedily until they reach a target length; each sample is a row
// (first sentence, one-past-last sentence, target length). The rows are then shuffled.
//
// The random streams are those of Megatron-LM's build_mapping (std::mt19937 seeded with `seed` for
// the target lengths, std::mt19937_64 seeded with `seed + 1` for the Fisher-Yates shuffle), so a
// mapping built here equals Megatron's row for row; tests check that against megatron-core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>

#include "registry.h"

namespace py = pybind11;

namespace {

struct MappingStats {
  int64_t empty_documents = 0;       // no sentence at all
  int64_t short_documents = 0;       // fewer sentences than min_sentences (not empty)
  int64_t long_sentence_documents = 0;  // skipped: a sentence longer than long_sentence_len
  int64_t epochs = 0;                // epochs actually walked
};

// Target length of the next sample: usually `max_length`; with probability 1/ratio a random length
// in [2, max_length] (BERT's short-sequence trick, so the model also sees short inputs).
inline int64_t next_target_length(int64_t ratio, int64_t max_length, std::mt19937& gen) {
  if (ratio == 0) return max_length;
  const uint32_t r = gen();
  if (r % static_cast<uint32_t>(ratio) == 0) return 2 + r % static_cast<uint32_t>(max_length - 1);
  return max_length;
}

// A document is skipped when it has a sentence longer than `long_sentence_len` tokens; as in
// Megatron the rule is only applied to documents with more than one sentence.
bool has_long_sentence(const int32_t* lengths, int64_t first, int64_t last, int64_t long_len) {
  if (last - first <= 1) return false;
  for (int64_t s = first; s < last; ++s)
    if (lengths[s] > long_len) return true;
  return false;
}

struct Params {
  const int64_t* docs;
  int64_t num_docs;
  const int32_t* lengths;
  int64_t num_epochs;
  uint64_t max_num_samples;
  int64_t max_length;
  int64_t ratio;  // short targets come 1 in `ratio` draws; 0 = never
  uint32_t seed;
  int64_t min_sentences;
  int64_t long_len;
};

// Walks one epoch over the documents; writes rows to `out` (when not null) from row `n` on and
// returns the new row count.
int64_t pack_epoch(const Params& p, std::mt19937& gen, int64_t n, int64_t* out, MappingStats* stats) {
  for (int64_t d = 0; d < p.num_docs; ++d) {
    const int64_t first = p.docs[d], last = p.docs[d + 1];
    int64_t remaining = last - first;
    const bool long_sentence = has_long_sentence(p.lengths, first, last, p.long_len);
    if (stats) {
      if (remaining == 0) ++stats->empty_documents;
      else if (remaining < p.min_sentences) ++stats->short_documents;
      else if (long_sentence) ++stats->long_sentence_documents;
    }
    if (remaining < p.min_sentences || long_sentence) continue;
    int64_t start = first, tokens = 0, sentences = 0;
    int64_t target = next_target_length(p.ratio, p.max_length, gen);
    for (int64_t s = first; s < last; ++s) {
      tokens += p.lengths[s];
      ++sentences;
      --remaining;
      // Close the sample at the target length unless that would leave a single sentence behind
      // (it could not form a pair on its own); always close at the end of the document.
      const bool full = tokens >= target && remaining > 1 && sentences >= p.min_sentences;
      if (full || remaining == 0) {
        if (out) {
          out[3 * n] = start;
          out[3 * n + 1] = s + 1;
          out[3 * n + 2] = target;
        }
        ++n;
        start = s + 1;
        tokens = 0;
        sentences = 0;
        target = next_target_length(p.ratio, p.max_length, gen);
      }
    }
  }
  return n;
}

// All epochs: counts rows (out == null), or fills `out` with exactly the rows counted before
// (same seed, same draws).
int64_t pack(const Params& p, int64_t* out, MappingStats* stats) {
  std::mt19937 gen(p.seed);
  int64_t n = 0;
  for (int64_t epoch = 0; epoch < p.num_epochs; ++epoch) {
    if (static_cast<uint64_t>(n) >= p.max_num_samples) break;
    const int64_t before = n;
    n = pack_epoch(p, gen, n, out, epoch == 0 ? stats : nullptr);
    if (stats) ++stats->epochs;
    if (n == before) break;  // nothing usable: more epochs would never add a sample
  }
  return n;
}

// Fisher-Yates from the last row down, with Megatron's 64-bit stream.
void shuffle_rows(int64_t* rows, int64_t n, uint32_t seed) {
  std::mt19937_64 gen(static_cast<uint64_t>(seed) + 1);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(gen() % static_cast<uint64_t>(i + 1));
    for (int k = 0; k < 3; ++k) std::swap(rows[3 * i + k], rows[3 * j + k]);
  }
}

void check_inputs(const py::array_t<int64_t>& docs, const py::array_t<int32_t>& lengths,
                  int64_t num_epochs, int64_t max_length, double short_seq_prob,
                  int64_t min_sentences, int64_t long_len) {
  if (docs.ndim() != 1 || docs.shape(0) < 1)
    throw std::invalid_argument("document_indices must be a 1-D array with at least one entry");
  if (lengths.ndim() != 1) throw std::invalid_argument("sequence_lengths must be a 1-D array");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be >= 1, got " + std::to_string(num_epochs));
  if (max_length < 2)
    throw std::invalid_argument("max_length (seq_length - 3) must be >= 2, got " + std::to_string(max_length));
  if (!(short_seq_prob >= 0.0 && short_seq_prob <= 1.0))
    throw std::invalid_argument("short_seq_prob must be in [0, 1], got " + std::to_string(short_seq_prob));
  if (min_sentences < 1 || min_sentences > 2)
    throw std::invalid_argument("min_sentences must be 1 or 2, got " + std::to_string(min_sentences));
  if (long_len < 1) throw std::invalid_argument("long_sentence_len must be >= 1");
  auto d = docs.unchecked<1>();
  const int64_t n = lengths.shape(0);
  for (py::ssize_t i = 0; i < docs.shape(0); ++i) {
    if (d(i) < 0 || d(i) > n || (i > 0 && d(i) < d(i - 1)))
      throw std::invalid_argument("document_indices must be non-decreasing and within [0, " +
                                  std::to_string(n) + "]; entry " + std::to_string(i) + " is " +
                                  std::to_string(d(i)));
  }
}

// Returns (mapping int64[N, 3], stats dict). Rows: (first sentence, end sentence, target length).
py::tuple build_bert_mapping(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& docs,
                             const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& lengths,
                             int64_t num_epochs, uint64_t max_num_samples, int64_t max_length,
                             double short_seq_prob, uint32_t seed, int64_t min_sentences,
                             int64_t long_sentence_len) {
  check_inputs(docs, lengths, num_epochs, max_length, short_seq_prob, min_sentences, long_sentence_len);
  // Probability p becomes "1 in round(1/p)" (Megatron's integer test on a 32-bit draw).
  const int64_t ratio = short_seq_prob > 0 ? static_cast<int64_t>(std::round(1.0 / short_seq_prob)) : 0;
  const Params p{docs.data(), docs.shape(0) - 1, lengths.data(), num_epochs, max_num_samples, max_length,
                 ratio, seed, min_sentences, long_sentence_len};
  MappingStats stats;
  int64_t n;
  {
    py::gil_scoped_release nogil;
    n = pack(p, nullptr, &stats);  // first pass counts, so the result is allocated once, exactly
  }
  py::array_t<int64_t> mapping({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  int64_t* rows = mapping.mutable_data();
  {
    py::gil_scoped_release nogil;
    pack(p, rows, nullptr);
    shuffle_rows(rows, n, seed);
  }
  py::dict info;
  info["empty_documents"] = stats.empty_documents;
  info["short_documents"] = stats.short_documents;
  info["long_sentence_documents"] = stats.long_sentence_documents;
  info["epochs"] = stats.epochs;
  return py::make_tuple(mapping, info);
}

void bind(py::module_& m) {
  m.def("build_bert_mapping", &build_bert_mapping, py::arg("document_indices"), py::arg("sequence_lengths"),
        py::arg("num_epochs"), py::arg("max_num_samples"), py::arg("max_length"), py::arg("short_seq_prob"),
        py::arg("seed"), py::arg("min_sentences"), py::arg("long_sentence_len"),
        "BERT sentence-pair mapping: (int64[N, 3] rows of (first sentence, end sentence, target "
        "length), shuffled; dict of document counts). Releases the GIL.");
}

megapre::data::Register reg(&bind);

}  // namespace
