#include "tensor_bridge.h"

#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "aphrodite/backend.h"

namespace aphrodite::bindings {

namespace {

constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";
constexpr const char* kVersionedCapsuleName = "dltensor_versioned";
constexpr const char* kUsedVersionedCapsuleName = "used_dltensor_versioned";

DType dtype_from_dlpack(const DLDataType& t, const char* name) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return DType::kFloat32;
    if (t.code == kDLFloat && t.bits == 16) return DType::kFloat16;
    if (t.code == kDLBfloat && t.bits == 16) return DType::kBFloat16;
    if (t.code == kDLInt && t.bits == 32) return DType::kInt32;
    if (t.code == kDLInt && t.bits == 64) return DType::kInt64;
    if (t.code == kDLUInt && t.bits == 8) return DType::kUInt8;
  }
  static const char* kCodes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  std::string got = t.code < 7 ? kCodes[t.code] : "code" + std::to_string(t.code);
  got += std::to_string(t.bits);
  if (t.lanes != 1) got += "x" + std::to_string(t.lanes);
  throw TypeError(std::string("'") + name + "' has unsupported dtype " + got +
                  " (supported: float32, float16, bfloat16, int32, int64, uint8)");
}

DLDataType dtype_to_dlpack(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return {kDLFloat, 32, 1};
    case DType::kFloat16:
      return {kDLFloat, 16, 1};
    case DType::kBFloat16:
      return {kDLBfloat, 16, 1};
    case DType::kInt32:
      return {kDLInt, 32, 1};
    case DType::kInt64:
      return {kDLInt, 64, 1};
    case DType::kUInt8:
      return {kDLUInt, 8, 1};
  }
  throw TypeError("unknown dtype");
}

Device device_from_dlpack(const DLDevice& d, const char* name) {
  switch (d.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      return Device::cpu();
    case kDLCUDA:
      return Device::cuda(d.device_id);
    default:
      throw ValueError(std::string("'") + name + "' is on an unsupported device (DLPack device " +
                       "type " + std::to_string(static_cast<int>(d.device_type)) +
                       "); expected a CPU or CUDA tensor");
  }
}

// What an exported capsule owns: the managed tensor itself (legacy or versioned), its
// shape/strides arrays and a reference to the buffer.
struct ExportContext {
  DLManagedTensor legacy{};
  DLManagedTensorVersioned versioned{};
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  std::shared_ptr<Buffer> buffer;
};

void legacy_deleter(DLManagedTensor* self) { delete static_cast<ExportContext*>(self->manager_ctx); }
void versioned_deleter(DLManagedTensorVersioned* self) {
  delete static_cast<ExportContext*>(self->manager_ctx);
}

// Called when an exported capsule is garbage collected. A consumer that took ownership renamed
// it to "used_..." and calls the deleter itself.
void export_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kCapsuleName)) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleName));
    if (managed->deleter != nullptr) managed->deleter(managed);
  } else if (PyCapsule_IsValid(capsule, kVersionedCapsuleName)) {
    auto* managed = static_cast<DLManagedTensorVersioned*>(
        PyCapsule_GetPointer(capsule, kVersionedCapsuleName));
    if (managed->deleter != nullptr) managed->deleter(managed);
  }
}

void release_legacy(void* p) {
  auto* managed = static_cast<DLManagedTensor*>(p);
  if (managed->deleter != nullptr) managed->deleter(managed);
}

void release_versioned(void* p) {
  auto* managed = static_cast<DLManagedTensorVersioned*>(p);
  if (managed->deleter != nullptr) managed->deleter(managed);
}

