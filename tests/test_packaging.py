"""The installed package ships `kernels/` as `peft_ops.kernels`, never as a top-level `kernels`.

That import name belongs to Hugging Face's kernel-hub distribution, which transformers probes
for (SPEC §1). The probe runs in a fresh interpreter whose working directory is outside the
repository, so the checkout itself is not on sys.path and only the installation answers.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from peft_ops import _cpu_loops

REPO = pathlib.Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.metadata, importlib.util, json
import peft_ops.kernels.nf4 as k
spec = importlib.util.find_spec("kernels")
dist = importlib.metadata.distribution("peft-ops")
print(json.dumps({
    "kernels_file": k.__file__,
    "top_level_kernels": None if spec is None else
        [spec.origin] if spec.origin else [str(p) for p in spec.submodule_search_locations or []],
    "dist_files": [str(f) for f in dist.files or []],
    "top_level_txt": dist.read_text("top_level.txt"),
}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path_factory.mktemp("outside"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        "`import peft_ops.kernels.nf4` failed outside the repository; is the package installed "
        f"(pip install -e .)?\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernels_import_as_peft_ops_kernels(probe):
    path = pathlib.Path(probe["kernels_file"]).resolve()
    editable = path == REPO / "kernels" / "nf4.py"
    installed = path.parts[-3:] == ("peft_ops", "kernels", "nf4.py")
    assert editable or installed, f"peft_ops.kernels.nf4 resolves to {path}"


def test_no_top_level_kernels_is_installed(probe):
    found = probe
    # `import kernels` must fail, or find someone else's package (Hugging Face's), never ours.
    for place in found["top_level_kernels"] or []:
        assert not pathlib.Path(place).resolve().is_relative_to(REPO), \
            f"top-level `kernels` resolves into this repository: {place}"
    assert not [f for f in found["dist_files"] if f.split("/")[0] == "kernels"], \
        "the peft-ops distribution installs a top-level kernels/ directory"
    assert "kernels" not in (found["top_level_txt"] or "").split(), found["top_level_txt"]


def test_plain_wheel_install(tmp_path):
    # A plain (non-editable) install: build the wheel, install it into an empty target and import
    # it from outside the repository with only that target on the path.
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(wheel_dir.glob("peft_ops-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert not (target / "kernels").exists()
    assert (target / "peft_ops" / "csrc" / "cpu_loops.c").is_file()   # the CPU loops' source ships
    check = ("import importlib.util, peft_ops.kernels.nf4 as k, peft_ops.kernels.lora; "
             "print(k.__file__); print(importlib.util.find_spec('kernels') is None)")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PEFT_OPS_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path, no_top_level = result.stdout.split()
    assert pathlib.Path(path).is_relative_to(target / "peft_ops" / "kernels")
    assert no_top_level == "True"
    if _cpu_loops.find_compiler() is not None:
        # and they build from the installed copy, into the cache the environment names
        built = subprocess.run([sys.executable, "-m", "peft_ops._cpu_loops"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        assert built.returncode == 0 and built.stdout.startswith("native ("), built.stdout + built.stderr
        assert list((tmp_path / "cache").glob("cpu_loops-*.so"))
