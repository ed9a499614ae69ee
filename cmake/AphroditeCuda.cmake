# Decides whether the CUDA backend is built (APHRODITE_CUDA=AUTO|ON|OFF) and sets it up:
# the architectures from APHRODITE_CUDA_ARCHS and the static CUDA runtime, so that the library
# and `import aphrodite` work on machines without a GPU driver.
set(APHRODITE_WITH_CUDA OFF)
set(APHRODITE_CUDA_ARCHS_USED "")
string(TOUPPER "${APHRODITE_CUDA}" _aphrodite_cuda_mode)

if(NOT _aphrodite_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "APHRODITE_CUDA must be AUTO, ON or OFF (got '${APHRODITE_CUDA}')")
endif()

if(NOT _aphrodite_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(APHRODITE_WITH_CUDA ON)
  elseif(_aphrodite_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR
      "APHRODITE_CUDA=ON but no CUDA compiler was found. Install the CUDA toolkit and put nvcc on "
      "PATH (or set CMAKE_CUDA_COMPILER), or configure with APHRODITE_CUDA=OFF or AUTO.")
  else()
    message(STATUS "aphrodite: no CUDA compiler found, building the CPU backend only")
  endif()
endif()

if(APHRODITE_WITH_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES "${APHRODITE_CUDA_ARCHS}")
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(APHRODITE_CUDA_ARCHS_USED "${APHRODITE_CUDA_ARCHS}")
endif()
