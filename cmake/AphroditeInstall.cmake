# Installs the core library, its public headers and a CMake package config, so that other
# projects can `find_package(Aphrodite CONFIG REQUIRED)` and link `aphrodite::core`. The wheel
# built by pip installs only the Python component (pyproject.toml: install.components).

# Guard: the core library stays free of Python, pybind11 and torch.
foreach(_target aphrodite_core aphrodite_cuda_kernels)
  if(TARGET ${_target})
    foreach(_prop LINK_LIBRARIES INTERFACE_LINK_LIBRARIES)
      get_target_property(_libs ${_target} ${_prop})
      if(_libs AND "${_libs}" MATCHES "pybind11|Python|torch")
        message(FATAL_ERROR "${_target} must not depend on Python, pybind11 or torch: ${_libs}")
      endif()
    endforeach()
  endif()
endforeach()

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(APHRODITE_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/Aphrodite")
set(_export_targets aphrodite_core)
if(APHRODITE_WITH_CUDA)
  list(APPEND _export_targets aphrodite_cuda_kernels)
endif()
set_target_properties(aphrodite_core PROPERTIES EXPORT_NAME core)
if(TARGET aphrodite_cuda_kernels)
  set_target_properties(aphrodite_cuda_kernels PROPERTIES EXPORT_NAME cuda_kernels)
endif()

install(TARGETS ${_export_targets}
  EXPORT AphroditeTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT cpp
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT cpp
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/cpp/include/aphrodite
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT cpp)
install(EXPORT AphroditeTargets
  NAMESPACE aphrodite::
  DESTINATION ${APHRODITE_INSTALL_CMAKEDIR} COMPONENT cpp)

configure_package_config_file(
  ${PROJECT_SOURCE_DIR}/cmake/AphroditeConfig.cmake.in
  ${PROJECT_BINARY_DIR}/AphroditeConfig.cmake
  INSTALL_DESTINATION ${APHRODITE_INSTALL_CMAKEDIR})
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/AphroditeConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${PROJECT_BINARY_DIR}/AphroditeConfig.cmake
  ${PROJECT_BINARY_DIR}/AphroditeConfigVersion.cmake
  DESTINATION ${APHRODITE_INSTALL_CMAKEDIR} COMPONENT cpp)
