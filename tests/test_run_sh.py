"""`bash bench/run.sh` and the example it runs: --quick reaches the example, nothing installed is
upgraded, the example reports every step, and results go to git-ignored folders by default.

run.sh runs under a stand-in `python` that records the bench, example and pip commands instead of
running them (the bench and the example take minutes; pip would touch the environment) and hands
everything else (its own checks of what is installed) to the real interpreter.
"""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_tiny_llama.py"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh is a bash script")


def _run_sh(tmp_path, *args):
    log = tmp_path / "commands.log"
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f"""#!/bin/sh
case "$1 $2" in
    "-m bench"*|"-m pip"*|examples/*) echo "$*" >> {str(log)!r}; exit 0 ;;
esac
exec {sys.executable!r} "$@"
""")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(ROOT / "bench" / "run.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, log.read_text().splitlines()


def test_quick_reaches_the_example_and_pip_upgrades_nothing(tmp_path):
    stdout, commands = _run_sh(tmp_path, "--quick", "--no-plots")
    assert "-m bench --quick --no-plots" in commands
    quick = "--steps 30" if torch.cuda.is_available() else "--steps 3 --warmup 1"
    assert f"examples/train_tiny_llama.py {quick}" in commands
    for command in commands:
        if command.startswith("-m pip"):   # only what is missing, quietly, never an upgrade
            assert command.startswith("-m pip install -qq ") and not {"-U", "--upgrade"} & set(command.split())
    installed = [line for line in stdout.splitlines() if line.startswith("bench/run.sh: installed ")]
    assert len(installed) == 1, stdout


def test_default_results_folders_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository's .git")
    # The bench's default, from a fresh interpreter in the root (bench is not importable here).
    code = "from bench.suite import default_out_dir; print(default_out_dir('cpu'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    example = runpy.run_path(str(EXAMPLE), run_name="example")
    for folder in (Path(done.stdout.strip().splitlines()[-1]), Path(example["default_out_dir"]("cpu-2c"))):
        assert folder.is_relative_to(ROOT)
        ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / "results.csv")], cwd=ROOT)
        assert ignored.returncode == 0, f"{folder} is not git-ignored"


def test_example_prints_every_step(tmp_path):
    # The smallest run that trains: one variant, two steps of 8 tokens, on the CPU path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "2", "--warmup", "0", "--batch", "1",
                           "--seq", "8", "--vocab", "64", "--r", "2", "--device", "cpu",
                           "--variants", "peft_ops-qlora", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split() for line in done.stdout.splitlines() if " step " in line]
    assert [s[2] for s in steps] == ["1/2", "2/2"], done.stdout
    for s in steps:
        assert s[3] == "loss" and float(s[4]) > 0 and s[6] == "tokens/s", s
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "loss.csv").exists()
