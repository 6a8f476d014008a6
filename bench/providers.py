"""The implementations compared by the bench, each registered exactly once with ``@provider``.

A provider gets a `Case` and the case's shared `Inputs` and builds a `Layer`: a forward function
of x, the trainable tensors whose gradients a backward pass computes, and the frozen objects
(base weight, quant state) that saved-for-backward accounting leaves out. `Layer.closure(mode)`
turns it into the zero-argument closure that gets timed; every allocation (weights, adapters, x,
the incoming gradient, the layer itself) happens before, outside the timed region.

Same math everywhere: adapters A [r, K], B [N, r] (and magnitude m [N]) in `case.adapter_dtype`,
scaling s = 2 (lora_alpha = 2 r), activations and dense base weight in `case.dtype`, one NF4
weight (blocksize 64, double quantization) per (N, K) shared by every provider.
"""

import copy
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Callable


def _drop_repo_root_from_path():
    """Take the repository root off sys.path (`python -m bench` puts the working directory there).

    The root holds `kernels/`, which would then shadow Hugging Face's `kernels` distribution:
    bitsandbytes and transformers import or probe a top-level `kernels` for their hub kernels,
    and the baselines must import what they import anywhere else. peft_ops comes from its
    installation (`pip install -e .` maps `peft_ops.kernels` to `kernels/`), and the bench's
    own modules from its package path, so neither needs the root.
    """
    root = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    stale = sys.modules.get("kernels")
    if stale is not None and os.path.realpath(getattr(stale, "__file__", None) or "").startswith(root + os.sep):
        del sys.modules["kernels"]


# Before anything here imports bitsandbytes, peft or transformers.
_drop_repo_root_from_path()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .cases import Case  # noqa: E402

SCALING = 2.0


class Unsupported(Exception):
    """This provider does not implement this case (the reason is printed, never silently dropped)."""


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable
    baseline: bool
    description: str
    requires: tuple

    def missing(self):
        """Name of a missing module this provider needs, or None."""
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return mod
        return None


PROVIDERS: dict = {}


def provider(name, *, description, baseline=False, requires=()):
    def register(build):
        if name in PROVIDERS:
            raise ValueError(f"provider {name!r} registered twice")
        PROVIDERS[name] = Provider(name, build, baseline, description, tuple(requires))
        return build
    return register


@dataclass
class Layer:
    forward: Callable            # x -> y (ignores x for nf4_dequantize)
    params: list = field(default_factory=list)   # tensors the backward pass differentiates
    frozen: list = field(default_factory=list)   # objects whose tensors are not "saved activations"
    note: str = ""               # backend / fallback facts worth reporting

    def closure(self, case: Case, inputs: "Inputs"):
        fwd, x = self.forward, inputs.x
        if case.mode in ("decode", "prefill") or case.op == "nf4_dequantize":
            def run():
                with torch.no_grad():
                    return fwd(x)
        elif case.mode == "forward":
            def run():
                return fwd(x)
        else:
            wrt, dy = [x] + self.params, inputs.dy

            def run():
                return torch.autograd.grad(fwd(x), wrt, dy)
        return run


# -- inputs -----------------------------------------------------------------------------------

_WEIGHTS: dict = {}


def _nf4_weight_cls():
    try:
        from peft_ops import NF4Weight
    except ImportError:
        from peft_ops.nf4 import NF4Weight
    return NF4Weight


