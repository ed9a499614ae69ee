// Exceptions thrown by the core. The Python bindings map them to Python exceptions:
// ValueError -> ValueError, TypeError -> TypeError, everything else -> RuntimeError.
#pragma once

#include <stdexcept>
#include <string>

namespace aphrodite {

// Base class of every error the core raises on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An argument has the wrong value, shape, layout or device.
class ValueError : public Error {
 public:
  using Error::Error;
};

// An argument has the wrong type (for tensors: the wrong dtype).
class TypeError : public Error {
 public:
  using Error::Error;
};

// A backend or device is missing or failed (no CUDA build, no driver, a CUDA error).
class DeviceError : public Error {
 public:
  using Error::Error;
};

}  // namespace aphrodite
