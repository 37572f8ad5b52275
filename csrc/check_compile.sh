#!/usr/bin/env bash
# Compile-check csrc/ without a GPU (nvcc + g++; nothing runs, CI does not use this).
#
#   csrc/check_compile.sh            # every .cu with setup.py's nvcc flags, then a link check
#   csrc/check_compile.sh --cpp      # also the torch binding (about a minute: torch headers)
#
# The .cu files include only CUDA headers. The binding needs torch's c10/cuda headers; a CPU wheel
# ships them except the generated c10/cuda/impl/cuda_cmake_macros.h, which is stubbed here.
# -expt-relaxed-constexpr is left out on purpose: device code must not call host constexpr functions.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
arch=${R1CORE_CUDA_ARCH:-90}
nv=(-std=c++20 -O3 --use_fast_math -lineinfo "-gencode=arch=compute_${arch},code=sm_${arch}" -Icsrc -Xcompiler -fPIC
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
    -D__CUDA_NO_HALF2_OPERATORS__ -Xptxas -warn-spills)
objs=()
for f in $(find csrc -name '*.cu' | sort); do
  o="$out/$(echo "$f" | tr / _).o"
  echo "nvcc $f"
  nvcc -c "${nv[@]}" "$f" -o "$o"
  objs+=("$o")
done
if [[ "${1:-}" == "--cpp" ]]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  echo '#pragma once' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  torch_inc=$(python -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')
  echo "g++ csrc/r1core_ext.cpp"
  # shellcheck disable=SC2086
  g++ -c -fPIC -O1 -std=c++20 -Wall -Icsrc -I"$out/stub" $torch_inc -I"$cuda_home/include" \
      $(python3-config --includes) -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
      csrc/r1core_ext.cpp -o "$out/ext.o"
  objs+=("$out/ext.o")
  g++ -shared -o "$out/_C.so" "${objs[@]}" -L"$cuda_home/lib64" -lcudart
  if nm -C -u "$out/_C.so" | grep r1core; then echo "unresolved r1core symbols" >&2; exit 1; fi
  echo "linked: every r1core symbol the binding uses is defined"
fi
echo ok
