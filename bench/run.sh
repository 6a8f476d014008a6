#!/usr/bin/env bash
# The main job, from a fresh machine: install what is missing, run the benchmark suite on its
# built-in shapes, then train the built-in tiny Llama (QLoRA and QDoRA beside PEFT + bitsandbytes).
# On a CPU-only machine the suite runs its CPU part and prints what needs a GPU.
#   bash bench/run.sh [python -m bench options, e.g. --quick]
# --quick also shortens the example to a few steps. Results go to bench/out/ and examples/out/
# (git-ignored); `--out bench/results/<name>` writes the bench's where results are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# Only what is missing is installed (pyproject's dependencies and its `bench` extra); a package
# that is already there is kept as it is, never upgraded, even when older than pyproject asks
# (that is said on stderr). torch and triton are pinned: this torch takes the CPU wheel, and a
# machine that has torch already (a GPU machine with its CUDA build) keeps its own.
missing() {
    python - "$1" <<'PY'
import importlib.metadata as md
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # packaging comes with the extras; pip always has its own
    from pip._vendor.packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
specs = project["dependencies"] if sys.argv[1] == "core" else project["optional-dependencies"]["bench"]
pins = {"torch": "torch==2.13.0", "triton": "triton==3.9.0"}
for spec in specs:
    req = Requirement(spec)
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        print(pins.get(req.name, spec))
        continue
    if not req.specifier.contains(have, prereleases=True):
        print(f"bench/run.sh: keeping {req.name} {have} (pyproject asks {spec})", file=sys.stderr)
PY
}

installed=()
core=$(missing core)
if [[ -n $core ]]; then
    # shellcheck disable=SC2086  # one word per requirement
    python -m pip install -qq $core
    installed+=($core)
fi
extras=$(missing bench)
if [[ -n $extras ]]; then
    # shellcheck disable=SC2086
    if python -m pip install -qq --retries 1 --timeout 15 $extras; then
        installed+=($extras)
    else   # e.g. a GPU machine without network: the bench says which providers it left out
        echo "bench/run.sh: could not install $extras; the bench runs without them" >&2
    fi
fi
# peft_ops itself, when this checkout is not what `import peft_ops` finds outside the repository.
here=$(pwd -P)
if ! (cd / && python -c "import os, sys, peft_ops
sys.exit(not os.path.realpath(peft_ops.__file__).startswith(sys.argv[1] + os.sep))" "$here") 2>/dev/null; then
    python -m pip install -qq --no-deps -e . 2>/dev/null \
        || python -m pip install -qq --no-deps --no-build-isolation -e .   # offline: this setuptools
    installed+=("peft_ops (editable)")
fi
echo "bench/run.sh: installed ${installed[*]:-nothing (everything needed was there)}"

quick=0
for arg in "$@"; do
    [[ $arg == --quick ]] && quick=1
done

python -m bench "$@"

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    steps=(--steps 300)
    ((quick)) && steps=(--steps 30)
else
    steps=(--steps 20)
    ((quick)) && steps=(--steps 3 --warmup 1)
fi
python examples/train_tiny_llama.py "${steps[@]}"
