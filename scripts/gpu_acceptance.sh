#!/usr/bin/env bash
# GPU acceptance run (docs/benchmarks.md, "GPU acceptance") on an offline GPU machine whose
# Python has torch, timm and CUDA but lacks zsbir's pure-Python dependencies.
#
#   scripts/gpu_acceptance.sh --wheels DIR   # networked machine: wheels of what such an image lacks,
#                                            # at the versions installed here (the tested ones)
#   scripts/gpu_acceptance.sh OUT_DIR [...]  # GPU machine: install DIR=.whl if needed, run bench gpu
#
# Extra arguments after OUT_DIR go to `python -m zsbir.bench gpu` (e.g. --budget-s 400).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="hydra-core omegaconf antlr4-python3-runtime open_clip_torch ftfy wcwidth"

if [ "${1:-}" = "--wheels" ]; then
  dir="${2:?usage: scripts/gpu_acceptance.sh --wheels DIR}"
  mkdir -p "$dir"
  for name in $PACKAGES; do
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    # antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) exists only as a source archive: build its wheel
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" "$name==$version" \
      || python3 -m pip wheel --quiet --no-deps -w "$dir" "$name==$version"
  done
  ls "$dir"
  exit 0
fi

out="${1:?usage: scripts/gpu_acceptance.sh OUT_DIR [bench gpu arguments]}"
shift
if ! python3 -c "import hydra, open_clip" 2>/dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export ZSBIR_CACHE="${ZSBIR_CACHE:-/tmp/zsbir-cache}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -m zsbir.bench gpu --out "$out" "$@"
