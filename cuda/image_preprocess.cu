// CUDA execution of a preprocessing plan (cpp/src/internal/image_preprocess.h). The host packs
// the plan (PIL's fixed-point coefficients, computed once on the host for both backends) and the
// uint8 images into one staging buffer that is uploaded with a single copy; two kernels then run
// the two resampling passes with the CPU's integer arithmetic, the second one fused with the crop,
// the normalisation table and the store into `out`. Everything is ordered on the caller's stream:
// the device memory is allocated and freed stream-ordered (cudaMallocAsync/cudaFreeAsync).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_check.cuh"
#include "internal/image_preprocess.h"

namespace aphrodite::detail {

namespace {

constexpr int kThreads = 256;
constexpr std::int32_t kBias = 1 << (kResamplePrecisionBits - 1);

__device__ __forceinline__ std::uint8_t clip8(std::int32_t v) {
  v >>= kResamplePrecisionBits;
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

struct DeviceArgs {
  const ImagePlan* plans;
  const std::int32_t* tables;
  const std::uint32_t* lut;  // [3][256]
  const std::uint8_t* images;
  std::uint8_t* scratch;
  int num_images;
  int crop_h, crop_w;
};

__device__ __forceinline__ std::int64_t first_pass_rows(const ImagePlan& ip) {
  if (ip.vertical_first) return ip.y1 - ip.y0;
  return ip.resample_x ? ip.row1 - ip.row0 : 0;
}

__device__ __forceinline__ std::int64_t mid_pixels(const ImagePlan& ip) {
  return ip.vertical_first ? ip.col1 - ip.col0 : ip.x1 - ip.x0;
}

// One pixel (3 channels) of the horizontal pass: output column p of the row at `row`.
__device__ __forceinline__ void horizontal_pixel(const ImagePlan& ip, const std::int32_t* tables,
                                                 const std::uint8_t* row, int p,
                                                 std::int32_t s[3]) {
  const std::int32_t* bounds = tables + ip.x_table;
  const std::int32_t* k = bounds + 2 * (ip.x1 - ip.x0) + static_cast<std::int64_t>(p) * ip.ksize_x;
  const int xmin = bounds[2 * p];
  const int taps = bounds[2 * p + 1];
  const std::uint8_t* px = row + static_cast<std::int64_t>(xmin) * 3;
  s[0] = s[1] = s[2] = kBias;
  for (int x = 0; x < taps; ++x) {
    s[0] += px[3 * x + 0] * k[x];
    s[1] += px[3 * x + 1] * k[x];
    s[2] += px[3 * x + 2] * k[x];
  }
}

// One pixel of the vertical pass: output row i (relative to y0) at byte column `byte` of
// `rows` (row 0 is source row `origin`).
__device__ __forceinline__ void vertical_pixel(const ImagePlan& ip, const std::int32_t* tables,
                                               const std::uint8_t* rows, std::int64_t stride,
                                               int origin, std::int64_t i, std::int64_t byte,
                                               std::int32_t s[3]) {
  const std::int32_t* bounds = tables + ip.y_table;
  const std::int32_t* k = bounds + 2 * (ip.y1 - ip.y0) + i * ip.ksize_y;
  const int ymin = bounds[2 * i] - origin;
  const int taps = bounds[2 * i + 1];
  s[0] = s[1] = s[2] = kBias;
  for (int t = 0; t < taps; ++t) {
    const std::uint8_t* px = rows + (ymin + t) * stride + byte;
    s[0] += px[0] * k[t];
    s[1] += px[1] * k[t];
    s[2] += px[2] * k[t];
  }
}

__global__ void first_pass_kernel(DeviceArgs args) {
  for (int n = blockIdx.y; n < args.num_images; n += gridDim.y) {
    const ImagePlan ip = args.plans[n];
    const std::int64_t width = mid_pixels(ip);
    const std::int64_t total = first_pass_rows(ip) * width;
    const std::uint8_t* src = args.images + ip.src_offset;
    const std::int64_t src_stride = static_cast<std::int64_t>(ip.width) * 3;
    std::uint8_t* mid = args.scratch + ip.mid_offset;
    for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
         idx < total; idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      const std::int64_t r = idx / width;
      const int p = static_cast<int>(idx % width);
      std::int32_t s[3];
      if (ip.vertical_first) {
        vertical_pixel(ip, args.tables, src, src_stride, 0, r,
                       static_cast<std::int64_t>(ip.col0 + p) * 3, s);
      } else {
        horizontal_pixel(ip, args.tables, src + (ip.row0 + r) * src_stride, p, s);
      }
      std::uint8_t* dst = mid + idx * 3;
      dst[0] = clip8(s[0]);
      dst[1] = clip8(s[1]);
      dst[2] = clip8(s[2]);
    }
  }
}

template <typename Bits>
__global__ void second_pass_kernel(DeviceArgs args, Bits* out) {
  const std::int64_t plane = static_cast<std::int64_t>(args.crop_h) * args.crop_w;
  for (int n = blockIdx.y; n < args.num_images; n += gridDim.y) {
    const ImagePlan ip = args.plans[n];
    const std::uint8_t* src = args.images + ip.src_offset;
    const std::int64_t src_stride = static_cast<std::int64_t>(ip.width) * 3;
    const std::uint8_t* mid = args.scratch + ip.mid_offset;
    const std::int64_t stride = ip.vertical_first ? static_cast<std::int64_t>(ip.col1 - ip.col0) * 3
                                : ip.resample_x   ? static_cast<std::int64_t>(ip.x1 - ip.x0) * 3
                                                  : src_stride;
    // Without horizontal resampling (horizontal first), "mid" is the source at the crop's
    // first column.
    const std::uint8_t* mid0 =
        ip.vertical_first || ip.resample_x
            ? mid
            : src + ip.row0 * src_stride + static_cast<std::int64_t>(ip.x0 + ip.left) * 3;
    Bits* image_out = out + static_cast<std::int64_t>(n) * 3 * plane;
    for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
         idx < plane; idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      const int y = static_cast<int>(idx / args.crop_w);
      const int x = static_cast<int>(idx % args.crop_w);
      std::uint32_t v[3] = {0, 0, 0};  // HF pads with zero pixels
      if (y >= ip.y0 && y < ip.y1 && x >= ip.x0 && x < ip.x1) {
        const std::int64_t i = y - ip.y0;
        const int p = x - ip.x0;
        if (ip.vertical_first) {
          std::int32_t s[3];
          horizontal_pixel(ip, args.tables, mid + i * stride, p, s);
          for (int c = 0; c < 3; ++c) v[c] = clip8(s[c]);
        } else if (ip.resample_y) {
          std::int32_t s[3];
          vertical_pixel(ip, args.tables, mid0, stride, ip.row0, i,
                         static_cast<std::int64_t>(p) * 3, s);
          for (int c = 0; c < 3; ++c) v[c] = clip8(s[c]);
        } else {
          const std::uint8_t* px = mid0 + (y + ip.top - ip.row0) * stride + p * 3;
          for (int c = 0; c < 3; ++c) v[c] = px[c];
        }
      }
      for (int c = 0; c < 3; ++c) {
        image_out[c * plane + idx] = static_cast<Bits>(args.lut[c * 256 + v[c]]);
      }
    }
  }
}

std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

int blocks_for(std::int64_t work) {
  const std::int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, 1024)));
}

}  // namespace

