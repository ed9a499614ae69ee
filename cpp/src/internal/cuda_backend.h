// Internal bridge between the core and the CUDA backend in cuda/. Only compiled when the core is
// built with APHRODITE_WITH_CUDA.
#pragma once

#include "aphrodite/backend.h"

namespace aphrodite::detail {

// The process-wide CUDA backend, defined in cuda/cuda_backend.cu.
Backend& cuda_backend();

}  // namespace aphrodite::detail
