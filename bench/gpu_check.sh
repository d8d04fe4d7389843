#!/usr/bin/env bash
# The device check in one command (README, "Running on a GPU"): install d2v2 under the machine's own
# torch and triton (never pinned here), bring the missing packages from the wheels that
# bench/fetch_wheels.sh put in .whl/, then run every stage of `d2v2 bench gpu-check` (bench/gpu_check.py).
# Usage: bench/gpu_check.sh OUT_DIR [--dry-run]    (PYTHON=... picks the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_check.sh OUT_DIR [--dry-run]}"
shift
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# `python -m` from the repository root must not put the root on sys.path: its top-level folders would shadow
# installed packages of the same names (Python 3.11+; README, "Run the tests").
export PYTHONSAFEPATH=1

if ! "$py" -c 'import soundfile, espeakng_loader' 2>/dev/null; then
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheels=(.whl/any/*.whl .whl/"$tag"/*.whl)
  if [ -e "${wheels[0]}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/d2v2-wheels "${wheels[@]}" \
      && export PYTHONPATH="/tmp/d2v2-wheels${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: no wheels for $tag in .whl/ (run bench/fetch_wheels.sh where the registry is reachable); audio will fail" >&2
  fi
fi

if ! "$py" -c 'import d2v2.bench.gpu_check' 2>/dev/null; then
  # --no-deps: the machine's torch and triton stay; --no-build-isolation: no network for setuptools.
  if ! "$py" -m pip install -q --no-deps --no-build-isolation -e . ; then
    # Fallback: the package_dir mapping by hand (d2v2.<folder> -> <folder>/), as an implicit namespace.
    mkdir -p /tmp/d2v2-src/d2v2
    for folder in kernels models engine bench; do ln -sfn "$PWD/$folder" "/tmp/d2v2-src/d2v2/$folder"; done
    export PYTHONPATH="/tmp/d2v2-src${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$py" -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.cuda.is_available())'
exec "$py" -m d2v2.bench.cli gpu-check --out "$out" "$@"
