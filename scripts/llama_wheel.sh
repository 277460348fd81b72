#!/usr/bin/env bash
# Build llama-cpp-python once into a local wheelhouse and print the wheel's path.
#
#   scripts/llama_wheel.sh VERSION        # e.g. 0.3.36
#
# pip compiles llama.cpp from source for this machine's CPU (-march=native). Some virtual
# machines advertise Intel AMX but fault on its first instruction (`ldtilecfg`: every
# batched decode segfaults), so on x86_64 the build leaves AMX out; AVX-512 and the rest
# stay. pip's own wheel cache does not key on compiler flags, so the wheel is kept in
# $TANDEM_WHEELHOUSE (default ~/.cache/tandem/wheels), in a folder named after the flags.
set -euo pipefail
VERSION="$1"
PY="${PYTHON:-python3}"
FLAGS=""
if [[ "$(uname -m)" == "x86_64" ]]; then
  FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
TAG="$(printf '%s' "$VERSION $FLAGS" | sha256sum | cut -c1-12)"
HOUSE="${TANDEM_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/wheels}/$TAG"
wheel="$(ls "$HOUSE"/llama_cpp_python-"$VERSION"-*.whl 2> /dev/null | head -1 || true)"
if [[ -z "$wheel" ]]; then
  mkdir -p "$HOUSE"
  echo "building llama-cpp-python $VERSION (about 6 minutes on 2 cores, once)" >&2
  CFLAGS="${CFLAGS:-} $FLAGS" CXXFLAGS="${CXXFLAGS:-} $FLAGS" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$HOUSE" "llama-cpp-python==$VERSION" >&2
  wheel="$(ls "$HOUSE"/llama_cpp_python-"$VERSION"-*.whl | head -1)"
fi
echo "$wheel"
