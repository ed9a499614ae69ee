#include "aphrodite/engine/sha256.h"

#include <cstring>

#include "internal/sha256_compress.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define APHRODITE_SHA256_X86 1
#endif

namespace aphrodite::engine {
namespace detail {

alignas(16) const std::uint32_t kSha256RoundConstants[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

namespace {

inline std::uint32_t rotr(std::uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

}  // namespace

void sha256_compress_portable(std::uint32_t* state, const std::uint8_t* data,
                              std::size_t num_blocks) {
  for (std::size_t b = 0; b < num_blocks; ++b, data += 64) {
    std::uint32_t w[64];
    for (int t = 0; t < 16; ++t) {
      w[t] = (std::uint32_t{data[4 * t]} << 24) | (std::uint32_t{data[4 * t + 1]} << 16) |
             (std::uint32_t{data[4 * t + 2]} << 8) | std::uint32_t{data[4 * t + 3]};
    }
    for (int t = 16; t < 64; ++t) {
      const std::uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const std::uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    std::uint32_t a = state[0], b2 = state[1], c = state[2], d = state[3];
    std::uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int t = 0; t < 64; ++t) {
      const std::uint32_t s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      const std::uint32_t ch = (e & f) ^ (~e & g);
      const std::uint32_t t1 = h + s1 + ch + kSha256RoundConstants[t] + w[t];
      const std::uint32_t s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      const std::uint32_t maj = (a & b2) ^ (a & c) ^ (b2 & c);
      const std::uint32_t t2 = s0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b2;
      b2 = a;
      a = t1 + t2;
    }
    state[0] += a;
    state[1] += b2;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
  }
}

}  // namespace detail

namespace {

bool cpu_has_sha_extensions() {
#ifdef APHRODITE_SHA256_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool sha = (ebx >> 29) & 1u;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool sse41 = (ecx >> 19) & 1u;
  const bool ssse3 = (ecx >> 9) & 1u;
  return sha && sse41 && ssse3;
#else
  return false;
#endif
}

using CompressFn = void (*)(std::uint32_t*, const std::uint8_t*, std::size_t);

CompressFn select_compress() {
#ifdef APHRODITE_SHA256_X86
  if (cpu_has_sha_extensions()) return &detail::sha256_compress_shani;
#endif
  return &detail::sha256_compress_portable;
}

const CompressFn kCompress = select_compress();

Sha256Digest digest_of(const std::uint32_t* state) {
  Sha256Digest out;
  for (int i = 0; i < 8; ++i) {
    out[4 * i] = static_cast<std::uint8_t>(state[i] >> 24);
    out[4 * i + 1] = static_cast<std::uint8_t>(state[i] >> 16);
    out[4 * i + 2] = static_cast<std::uint8_t>(state[i] >> 8);
    out[4 * i + 3] = static_cast<std::uint8_t>(state[i]);
  }
  return out;
}

}  // namespace

Sha256::Sha256()
    : state_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19} {}

void Sha256::update(const void* data, std::size_t len) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  total_len_ += len;
  if (block_len_ > 0) {
    const std::size_t take = std::min<std::size_t>(64 - block_len_, len);
    std::memcpy(block_ + block_len_, p, take);
    block_len_ += take;
    p += take;
    len -= take;
    if (block_len_ < 64) return;
    kCompress(state_, block_, 1);
    block_len_ = 0;
  }
  if (len >= 64) {
    kCompress(state_, p, len / 64);
    p += len / 64 * 64;
    len %= 64;
  }
  if (len > 0) {
    std::memcpy(block_, p, len);
    block_len_ = len;
  }
}

Sha256Digest Sha256::finish() {
  const std::uint64_t bit_len = total_len_ * 8;
  block_[block_len_++] = 0x80;
  if (block_len_ > 56) {
    std::memset(block_ + block_len_, 0, 64 - block_len_);
    kCompress(state_, block_, 1);
    block_len_ = 0;
  }
  std::memset(block_ + block_len_, 0, 56 - block_len_);
  for (int i = 0; i < 8; ++i) block_[56 + i] = static_cast<std::uint8_t>(bit_len >> (56 - 8 * i));
  kCompress(state_, block_, 1);
  return digest_of(state_);
}

Sha256Digest Sha256::hash(const void* data, std::size_t len) {
  // Short messages (prefix-cache block keys are ~100 bytes) are padded in one buffer and
  // compressed in a single call instead of going through update()/finish()'s staging block.
  constexpr std::size_t kMaxBlocks = 4;
  if (len + 9 <= 64 * kMaxBlocks) {
    std::uint8_t buf[64 * kMaxBlocks];
    const std::size_t blocks = (len + 9 + 63) / 64;
    std::memcpy(buf, data, len);
    buf[len] = 0x80;
    std::memset(buf + len + 1, 0, blocks * 64 - 8 - (len + 1));
    const std::uint64_t bit_len = static_cast<std::uint64_t>(len) * 8;
    for (int i = 0; i < 8; ++i) {
      buf[blocks * 64 - 8 + i] = static_cast<std::uint8_t>(bit_len >> (56 - 8 * i));
    }
    Sha256 h;
    kCompress(h.state_, buf, blocks);
    return digest_of(h.state_);
  }
  Sha256 h;
  h.update(data, len);
  return h.finish();
}

bool Sha256::uses_sha_extensions() { return kCompress != &detail::sha256_compress_portable; }

}  // namespace aphrodite::engine
