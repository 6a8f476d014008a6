"""FSDP2 (`fully_shard`) and DDP on CPU with gloo: two processes spawned from pytest, bounded in time.

Each rank trains a tiny model (two residual blocks with NF4 bases, a dense head) on its half of
every batch for a few SGD steps; rank 0 also trains the same model in one process on the whole
batches. The workers run the PyTorch twins (TRITON_INTERPRET=0 in the children): what is under
test is sharding, gathering and gradient reduction, and the twins compute what the kernels do
(tests/test_lora.py checks the kernels). The parent compares losses, adapter weights and the
checkpoint `peft_ops.distributed.save_adapter` wrote from rank 0 with the single-process one.
"""

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3
TIMEOUT_S = 150


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))   # out of place: FSDP2 hooks the output


class Tiny(nn.Module):
    # up: K=64, N=95 (absmax [95, 1], uneven row shards); down: K=95 (odd K: 1-D packed bytes);
    # head: a dense base with 7 rows.
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(64, 95), Block(64, 32)])
        self.head = nn.Linear(64, 7)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(dora):
    import peft_ops

    torch.manual_seed(0)
    model = Tiny()
    for block in model.blocks:
        block.up, block.down = peft_ops.NF4Linear.from_linear(block.up), peft_ops.NF4Linear.from_linear(block.down)
    peft_ops.add_lora(model, ["up", "down", "head"], r=4, lora_alpha=8, use_dora=dora)
    with torch.no_grad():   # a non-trivial start: B ≠ 0, magnitudes ≠ row norms
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            elif "lora_magnitude" in name:
                p.mul_(1.1)
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, 64, generator=gen), torch.randn(8, 5, 7, generator=gen)) for _ in range(STEPS)]


def train(model, data, step_hook=lambda loss: loss):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for x, y in data:
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(step_hook(loss.detach()).item())
    return losses