void preprocess_images_cuda(const PreprocessPlan& plan, const TensorView& out,
                            StreamHandle stream_handle) {
  const auto n = static_cast<int>(plan.images.size());
  if (n == 0) return;
  DeviceGuard guard(out.device().index);
  const cudaStream_t stream = to_cuda_stream(stream_handle);

  // Staging layout: plans | tables | lut | images, then (device only) the scratch.
  const std::size_t plans_bytes = plan.images.size() * sizeof(ImagePlan);
  const std::size_t tables_at = align_up(plans_bytes, 16);
  const std::size_t lut_at = align_up(tables_at + plan.tables.size() * sizeof(std::int32_t), 16);
  const std::size_t images_at = align_up(lut_at + sizeof(plan.lut), 16);
  std::size_t images_bytes = 0;
  for (const ImagePlan& ip : plan.images) {
    images_bytes += static_cast<std::size_t>(ip.height) * static_cast<std::size_t>(ip.width) * 3;
  }
  const std::size_t staged = images_at + images_bytes;
  const std::size_t scratch_at = align_up(staged, 16);
  const std::size_t total = scratch_at + static_cast<std::size_t>(plan.scratch_bytes);

  std::vector<std::uint8_t> host(staged);
  std::memcpy(host.data(), plan.images.data(), plans_bytes);
  if (!plan.tables.empty()) {
    std::memcpy(host.data() + tables_at, plan.tables.data(),
                plan.tables.size() * sizeof(std::int32_t));
  }
  std::memcpy(host.data() + lut_at, plan.lut, sizeof(plan.lut));
  // The kernels read packed RGB: 4-byte pixels and strided rows are packed here, in the copy
  // that stages the images anyway.
  for (int i = 0; i < n; ++i) {
    const ImagePlan& ip = plan.images[static_cast<std::size_t>(i)];
    pack_rgb(plan.sources[static_cast<std::size_t>(i)], ip.height, ip.width,
             host.data() + images_at + ip.src_offset);
  }

  void* device = nullptr;
  check_cuda(cudaMallocAsync(&device, total, stream), "cudaMallocAsync(preprocess_images)");
  auto* base = static_cast<std::uint8_t*>(device);
  // From pageable memory the copy returns once `host` has been read, so it may be freed after.
  const cudaError_t copied =
      cudaMemcpyAsync(base, host.data(), staged, cudaMemcpyHostToDevice, stream);
  if (copied != cudaSuccess) {
    (void)cudaFreeAsync(device, stream);
    check_cuda(copied, "cudaMemcpyAsync(preprocess_images)");
  }

  DeviceArgs args{};
  args.plans = reinterpret_cast<const ImagePlan*>(base);
  args.tables = reinterpret_cast<const std::int32_t*>(base + tables_at);
  args.lut = reinterpret_cast<const std::uint32_t*>(base + lut_at);
  args.images = base + images_at;
  args.scratch = base + scratch_at;
  args.num_images = n;
  args.crop_h = static_cast<int>(plan.crop_h);
  args.crop_w = static_cast<int>(plan.crop_w);

  std::int64_t first_work = 0;
  for (const ImagePlan& ip : plan.images) {
    const std::int64_t rows =
        ip.vertical_first ? ip.y1 - ip.y0 : (ip.resample_x ? ip.row1 - ip.row0 : 0);
    const std::int64_t width = ip.vertical_first ? ip.col1 - ip.col0 : ip.x1 - ip.x0;
    first_work = std::max(first_work, rows * width);
  }
  const unsigned grid_y = static_cast<unsigned>(std::min(n, 65535));
  cudaError_t launched = cudaSuccess;
  if (first_work > 0) {
    first_pass_kernel<<<dim3(static_cast<unsigned>(blocks_for(first_work)), grid_y), kThreads, 0,
                        stream>>>(args);
    launched = cudaGetLastError();
  }
  if (launched == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(blocks_for(plan.crop_h * plan.crop_w)), grid_y);
    if (out.dtype() == DType::kFloat32) {
      second_pass_kernel<std::uint32_t>
          <<<grid, kThreads, 0, stream>>>(args, static_cast<std::uint32_t*>(out.data()));
    } else {
      second_pass_kernel<std::uint16_t>
          <<<grid, kThreads, 0, stream>>>(args, static_cast<std::uint16_t*>(out.data()));
    }
    launched = cudaGetLastError();
  }
  const cudaError_t freed = cudaFreeAsync(device, stream);
  check_cuda(launched, "preprocess_images kernels");
  check_cuda(freed, "cudaFreeAsync(preprocess_images)");
}

}  // namespace aphrodite::detail
