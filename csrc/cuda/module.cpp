// Python module megapre._C_cuda. It exports nothing: importing it loads this shared library,
// whose static initializers (TORCH_LIBRARY_IMPL in ops_cuda.cpp) register the CUDA kernels for
// the megapre ops, whose schemas megapre._C defines.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "megapre CUDA kernels (registered with the torch dispatcher on import)";
}
