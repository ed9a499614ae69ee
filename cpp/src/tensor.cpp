#include "aphrodite/tensor.h"

#include <cstdint>
#include <sstream>
#include <string>

#include "aphrodite/error.h"

namespace aphrodite {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kInt64:
      return 8;
    case DType::kUInt8:
      return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kUInt8:
      return "uint8";
  }
  return "unknown";
}

std::int64_t checked_nbytes(int ndim, const std::int64_t* shape, DType dtype) {
  auto describe = [&] {
    std::string text = "[";
    for (int i = 0; i < ndim; ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + "]";
  };
  std::int64_t bytes = static_cast<std::int64_t>(dtype_size(dtype));
  bool overflow = false;
  for (int i = 0; i < ndim; ++i) {
    if (shape[i] < 0) {
      throw ValueError("tensor sizes must be non-negative, got shape " + describe());
    }
    overflow = overflow || __builtin_mul_overflow(bytes, shape[i], &bytes);
  }
  // (A zero size anywhere makes the tensor empty, whatever the other sizes.)
  for (int i = 0; i < ndim; ++i) {
    if (shape[i] == 0) return 0;
  }
  if (overflow) {
    throw ValueError("a " + std::string(dtype_name(dtype)) + " tensor of shape " + describe() +
                     " is too large: its byte count overflows 64 bits");
  }
  return bytes;
}

std::string device_name(Device device) {
  if (device.is_cpu()) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

TensorView::TensorView(void* data, DType dtype, Device device,
                       std::initializer_list<std::int64_t> shape)
    : data_(data), dtype_(dtype), device_(device), ndim_(static_cast<int>(shape.size())) {
  if (ndim_ > kMaxDims) throw ValueError("tensor has more than 8 dimensions");
  checked_nbytes(ndim_, shape.begin(), dtype);
  int d = 0;
  for (std::int64_t s : shape) shape_[d++] = s;
  std::int64_t stride = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    strides_[i] = stride;
    stride *= shape_[i];
  }
}

TensorView::TensorView(void* data, DType dtype, Device device, int ndim, const std::int64_t* shape,
                       const std::int64_t* strides)
    : data_(data), dtype_(dtype), device_(device), ndim_(ndim) {
  if (ndim < 0 || ndim > kMaxDims) {
    throw ValueError("tensor must have 0 to 8 dimensions, got " + std::to_string(ndim));
  }
  checked_nbytes(ndim, shape, dtype);
  std::int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    shape_[i] = shape[i];
    strides_[i] = strides != nullptr ? strides[i] : stride;
    stride *= shape[i];
  }
}

int TensorView::normalize_dim(int d) const {
  int n = d < 0 ? d + ndim_ : d;
  if (n < 0 || n >= ndim_) {
    throw ValueError("dimension " + std::to_string(d) + " out of range for a " +
                     std::to_string(ndim_) + "-d tensor");
  }
  return n;
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= shape_[i];
  return n;
}

bool TensorView::is_contiguous() const {
  for (int i = 0; i < ndim_; ++i) {
    if (shape_[i] == 0) return true;  // no elements: any strides describe it (as torch says)
  }
  std::int64_t expected = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype_) << "[";
  for (int i = 0; i < ndim_; ++i) os << (i ? ", " : "") << shape_[i];
  os << "]";
  if (!is_contiguous()) {
    os << " (strides [";
    for (int i = 0; i < ndim_; ++i) os << (i ? ", " : "") << strides_[i];
    os << "])";
  }
  os << " on " << device_name(device_);
  return os.str();
}

void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  check_dtype(t, name, std::vector<DType>(allowed));
}

void check_dtype(const TensorView& t, const char* name, const std::vector<DType>& allowed) {
  for (DType d : allowed) {
    if (t.dtype() == d) return;
  }
  std::string expected;
  for (DType d : allowed) {
    if (!expected.empty()) expected += " or ";
    expected += dtype_name(d);
  }
  throw TypeError(std::string("'") + name + "' must have dtype " + expected + ", got " +
                  t.describe());
}

void check_dim(const TensorView& t, const char* name, int ndim) {
  if (t.dim() != ndim) {
    throw ValueError(std::string("'") + name + "' must be " + std::to_string(ndim) +
                     "-dimensional, got " + t.describe());
  }
}

void check_shape(const TensorView& t, const char* name, std::initializer_list<std::int64_t> shape) {
  check_shape(t, name, std::vector<std::int64_t>(shape));
}

void check_shape(const TensorView& t, const char* name, const std::vector<std::int64_t>& shape) {
  bool ok = t.dim() == static_cast<int>(shape.size());
  int d = 0;
  for (std::int64_t s : shape) {
    if (!ok) break;
    ok = s < 0 || t.size(d) == s;
    ++d;
  }
  if (ok) return;
  std::string expected = "[";
  d = 0;
  for (std::int64_t s : shape) {
    expected += (d++ ? ", " : "") + (s < 0 ? std::string("*") : std::to_string(s));
  }
  expected += "]";
  throw ValueError(std::string("'") + name + "' must have shape " + expected + ", got " +
                   t.describe());
}

void check_contiguous(const TensorView& t, const char* name) {
  if (!t.is_contiguous()) {
    throw ValueError(std::string("'") + name + "' must be contiguous, got " + t.describe());
  }
}