@dataclass
class Inputs:
    w: torch.Tensor               # dense base weight [N, K], case.dtype
    A: torch.Tensor
    B: torch.Tensor
    m: object                     # magnitude [N] for DoRA, else None
    x: torch.Tensor
    dy: object
    cache: dict                   # per-weight cache shared by the cases of one (N, K)

    @classmethod
    def make(cls, case: Case, device):
        key = (case.N, case.K, case.dtype, device)
        if key not in _WEIGHTS:
            _WEIGHTS.clear()  # one base weight alive at a time: the 14336 x 4096 ones are large
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(case.N, case.K, generator=g) / case.K ** 0.5).to(device, case.dtype)
            _WEIGHTS[key] = {"w": w}
        cache = _WEIGHTS[key]
        g = torch.Generator().manual_seed(1)
        r, ad = max(case.r, 1), case.adapter_dtype
        A = (torch.randn(r, case.K, generator=g) / case.K ** 0.5).to(device, ad).requires_grad_()
        B = (torch.randn(case.N, r, generator=g) * 0.01).to(device, ad).requires_grad_()
        m = None
        if case.dora:
            # PEFT's init, m = ||W + s·B A|| per row, taken with B already non-zero so m/n = 1
            with torch.no_grad():
                n = torch.linalg.vector_norm(torch.addmm(cache["w"].float(), B.float(), A.float(), alpha=SCALING), dim=1)
            m = n.to(ad).requires_grad_()
        M = max(case.M, 1)
        x = torch.randn(M, case.K, generator=g).to(device, case.dtype)
        x.requires_grad_(case.trains)
        dy = torch.randn(M, case.N, generator=g).to(device, case.dtype) if case.mode == "forward+backward" else None
        return cls(cache["w"], A, B, m, x, dy, cache)

    @property
    def nf4(self):
        """peft_ops NF4Weight of w (blocksize 64, double quantization), made on first use."""
        if "nf4" not in self.cache:
            self.cache["nf4"] = _nf4_weight_cls().quantize(self.w, blocksize=64, double_quant=True)
        return self.cache["nf4"]

    def bnb_quantized(self):
        """(packed, quant_state) of the same weight, quantized by bitsandbytes itself."""
        cache = self.cache
        if "bnb" not in cache:
            import bitsandbytes.functional as bnbF
            cache["bnb"] = bnbF.quantize_4bit(self.w, blocksize=64, compress_statistics=True,
                                              quant_type="nf4", quant_storage=torch.uint8)
        return cache["bnb"]


def _trainable(case, inputs):
    if case.mixed:
        mixed = mixed_adapters(case, inputs)
        return mixed.As + mixed.Bs + [m for m in mixed.ms if m is not None]
    return [inputs.A, inputs.B] + ([inputs.m] if case.dora else [])


@dataclass
class Mixed:
    """The adapters of a mixed-adapter case: E = case.adapters of rank r, derived from the case's
    own A, B (and m) by fixed factors (the same tensors on every provider, on any device, meta
    included); row m uses adapter m mod E."""
    As: list
    Bs: list
    ms: list
    index: torch.Tensor          # int32 [M] on the device
    names: list                  # PEFT's adapter_names, one a row


def mixed_adapters(case: Case, inputs: Inputs) -> Mixed:
    if "_mixed" not in inputs.__dict__:   # one set a case (inputs.cache is shared by every case of a weight)
        E, M = case.adapters, max(case.M, 1)
        with torch.no_grad():
            As = [(inputs.A * (1.0 + 0.1 * e)).requires_grad_(case.trains) for e in range(E)]
            Bs = [(inputs.B * (1.0 - 0.05 * e)).requires_grad_(case.trains) for e in range(E)]
            ms = [(inputs.m * (1.0 + 0.01 * e)).requires_grad_(case.trains) if case.dora else None for e in range(E)]
        index = (torch.arange(M, dtype=torch.int32) % E).to(inputs.x.device)
        inputs.__dict__["_mixed"] = Mixed(As, Bs, ms, index, [f"adapter{m % E}" for m in range(M)])
    return inputs.__dict__["_mixed"]


def _warm(fn, x):
    """One call without grad at build time fills a layer's no-grad caches (DoRA's row norm, the
    adapter table), as a server's first request does; on meta tensors (the static model) its
    Triton launches are recorded, not run."""
    with torch.no_grad():
        if x.device.type == "meta":
            from . import lowering
            with lowering.recording():
                fn(x)
        else:
            fn(x)


# -- providers --------------------------------------------------------------------------------

@provider("peft_ops", requires=("peft_ops",),
          description="peft_ops fused lora_linear (Triton on CUDA; its plain-PyTorch twin on CPU); "
                      "lora_linear_multi for the mixed-adapter ops")
