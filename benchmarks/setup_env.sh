#!/usr/bin/env bash
# Create the benchmark venv (.bench-venv, gitignored) with advguard and its peers
# (torchattacks, adversarial-robustness-toolbox), separate from the project's .venv.
#
#   bash benchmarks/setup_env.sh            # creates /work/main/.bench-venv (repo root/.bench-venv)
#   BENCH_VENV=/tmp/bv bash benchmarks/setup_env.sh
#
# Every pip call passes -c constraints.txt: it pins torch==2.13.0, the local CPU wheel.
# Any other torch request would pull gigabytes of CUDA packages.
#
# torchattacks 3.5.1 declares a dependency on torchvision, which has no CPU build here.
# It is installed with --no-deps plus its real runtime dependencies (scipy, tqdm, requests);
# `import torchattacks` needs no torchvision (only its dataset/model helpers in
# torchattacks.wrappers do, which the benchmark never imports).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.bench-venv}"
CONSTRAINTS="$ROOT/constraints.txt"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -c "$CONSTRAINTS")

"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e "$ROOT"
# peers
"${PIP[@]}" --no-deps torchattacks==3.5.1
"${PIP[@]}" scipy tqdm requests
"${PIP[@]}" adversarial-robustness-toolbox==1.20.1

# torch must still be the pinned CPU wheel, and no torchvision may have slipped in
"$VENV/bin/python" - <<'EOF'
import importlib.util
import sys

import torch

assert torch.__version__.startswith("2.13.0"), torch.__version__
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision got installed into the bench venv; remove it")

import advguard  # noqa: F401
import torchattacks
from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch  # noqa: F401
from art.estimators.classification import PyTorchClassifier  # noqa: F401
import art

print(f"ok: torch {torch.__version__}, torchattacks {torchattacks.__version__}, art {art.__version__}")
EOF
