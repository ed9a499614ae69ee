#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "aphrodite/buffer.h"
#include "aphrodite/error.h"
#include "aphrodite/tensor.h"

namespace aphrodite {
namespace {

TEST(TensorView, ContiguousStridesAreRowMajor) {
  float data[24];
  TensorView t(data, DType::kFloat32, Device::cpu(), {2, 3, 4});
  EXPECT_EQ(t.dim(), 3);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(1), 4);
  EXPECT_EQ(t.stride(-1), 1);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_THROW(t.size(3), ValueError);
}

TEST(TensorView, StridedViewIsNotContiguous) {
  std::int64_t shape[] = {4, 3};
  std::int64_t strides[] = {1, 4};
  float data[12];
  TensorView t(data, DType::kFloat32, Device::cpu(), 2, shape, strides);
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_EQ(t.describe(), "float32[4, 3] (strides [1, 4]) on cpu");
}

TEST(TensorView, SizeOneDimensionsIgnoreTheirStride) {
  std::int64_t shape[] = {1, 5};
  std::int64_t strides[] = {999, 1};
  float data[5];
  TensorView t(data, DType::kFloat32, Device::cpu(), 2, shape, strides);
  EXPECT_TRUE(t.is_contiguous());
}

TEST(TensorChecks, MessagesNameTheArgument) {
  std::int32_t data[8];
  TensorView t(data, DType::kInt32, Device::cpu(), {2, 4});
  EXPECT_NO_THROW(check_dtype(t, "ids", {DType::kInt32, DType::kInt64}));
  try {
    check_dtype(t, "weight", {DType::kFloat32});
    FAIL() << "expected TypeError";
  } catch (const TypeError& e) {
    EXPECT_STREQ(e.what(), "'weight' must have dtype float32, got int32[2, 4] on cpu");
  }
  try {
    check_shape(t, "positions", {-1, 8});
    FAIL() << "expected ValueError";
  } catch (const ValueError& e) {
    EXPECT_STREQ(e.what(), "'positions' must have shape [*, 8], got int32[2, 4] on cpu");
  }
  EXPECT_NO_THROW(check_shape(t, "positions", {-1, 4}));
  EXPECT_THROW(check_dim(t, "x", 3), ValueError);
  EXPECT_THROW(check_device(t, "x", Device::cuda(0)), ValueError);
}

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::kBFloat16), 2u);
  EXPECT_EQ(dtype_size(DType::kInt64), 8u);
  EXPECT_STREQ(dtype_name(DType::kUInt8), "uint8");
}

TEST(Buffer, OwnedTensorIsAlignedAndFreed) {
  std::int64_t before = Buffer::live_count();
  {
    OwnedTensor t = OwnedTensor::empty({3, 5}, DType::kFloat32);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.view.data()) % 64, 0u);
    EXPECT_EQ(t.view.numel(), 15);
    EXPECT_EQ(Buffer::live_count(), before + 1);
    auto shared = t.buffer;
    t = OwnedTensor{};
    EXPECT_EQ(Buffer::live_count(), before + 1);  // `shared` keeps it alive
  }
  EXPECT_EQ(Buffer::live_count(), before);
  EXPECT_THROW(OwnedTensor::empty({-1}, DType::kFloat32), ValueError);
}

TEST(TensorView, NegativeOrOverflowingShapesAreRefused) {
  // A shape whose byte count wraps would get a buffer far smaller than it describes.
  float x[4] = {};
  const std::int64_t negative[] = {-2, 2};
  EXPECT_THROW(TensorView(x, DType::kFloat32, Device::cpu(), {-2, 2}), ValueError);
  EXPECT_THROW(TensorView(x, DType::kFloat32, Device::cpu(), 2, negative, nullptr), ValueError);
  EXPECT_THROW(OwnedTensor::empty({std::int64_t{1} << 62}, DType::kInt64), ValueError);
  EXPECT_THROW(OwnedTensor::empty({std::int64_t{1} << 40, std::int64_t{1} << 40}, DType::kFloat32),
               ValueError);
  const std::int64_t two_by_one[] = {2, 1};
  EXPECT_EQ(checked_nbytes(2, two_by_one, DType::kFloat32), 8);
  // An empty tensor is empty whatever its other sizes.
  EXPECT_EQ(OwnedTensor::empty({std::int64_t{1} << 62, 0, 1 << 30}, DType::kInt64).view.numel(), 0);
}

}  // namespace
}  // namespace aphrodite
