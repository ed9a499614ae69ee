// <immintrin.h> for the *_avx512.cpp kernels. GCC 12 at -O3 reports the deliberately undefined
// pass-through operand of its own AVX-512 intrinsics (_mm512_undefined_ps in avx512fintrin.h) as
// maybe-uninitialized once inlined into a caller, so that warning is off for the rest of any file
// that includes this header (only those kernel files do).
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
