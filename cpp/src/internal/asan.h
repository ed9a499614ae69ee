// Marking memory that the engine recycles itself (request slabs, the request arena) as
// unaddressable while it is free, so AddressSanitizer builds catch uses after free and overflows
// inside those pools as they do for the heap. No-ops in other builds.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define APHRODITE_HAS_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define APHRODITE_HAS_ASAN 1
#endif
#endif

#if defined(APHRODITE_HAS_ASAN)
#include <sanitizer/asan_interface.h>
#define APHRODITE_ASAN_POISON(addr, size) ASAN_POISON_MEMORY_REGION((addr), (size))
#define APHRODITE_ASAN_UNPOISON(addr, size) ASAN_UNPOISON_MEMORY_REGION((addr), (size))
#else
#define APHRODITE_ASAN_POISON(addr, size) ((void)(addr), (void)(size))
#define APHRODITE_ASAN_UNPOISON(addr, size) ((void)(addr), (void)(size))
#endif
