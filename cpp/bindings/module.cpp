// aphrodite._C: the only place where pybind11 meets the core. Each area binds itself in its own
// file (bind_*); this file maps the core's exceptions to Python's and exposes build information.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "aphrodite/backend.h"
#include "aphrodite/error.h"
#include "aphrodite/parallel.h"
#include "tensor_bridge.h"

namespace py = pybind11;

namespace aphrodite::bindings {
void bind_attention_ops(py::module_& ops);
void bind_image_ops(py::module_& ops);
void bind_layer_ops(py::module_& ops);
void bind_linear_ops(py::module_& ops);
void bind_engine(py::module_& m);
}  // namespace aphrodite::bindings

namespace {

py::dict backend_info_to_dict(const aphrodite::BackendInfo& info) {
  py::dict d;
  d["name"] = info.name;
  d["compiled"] = info.compiled;
  d["archs"] = info.archs;
  py::list devices;
  for (const auto& dev : info.devices) {
    py::dict dd;
    dd["index"] = dev.index;
    dd["name"] = dev.name;
    if (info.name == "cuda") {
      dd["compute_capability"] =
          py::make_tuple(dev.compute_capability_major, dev.compute_capability_minor);
      dd["total_memory"] = dev.total_memory;
      dd["multiprocessor_count"] = dev.multiprocessor_count;
    }
    devices.append(dd);
  }
  d["devices"] = devices;
  d["status"] = info.status;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "aphrodite core library bindings";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const aphrodite::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const aphrodite::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const aphrodite::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.attr("__version__") = aphrodite::version();
  m.def("cuda_compiled", &aphrodite::cuda_compiled,
        "Whether this build contains the CUDA backend.");
  m.def(
      "backends_info",
      [] {
        py::list out;
        for (const auto& info : aphrodite::backends_info()) out.append(backend_info_to_dict(info));
        return out;
      },
      "Every backend of this build: name, compiled, archs, devices found and status.");
  m.def("num_threads", &aphrodite::num_threads, "Threads used by the core's CPU kernels.");
  m.def("set_num_threads", &aphrodite::set_num_threads, py::arg("n"),
        "Sets the number of threads used by the core's CPU kernels.");
  m.def(
      "require_device",
      [](py::object device) { aphrodite::backend_for(aphrodite::bindings::parse_device(device)); },
      py::arg("device"),
      "Raises RuntimeError with the reason when `device` ('cpu', 'cuda', 'cuda:N') cannot be "
      "used by this build on this machine.");

  aphrodite::bindings::bind_tensor(m);
  aphrodite::bindings::bind_engine(m);

  // Ops: every area binds its ops into this submodule (cpp/bindings/*_ops.cpp).
  py::module_ ops = m.def_submodule("ops", "The core's ops; backend chosen by the tensors' device");
  aphrodite::bindings::bind_attention_ops(ops);
  aphrodite::bindings::bind_image_ops(ops);
  aphrodite::bindings::bind_layer_ops(ops);
  aphrodite::bindings::bind_linear_ops(ops);
}