// Asks the producer for a capsule, preferring DLPack 1.x (which carries the read-only flag).
py::object request_capsule(py::handle obj) {
  try {
    return obj.attr("__dlpack__")(py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;  // a producer that predates max_version
  }
  return obj.attr("__dlpack__")();
}

std::string as_str(py::handle obj) { return py::str(obj).cast<std::string>(); }

// A core-owned tensor exposed to Python; consumed with torch.from_dlpack / np.from_dlpack.
class PyTensor {
 public:
  explicit PyTensor(OwnedTensor t) : tensor_(std::move(t)) {}
  const OwnedTensor& tensor() const { return tensor_; }

 private:
  OwnedTensor tensor_;
};

py::dict tensor_info(const TensorView& v) {
  py::dict info;
  info["dtype"] = dtype_name(v.dtype());
  info["device"] = device_name(v.device());
  std::vector<std::int64_t> shape(v.shape(), v.shape() + v.dim());
  std::vector<std::int64_t> strides(v.strides(), v.strides() + v.dim());
  info["shape"] = py::tuple(py::cast(shape));
  info["strides"] = py::tuple(py::cast(strides));
  info["data_ptr"] = reinterpret_cast<std::uintptr_t>(v.data());
  info["contiguous"] = v.is_contiguous();
  return info;
}

}  // namespace

ImportedTensor& ImportedTensor::operator=(ImportedTensor&& other) noexcept {
  if (this != &other) {
    release();
    managed_ = other.managed_;
    release_ = other.release_;
    view_ = other.view_;
    read_only_ = other.read_only_;
    other.managed_ = nullptr;
  }
  return *this;
}

void ImportedTensor::release() noexcept {
  if (managed_ != nullptr) release_(managed_);
  managed_ = nullptr;
}

ImportedTensor import_tensor(py::handle obj, const char* name, bool writable) {
  py::object capsule;
  if (PyCapsule_CheckExact(obj.ptr())) {
    capsule = py::reinterpret_borrow<py::object>(obj);
  } else if (py::hasattr(obj, "__dlpack__")) {
    capsule = request_capsule(obj);
  } else {
    throw TypeError(std::string("'") + name + "' must be a tensor (an object with __dlpack__, " +
                    "such as a torch.Tensor or numpy.ndarray), got " +
                    as_str(py::type::handle_of(obj).attr("__name__")));
  }

  // Take ownership: once renamed, the producer's capsule destructor leaves the tensor to us.
  ImportedTensor imported;
  const DLTensor* t = nullptr;
  if (PyCapsule_IsValid(capsule.ptr(), kVersionedCapsuleName)) {
    auto* managed = static_cast<DLManagedTensorVersioned*>(
        PyCapsule_GetPointer(capsule.ptr(), kVersionedCapsuleName));
    if (PyCapsule_SetName(capsule.ptr(), kUsedVersionedCapsuleName) != 0) {
      throw py::error_already_set();
    }
    imported.managed_ = managed;
    imported.release_ = release_versioned;
    if (managed->version.major > DLPACK_MAJOR_VERSION) {
      throw ValueError(std::string("'") + name + "' uses DLPack " +
                       std::to_string(managed->version.major) + ".x; this build reads 1.x");
    }
    imported.read_only_ = (managed->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    t = &managed->dl_tensor;
  } else if (PyCapsule_IsValid(capsule.ptr(), kCapsuleName)) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), kCapsuleName));
    if (PyCapsule_SetName(capsule.ptr(), kUsedCapsuleName) != 0) throw py::error_already_set();
    imported.managed_ = managed;
    imported.release_ = release_legacy;
    t = &managed->dl_tensor;
  } else {
    throw ValueError(std::string("'") + name +
                     "': __dlpack__ did not return an unused 'dltensor' capsule");
  }

  if (writable && imported.read_only_) {
    throw ValueError(std::string("'") + name + "' is read-only, but the op writes to it");
  }
  DType dtype = dtype_from_dlpack(t->dtype, name);
  Device device = device_from_dlpack(t->device, name);
  if (t->ndim < 0 || t->ndim > TensorView::kMaxDims) {
    throw ValueError(std::string("'") + name + "' has " + std::to_string(t->ndim) +
                     " dimensions; at most 8 are supported");
  }
  void* data = static_cast<char*>(t->data) + t->byte_offset;
  imported.view_ = TensorView(data, dtype, device, t->ndim, t->shape, t->strides);
  return imported;
}

