// Bindings of the linear ops: linear, pack_linear_weight (PackedLinearWeight), llava_projector.
#include <pybind11/pybind11.h>

#include <optional>
#include <string>

#include "aphrodite/linear.h"
#include "aphrodite/llava_projector.h"
#include "tensor_bridge.h"

namespace aphrodite::bindings {

namespace py = pybind11;

namespace {

std::optional<TensorView> optional_view(const std::optional<ImportedTensor>& t) {
  if (!t) return std::nullopt;
  return t->view();
}

}  // namespace

void bind_linear_ops(py::module_& ops) {
  py::class_<PackedWeight>(ops, "PackedLinearWeight",
                           "A float32 CPU linear weight packed once into the CPU GEMM's panel "
                           "layout (see pack_linear_weight).")
      .def_property_readonly("out_features", &PackedWeight::out_features)
      .def_property_readonly("in_features", &PackedWeight::in_features)
      .def_property_readonly("gated", &PackedWeight::gated)
      .def("__repr__", [](const PackedWeight& w) {
        return "PackedLinearWeight(out_features=" + std::to_string(w.out_features()) +
               ", in_features=" + std::to_string(w.in_features()) +
               (w.gated() ? ", gated=True)" : ")");
      });

  ops.def(
      "set_linear_cpu_isa", [](const std::string& name) { set_linear_cpu_isa(name.c_str()); },
      py::arg("name"),
      "Forces the CPU GEMM's kernel set: 'avx512', 'avx2', 'scalar' or 'auto' (tests, "
      "benchmarks).");
  ops.def("linear_cpu_isa", &linear_cpu_isa, "The CPU GEMM's kernel set in use now.");

  ops.def(
      "pack_linear_weight",
      [](py::handle weight, bool gated) {
        ImportedTensor w = import_tensor(weight, "weight");
        py::gil_scoped_release release;
        return pack_linear_weight(w, gated);
      },
      py::arg("weight"), py::arg("gated") = false,
      "Packs a float32 CPU weight [N, K] for linear(); the result no longer refers to `weight`. "
      "gated: for activation 'swiglu' (weight = gate rows over up rows).");

  ops.def(
      "linear",
      [](py::handle out, py::handle x, py::handle weight, py::handle bias,
         const std::string& activation, StreamHandle stream) {
        const Activation act = parse_activation(activation.c_str());
        ImportedTensor o = import_tensor(out, "out", /*writable=*/true);
        ImportedTensor xt = import_tensor(x, "x");
        std::optional<ImportedTensor> b = import_optional_tensor(bias, "bias");
        if (py::isinstance<PackedWeight>(weight)) {
          const PackedWeight& packed = weight.cast<const PackedWeight&>();
          py::gil_scoped_release release;
          linear(o, xt, packed, optional_view(b), act);
          return;
        }
        ImportedTensor w = import_tensor(weight, "weight");
        py::gil_scoped_release release;
        linear(o, xt, w, optional_view(b), act, stream);
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
      py::arg("activation") = "none", py::kw_only(), py::arg("stream") = 0,
      "out = act(x @ weight^T + bias). weight: a tensor [N, K] or a PackedLinearWeight (CPU). "
      "activation: 'none', 'gelu' (erf), 'gelu_tanh', 'quick_gelu' (x * sigmoid(1.702 x)) or "
      "'swiglu' (CPU; out [M, N / 2]).");

  ops.def(
      "llava_projector",
      [](py::handle out, py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2,
         const std::string& activation, py::handle workspace, StreamHandle stream) {
        const Activation act = parse_activation(activation.c_str());
        ImportedTensor o = import_tensor(out, "out", /*writable=*/true);
        ImportedTensor xt = import_tensor(x, "x");
        ImportedTensor w1t = import_tensor(w1, "w1");
        ImportedTensor b1t = import_tensor(b1, "b1");
        ImportedTensor w2t = import_tensor(w2, "w2");
        ImportedTensor b2t = import_tensor(b2, "b2");
        std::optional<ImportedTensor> ws =
            import_optional_tensor(workspace, "workspace", /*writable=*/true);
        py::gil_scoped_release release;
        llava_projector(o, xt, w1t, b1t, w2t, b2t, act, optional_view(ws), stream);
      },
      py::arg("out"), py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
      py::arg("activation") = "gelu", py::kw_only(), py::arg("workspace") = py::none(),
      py::arg("stream") = 0,
      "out = gelu(x @ w1^T + b1) @ w2^T + b2; activation 'gelu' (erf) or 'gelu_tanh'. "
      "workspace: optional [T, H] tensor for the intermediate activations.");
}

}  // namespace aphrodite::bindings
