// CPU paged-attention decode against the machine's copy bandwidth, measured in the same run.
//
// Decode reads each sequence's whole K and V context once per step, so its ceiling is memory
// bandwidth. The copy figure is STREAM's convention (bytes read + bytes written per second by a
// multi-threaded memcpy on the core's pool); the attention figure counts the K/V bytes read.
//
// Usage: bench_attention [batch=32] [context=1024] [iterations=10]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "aphrodite/attention.h"
#include "aphrodite/buffer.h"
#include "aphrodite/parallel.h"

namespace {

using Clock = std::chrono::steady_clock;

// Best of `iterations` runs: on a shared machine the minimum is the least disturbed one.
template <typename Fn>
double best_seconds(int iterations, Fn&& fn) {
  fn();  // warm-up: page faults, thread start, caches
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    const auto t0 = Clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return *std::min_element(times.begin(), times.end());
}

void fill_random(float* data, std::int64_t n, std::uint32_t seed) {
  aphrodite::parallel_for(0, n, 1 << 16, [&](std::int64_t lo, std::int64_t hi) {
    std::uint32_t x = seed ^ static_cast<std::uint32_t>(lo * 2654435761u);
    for (std::int64_t i = lo; i < hi; ++i) {
      x = x * 1664525u + 1013904223u;
      data[i] = static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
  });
}

}  // namespace

int main(int argc, char** argv) {
  using aphrodite::DType;
  using aphrodite::OwnedTensor;
  const int batch = argc > 1 ? std::atoi(argv[1]) : 32;
  const int context = argc > 2 ? std::atoi(argv[2]) : 1024;
  const int iterations = argc > 3 ? std::atoi(argv[3]) : 10;
  const int heads = 32, kv_heads = 8, head_size = 128, block_size = 16;
  const int blocks_per_seq = (context + block_size - 1) / block_size;
  const int num_blocks = batch * blocks_per_seq;

  OwnedTensor key_cache =
      OwnedTensor::empty({num_blocks, block_size, kv_heads, head_size}, DType::kFloat32);
  OwnedTensor value_cache =
      OwnedTensor::empty({num_blocks, block_size, kv_heads, head_size}, DType::kFloat32);
  fill_random(key_cache.view.data_as<float>(), key_cache.view.numel(), 1);
  fill_random(value_cache.view.data_as<float>(), value_cache.view.numel(), 2);
  OwnedTensor query = OwnedTensor::empty({batch, heads, head_size}, DType::kFloat32);
  fill_random(query.view.data_as<float>(), query.view.numel(), 3);
  OwnedTensor out = OwnedTensor::empty({batch, heads, head_size}, DType::kFloat32);

  // Blocks handed out in a shuffled order, as a block pool does after some churn.
  std::vector<std::int32_t> pool(static_cast<std::size_t>(num_blocks));
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), std::mt19937(7));
  OwnedTensor tables = OwnedTensor::empty({batch, blocks_per_seq}, DType::kInt32);
  std::memcpy(tables.view.data(), pool.data(), pool.size() * sizeof(std::int32_t));
  OwnedTensor seq_lens = OwnedTensor::empty({batch}, DType::kInt32);
  OwnedTensor qsl = OwnedTensor::empty({batch + 1}, DType::kInt32);
  for (int s = 0; s < batch; ++s) seq_lens.view.data_as<std::int32_t>()[s] = context;
  for (int s = 0; s <= batch; ++s) qsl.view.data_as<std::int32_t>()[s] = s;

  const double attention_s = best_seconds(iterations, [&] {
    aphrodite::paged_attention(out.view, query.view, key_cache.view, value_cache.view, tables.view,
                               seq_lens.view, qsl.view,
                               1.0f / std::sqrt(static_cast<float>(head_size)));
  });
  const double kv_bytes =
      2.0 * batch * static_cast<double>(context) * kv_heads * head_size * sizeof(float);

  // Copy of the same size as the K/V the decode reads.
  const std::size_t copy_bytes = static_cast<std::size_t>(kv_bytes);
  auto src = aphrodite::Buffer::allocate(copy_bytes, aphrodite::Device::cpu());
  auto dst = aphrodite::Buffer::allocate(copy_bytes, aphrodite::Device::cpu());
  fill_random(static_cast<float*>(src->data()), static_cast<std::int64_t>(copy_bytes / 4), 4);
  std::memset(dst->data(), 0, copy_bytes);
  const std::int64_t chunk = 1 << 20;
  const std::int64_t chunks = static_cast<std::int64_t>((copy_bytes + chunk - 1) / chunk);
  const double copy_s = best_seconds(iterations, [&] {
    aphrodite::parallel_for(0, chunks, 1, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t c = lo; c < hi; ++c) {
        const std::size_t begin = static_cast<std::size_t>(c * chunk);
        const std::size_t n =
            std::min<std::size_t>(static_cast<std::size_t>(chunk), copy_bytes - begin);
        std::memcpy(static_cast<char*>(dst->data()) + begin,
                    static_cast<const char*>(src->data()) + begin, n);
      }
    });
  });
  const double copy_bw = 2.0 * static_cast<double>(copy_bytes) / copy_s;
  const double attention_bw = kv_bytes / attention_s;

  std::printf(
      "bench_attention: CPU decode, float32, batch %d, context %d, %d/%d heads, head %d, "
      "block %d, %d threads\n",
      batch, context, heads, kv_heads, head_size, block_size, aphrodite::num_threads());
  std::printf("%-34s %10s %12s %8s\n", "", "ms", "GB/s", "ratio");
  std::printf("%-34s %10.3f %12.2f %8s\n", "copy (read+write, STREAM)", copy_s * 1e3, copy_bw / 1e9,
              "1.00");
  std::printf("%-34s %10.3f %12.2f %8.2f\n", "paged_attention decode (K/V read)", attention_s * 1e3,
              attention_bw / 1e9, attention_bw / copy_bw);
  std::printf("target: ratio >= 0.60\n");
  return 0;
}
