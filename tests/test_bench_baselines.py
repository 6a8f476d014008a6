"""The bench's and the example's PEFT + bitsandbytes baseline: imported as it is anywhere else, and
built from the layer class a 4-bit transformers model gets.

Run from the repository root, `python -m bench` puts the root on sys.path, where `kernels/` would
shadow Hugging Face's `kernels` distribution (bitsandbytes imports it for its CPU kernels,
transformers probes it): the bench must take the root off sys.path before any baseline is
imported. The same for the example when the root is on PYTHONPATH. Each check runs in a fresh
interpreter started in the repository root, since the shadowing is a matter of sys.path at start.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# After `setup` ran in a fresh interpreter: where would `import kernels` come from, and is a
# `kernels` module from the repository already loaded?
_CHECK = """
import importlib.util, json, os, sys
root = os.path.realpath({root!r})
spec = importlib.util.find_spec("kernels")
origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
loaded = getattr(sys.modules.get("kernels"), "__file__", None)
print(json.dumps(dict(origin=origin, loaded=loaded, root=root)))
"""


def _run(setup, root_on_pythonpath=True):
    code = textwrap.dedent(setup) + _CHECK.format(root=str(ROOT))
    environ = dict(os.environ)
    environ.pop("TRITON_INTERPRET", None)   # the bench refuses to time under the interpreter
    if root_on_pythonpath:   # as `PYTHONPATH=. python -m bench` has it
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for where in (result["origin"], result["loaded"]):
        assert not (where and os.path.realpath(where).startswith(result["root"] + os.sep)), result
    return result


def test_the_repository_root_would_shadow_kernels_without_the_guard():
    # The premise of the next two tests: from the root, a plain interpreter finds our folder.
    code = "import importlib.util; print(importlib.util.find_spec('kernels').origin)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(ROOT / "kernels" / "__init__.py")


def test_running_the_bench_leaves_no_kernels_from_the_repository():
    # `python -m bench --list` as runpy runs it (sys.path[0] is the working directory; the root
    # is on PYTHONPATH too), then the baselines' imports.
    setup = """
    import os, runpy, sys
    sys.path.insert(0, os.getcwd())
    sys.argv = ["bench", "--list"]
    try:
        runpy.run_module("bench", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert not e.code, e.code
    import bitsandbytes, peft, transformers
    """
    _run(setup)


def test_importing_the_example_leaves_no_kernels_from_the_repository():
    setup = f"""
    import runpy
    runpy.run_path({str(ROOT / "examples" / "train_tiny_llama.py")!r}, run_name="example")
    import bitsandbytes, peft, transformers
    """
    _run(setup)


def test_peft_bnb_baselines_use_peft_bitsandbytes_layer():
    # get_peft_model on a model with is_loaded_in_4bit (what transformers' 4-bit loading sets)
    # wraps each Linear4bit in peft.tuners.lora.bnb.Linear4bit, not the generic lora.Linear.
    setup = f"""
    import runpy, torch
    from bench import cases as C
    from bench.providers import Inputs, make_layer

    case = C.Case("qlora", "forward+backward", 4, 64, 64, 4)
    note = make_layer("peft_bnb", case, Inputs.make(case, "cpu")).note
    assert note == "peft.tuners.lora.bnb.Linear4bit", note
    example = runpy.run_path({str(ROOT / "examples" / "train_tiny_llama.py")!r}, run_name="example")
    model = example["with_peft_bnb"](example["tiny_llama"](64, torch.device("cpu")), False, 4, 8, 0.0)
    layer = example["lora_layer_class"](model)
    assert layer == "peft.tuners.lora.bnb.Linear4bit", layer
    """
    _run(setup, root_on_pythonpath=False)
