// SHA-256 compression functions shared between the portable and the SHA-extension sources.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aphrodite::engine::detail {

// Processes `num_blocks` consecutive 64-byte blocks into `state` (8 words, FIPS 180-4 order).
// The 64 round constants of FIPS 180-4 (section 4.2.2), 16-byte aligned for the SHA-NI path.
alignas(16) extern const std::uint32_t kSha256RoundConstants[64];

void sha256_compress_portable(std::uint32_t* state, const std::uint8_t* data,
                              std::size_t num_blocks);
// The same on the x86 SHA extensions (defined in sha256_shani.cpp, x86-64 only); call only when
// the CPU has them.
void sha256_compress_shani(std::uint32_t* state, const std::uint8_t* data, std::size_t num_blocks);

}  // namespace aphrodite::engine::detail
