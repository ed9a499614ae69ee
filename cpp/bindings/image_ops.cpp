// Bindings of the image preprocessing op (aphrodite/image.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "aphrodite/error.h"
#include "aphrodite/image.h"
#include "tensor_bridge.h"

namespace aphrodite::bindings {

namespace py = pybind11;

void bind_image_ops(py::module_& ops) {
  py::enum_<PilPassOrder>(ops, "PilPassOrder",
                          "Which pass PIL's bicubic resize runs first when both axes change; "
                          "the rule of each Pillow release (aphrodite/image.h).")
      .value("HORIZONTAL_FIRST", PilPassOrder::kHorizontalFirst, "Pillow 10.x to 12.1")
      .value("VERTICAL_FIRST_WHEN_TALL", PilPassOrder::kVerticalFirstWhenTall,
             "Pillow 12.2 and 12.3")
      .value("VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS_MORE",
             PilPassOrder::kVerticalFirstWhenHeightShrinksMore, "Pillow 13");
  ops.def(
      "preprocess_images",
      [](const py::list& images, py::handle out, std::int64_t shortest_edge,
         std::array<std::int64_t, 2> crop_size, std::array<float, 3> mean, std::array<float, 3> std,
         double rescale_factor, bool do_resize, bool do_center_crop, PilPassOrder pass_order,
         StreamHandle stream) {
        std::vector<ImportedTensor> imported;
        imported.reserve(images.size());
        for (std::size_t i = 0; i < images.size(); ++i) {
          const std::string name = "images[" + std::to_string(i) + "]";
          imported.push_back(import_tensor(images[i], name.c_str()));
        }
        ImportedTensor out_t = import_tensor(out, "out", /*writable=*/true);
        const TensorView& o = out_t.view();
        if (o.dim() == 4 && (o.size(2) != crop_size[0] || o.size(3) != crop_size[1])) {
          throw ValueError("out: its last two dimensions must be crop_size (" +
                           std::to_string(crop_size[0]) + ", " + std::to_string(crop_size[1]) +
                           "), got " + o.describe());
        }
        ImagePreprocessParams params;
        params.shortest_edge = shortest_edge;
        params.rescale_factor = rescale_factor;
        for (int c = 0; c < 3; ++c) {
          params.mean[c] = mean[static_cast<std::size_t>(c)];
          params.std[c] = std[static_cast<std::size_t>(c)];
        }
        params.do_resize = do_resize;
        params.do_center_crop = do_center_crop;
        params.pass_order = pass_order;
        std::vector<TensorView> views;
        views.reserve(imported.size());
        for (const ImportedTensor& t : imported) views.push_back(t.view());
        py::gil_scoped_release release;
        preprocess_images(views, o, params, stream);
      },
      py::arg("images"), py::arg("out"), py::arg("shortest_edge"), py::arg("crop_size"),
      py::arg("mean"), py::arg("std"), py::arg("rescale_factor") = 1.0 / 255.0,
      py::arg("do_resize") = true, py::arg("do_center_crop") = true,
      py::arg("pass_order") = PilPassOrder::kVerticalFirstWhenHeightShrinksMore,
      py::arg("stream") = 0,
      "Resizes (PIL bicubic, shortest edge), center-crops, rescales and normalises RGB uint8 "
      "[H, W, 3] CPU images into out [N, 3, crop_h, crop_w] (float32/float16/bfloat16, CPU or "
      "CUDA), as HF's CLIPImageProcessorPil does.");
  ops.def(
      "check_image_size",
      [](std::int64_t height, std::int64_t width, std::int64_t shortest_edge,
         std::array<std::int64_t, 2> crop_size, bool do_resize, bool do_center_crop,
         const std::string& name) {
        ImagePreprocessParams params;
        params.shortest_edge = shortest_edge;
        params.do_resize = do_resize;
        params.do_center_crop = do_center_crop;
        check_image_size(height, width, params, crop_size[0], crop_size[1], name);
      },
      py::arg("height"), py::arg("width"), py::arg("shortest_edge"), py::arg("crop_size"),
      py::arg("do_resize") = true, py::arg("do_center_crop") = true, py::arg("name") = "image",
      "Raises ValueError unless preprocess_images can take an image of height x width with these "
      "settings (sides and resized sides below 2^29; crop-sized without the center crop).");
  ops.def(
      "pil_vertical_pass_first",
      [](std::int64_t in_h, std::int64_t in_w, std::int64_t out_h, std::int64_t out_w,
         PilPassOrder order) { return pil_vertical_pass_first(in_h, in_w, out_h, out_w, order); },
      py::arg("in_h"), py::arg("in_w"), py::arg("out_h"), py::arg("out_w"), py::arg("pass_order"),
      "Whether PIL resizes (in_h, in_w) to (out_h, out_w) vertical pass first under pass_order.");
  ops.def(
      "shortest_edge_resize_size",
      [](std::int64_t height, std::int64_t width, std::int64_t shortest_edge) {
        return shortest_edge_resize_size(height, width, shortest_edge);
      },
      py::arg("height"), py::arg("width"), py::arg("shortest_edge"),
      "(height, width) after HF's shortest-edge resize.");
}

}  // namespace aphrodite::bindings
