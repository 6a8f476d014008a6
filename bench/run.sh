#!/usr/bin/env bash
# The main job, from a fresh machine: install what is missing, run the benchmark suite on its
# built-in shapes, then train the built-in tiny Llama (QLoRA and QDoRA beside PEFT + bitsandbytes).
# On a CPU-only machine the suite runs its CPU part and prints what needs a GPU.
#   bash bench/run.sh [python -m bench options, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."

# torch with this exact pin takes the CPU wheel; a machine that already has torch (a GPU machine
# with its CUDA build) keeps it.
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -c "import triton" 2>/dev/null || python -m pip install triton==3.9.0
# A GPU machine without network keeps what it has and installs only this package.
python -m pip install -e ".[bench]" || python -m pip install --no-deps --no-build-isolation -e .

python -m bench "$@"

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    python examples/train_tiny_llama.py --steps 300
else
    python examples/train_tiny_llama.py --steps 20
fi
