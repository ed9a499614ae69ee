// Core-owned memory on the host or on a CUDA device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "aphrodite/tensor.h"

namespace aphrodite {

class Buffer {
 public:
  // Allocates `bytes` on `device` (64-byte aligned on the host). Throws DeviceError when the
  // device's backend is not built or has no such device.
  static std::shared_ptr<Buffer> allocate(std::size_t bytes, Device device);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

  // Number of Buffers alive in the process (for leak checks in tests).
  static std::int64_t live_count();

 private:
  Buffer(void* data, std::size_t bytes, Device device);
  void* data_;
  std::size_t bytes_;
  Device device_;
};

// A contiguous tensor that owns its memory.
struct OwnedTensor {
  std::shared_ptr<Buffer> buffer;
  TensorView view;

  static OwnedTensor empty(std::initializer_list<std::int64_t> shape, DType dtype,
                           Device device = Device::cpu());
  static OwnedTensor empty(int ndim, const std::int64_t* shape, DType dtype,
                           Device device = Device::cpu());
};

}  // namespace aphrodite
