#!/usr/bin/env bash
# megapre quickstart (README's main command). Until the pretraining program lands, the main job
# is the kernel benchmark: it builds megapre, checks the compiled kernels load, and prints our
# fused kernels against the torch eager ops they replace, on this machine (CPU if no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -r requirements-dev.txt
pip install --no-build-isolation -e .
python -c "import megapre.ops as o; print('megapre backend:', o.backend_info())"
device=cpu
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda
python benchmarks/bench_kernels.py --quick --device "$device"
