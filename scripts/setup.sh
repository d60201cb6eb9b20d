#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a virtual environment in .venv with mpsearch, its
# test tools, torchao (for --format pt2e) and the cluster extras (ray[default], psycopg2), and where
# apt is available the Fashion-MNIST data package and PostgreSQL (for the live database tests).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision pinned to the newest releases mpsearch is tested with.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,all]"

# Debian packages: the data set, and a PostgreSQL server the tests start on a loopback port.
PACKAGES=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || PACKAGES+=(dataset-fashion-mnist)
command -v pg_ctl >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || PACKAGES+=(postgresql)
if [ ${#PACKAGES[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"; } >/dev/null 2>&1; then
    echo "setup: installed ${PACKAGES[*]} (apt)"
  else
    echo "setup: could not install ${PACKAGES[*]} with apt; mpsearch will try to download Fashion-MNIST, and the PostgreSQL tests will be skipped" >&2
  fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'))"