std::optional<ImportedTensor> import_optional_tensor(py::handle obj, const char* name,
                                                     bool writable) {
  if (obj.is_none()) return std::nullopt;
  return import_tensor(obj, name, writable);
}

py::capsule export_tensor(const OwnedTensor& tensor, bool versioned) {
  auto ctx = std::make_unique<ExportContext>();
  const TensorView& v = tensor.view;
  ctx->shape.assign(v.shape(), v.shape() + v.dim());
  ctx->strides.assign(v.strides(), v.strides() + v.dim());
  ctx->buffer = tensor.buffer;
  DLTensor t{};
  t.data = v.data();
  t.device = v.device().is_cpu() ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, v.device().index};
  t.ndim = v.dim();
  t.dtype = dtype_to_dlpack(v.dtype());
  t.shape = ctx->shape.data();
  t.strides = ctx->strides.data();
  t.byte_offset = 0;

  void* managed = nullptr;
  const char* capsule_name = nullptr;
  if (versioned) {
    ctx->versioned.version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
    ctx->versioned.manager_ctx = ctx.get();
    ctx->versioned.deleter = versioned_deleter;
    ctx->versioned.flags = 0;
    ctx->versioned.dl_tensor = t;
    managed = &ctx->versioned;
    capsule_name = kVersionedCapsuleName;
  } else {
    ctx->legacy.manager_ctx = ctx.get();
    ctx->legacy.deleter = legacy_deleter;
    ctx->legacy.dl_tensor = t;
    managed = &ctx->legacy;
    capsule_name = kCapsuleName;
  }
  PyObject* capsule = PyCapsule_New(managed, capsule_name, export_capsule_destructor);
  if (capsule == nullptr) throw py::error_already_set();
  ctx.release();  // owned by the capsule (or by whoever consumes it) from now on
  return py::reinterpret_steal<py::capsule>(capsule);
}

py::tuple dlpack_device(Device device) {
  if (device.is_cpu()) return py::make_tuple(static_cast<int>(kDLCPU), 0);
  return py::make_tuple(static_cast<int>(kDLCUDA), device.index);
}

DType parse_dtype(py::handle obj) {
  std::string s;
  if (py::isinstance<py::str>(obj)) {
    s = obj.cast<std::string>();
  } else {
    s = as_str(obj);
    if (s.rfind("torch.", 0) == 0) {
      s = s.substr(6);
    } else {
      s = as_str(py::module_::import("numpy").attr("dtype")(obj).attr("name"));
    }
  }
  if (s == "float32" || s == "float") return DType::kFloat32;
  if (s == "float16" || s == "half") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  if (s == "int32") return DType::kInt32;
  if (s == "int64" || s == "long") return DType::kInt64;
  if (s == "uint8") return DType::kUInt8;
  throw TypeError("unsupported dtype '" + s +
                  "' (supported: float32, float16, bfloat16, int32, int64, uint8)");
}

Device parse_device(py::handle obj) {
  std::string s = as_str(obj);
  if (s == "cpu") return Device::cpu();
  if (s == "cuda") return Device::cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    try {
      std::size_t used = 0;
      int index = std::stoi(s.substr(5), &used);
      if (used == s.size() - 5 && index >= 0) return Device::cuda(index);
    } catch (const std::exception&) {
    }
  }
  throw ValueError("invalid device '" + s + "' (expected 'cpu', 'cuda' or 'cuda:N')");
}

