#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a virtual environment in .venv with mpsearch, its
# test tools and torchao (for --format pt2e), and the Fashion-MNIST data package where apt is available. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision pinned to the newest releases mpsearch is tested with.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,pt2e]"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "setup: installed Fashion-MNIST (Debian package dataset-fashion-mnist)"
  else
    echo "setup: could not install dataset-fashion-mnist with apt; mpsearch will try to download Fashion-MNIST" >&2
  fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'))"
