#!/usr/bin/env bash
# Builds the wheel of llama-cpp-python (the embedded local model's runtime) once, portably, and
# prints its path. PyPI has no Linux binary wheel of it, so it is compiled from source.
#
# Portable means: never compiled for the build machine's CPU. llama.cpp's default
# (GGML_NATIVE=ON, -march=native) emits whatever the build CPU has — AVX-512, AMX — and the
# result crashes with a general protection fault on a CPU (or a VM) without them. We build for
# a fixed baseline instead:
#   x86-64: AVX, AVX2, FMA, F16C (x86-64-v3: every x86-64 server CPU since 2015); no AVX-512/AMX.
#   arm64:  the compiler's generic armv8-a target (NEON), no native tuning.
# The wheel is kept under var/wheels/<key>/, the key a hash of the version *and* the flags, so a
# wheel built with other flags (e.g. an old native one) is never reused; pip's own wheel cache is
# bypassed for the same reason (it would silently hand back a cached native build).
set -euo pipefail
python=${1:?usage: build-llama.sh PYTHON}
version=0.3.36
case "$(uname -m)" in
  x86_64|amd64)
    flags="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  aarch64|arm64)
    flags="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF" ;;
  *)
    flags="-DGGML_NATIVE=OFF" ;;
esac
# OpenMP is off: the server runs one request at a time with its own thread count, and the
# system libgomp would otherwise become a runtime dependency of the wheel.
flags="$flags -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF"
key=$(printf '%s %s %s' "$version" "$(uname -m)" "$flags" | sha256sum | cut -c1-16)
dir=var/wheels/llama-$version-$key
wheel=$(ls "$dir"/llama_cpp_python-$version-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "Building llama-cpp-python $version from source, portable flags (first install only, ~5 minutes)..." >&2
  mkdir -p "$dir"
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) FORCE_CMAKE=1 \
    "$python" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    "llama-cpp-python==$version" -w "$dir" >&2
  wheel=$(ls "$dir"/llama_cpp_python-$version-*.whl | head -n 1)
  printf '%s\n' "$flags" > "$dir/FLAGS"
fi
printf '%s\n' "$wheel"
