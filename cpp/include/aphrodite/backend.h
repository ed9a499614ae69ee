// Backend registry: which compute backends were compiled in and which devices they see.
//
// The CPU backend is always present. The CUDA backend is present when the library was built with
// APHRODITE_CUDA=ON/AUTO and a CUDA compiler; it links the CUDA runtime statically, so a machine
// without a driver still loads the library and simply reports no CUDA devices.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "aphrodite/tensor.h"

namespace aphrodite {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  std::size_t total_memory = 0;
  int multiprocessor_count = 0;
};

struct BackendInfo {
  std::string name;                // "cpu" or "cuda"
  bool compiled = false;           // built into this library
  std::vector<std::string> archs;  // CPU: instruction sets in use; CUDA: compiled architectures
  std::vector<DeviceInfo> devices;
  std::string status;  // why no device was found, empty when all is well
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceType type() const = 0;
  virtual BackendInfo info() const = 0;
  virtual int device_count() const = 0;
  virtual void* allocate(std::size_t bytes, int device_index) = 0;
  virtual void deallocate(void* ptr, int device_index) noexcept = 0;
  // Waits until all work queued on `stream` has finished (no-op on the CPU).
  virtual void synchronize(StreamHandle stream, int device_index) = 0;
};

// Whether the CUDA backend was compiled into this library.
bool cuda_compiled();

// The backend for `type`. Throws DeviceError when it was not compiled in.
Backend& backend(DeviceType type);

// Backend of `device`, checked: throws DeviceError when the backend is missing or the device
// index does not exist (for example no GPU driver).
Backend& backend_for(Device device);

// Information about every backend known to this build (compiled or not).
std::vector<BackendInfo> backends_info();

const char* version();

}  // namespace aphrodite
