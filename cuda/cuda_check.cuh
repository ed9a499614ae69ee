// Helpers shared by the CUDA sources: error checks that throw the core's exceptions, and a
// guard that switches the current device for a scope.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "aphrodite/error.h"

namespace aphrodite::detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw DeviceError(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " +
                      cudaGetErrorString(err));
  }
}

// Checks the launch of the kernel just queued (configuration errors surface here).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = 0;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) {
      (void)cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t to_cuda_stream(std::uintptr_t handle) {
  return reinterpret_cast<cudaStream_t>(handle);
}

}  // namespace aphrodite::detail
