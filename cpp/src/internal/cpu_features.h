// The CPU features the kernels dispatch on, read once per process. Every kernel family asks here,
// so that the choice (and `python -m aphrodite.env`'s report of it) is made in one place.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace aphrodite::detail {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA + F16C: the *_avx2.cpp kernels
  bool avx512 = false;    // AVX-512 F/BW/DQ/VL (and avx2_fma): the *_avx512.cpp kernels
  // AMX tiles with bfloat16 products, AVX-512 BF16, and the kernel's permission to use the tile
  // state (and avx512): the *_amx.cpp kernels.
  bool amx_bf16 = false;
};

#if defined(__x86_64__) || defined(_M_X64)
// CPUID says AMX-TILE, AMX-BF16 and AVX512-BF16; the OS saves the tile state (XCR0 bits 17 and
// 18); and Linux grants this process the tile data (it is off until asked for, per process:
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
inline bool detect_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_tile = (d >> 24) & 1u, amx_bf16 = (d >> 22) & 1u;
  if (!amx_tile || !amx_bf16) return false;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) || !((a1 >> 5) & 1u)) return false;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if (((xcr0_lo >> 17) & 3u) != 3u) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c");
    f.avx512 = f.avx2_fma && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl");
    f.amx_bf16 = f.avx512 && detect_amx_bf16();
#endif
    return f;
  }();
  return features;
}

}  // namespace aphrodite::detail
