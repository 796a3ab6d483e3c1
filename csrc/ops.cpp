// Op schemas (torch.ops.megapre.*) and the megapre._C Python module.
// CPU impls are registered in csrc/cpu/ops_cpu.cpp, CUDA impls in csrc/cuda/ops_cuda.cpp
// (megapre._C_cuda), autograd and fake impls from Python (megapre/ops/).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "data/registry.h"

TORCH_LIBRARY(megapre, m) {
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms)"
        " -> (Tensor y, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("norm_bwd(Tensor dy, Tensor? dsum, Tensor xin, Tensor? weight, Tensor mean, Tensor rstd,"
        " bool rms, bool weight_grad, bool bias_grad) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("scale_mask_softmax_fwd(Tensor scores, Tensor? mask, float scale, bool causal) -> Tensor");
  m.def("scale_mask_softmax_bwd(Tensor grad, Tensor probs, float scale, bool causal) -> Tensor");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool bias_grad)"
        " -> (Tensor dx, Tensor dbias)");
  m.def("quantize_rowwise(Tensor x) -> (Tensor q, Tensor scale)");
  m.def("int8_gemm(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias,"
        " ScalarType out_dtype) -> Tensor");
  m.def("weight_only_int8_gemm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor");
}

namespace {

using megapre::cpu::Isa;

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    megapre::cpu::set_isa(Isa::kAuto);
  } else if (name == "scalar") {
    megapre::cpu::set_isa(Isa::kScalar);
  } else if (name == "avx2") {
    if (!megapre::cpu::cpu_has_avx2())
      throw std::invalid_argument("set_cpu_isa('avx2'): this CPU lacks AVX2/FMA/F16C");
    megapre::cpu::set_isa(Isa::kAvx2);
  } else if (name == "avx512vnni") {
    if (!megapre::cpu::cpu_has_avx512vnni())
      throw std::invalid_argument(
          "set_cpu_isa('avx512vnni'): this CPU (or OS) lacks AVX-512 F/BW/VL/VNNI with zmm "
          "state enabled; use 'avx2', 'scalar' or 'auto'");
    megapre::cpu::set_isa(Isa::kAvx512Vnni);
  } else {
    throw std::invalid_argument(
        "set_cpu_isa: expected 'auto', 'scalar' or 'avx2' (or 'avx512vnni' where the CPU has "
        "AVX-512 VNNI), got '" + name + "'");
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megapre CPU kernels; importing registers torch.ops.megapre.*";
  m.def("cpu_has_avx2", &megapre::cpu::cpu_has_avx2, "CPU has AVX2, FMA and F16C");
  m.def("cpu_has_avx512vnni", &megapre::cpu::cpu_has_avx512vnni,
        "CPU has AVX-512 F/BW/VL/VNNI (and the OS saves zmm state)");
  m.def("cpu_isa", [] { return std::string(megapre::cpu::isa_name()); },
        "vector ISA the CPU kernels use now");
  m.def("set_cpu_isa", &set_cpu_isa, "force 'scalar', 'avx2' or 'avx512vnni', or 'auto'");
  auto data = m.def_submodule("data", "dataset index builders (csrc/data/)");
  for (auto bind : megapre::data::binders()) bind(data);
}
