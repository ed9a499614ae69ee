#include "aphrodite/backend.h"

#include <cstdlib>
#include <new>

#include "aphrodite/huge_page_allocator.h"
#include "aphrodite/parallel.h"
#include "internal/cpu_features.h"

#ifdef APHRODITE_WITH_CUDA
#include "internal/cuda_backend.h"
#endif

#ifndef APHRODITE_VERSION
#error "APHRODITE_VERSION must be defined by the build"
#endif

namespace aphrodite {

namespace {

// The instruction sets the CPU kernels dispatch to at run time on this CPU.
std::vector<std::string> cpu_feature_names() {
  std::vector<std::string> names;
  const detail::CpuFeatures& f = detail::cpu_features();
  if (f.avx2_fma) names.insert(names.end(), {"avx2", "fma"});
  if (f.avx512) names.emplace_back("avx512 (linear)");
  if (f.amx_bf16) names.emplace_back("amx-bf16 (linear, prefill)");
  return names;
}

class CpuBackend final : public Backend {
 public:
  DeviceType type() const override { return DeviceType::kCPU; }
  int device_count() const override { return 1; }

  BackendInfo info() const override {
    BackendInfo info;
    info.name = "cpu";
    info.compiled = true;
    info.archs = cpu_feature_names();
    DeviceInfo dev;
    dev.name = "cpu (" + std::to_string(num_threads()) + " threads)";
    info.devices.push_back(dev);
    return info;
  }

  // 64-byte aligned (a cache line, an AVX-512 vector); from 1 MiB on in transparent huge pages,
  // which matters most for prepacked weights that every decode step streams.
  void* allocate(std::size_t bytes, int) override { return detail::huge_page_alloc(bytes); }
  void deallocate(void* ptr, int) noexcept override { detail::huge_page_free(ptr); }
  void synchronize(StreamHandle, int) override {}
};

CpuBackend& cpu_backend() {
  static CpuBackend instance;
  return instance;
}

}  // namespace

bool cuda_compiled() {
#ifdef APHRODITE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

Backend& backend(DeviceType type) {
  if (type == DeviceType::kCPU) return cpu_backend();
#ifdef APHRODITE_WITH_CUDA
  return detail::cuda_backend();
#else
  throw DeviceError(
      "a CUDA tensor or device was requested, but this build of aphrodite has no CUDA backend "
      "(rebuild with APHRODITE_CUDA=ON and a CUDA toolkit)");
#endif
}

Backend& backend_for(Device device) {
  Backend& b = backend(device.type);
  if (device.is_cuda()) {
    int count = b.device_count();
    if (device.index < 0 || device.index >= count) {
      std::string why = count == 0 ? "no CUDA device is available"
                                   : "only " + std::to_string(count) + " CUDA device(s) exist";
      std::string status = b.info().status;
      throw DeviceError("cannot use " + device_name(device) + ": " + why +
                        (status.empty() ? "" : " (" + status + ")"));
    }
  }
  return b;
}

std::vector<BackendInfo> backends_info() {
  std::vector<BackendInfo> infos{cpu_backend().info()};
#ifdef APHRODITE_WITH_CUDA
  infos.push_back(detail::cuda_backend().info());
#else
  BackendInfo cuda;
  cuda.name = "cuda";
  cuda.compiled = false;
  cuda.status = "built with APHRODITE_CUDA=OFF or without a CUDA compiler";
  infos.push_back(cuda);
#endif
  return infos;
}

const char* version() { return APHRODITE_VERSION; }

}  // namespace aphrodite