def _peft_ops(case: Case, inputs: Inputs) -> Layer:
    from peft_ops.functional import DoraNormCache, lora_linear

    backend = "triton" if inputs.x.is_cuda else "cpu-path"
    if case.op == "nf4_dequantize":
        nf4, dtype = inputs.nf4, case.dtype
        return Layer(lambda x: nf4.dequantize(dtype), frozen=[nf4], note=backend)
    weight = inputs.nf4 if case.quantized else inputs.w
    A, B, m, p = inputs.A, inputs.B, inputs.m, case.dropout
    training = case.trains
    if case.mixed:
        from peft_ops.multi import MultiAdapterCache, lora_linear_multi

        mixed, cache = mixed_adapters(case, inputs), MultiAdapterCache()

        def forward(x):
            return lora_linear_multi(x, weight, mixed.As, mixed.Bs, SCALING, mixed.index,
                                     magnitude=mixed.ms if case.dora else None, dropout=p, training=training,
                                     seed=0, cache=cache)
    else:
        norm_cache = DoraNormCache() if case.dora else None   # read without grad only

        def forward(x):
            return lora_linear(x, weight, A, B, SCALING, magnitude=m, dropout=p, training=training, seed=0,
                               norm_cache=norm_cache)
    if not training:
        _warm(forward, inputs.x)
    return Layer(forward, _trainable(case, inputs), [weight], note=backend)


@provider("peft_ops_lora", requires=("peft_ops",),
          description="peft_ops on a DoRA serving case without its magnitude (QLoRA's cost): the QDoRA "
                      "decode / prefill target is peft_ops / this <= 1.05")
def _peft_ops_lora(case: Case, inputs: Inputs) -> Layer:
    from peft_ops.functional import lora_linear

    if not (case.dora and not case.mixed and case.mode in ("decode", "prefill")):
        raise Unsupported("only for DoRA decode / prefill (it is the LoRA twin of that case)")
    weight = inputs.nf4 if case.quantized else inputs.w
    A, B = inputs.A, inputs.B

    def forward(x):
        return lora_linear(x, weight, A, B, SCALING)
    _warm(forward, inputs.x)
    return Layer(forward, [A, B], [weight], note="triton" if inputs.x.is_cuda else "cpu-path")


@provider("peft_ops_one_adapter", requires=("peft_ops",),
          description="peft_ops lora_linear on a mixed case's rows all with its first adapter (a "
                      "single-adapter batch of the same size): the mixed target is peft_ops / this <= 1.25")
def _peft_ops_one_adapter(case: Case, inputs: Inputs) -> Layer:
    from peft_ops.functional import DoraNormCache, lora_linear

    if not case.mixed:
        raise Unsupported("only for the mixed-adapter ops")
    weight = inputs.nf4 if case.quantized else inputs.w
    mixed = mixed_adapters(case, inputs)
    A, B, m, norm_cache = mixed.As[0], mixed.Bs[0], mixed.ms[0], DoraNormCache() if case.dora else None

    def forward(x):
        return lora_linear(x, weight, A, B, SCALING, magnitude=m, norm_cache=norm_cache)
    if not case.trains:
        _warm(forward, inputs.x)
    return Layer(forward, [A, B] + ([m] if m is not None else []), [weight],
                 note="triton" if inputs.x.is_cuda else "cpu-path")


@provider("torch", requires=("torch",),
          description="dense bf16 F.linear, no adapter: the limit at large M")
def _torch(case: Case, inputs: Inputs) -> Layer:
    if case.op == "nf4_dequantize":
        raise Unsupported("no dense counterpart of a dequantization")
    w = inputs.w
    if case.mixed:
        return Layer(lambda x: F.linear(x, w), [], [w], note="no adapter")
    return Layer(lambda x: F.linear(x, w), [], [w])


@provider("reference", requires=("peft_ops",),
          description="peft_ops.reference in plain PyTorch, computed in the activation dtype")
def _reference(case: Case, inputs: Inputs) -> Layer:
    from peft_ops import reference

    if case.op == "nf4_dequantize":
        nf4, dtype = inputs.nf4, case.dtype
        return Layer(lambda x: reference.nf4_dequantize(nf4, dtype=dtype), frozen=[nf4])
    if case.dropout and case.trains:
        raise Unsupported("the reference takes an explicit dropout mask; the bench times dropout 0")
    if case.mixed:
        raise Unsupported("the mixed-adapter reference loops over rows; the bench times PEFT's loop instead")
    weight = inputs.nf4 if case.quantized else inputs.w
    A, B, m, dtype = inputs.A, inputs.B, inputs.m, case.dtype

    def forward(x):
        return reference.lora_linear(x, weight, A, B, SCALING, magnitude=m, compute_dtype=dtype)
    return Layer(forward, _trainable(case, inputs), [weight])


