// Non-owning tensor views: the one tensor type of the core.
//
// A TensorView is a pointer plus dtype, device, shape and strides (in elements, as in DLPack and
// torch). It never owns memory: Python tensors come in through DLPack (cpp/bindings/) and stay
// owned by their producer for the duration of the call; core-owned memory lives in a Buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "aphrodite/error.h"

namespace aphrodite {

enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUInt8 };

// Size of one element in bytes.
std::size_t dtype_size(DType dtype);
// Lower-case name as torch and numpy spell it ("float32", "bfloat16", "uint8", ...).
const char* dtype_name(DType dtype);

enum class DeviceType : std::uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;

  static Device cpu() { return {DeviceType::kCPU, 0}; }
  static Device cuda(int index) { return {DeviceType::kCUDA, index}; }
  bool is_cpu() const { return type == DeviceType::kCPU; }
  bool is_cuda() const { return type == DeviceType::kCUDA; }
  friend bool operator==(Device a, Device b) {
    return a.type == b.type && (a.type == DeviceType::kCPU || a.index == b.index);
  }
  friend bool operator!=(Device a, Device b) { return !(a == b); }
};

// "cpu" or "cuda:N".
std::string device_name(Device device);

// A CUDA stream handle as an integer (cudaStream_t cast to uintptr_t; 0 = the legacy default
// stream). Kept as an integer so that public headers need no CUDA headers.
using StreamHandle = std::uintptr_t;

class TensorView {
 public:
  static constexpr int kMaxDims = 8;

  TensorView() = default;
  // Both constructors throw ValueError for a negative size or a shape whose byte count
  // overflows int64 (checked_nbytes). Contiguous (row-major) view:
  TensorView(void* data, DType dtype, Device device, std::initializer_list<std::int64_t> shape);
  // General view; strides are in elements.
  TensorView(void* data, DType dtype, Device device, int ndim, const std::int64_t* shape,
             const std::int64_t* strides);

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int dim() const { return ndim_; }
  std::int64_t size(int d) const { return shape_[normalize_dim(d)]; }
  std::int64_t stride(int d) const { return strides_[normalize_dim(d)]; }
  const std::int64_t* shape() const { return shape_; }
  const std::int64_t* strides() const { return strides_; }
  std::int64_t numel() const;
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  // True when the strides are those of a row-major tensor (size-1 dims may have any stride).
  bool is_contiguous() const;
  // "float32[2, 3] (strides [3, 1]) on cpu": used in error messages.
  std::string describe() const;

 private:
  int normalize_dim(int d) const;

  void* data_ = nullptr;
  DType dtype_ = DType::kFloat32;
  Device device_{};
  int ndim_ = 0;
  std::int64_t shape_[kMaxDims] = {};
  std::int64_t strides_[kMaxDims] = {};
};

// The byte count of a dense tensor of this shape; throws ValueError when a size is negative
// or the count does not fit in int64 (TensorView's constructors check every shape this way).
std::int64_t checked_nbytes(int ndim, const std::int64_t* shape, DType dtype);

// Argument checks shared by every op. Each names the argument in its message and throws
// TypeError (dtype) or ValueError (everything else).
void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
void check_dtype(const TensorView& t, const char* name, const std::vector<DType>& allowed);
void check_dim(const TensorView& t, const char* name, int ndim);
// `shape` may hold -1 for "any size".
void check_shape(const TensorView& t, const char* name, std::initializer_list<std::int64_t> shape);
void check_shape(const TensorView& t, const char* name, const std::vector<std::int64_t>& shape);
void check_contiguous(const TensorView& t, const char* name);
// The innermost dimension is dense (stride 1); outer dimensions may be strided.
void check_last_dim_contiguous(const TensorView& t, const char* name);
void check_device(const TensorView& t, const char* name, Device expected);
void check_same_device(const TensorView& a, const char* a_name, const TensorView& b,
                       const char* b_name);
// t has ref's dtype (TypeError naming both otherwise).
void check_same_dtype(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name);
// [tokens, heads, head_size], dense in [heads, head_size], any token stride >= heads * head_size
// (slices of a fused QKV projection's output).
void check_token_major(const TensorView& t, const char* name);
// Whether the byte ranges two views span intersect (conservative for strided views: the range
// from their lowest to their highest element). Empty views overlap nothing.
bool memory_overlaps(const TensorView& a, const TensorView& b);
// ValueError naming both unless a and b are disjoint in memory; with `same_ok`, a and b may also
// be exactly the same view (an op that works in place).
void check_no_overlap(const TensorView& a, const char* a_name, const TensorView& b,
                      const char* b_name, bool same_ok = false);

}  // namespace aphrodite
