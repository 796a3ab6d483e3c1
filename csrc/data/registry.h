// Dataset helpers (sample/shuffle/blending indices, BERT sentence-pair mapping) bind themselves
// into megapre._C.data through this registry, so each helper file stays self-contained and
// csrc/ops.cpp never needs editing when one is added.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace megapre::data {

using Binder = void (*)(pybind11::module_&);

// All binders registered by static Register objects in csrc/data/*.cpp (run at library load,
// before the module init function that calls them).
std::vector<Binder>& binders();

struct Register {
  explicit Register(Binder b) { binders().push_back(b); }
};

}  // namespace megapre::data
