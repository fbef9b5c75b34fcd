# NVSHMEM from the nvidia-nvshmem-cu13 wheel (host library, device library, headers).
#
# JAX_EP_NVSHMEM: OFF (default) skips it; AUTO uses it when found; ON requires it.
# The root is NVSHMEM_ROOT (-D or environment), else NVSHMEM_HOME, else the wheel's
# nvidia/nvshmem directory as seen by ${Python_EXECUTABLE}.
#
# The wheel ships lib/libnvshmem_host.so.3 without an unversioned symlink, so the host
# library is linked by its full path. lib/libnvshmem_device.a holds relocatable device
# code: a target using it needs CUDA_SEPARABLE_COMPILATION and a device-link step
# (CUDA_RESOLVE_DEVICE_SYMBOLS), which jax_ep_link_nvshmem() sets. Host and device parts
# must come from the same NVSHMEM release as the one loaded at run time.
#
# Sets NVSHMEM_FOUND, NVSHMEM_INCLUDE_DIR, NVSHMEM_LIB_DIR, NVSHMEM_HOST_LIBRARY,
# NVSHMEM_DEVICE_LIBRARY.
set(NVSHMEM_FOUND FALSE)
if(JAX_EP_NVSHMEM STREQUAL "OFF")
  return()
endif()

if(NOT NVSHMEM_ROOT)
  if(DEFINED ENV{NVSHMEM_ROOT})
    set(NVSHMEM_ROOT "$ENV{NVSHMEM_ROOT}")
  elseif(DEFINED ENV{NVSHMEM_HOME})
    set(NVSHMEM_ROOT "$ENV{NVSHMEM_HOME}")
  else()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c [=[
import os, sys
try:
    import nvidia.nvshmem as m
    print(list(m.__path__)[0])
except ImportError:
    for p in sys.path:
        d = os.path.join(p, "nvidia", "nvshmem")
        if os.path.isdir(d):
            print(d)
            break
]=]
      OUTPUT_VARIABLE NVSHMEM_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
endif()

find_path(NVSHMEM_INCLUDE_DIR nvshmem.h HINTS "${NVSHMEM_ROOT}/include" NO_DEFAULT_PATH)
find_library(NVSHMEM_DEVICE_LIBRARY libnvshmem_device.a HINTS "${NVSHMEM_ROOT}/lib" NO_DEFAULT_PATH)
file(GLOB _nvshmem_host "${NVSHMEM_ROOT}/lib/libnvshmem_host.so.[0-9]*")
list(SORT _nvshmem_host)
list(POP_FRONT _nvshmem_host NVSHMEM_HOST_LIBRARY)

if(NVSHMEM_INCLUDE_DIR AND NVSHMEM_DEVICE_LIBRARY AND NVSHMEM_HOST_LIBRARY)
  set(NVSHMEM_FOUND TRUE)
  get_filename_component(NVSHMEM_LIB_DIR "${NVSHMEM_HOST_LIBRARY}" DIRECTORY)
  message(STATUS "jax_ep: NVSHMEM: ${NVSHMEM_ROOT} (${NVSHMEM_HOST_LIBRARY})")
elseif(JAX_EP_NVSHMEM STREQUAL "ON")
  message(FATAL_ERROR "jax_ep: JAX_EP_NVSHMEM=ON but NVSHMEM was not found under "
    "'${NVSHMEM_ROOT}' (install nvidia-nvshmem-cu13 or set NVSHMEM_ROOT)")
else()
  message(STATUS "jax_ep: NVSHMEM not found; building without it")
  return()
endif()

function(jax_ep_link_nvshmem target)
  set_target_properties(${target} PROPERTIES
    CUDA_SEPARABLE_COMPILATION ON
    CUDA_RESOLVE_DEVICE_SYMBOLS ON)
  target_include_directories(${target} PRIVATE "${NVSHMEM_INCLUDE_DIR}")
  target_compile_definitions(${target} PRIVATE JAX_EP_WITH_NVSHMEM=1)
  target_link_libraries(${target} PRIVATE "${NVSHMEM_DEVICE_LIBRARY}" "${NVSHMEM_HOST_LIBRARY}")
  # site-packages/jax_ep/_ext.so finds site-packages/nvidia/nvshmem/lib; the absolute
  # directory covers builds against an NVSHMEM outside the wheel.
  set_property(TARGET ${target} APPEND PROPERTY INSTALL_RPATH
    "$ORIGIN/../nvidia/nvshmem/lib" "${NVSHMEM_LIB_DIR}")
endfunction()
