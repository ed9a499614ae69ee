#include "aphrodite/buffer.h"

#include <atomic>

#include "aphrodite/backend.h"

namespace aphrodite {

namespace {
std::atomic<std::int64_t> g_live_buffers{0};
}  // namespace

Buffer::Buffer(void* data, std::size_t bytes, Device device)
    : data_(data), bytes_(bytes), device_(device) {
  g_live_buffers.fetch_add(1, std::memory_order_relaxed);
}

Buffer::~Buffer() {
  backend(device_.type).deallocate(data_, device_.index);
  g_live_buffers.fetch_sub(1, std::memory_order_relaxed);
}

std::shared_ptr<Buffer> Buffer::allocate(std::size_t bytes, Device device) {
  Backend& b = backend_for(device);
  void* data = b.allocate(bytes, device.index);
  return std::shared_ptr<Buffer>(new Buffer(data, bytes, device));
}

std::int64_t Buffer::live_count() { return g_live_buffers.load(std::memory_order_relaxed); }

OwnedTensor OwnedTensor::empty(std::initializer_list<std::int64_t> shape, DType dtype,
                               Device device) {
  return empty(static_cast<int>(shape.size()), shape.begin(), dtype, device);
}

OwnedTensor OwnedTensor::empty(int ndim, const std::int64_t* shape, DType dtype, Device device) {
  if (ndim < 0 || ndim > TensorView::kMaxDims) {
    throw ValueError("tensor must have 0 to 8 dimensions, got " + std::to_string(ndim));
  }
  const std::int64_t bytes = checked_nbytes(ndim, shape, dtype);
  OwnedTensor t;
  t.buffer = Buffer::allocate(static_cast<std::size_t>(bytes), device);
  t.view = TensorView(t.buffer->data(), dtype, device, ndim, shape, nullptr);
  return t;
}

}  // namespace aphrodite
