// The CUDA backend: device discovery and memory. The runtime is linked statically, so on a
// machine without a driver cudaGetDeviceCount fails and the backend reports zero devices with
// the runtime's reason instead of failing to load.
#include <cuda_runtime.h>

#include <string>

#include "aphrodite/error.h"
#include "internal/cuda_backend.h"
#include "cuda_check.cuh"

namespace aphrodite::detail {

namespace {

class CudaBackend final : public Backend {
 public:
  DeviceType type() const override { return DeviceType::kCUDA; }

  int device_count() const override {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky error so later calls start clean
      return 0;
    }
    return count;
  }

  BackendInfo info() const override {
    BackendInfo info;
    info.name = "cuda";
    info.compiled = true;
    std::string archs = APHRODITE_CUDA_ARCHS_STRING;
    std::size_t start = 0;
    while (start <= archs.size()) {
      std::size_t end = archs.find(',', start);
      if (end == std::string::npos) end = archs.size();
      if (end > start) info.archs.push_back(archs.substr(start, end - start));
      start = end + 1;
    }
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      info.status = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
      return info;
    }
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
      DeviceInfo dev;
      dev.index = i;
      dev.name = prop.name;
      dev.compute_capability_major = prop.major;
      dev.compute_capability_minor = prop.minor;
      dev.total_memory = prop.totalGlobalMem;
      dev.multiprocessor_count = prop.multiProcessorCount;
      info.devices.push_back(dev);
    }
    return info;
  }

  void* allocate(std::size_t bytes, int device_index) override {
    DeviceGuard guard(device_index);
    void* ptr = nullptr;
    if (bytes > 0) check_cuda(cudaMalloc(&ptr, bytes), "cudaMalloc");
    return ptr;
  }

  void deallocate(void* ptr, int device_index) noexcept override {
    if (ptr == nullptr) return;
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess) previous = device_index;
    (void)cudaSetDevice(device_index);
    (void)cudaFree(ptr);
    (void)cudaSetDevice(previous);
  }

  void synchronize(StreamHandle stream, int device_index) override {
    DeviceGuard guard(device_index);
    check_cuda(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)),
               "cudaStreamSynchronize");
  }
};

}  // namespace

Backend& cuda_backend() {
  static CudaBackend instance;
  return instance;
}

}  // namespace aphrodite::detail