class _DequantMatmulAddmm(torch.autograd.Function):
    """The strongest unfused strategy (as Unsloth does it): dequantize W to a 16-bit buffer, one
    cuBLAS GEMM, the LoRA path as an addmm into the same output; backward dequantizes again
    instead of keeping W. Adapters are cast to the activation dtype for the GEMMs, their grads
    returned in their own dtype. DoRA adds the row norm of W + s·B A from the same buffer and
    keeps the output y, since dm = Σ_i dy ⊙ y / m."""

    @staticmethod
    def forward(ctx, x, A, B, m, dequant, s):
        W = dequant()
        a, b = A.to(x.dtype), B.to(x.dtype)
        xa = x @ a.t()
        y = torch.addmm(x @ W.t(), xa, b.t(), alpha=s)
        mn = None
        if m is not None:
            n = torch.linalg.vector_norm(torch.addmm(W.float(), B.float(), A.float(), alpha=s), dim=1)
            mn = (m.float() / n.clamp_min(1e-12)).to(x.dtype)
            y = y * mn
        ctx.dequant, ctx.s = dequant, s
        ctx.save_for_backward(x, xa, A, B, m, mn, y if m is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, A, B, m, mn, y = ctx.saved_tensors
        s = ctx.s
        a, b = A.to(x.dtype), B.to(x.dtype)
        g = dy if mn is None else dy * mn
        gb = g @ b
        dx = torch.addmm(g @ ctx.dequant(), gb, a, alpha=s)
        dA = (s * (gb.t() @ x)).to(A.dtype)
        dB = (s * (g.t() @ xa)).to(B.dtype)
        dm = None if m is None else ((dy.float() * y.float()).sum(0) / m.float()).to(m.dtype)
        return dx, dA, dB, dm, None, None


@provider("dequant_addmm", requires=("torch",),
          description="dequantize NF4 to bf16 (bitsandbytes) + cuBLAS matmul + LoRA addmm, unfused")
def _dequant_addmm(case: Case, inputs: Inputs) -> Layer:
    if case.op == "nf4_dequantize":
        raise Unsupported("is itself built on a dequantization (see peft_bnb)")
    if case.dropout and case.trains:
        raise Unsupported("dropout is not implemented in this baseline; the bench times dropout 0")
    if case.mixed:
        raise Unsupported("one adapter a call; see peft_bnb for PEFT's mixed-batch loop")
    note = ""
    if not case.quantized:
        w = inputs.w

        def dequant():
            return w
        frozen = [w]
    elif importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes.functional as bnbF
        packed, state = inputs.bnb_quantized()

        def dequant():
            return bnbF.dequantize_4bit(packed, state)
        frozen = [packed, state]
    else:
        nf4, dtype = inputs.nf4, case.dtype
        note = "fallback: NF4Weight.dequantize (bitsandbytes not installed)"

        def dequant():
            return nf4.dequantize(dtype)
        frozen = [nf4]
    A, B, m = inputs.A, inputs.B, inputs.m

    def forward(x):
        return _DequantMatmulAddmm.apply(x, A, B, m, dequant, SCALING)
    return Layer(forward, _trainable(case, inputs), frozen, note)


class _Wrap(torch.nn.Module):
    def __init__(self, proj, loaded_in_4bit):
        super().__init__()
        self.proj = proj
        # What transformers sets on a model loaded with load_in_4bit: PEFT then wraps Linear4bit
        # bases in its bitsandbytes layer (peft.tuners.lora.bnb.Linear4bit), the class QLoRA users
        # train, rather than in the generic lora.Linear.
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x):
        return self.proj(x)


@provider("peft_bnb", baseline=True, requires=("peft", "bitsandbytes"),
          description="PEFT's bitsandbytes LoRA/DoRA layer (lora.bnb.Linear4bit) on a Linear4bit, as a 4-bit "
                      "transformers model gets it (PEFT's lora.Linear on nn.Linear for the dense ops)")
