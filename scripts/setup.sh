#!/usr/bin/env bash
# Creates .venv (idempotently) with torch, edgeft and its dev extras, and the ONNX Runtime training build.
# torch comes first and as the CPU build where no NVIDIA GPU is present: an unpinned `torch` from PyPI
# pulls several GB of CUDA wheels. A stamp file skips all of this when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
STAMP="$VENV/.edgeft-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"

install_runtime() {
  # onnxruntime-training 1.19.2 has no Linux aarch64 wheel (Raspberry Pi, Jetson): there, train with --backend torch.
  if [[ "$(uname -s)" == "Linux" && "$(uname -m)" =~ ^(aarch64|arm64)$ ]]; then
    echo "setup: no ONNX Runtime training wheel for Linux $(uname -m); edgeft will train with --backend torch"
    return 0
  fi
  "$VENV/bin/edgeft" runtime path >/dev/null || "$VENV/bin/edgeft" runtime install
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/edgeft" ]]; then
  install_runtime
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  PY=""
  for cand in python3.12 python3.11 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(not ((3,10) <= sys.version_info[:2] <= (3,12)))' 2>/dev/null; then
      PY="$cand"; break
    fi
  done
  [[ -n "$PY" ]] || { echo "error: edgeft needs Python 3.10-3.12 (onnxruntime-training 1.19.2 has no wheels for newer)" >&2; exit 2; }
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: torch==$TORCH_VERSION with CUDA"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    echo "setup: no NVIDIA GPU: torch==$TORCH_VERSION CPU build"
    "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
  fi
fi

echo "setup: installing edgeft with the dev, fleet, distributed, serve, data and trackers extras"
DS_BUILD_OPS=0 "${PIP[@]}" install -e ".[dev,fleet,distributed,serve,data,trackers]"
# DeepSpeed compiles its shared-memory collective for CPU ranks on first use (about 3 min, cached under
# ~/.cache/torch_extensions): once here, not in the first distributed run
"$VENV/bin/python" -c "import deepspeed.comm.torch as c; c.build_shm_op()" >/dev/null 2>&1 \
  || echo "setup: DeepSpeed's shared-memory op was not built (no C++ compiler?); zero2/zero3 build it on first use"
echo "setup: installing the ONNX Runtime training build"
install_runtime
echo "$WANT" > "$STAMP"
echo "setup: done ($VENV)"
