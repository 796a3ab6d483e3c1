// Runtime choice of the CPU kernels' vector ISA: AVX2 code runs only on CPUs that have it.
// MEGAPRE_CPU_ISA=scalar|avx2|auto sets the initial choice; tests switch it with set_isa.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace megapre::cpu {
namespace {

Isa isa_from_env() {
  const char* v = std::getenv("MEGAPRE_CPU_ISA");
  if (v == nullptr) return Isa::kAuto;
  if (std::strcmp(v, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(v, "avx2") == 0) return Isa::kAvx2;
  return Isa::kAuto;
}

std::atomic<int>& isa_setting() {
  static std::atomic<int> setting{static_cast<int>(isa_from_env())};
  return setting;
}

}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

void set_isa(Isa isa) { isa_setting().store(static_cast<int>(isa)); }

bool use_avx2() {
  // kAvx2 on a CPU without it degrades to scalar rather than crashing with SIGILL.
  return static_cast<Isa>(isa_setting().load()) != Isa::kScalar && cpu_has_avx2();
}

}  // namespace megapre::cpu
