// Runtime choice of the CPU kernels' vector ISA: AVX2 / AVX-512 code runs only on CPUs (and
// operating systems) that support it. MEGAPRE_CPU_ISA=scalar|avx2|avx512vnni|auto sets the
// initial choice; tests switch it with set_isa.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "kernels.h"

namespace megapre::cpu {
namespace {

Isa isa_from_env() {
  const char* v = std::getenv("MEGAPRE_CPU_ISA");
  if (v == nullptr) return Isa::kAuto;
  if (std::strcmp(v, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(v, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(v, "avx512vnni") == 0) return Isa::kAvx512Vnni;
  return Isa::kAuto;
}

std::atomic<int>& isa_setting() {
  static std::atomic<int> setting{static_cast<int>(isa_from_env())};
  return setting;
}

Isa current() { return static_cast<Isa>(isa_setting().load(std::memory_order_relaxed)); }

#if defined(__x86_64__) || defined(__i386__)
// XCR0: which register states the OS saves on a context switch. A CPU can report AVX-512
// while the kernel (or hypervisor) leaves the opmask / zmm state unmanaged; using it then
// faults, so the instruction bits alone are not enough.
uint64_t xcr0() {
  uint32_t eax, edx;
  asm volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool detect_avx512vnni() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  // SSE (1), AVX (2), opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7) state all enabled.
  constexpr uint64_t kZmmState = (1u << 1) | (1u << 2) | (1u << 5) | (1u << 6) | (1u << 7);
  if ((xcr0() & kZmmState) != kZmmState) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool vnni = c & (1u << 11);
  return f && bw && vl && vnni;
}
#endif

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

bool cpu_has_avx512vnni() {
#if defined(__x86_64__) || defined(__i386__)
  // The AVX-512 path also runs the AVX2 kernels of the other families.
  static const bool has = cpu_has_avx2() && detect_avx512vnni();
  return has;
#else
  return false;
#endif
}

void set_isa(Isa isa) { isa_setting().store(static_cast<int>(isa)); }

bool use_avx2() {
  // A forced ISA the CPU lacks degrades to the next one down rather than crashing with SIGILL.
  return current() != Isa::kScalar && cpu_has_avx2();
}

bool use_avx512vnni() {
  const Isa isa = current();
  return (isa == Isa::kAuto || isa == Isa::kAvx512Vnni) && cpu_has_avx512vnni();
}

const char* isa_name() {
  if (use_avx512vnni()) return "avx512vnni";
  return use_avx2() ? "avx2" : "scalar";
}

}  // namespace megapre::cpu