def _peft_bnb(case: Case, inputs: Inputs) -> Layer:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    if case.op == "nf4_dequantize":
        import bitsandbytes.functional as bnbF
        packed, state = inputs.bnb_quantized()
        return Layer(lambda x: bnbF.dequantize_4bit(packed, state), frozen=[packed, state],
                     note="bitsandbytes.functional.dequantize_4bit")
    w = inputs.w
    if case.quantized:
        base = bnb.nn.Linear4bit(case.K, case.N, bias=False, compute_dtype=case.dtype,
                                 compress_statistics=True, quant_type="nf4", device=w.device)
        # The case's own quantization (bitsandbytes', as every provider shares), in a copy: on an
        # AVX512-BF16 CPU an eval forward repacks the layer's weight and rewrites its quant_state
        # in place, which must not reach the other providers. (Built from these tensors, the
        # layer also exists on meta tensors, for the static model.)
        packed, state = copy.deepcopy(inputs.bnb_quantized())
        base.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                        compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=base)
    else:
        base = torch.nn.Linear(case.K, case.N, bias=False, device=w.device, dtype=w.dtype)
        base.weight.data.copy_(w)
        base.weight.requires_grad_(False)
    config = LoraConfig(r=case.r, lora_alpha=SCALING * case.r, target_modules=["proj"], lora_dropout=case.dropout,
                        use_dora=case.dora)
    if not case.mixed:
        model = get_peft_model(_Wrap(base, loaded_in_4bit=case.quantized), config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(inputs.A)
            layer.lora_B["default"].weight.copy_(inputs.B)
            if case.dora:
                layer.lora_magnitude_vector["default"].weight.copy_(inputs.m)
        forward, note = layer, f"{type(layer).__module__}.{type(layer).__name__}"
    else:
        # PEFT's mixed batch: one adapter per row (adapter_names), run one sub-batch per adapter
        mixed = mixed_adapters(case, inputs)
        if case.dora and w.device.type == "meta":
            raise Unsupported("PEFT's DoRA init of an added adapter copies the base weight to the adapter's "
                              "device, which meta tensors (the static model) cannot")
        model = get_peft_model(_Wrap(base, loaded_in_4bit=case.quantized), config, adapter_name="adapter0")
        for e in range(1, case.adapters):
            model.add_adapter(f"adapter{e}", config)
        layer = model.base_model.model.proj
        for adapters in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            adapters.to(w.device)   # adapters added later sit on the CPU when the base is on meta
        with torch.no_grad():
            for e in range(case.adapters):
                layer.lora_A[f"adapter{e}"].weight.copy_(mixed.As[e])
                layer.lora_B[f"adapter{e}"].weight.copy_(mixed.Bs[e])
                if case.dora:
                    layer.lora_magnitude_vector[f"adapter{e}"].weight.copy_(mixed.ms[e])
        for e in range(case.adapters):   # add_adapter leaves the new ones frozen
            for name in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if case.dora else ()):
                getattr(layer, name)[f"adapter{e}"].weight.requires_grad_(case.trains)
        names = mixed.names
        if case.dora:
            # PEFT refuses DoRA with adapter_names; its own per-adapter loop, called directly
            def forward(x):
                return layer._mixed_batch_forward(x, adapter_names=names)
            note = f"{type(layer).__module__}.{type(layer).__name__}._mixed_batch_forward (PEFT refuses DoRA there)"
        else:
            def forward(x):
                return layer(x, adapter_names=names)
            note = f"{type(layer).__module__}.{type(layer).__name__}(adapter_names=...)"
    model.train(case.trains)
    params = [p for p in layer.parameters() if p.requires_grad]
    if any(p.dtype != case.adapter_dtype for p in params):
        raise Unsupported(f"PEFT made adapters in {params[0].dtype}, expected {case.adapter_dtype}")
    return Layer(forward, params, [layer], note)


def make_layer(name: str, case: Case, inputs: Inputs) -> Layer:
    return PROVIDERS[name].build(case, inputs)


__all__ = ["PROVIDERS", "Provider", "provider", "Layer", "Inputs", "Unsupported", "make_layer",
           "SCALING", "mixed_adapters"]
