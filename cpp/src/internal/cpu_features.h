// The CPU features the kernels dispatch on, read once per process. Every kernel family asks here,
// so that the choice (and `python -m aphrodite.env`'s report of it) is made in one place.
#pragma once

namespace aphrodite::detail {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA + F16C: the *_avx2.cpp kernels
  bool avx512 = false;    // AVX-512 F/BW/DQ/VL (and avx2_fma): the *_avx512.cpp kernels
};

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
#endif
    return f;
  }();
  return features;
}

}  // namespace aphrodite::detail
