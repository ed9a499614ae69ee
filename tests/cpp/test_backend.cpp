#include <gtest/gtest.h>

#include "aphrodite/backend.h"
#include "aphrodite/buffer.h"
#include "aphrodite/error.h"

namespace aphrodite {
namespace {

TEST(Backends, CpuIsAlwaysPresent) {
  auto infos = backends_info();
  ASSERT_EQ(infos.size(), 2u);
  EXPECT_EQ(infos[0].name, "cpu");
  EXPECT_TRUE(infos[0].compiled);
  EXPECT_EQ(infos[1].name, "cuda");
  EXPECT_EQ(infos[1].compiled, cuda_compiled());
  EXPECT_EQ(backend(DeviceType::kCPU).device_count(), 1);
}

TEST(Backends, MissingCudaDeviceIsAClearError) {
  bool has_gpu = cuda_compiled() && backend(DeviceType::kCUDA).device_count() > 0;
  if (has_gpu) {
    EXPECT_THROW(backend_for(Device::cuda(1000)), DeviceError);
    return;
  }
  try {
    Buffer::allocate(16, Device::cuda(0));
    FAIL() << "expected DeviceError";
  } catch (const DeviceError& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
}

TEST(Backends, VersionIsSet) { EXPECT_STRNE(version(), ""); }

}  // namespace
}  // namespace aphrodite
