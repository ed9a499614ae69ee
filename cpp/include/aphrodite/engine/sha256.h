// SHA-256 (FIPS 180-4), the hash behind the prefix cache's block keys and image content hashes.
// Written from the standard so that the core needs no crypto library; on x86-64 CPUs with the
// SHA extensions the compression function runs on them (chosen at run time), else in portable C++.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace aphrodite::engine {

using Sha256Digest = std::array<std::uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t len);
  // Finishes the hash; the object must not be updated afterwards.
  Sha256Digest finish();

  // One-shot hash.
  static Sha256Digest hash(const void* data, std::size_t len);
  // Whether the x86 SHA extensions are used on this CPU.
  static bool uses_sha_extensions();

 private:
  std::uint32_t state_[8];
  std::uint8_t block_[64];
  std::size_t block_len_ = 0;
  std::uint64_t total_len_ = 0;
};

}  // namespace aphrodite::engine