void check_last_dim_contiguous(const TensorView& t, const char* name) {
  if (t.dim() > 0 && t.size(-1) != 1 && t.stride(-1) != 1) {
    throw ValueError(std::string("'") + name + "' must have a contiguous last dimension, got " +
                     t.describe());
  }
}

void check_device(const TensorView& t, const char* name, Device expected) {
  if (t.device() != expected) {
    throw ValueError(std::string("'") + name + "' must be on " + device_name(expected) + ", got " +
                     t.describe());
  }
}

void check_same_device(const TensorView& a, const char* a_name, const TensorView& b,
                       const char* b_name) {
  if (a.device() != b.device()) {
    throw ValueError(std::string("'") + b_name + "' must be on the same device as '" + a_name +
                     "' (" + device_name(a.device()) + "), got " + b.describe());
  }
}

void check_same_dtype(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name) {
  if (t.dtype() != ref.dtype()) {
    throw TypeError(std::string("'") + name + "' must have the dtype of '" + ref_name + "' (" +
                    dtype_name(ref.dtype()) + "), got " + t.describe());
  }
}

void check_token_major(const TensorView& t, const char* name) {
  check_dim(t, name, 3);
  if (t.size(0) > 1 || t.size(1) > 1) {
    if (t.stride(2) != 1 || (t.size(1) > 1 && t.stride(1) != t.size(2))) {
      throw ValueError(std::string("'") + name +
                       "' must be dense in its [heads, head_size] dimensions, got " + t.describe());
    }
  } else if (t.stride(2) != 1 && t.size(2) > 1) {
    throw ValueError(std::string("'") + name + "' must be dense in its last dimension, got " +
                     t.describe());
  }
  if (t.size(0) > 1 && t.stride(0) < t.size(1) * t.size(2)) {
    throw ValueError(std::string("'") + name + "' rows overlap: token stride " +
                     std::to_string(t.stride(0)) + " is below heads * head_size in " +
                     t.describe());
  }
}

namespace {

struct ByteRange {
  std::uintptr_t begin = 0, end = 0;  // [begin, end); empty when begin == end
};

ByteRange byte_range(const TensorView& t) {
  const auto base = reinterpret_cast<std::uintptr_t>(t.data());
  std::int64_t lo = 0, hi = 0;  // element offsets of the lowest and highest element
  for (int i = 0; i < t.dim(); ++i) {
    if (t.size(i) == 0) return {base, base};
    const std::int64_t extent = (t.size(i) - 1) * t.stride(i);
    (extent < 0 ? lo : hi) += extent;
  }
  const auto item = static_cast<std::int64_t>(dtype_size(t.dtype()));
  return {base + static_cast<std::uintptr_t>(lo * item),
          base + static_cast<std::uintptr_t>((hi + 1) * item)};
}

bool same_view(const TensorView& a, const TensorView& b) {
  if (a.data() != b.data() || a.dtype() != b.dtype() || a.dim() != b.dim()) return false;
  for (int i = 0; i < a.dim(); ++i) {
    if (a.size(i) != b.size(i) || (a.size(i) > 1 && a.stride(i) != b.stride(i))) return false;
  }
  return true;
}

// A view whose dim 0 steps by `stride` bytes over rows of `width` dense bytes (width <= stride):
// the token-major slices of one fused buffer (query, key and value of a QKV projection).
struct RowPattern {
  std::int64_t stride = 0, width = 0;
};

bool row_pattern(const TensorView& t, RowPattern* out) {
  if (t.dim() < 2 || t.stride(0) <= 0) return false;
  std::int64_t expected = 1;  // the dims after 0 must be dense, row-major
  for (int i = t.dim() - 1; i >= 1; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  const auto item = static_cast<std::int64_t>(dtype_size(t.dtype()));
  out->stride = t.stride(0) * item;
  out->width = expected * item;
  return out->width <= out->stride;
}

}  // namespace

bool memory_overlaps(const TensorView& a, const TensorView& b) {
  if (a.device() != b.device()) return false;
  const ByteRange x = byte_range(a), y = byte_range(b);
  if (x.begin == x.end || y.begin == y.end) return false;
  if (!(x.begin < y.end && y.begin < x.end)) return false;
  // Interleaved rows with the same stride: disjoint when their columns are, on the circle of one
  // row stride (b's rows start r bytes into a's and end before a's next row begins).
  RowPattern pa, pb;
  if (row_pattern(a, &pa) && row_pattern(b, &pb) && pa.stride == pb.stride) {
    const auto base_a = reinterpret_cast<std::uintptr_t>(a.data());
    const auto base_b = reinterpret_cast<std::uintptr_t>(b.data());
    const std::int64_t s = pa.stride;
    const std::int64_t d = base_b >= base_a ? static_cast<std::int64_t>(base_b - base_a)
                                            : -static_cast<std::int64_t>(base_a - base_b);
    const std::int64_t r = ((d % s) + s) % s;
    if (r >= pa.width && r + pb.width <= s) return false;
  }
  return true;
}

void check_no_overlap(const TensorView& a, const char* a_name, const TensorView& b,
                      const char* b_name, bool same_ok) {
  if (same_ok && same_view(a, b)) return;
  if (memory_overlaps(a, b)) {
    throw ValueError(std::string(a_name) + " and " + b_name + " must not overlap in memory" +
                     (same_ok ? std::string(" (unless they are the same tensor)") : std::string()) +
                     ": " + a.describe() + " and " + b.describe());
  }
}

}  // namespace aphrodite
