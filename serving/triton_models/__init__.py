"""Python-backend model files copied into exported repositories; they import `triton_python_backend_utils`,
which only the Triton server provides, so nothing here is imported by the toolchain itself."""
