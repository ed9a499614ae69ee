// DLPack bridge between Python objects and core tensors.
//
// Import: any object with __dlpack__ (torch tensors on CPU or CUDA, numpy arrays) or a raw
// "dltensor" capsule becomes an ImportedTensor: a TensorView over the producer's memory (no copy)
// that keeps the producer's DLManagedTensor alive and calls its deleter when destroyed.
// Export: a core-owned tensor (OwnedTensor) is wrapped in a capsule whose deleter drops our
// reference to the Buffer.
#pragma once

#include <pybind11/pybind11.h>

#include <initializer_list>
#include <optional>

#include "aphrodite/buffer.h"
#include "aphrodite/tensor.h"
#include "dlpack.h"

namespace aphrodite::bindings {

namespace py = pybind11;

class ImportedTensor {
 public:
  ImportedTensor() = default;
  ImportedTensor(ImportedTensor&& other) noexcept { *this = std::move(other); }
  ImportedTensor& operator=(ImportedTensor&& other) noexcept;
  ImportedTensor(const ImportedTensor&) = delete;
  ImportedTensor& operator=(const ImportedTensor&) = delete;
  ~ImportedTensor() { release(); }

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }  // NOLINT: used as a view in op calls
  bool read_only() const { return read_only_; }

 private:
  friend ImportedTensor import_tensor(py::handle obj, const char* name, bool writable);
  void release() noexcept;

  // The producer's DLManagedTensor or DLManagedTensorVersioned, released through `release_`.
  void* managed_ = nullptr;
  void (*release_)(void*) = nullptr;
  TensorView view_;
  bool read_only_ = false;
};

// Imports `obj`; `name` is the argument name used in error messages. With `writable`, a tensor
// its producer marked read-only (DLPack 1.x flag) is rejected.
ImportedTensor import_tensor(py::handle obj, const char* name, bool writable = false);

// Imports `obj` when it is not None.
std::optional<ImportedTensor> import_optional_tensor(py::handle obj, const char* name,
                                                     bool writable = false);

// A DLPack capsule over a core-owned tensor; the capsule keeps the buffer alive. `versioned`
// gives a DLPack 1.0 "dltensor_versioned" capsule (writable), else a legacy "dltensor" one.
py::capsule export_tensor(const OwnedTensor& tensor, bool versioned);

// (device_type, device_id) as __dlpack_device__ returns it.
py::tuple dlpack_device(Device device);

// Parses a dtype given as a string ("float32"), a numpy dtype or a torch dtype.
DType parse_dtype(py::handle obj);

// Parses "cpu", "cuda", "cuda:1" (or a torch.device).
Device parse_device(py::handle obj);

void bind_tensor(py::module_& m);

}  // namespace aphrodite::bindings