void bind_tensor(py::module_& m) {
  py::class_<PyTensor>(m, "Tensor",
                       "A tensor owned by the core. Convert it with torch.from_dlpack() or "
                       "numpy.from_dlpack(); the memory stays alive while any view of it does.")
      .def_property_readonly("shape",
                             [](const PyTensor& t) {
                               const TensorView& v = t.tensor().view;
                               return py::tuple(py::cast(std::vector<std::int64_t>(
                                   v.shape(), v.shape() + v.dim())));
                             })
      .def_property_readonly("dtype",
                             [](const PyTensor& t) { return dtype_name(t.tensor().view.dtype()); })
      .def_property_readonly(
          "device", [](const PyTensor& t) { return device_name(t.tensor().view.device()); })
      .def_property_readonly("data_ptr",
                             [](const PyTensor& t) {
                               return reinterpret_cast<std::uintptr_t>(t.tensor().view.data());
                             })
      .def(
          "__dlpack__",
          [](const PyTensor& t, py::object /*stream*/, py::object max_version,
             py::object dl_device, py::object copy) {
            // Our buffers have no pending device work, so no stream synchronisation is needed.
            if (!copy.is_none() && copy.cast<bool>()) {
              throw py::buffer_error("aphrodite.Tensor cannot export a copy through DLPack");
            }
            if (!dl_device.is_none() &&
                !dl_device.equal(dlpack_device(t.tensor().view.device()))) {
              throw py::buffer_error("aphrodite.Tensor cannot export to another device");
            }
            bool versioned = !max_version.is_none() &&
                             max_version.cast<py::tuple>()[0].cast<int>() >= 1;
            return export_tensor(t.tensor(), versioned);
          },
          py::kw_only(), py::arg("stream") = py::none(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__",
           [](const PyTensor& t) { return dlpack_device(t.tensor().view.device()); })
      .def("__repr__", [](const PyTensor& t) {
        return "aphrodite._C.Tensor(" + t.tensor().view.describe() + ")";
      });

  m.def(
      "empty",
      [](const std::vector<std::int64_t>& shape, py::object dtype, py::object device) {
        OwnedTensor t = OwnedTensor::empty(static_cast<int>(shape.size()), shape.data(),
                                           parse_dtype(dtype), parse_device(device));
        return PyTensor(std::move(t));
      },
      py::arg("shape"), py::arg("dtype") = "float32", py::arg("device") = "cpu",
      "Allocates an uninitialised core-owned tensor (host or CUDA memory).");

  m.def(
      "tensor_info", [](py::handle obj) { return tensor_info(import_tensor(obj, "tensor")); },
      py::arg("tensor"),
      "How the core sees a tensor passed through DLPack: dtype, device, shape, strides (in "
      "elements), data pointer and contiguity. No copy is made.");

  m.def(
      "check_tensor",
      [](py::handle obj, const std::string& name, py::object dtypes, py::object device,
         py::object shape, bool contiguous, bool writable) {
        ImportedTensor imported = import_tensor(obj, name.c_str(), writable);
        const TensorView& v = imported.view();
        if (!dtypes.is_none()) {
          std::vector<DType> allowed;
          for (py::handle d : dtypes) allowed.push_back(parse_dtype(d));
          check_dtype(v, name.c_str(), allowed);
        }
        if (!device.is_none()) check_device(v, name.c_str(), parse_device(device));
        if (!shape.is_none()) {
          check_shape(v, name.c_str(), shape.cast<std::vector<std::int64_t>>());
        }
        if (contiguous) check_contiguous(v, name.c_str());
        return tensor_info(v);
      },
      py::arg("tensor"), py::arg("name") = "tensor", py::arg("dtypes") = py::none(),
      py::arg("device") = py::none(), py::arg("shape") = py::none(),
      py::arg("contiguous") = false, py::arg("writable") = false,
      "Validates a tensor the way every op validates its arguments (dtype, device, shape with -1 "
      "for any size, contiguity, writability for outputs) and returns tensor_info(); raises TypeError/ValueError naming "
      "the argument otherwise.");

  m.def("live_buffers", &Buffer::live_count,
        "Number of core-owned buffers alive in the process (for leak checks).");
}

}  // namespace aphrodite::bindings
