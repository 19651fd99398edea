#!/usr/bin/env bash
# Installs every build, test and demo dependency from Debian packages (idempotent); extra package
# names given as arguments are installed too (scripts/fuzz.sh adds clang and its runtimes).
# Why each package is here: docs/design.md, "Dependencies".
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config clang-format
  nlohmann-json3-dev libcli11-dev libfmt-dev
  libopenblas-dev
  libopenmpi-dev openmpi-bin
  libgtest-dev
  libsentencepiece-dev
  fortunes
  python3 python3-numpy python3-venv
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi

# Python packages of the merge reference test (tests/merge/reference_merge.py): numpy and
# safetensors from PyPI in a venv at .venv of Debian's python (python3-venv is built for it).
repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_dir/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  /usr/bin/python3 -m venv "$venv"
fi
if "$venv/bin/python" -c "import numpy, safetensors" 2>/dev/null; then
  echo "setup: python packages present in $venv"
else
  echo "setup: installing numpy and safetensors into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check numpy safetensors
fi

# Header-only C++ libraries of the CUDA backend from PyPI wheels, without their Python
# dependencies, into .deps/<name>/include. Pinned so every machine builds the same; a VERSION file
# marks a finished install. install_wheel_headers NAME LABEL PACKAGE VERSION MARKER: pip installs
# PACKAGE==VERSION into .deps/NAME/wheel, then the function `NAME_headers` (defined below) moves
# the headers from there to .deps/NAME/include, and the rest of the wheel is removed. MARKER is a
# file under include/ that shows the headers are in place.
install_wheel_headers() {
  local name=$1 label=$2 package=$3 version=$4 marker=$5
  local dir="$repo_dir/.deps/$name"
  if [ -f "$dir/include/$marker" ] && grep -qx "$version" "$dir/VERSION" 2>/dev/null; then
    echo "setup: $label $version headers present"
    return
  fi
  echo "setup: installing $label $version headers into $dir"
  rm -rf "$dir"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --target "$dir/wheel" "$package==$version"
  "${name//-/_}_headers" "$dir/wheel" "$dir/include"
  rm -rf "$dir/wheel"
  echo "$version" > "$dir/VERSION"
}

# The cuDNN frontend (the attention's graph API): the wheel's include/.
cudnn_frontend_headers() { mv "$1/include" "$2"; }
install_wheel_headers cudnn-frontend "cuDNN frontend" nvidia-cudnn-frontend 1.32.0 cudnn_frontend.h

# CUTLASS (the experts' grouped GEMM on Hopper): the wheel carries the headers under
# cutlass_library/source: include/ and the utilities' tools/util/include/cutlass/util.
cutlass_headers() {
  mv "$1/cutlass_library/source/include" "$2"
  mv "$1/cutlass_library/source/tools/util/include/cutlass/util" "$2/cutlass/util"
}
install_wheel_headers cutlass CUTLASS nvidia-cutlass 4.2.0.0 cutlass/util/packed_stride.hpp
