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

# cuDNN frontend C++ headers (header-only; the CUDA backend's attention) from PyPI, without its
# Python dependencies, into .deps/cudnn-frontend/include. Pinned so every machine builds the same.
cudnn_frontend_version=1.32.0
cudnn_frontend_dir="$repo_dir/.deps/cudnn-frontend"
if [ -f "$cudnn_frontend_dir/include/cudnn_frontend.h" ] &&
  grep -qx "$cudnn_frontend_version" "$cudnn_frontend_dir/VERSION" 2>/dev/null; then
  echo "setup: cuDNN frontend $cudnn_frontend_version headers present"
else
  echo "setup: installing cuDNN frontend $cudnn_frontend_version headers into $cudnn_frontend_dir"
  rm -rf "$cudnn_frontend_dir"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --target "$cudnn_frontend_dir" "nvidia-cudnn-frontend==$cudnn_frontend_version"
  # Only the headers are used; the Python module next to them is not.
  find "$cudnn_frontend_dir" -mindepth 1 -maxdepth 1 ! -name include -exec rm -rf {} +
  echo "$cudnn_frontend_version" > "$cudnn_frontend_dir/VERSION"
fi

# CUTLASS C++ headers (header-only; the CUDA backend's grouped GEMM for the experts on Hopper) from
# PyPI's nvidia-cutlass wheel, which carries them under cutlass_library/source: include/ and the
# utilities' tools/util/include/cutlass/util, merged into .deps/cutlass/include; nothing else of the
# wheel is kept. Pinned like the cuDNN frontend.
cutlass_version=4.2.0.0
cutlass_dir="$repo_dir/.deps/cutlass"
if [ -f "$cutlass_dir/include/cutlass/util/packed_stride.hpp" ] &&
  grep -qx "$cutlass_version" "$cutlass_dir/VERSION" 2>/dev/null; then
  echo "setup: CUTLASS $cutlass_version headers present"
else
  echo "setup: installing CUTLASS $cutlass_version headers into $cutlass_dir"
  rm -rf "$cutlass_dir"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --target "$cutlass_dir/wheel" "nvidia-cutlass==$cutlass_version"
  mv "$cutlass_dir/wheel/cutlass_library/source/include" "$cutlass_dir/include"
  mv "$cutlass_dir/wheel/cutlass_library/source/tools/util/include/cutlass/util" \
    "$cutlass_dir/include/cutlass/util"
  rm -rf "$cutlass_dir/wheel"
  echo "$cutlass_version" > "$cutlass_dir/VERSION"
fi
