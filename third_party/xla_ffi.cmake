# XLA FFI headers (xla/ffi/api/ffi.h), shipped inside the jaxlib wheel.
# Sets XLA_FFI_INCLUDE_DIR, asked from the Python that builds the package so the headers
# match the jaxlib the extension will be loaded into. Pass -DXLA_FFI_INCLUDE_DIR=... to
# override.
if(NOT XLA_FFI_INCLUDE_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
    OUTPUT_VARIABLE _xla_ffi_dir OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _xla_ffi_rc ERROR_QUIET)
  if(_xla_ffi_rc EQUAL 0 AND EXISTS "${_xla_ffi_dir}/xla/ffi/api/ffi.h")
    set(XLA_FFI_INCLUDE_DIR "${_xla_ffi_dir}")
  endif()
endif()
if(XLA_FFI_INCLUDE_DIR)
  message(STATUS "jax_ep: XLA FFI headers: ${XLA_FFI_INCLUDE_DIR}")
endif()