def adapters(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def check_nf4_shards(model, reference, rank):
    """Every NF4 tensor is sharded by rows (packed bytes and absmax cut at the same rows) and
    gathers back to the original bytes."""
    from torch.distributed.tensor import DTensor, Shard

    from peft_ops import NF4Linear

    originals = {n: m for n, m in reference.named_modules() if isinstance(m, NF4Linear)}
    checked = aligned = 0
    for name, module in model.named_modules():
        if not isinstance(module, NF4Linear):
            continue
        packed, absmax = module.nf4_packed, module.nf4_absmax
        for t in (packed, absmax, module.nf4_nested_absmax):
            assert isinstance(t, DTensor) and t.placements == (Shard(0),), name
        orig = originals[name]
        chunk = -(-orig.nf4_packed.shape[0] // WORLD)
        rows = slice(rank * chunk, (rank + 1) * chunk)
        assert torch.equal(packed.to_local(), orig.nf4_packed[rows]), name
        if orig.nf4_packed.dim() == 2 and orig.nf4_absmax.dim() == 2:   # whole blocks per row
            assert torch.equal(absmax.to_local(), orig.nf4_absmax[rows]), name
            aligned += 1
        for attr in ("nf4_packed", "nf4_absmax", "nf4_nested_absmax"):
            assert torch.equal(getattr(module, attr).full_tensor(), getattr(orig, attr)), (name, attr)
        checked += 1
    assert (checked, aligned) == (4, 2)   # the two `up` layers have K = 64 = blocksize


def worker(rank, store_path, out_dir):
    os.environ["TRITON_INTERPRET"] = "0"   # the twins (see the module docstring)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import peft_ops
    from peft_ops.distributed import save_adapter

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    local = [(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]) for x, y in batches()]

    def mean_over_ranks(loss):
        dist.all_reduce(loss)
        return loss / WORLD

    results = {}
    for dora in (False, True):
        kind = "dora" if dora else "lora"
        model = build(dora)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        check_nf4_shards(model, build(dora), rank)
        losses = train(model, local, mean_over_ranks)
        results[f"fsdp2_{kind}"] = (losses, adapters(model))
        save_adapter(model, os.path.join(out_dir, f"fsdp2_{kind}"))

        model = nn.parallel.DistributedDataParallel(build(dora))
        losses = train(model, local, mean_over_ranks)
        results[f"ddp_{kind}"] = (losses, adapters(model.module))
        save_adapter(model, os.path.join(out_dir, f"ddp_{kind}"))

        if rank == 0:
            model = build(dora)
            results[f"single_{kind}"] = (train(model, batches()), adapters(model))
            peft_ops.save_adapter(model, os.path.join(out_dir, f"single_{kind}"))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    # Rank 1 skips the single-process runs; tearing gloo down while rank 0 still trains has
    # aborted rank 1 ("terminate called without an active exception") on a loaded machine.
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return out_dir, torch.load(out_dir / "results.pt")


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
def test_matches_single_process_training(distributed_run, parallel, kind):
    out_dir, results = distributed_run
    losses, weights = results[f"{parallel}_{kind}"]
    ref_losses, ref_weights = results[f"single_{kind}"]
    # Two half-batch means averaged vs one full-batch mean, and gradients summed in another
    # order: equal up to fp32 rounding.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert len(set(ref_losses)) == STEPS, "training did not change the loss"
    assert weights.keys() == ref_weights.keys()
    assert len(weights) == 5 * (3 if kind == "dora" else 2)   # 5 adapted layers
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)

    # The checkpoint written from rank 0 is the single-process one.
    from safetensors.torch import load_file

    ours, ref = out_dir / f"{parallel}_{kind}", out_dir / f"single_{kind}"
    assert (ours / "adapter_config.json").read_bytes() == (ref / "adapter_config.json").read_bytes()
    assert json.loads((ours / "adapter_config.json").read_text())["use_dora"] == (kind == "dora")
    saved, saved_ref = load_file(ours / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert saved.keys() == saved_ref.keys()
    for key, t in saved.items():
        torch.testing.assert_close(t, saved_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    # and it holds the trained (gathered, not per-rank shard) weights
    trained = {f"base_model.model.{n}" + ("" if n.endswith("magnitude_vector") else ".weight"): w
               for n, w in weights.items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in trained.items()}
    for key, t in saved.items():
        assert torch.equal(t, trained[key].float()), key


def test_nf4linear_holds_row_shardable_frozen_parameters():
    # What FSDP2 and DDP see of an NF4Linear: frozen parameters, bytes and absmax as [N, ...] rows.
    from peft_ops import NF4Linear

    torch.manual_seed(0)
    even, odd = NF4Linear.from_linear(nn.Linear(64, 95)), NF4Linear.from_linear(nn.Linear(95, 64))
    params = dict(even.named_parameters())
    assert {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in params.items() if n != "bias"} == {
        "nf4_packed": ((95, 32), torch.uint8, False),
        "nf4_absmax": ((95, 1), torch.uint8, False),        # double quantization: 8-bit codes
        "nf4_nested_absmax": ((1,), torch.float32, False)}
    assert even.weight.packed.data_ptr() == even.nf4_packed.data_ptr()   # a view, not a copy
    assert odd.nf4_packed.shape == ((95 * 64 + 1) // 2,) and odd.nf4_absmax.dim() == 1   # odd K: flat
    plain = NF4Linear.from_linear(nn.Linear(64, 8), double_quant=False)
    assert plain.nf4_absmax.dtype == torch.float32 and plain.nf4_nested_absmax is None

    # State dicts keep bitsandbytes' keys only, and load back into the same layout.
    keys = set(even.state_dict())
    assert not any(k.startswith("nf4_") for k in keys) and "weight" in keys and "weight.absmax" in keys
    fresh = NF4Linear(64, 95)
    fresh.load_state_dict(even.state_dict())
    for name in ("nf4_packed", "nf4_absmax", "nf4_nested_absmax"):
        assert torch.equal(getattr(fresh, name), getattr(even, name)), name

    # Dtype casts leave the NF4 tensors alone (fp32 statistics stay fp32); the bias is cast.
    dense = plain.weight.dequantize(torch.float32)
    plain.to(torch.bfloat16)
    assert plain.nf4_absmax.dtype == torch.float32 and plain.bias.dtype == torch.bfloat16
    assert torch.equal(plain.weight.dequantize(torch.float32), dense)
