#!/usr/bin/env bash
# A whole GPU check in one call of the device tool, at most 6 minutes (a lent GPU machine gives 15
# minutes in all, its start-up and one rerun included). Each step has its own time limit:
#   1. (100 s) the kernel property tests compiled for the GPU: tests/test_lora.py and
#      tests/test_strategy.py with PEFT_OPS_TEST_DEVICE=cuda (bf16 / fp16 / fp32 on the tensor
#      cores, every strategy pinned in turn);
#   2. (190 s) the benchmark suite on the GPU shapes, with its time budget, which also writes the
#      static model's prediction beside every measured case and their ratio (the calibration:
#      metrics predicted_time and measured_over_predicted in results.csv);
#   3. (40 s) the tiny-Llama example, 30 steps a variant;
#   and beside them, in the background on two host cores (no wall time added), the CPU path's quick
#   bench on this host's CPU, with the GPU hidden: its CPU model and ISA are recorded, and these
#   hosts may have the AVX512-BF16 / AMX units that CI's CPU has and no development machine has.
# It leaves at most 8 files under $OUT: gpu_tests.log, bench.log, bench/results.csv,
# bench/summary.txt, example.log, example/summary.csv, cpu/results.csv, cpu/summary.txt (plots are
# drawn afterwards from the CSV with `python -m bench.plot`). Commit $OUT/bench as
# bench/results/<gpu>-<date>/ and $OUT/cpu as bench/results/cpu-<host>-<date>/.
#
# The GPU image has torch, triton, pytest, hypothesis, peft and transformers but no network and no
# bitsandbytes: carry its wheel in .whl/ and name .whl in `carry`; without it the bench leaves out
# the PEFT + bitsandbytes baseline and says so.
#   device run:  bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)

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
pin=()
command -v taskset >/dev/null && [ "$(nproc)" -ge 8 ] && pin=(taskset -c 2,3)
( CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout 150 ${pin[@]+"${pin[@]}"} python3 -m bench --quick --no-model --no-memory \
    --no-plots --out "$OUT/cpu" > /dev/null 2>&1 ) &
cpu_bench=$!
TRITON_INTERPRET=0 PEFT_OPS_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_lora.py tests/test_strategy.py 2>&1 | tail -n 40 >> "$OUT/gpu_tests.log" || status=1
timeout 190 python3 -m bench --no-plots --budget-s 150 --out "$OUT/bench" 2>&1 | tail -n 80 > "$OUT/bench.log" \
    || status=1
variants=()
python3 -c "import bitsandbytes" 2>/dev/null || variants=(--variants peft_ops-qlora peft_ops-qdora)
timeout 40 python3 examples/train_tiny_llama.py --steps 30 --out "$OUT/example" "${variants[@]}" 2>&1 \
    | tail -n 20 > "$OUT/example.log" || status=1
wait "$cpu_bench" || echo "gpu_session: the CPU quick bench failed or ran out of time" >> "$OUT/bench.log"
echo "gpu_session: $(( $(date +%s) - start )) s, status $status" | tee -a "$OUT/bench.log"
exit $status
