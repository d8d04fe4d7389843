#!/usr/bin/env bash
# Download, on a machine that reaches the package registry, the wheels the GPU machine's image lacks
# (it has torch, triton, numpy, PyYAML, tqdm, Pillow, tokenizers, safetensors, scikit-learn,
# matplotlib and pytest, but no soundfile or espeakng-loader, and no network): wheels for any Python
# 3 into .whl/any/, compiled ones into .whl/cp3XX/ for each Python version, since the image's Python
# may change (3.12 when last seen). .whl/ is ignored by git; the device call names it in `carry`, and
# bench/gpu_check.sh installs .whl/any plus the folder of its interpreter.
# Usage: bench/fetch_wheels.sh [PYTHON_VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."

# soundfile's own needs (cffi, which needs pycparser) are missing there too; numpy is not.
WHEELS=(soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 espeakng-loader==0.2.4)
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.10 3.11 3.12 3.13)

PLATFORMS=()
for n in 17 24 27 28 31 34 35 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)

for version in "${VERSIONS[@]}"; do
  dest=".whl/cp${version/./}"
  mkdir -p "$dest"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$version" "${PLATFORMS[@]}" --dest "$dest" "${WHEELS[@]}"
  mkdir -p .whl/any
  for wheel in "$dest"/*-py3-none-*.whl "$dest"/*-py2.py3-none-*.whl; do
    [ -e "$wheel" ] && mv -f "$wheel" .whl/any/
  done
  echo "$dest: $(ls "$dest" | tr '\n' ' ')"
done
echo ".whl/any: $(ls .whl/any | tr '\n' ' ')"
du -sh .whl
