// Links the installed aphrodite core: reports the backends and runs a parallel loop over a
// core-owned tensor.
#include <aphrodite/aphrodite.h>

#include <cstdio>

int main() {
  std::printf("aphrodite %s\n", aphrodite::version());
  for (const auto& info : aphrodite::backends_info()) {
    std::printf("backend %s: %s, %zu device(s)%s%s\n", info.name.c_str(),
                info.compiled ? "compiled" : "not compiled", info.devices.size(),
                info.status.empty() ? "" : ", ", info.status.c_str());
  }

  aphrodite::OwnedTensor t = aphrodite::OwnedTensor::empty({1 << 16}, aphrodite::DType::kFloat32);
  float* x = t.view.data_as<float>();
  aphrodite::parallel_for(0, t.view.numel(), 1024, [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t i = lo; i < hi; ++i) x[i] = static_cast<float>(i);
  });
  double sum = 0;
  for (std::int64_t i = 0; i < t.view.numel(); ++i) sum += x[i];
  double n = static_cast<double>(t.view.numel());
  if (sum != n * (n - 1) / 2) {
    std::printf("wrong sum %.0f\n", sum);
    return 1;
  }
  std::printf("ok: %s filled on %d threads\n", t.view.describe().c_str(), aphrodite::num_threads());
  return 0;
}
