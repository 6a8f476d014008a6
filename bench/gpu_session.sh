#!/usr/bin/env bash
# Everything a session lent a GPU machine should run, in one call of the device tool:
#   1. the kernel property tests compiled for the GPU (bf16 / fp16 / fp32 on the tensor cores),
#   2. the full benchmark suite, 3. the tiny-Llama example (300 steps, tokens/s, peak memory).
# Logs, the results CSV and summaries land in $OUT (the device tool brings back at most 8 files,
# two folders deep: plots are redrawn afterwards from the CSV with `python -m bench.plot`).
#
# The GPU image has torch, triton, pytest, hypothesis, peft and transformers but no network and no
# bitsandbytes: carry its wheel (the device tool's README shows how) in .whl/ and name .whl in
# `carry`; without it the bench leaves out the PEFT + bitsandbytes baseline and says so.
#   device run:  bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed" >&2; exit 1; }
python3 - <<'PY' | tee "$OUT/gpu_tests.log"
import datetime, torch, triton
print(f"{datetime.date.today()} torch {torch.__version__} triton {triton.__version__} "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY

status=0
TRITON_INTERPRET=0 PEFT_OPS_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -x tests/test_lora.py \
    2>&1 | tee -a "$OUT/gpu_tests.log" || status=1
timeout 600 python3 -m bench --no-plots --out "$OUT/bench" 2>&1 | tail -n 80 > "$OUT/bench.log" || status=1
variants=()
python3 -c "import bitsandbytes" 2>/dev/null || variants=(--variants peft_ops-qlora peft_ops-qdora)
timeout 300 python3 examples/train_tiny_llama.py --steps 300 --out "$OUT/example" "${variants[@]}" 2>&1 \
    | tail -n 20 > "$OUT/example.log" || status=1
exit $status
