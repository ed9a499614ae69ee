// Bindings of the layer ops: rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul.
#include "aphrodite/layer_ops.h"

#include <pybind11/pybind11.h>

#include "tensor_bridge.h"

namespace aphrodite::bindings {

namespace py = pybind11;

void bind_layer_ops(py::module_& ops) {
  ops.def(
      "rms_norm",
      [](py::handle out, py::handle x, py::handle weight, float eps, std::uintptr_t stream) {
        const ImportedTensor o = import_tensor(out, "out", /*writable=*/true);
        const ImportedTensor xt = import_tensor(x, "x");
        const ImportedTensor w = import_tensor(weight, "weight");
        py::gil_scoped_release release;
        aphrodite::rms_norm(o, xt, w, eps, stream);
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::kw_only(),
      py::arg("stream") = 0, "out = weight * dtype(x * rsqrt(mean(x^2) + eps)), x [rows, hidden].");

  ops.def(
      "fused_add_rms_norm",
      [](py::handle x, py::handle residual, py::handle weight, float eps, std::uintptr_t stream) {
        const ImportedTensor xt = import_tensor(x, "x", /*writable=*/true);
        const ImportedTensor r = import_tensor(residual, "residual", /*writable=*/true);
        const ImportedTensor w = import_tensor(weight, "weight");
        py::gil_scoped_release release;
        aphrodite::fused_add_rms_norm(xt, r, w, eps, stream);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::kw_only(),
      py::arg("stream") = 0, "In place: residual = x + residual, then x = rms_norm(residual).");

  ops.def(
      "rotary_embedding",
      [](py::handle positions, py::handle query, py::handle key, py::handle cos, py::handle sin,
         std::uintptr_t stream) {
        const ImportedTensor pos = import_tensor(positions, "positions");
        const ImportedTensor q = import_tensor(query, "query", /*writable=*/true);
        const ImportedTensor k = import_tensor(key, "key", /*writable=*/true);
        const ImportedTensor c = import_tensor(cos, "cos");
        const ImportedTensor s = import_tensor(sin, "sin");
        py::gil_scoped_release release;
        aphrodite::rotary_embedding(pos, q, k, c, s, stream);
      },
      py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("cos"), py::arg("sin"),
      py::kw_only(), py::arg("stream") = 0,
      "In place on query/key [tokens, heads, head_size]: the rotate_half rotary embedding at "
      "positions, with float32 cos/sin tables [max_positions, head_size].");

  ops.def(
      "silu_and_mul",
      [](py::handle out, py::handle x, std::uintptr_t stream) {
        const ImportedTensor o = import_tensor(out, "out", /*writable=*/true);
        const ImportedTensor xt = import_tensor(x, "x");
        py::gil_scoped_release release;
        aphrodite::silu_and_mul(o, xt, stream);
      },
      py::arg("out"), py::arg("x"), py::kw_only(), py::arg("stream") = 0,
      "out [rows, n] = silu(x[:, :n]) * x[:, n:] for x [rows, 2n].");
}

}  // namespace aphrodite::bindings
