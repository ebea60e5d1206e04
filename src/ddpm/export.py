"""A run's network as an ONNX graph, checked against PyTorch on random inputs.

The graph is the network alone, ``(x_t, t[, cond]) -> out``, as DESIGN.md rule 4 draws it:

- ``x_t``  float32 (B, C, H, W), the noisy image in [-1, 1] scale;
- ``t``    float32 (B,), the diffusion step the network was trained on (0 .. T-1; float so that
           a continuous-time network exports the same way);
- ``cond`` int64 (B,), class indices, only for a class-conditional network
           (``model.num_classes`` > 0); index ``num_classes`` is the null class of
           classifier-free guidance;
- ``out``  float32 (B, C', H, W), what the network predicts (eps, x0 or v, per ``objective``;
           C' = 2C with learned variances).

The batch axis is dynamic. The schedule and the sampler stay outside: the graph's metadata
carries the run's full config (``ddpm_config``), so a server can rebuild them. Needs the
``onnx`` package (``pip install 'ddpm[export]'``); the check uses ONNX Runtime when it is
installed and ONNX's own reference evaluator otherwise.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DdpmError
from .files import atomic_write_bytes, check_writable_file

OPSET = 17  # LayerNormalization (opset 17) keeps GroupNorm/LayerNorm graphs compact
MIN_OPSET = 14  # the first in which the networks' attention (scaled_dot_product_attention) exports
TOLERANCE = 1e-4  # max |onnx - torch| allowed, relative to max(1, max |torch|)
CHECK_BATCHES = (1, 3)  # batch sizes unlike the one traced (2), to prove the dynamic axis


@dataclass(frozen=True)
class ExportResult:
    """What was written and how closely it matches PyTorch."""

    path: Path
    opset: int
    inputs: tuple[str, ...]
    max_abs_err: float
    tolerance: float
    checked_with: str  # onnxruntime | onnx-reference
    step: int  # the checkpoint's training step

    def summary(self) -> str:
        return (f"exported step {self.step} to {self.path} (opset {self.opset}, inputs {', '.join(self.inputs)}, "
                f"dynamic batch); max |onnx - torch| = {self.max_abs_err:.2e} on random inputs at batch "
                f"{' and '.join(map(str, CHECK_BATCHES))} ({self.checked_with}; tolerance {self.tolerance:.0e})")


class _Traced(nn.Module):
    """The network with explicit positional inputs (what the exporter traces)."""

    def __init__(self, net: nn.Module, conditional: bool):
        super().__init__()
        self.net, self.conditional = net, conditional

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t, *cond) if self.conditional else self.net(x_t, t)


def random_inputs(cfg: Any, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x_t ~ N(0, 1), t uniform over the T steps, classes uniform over all and the null one."""
    m, T = cfg.model, cfg.diffusion.timesteps
    x = torch.randn((batch, m.channels, cfg.data.image_size, cfg.data.image_size), generator=generator)
    t = torch.randint(0, T, (batch,), generator=generator).float()
    if not getattr(m, "num_classes", 0):
        return x, t
    return x, t, torch.randint(0, m.num_classes + 1, (batch,), generator=generator)


def input_names(cfg: Any) -> tuple[str, ...]:
    return ("x_t", "t", "cond") if getattr(cfg.model, "num_classes", 0) else ("x_t", "t")


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise DdpmError("ONNX export needs the onnx package: pip install 'ddpm[export]'") from None
    return onnx


def max_opset() -> int:
    """The newest opset the installed PyTorch exporter writes."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_MAX_OPSET", OPSET))


def check_opset(opset: int) -> None:
    """An opset the exporter cannot write the network in: one line, before the model loads."""
    if not MIN_OPSET <= opset <= max_opset():
        raise DdpmError(f"--opset must be between {MIN_OPSET} and {max_opset()} (what this PyTorch exports "
                        f"the network in), got {opset}")


def to_onnx(net: nn.Module, cfg: Any, *, opset: int = OPSET) -> bytes:
    """Trace ``net`` (fp32, eval mode) into ONNX bytes with a dynamic batch axis."""
    names = input_names(cfg)
    traced = _Traced(net, len(names) == 3).eval()
    example = random_inputs(cfg, 2, torch.Generator().manual_seed(0))
    dynamic = {n: {0: "batch"} for n in (*names, "out")}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of one
        warnings.simplefilter("ignore")  # that needs onnxscript; this one needs only onnx
        torch.onnx.export(traced, example, buf, input_names=list(names), output_names=["out"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    return buf.getvalue()


def with_metadata(data: bytes, cfg: Any, step: int) -> bytes:
    """The run's config and step in the graph's metadata_props (what a server needs)."""
    onnx = _require_onnx()
    model = onnx.load_from_string(data)
    props = {"ddpm_config": cfg.to_json(), "ddpm_step": str(step), "ddpm_objective": cfg.diffusion.objective}
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_onnx(data: bytes, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The graph's output on ``inputs``: ONNX Runtime if installed, else ONNX's reference evaluator."""
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator
        return ReferenceEvaluator(_require_onnx().load_from_string(data)).run(None, inputs)[0], "onnx-reference"
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0], "onnxruntime"


@torch.inference_mode()
def max_error(data: bytes, net: nn.Module, cfg: Any, *, seed: int = 0) -> tuple[float, float, str]:
    """(max |onnx - torch|, max |torch|, engine) over random inputs at each of CHECK_BATCHES."""
    gen = torch.Generator().manual_seed(seed)
    names, err, scale, engine = input_names(cfg), 0.0, 0.0, ""
    for batch in CHECK_BATCHES:
        args = random_inputs(cfg, batch, gen)
        ref = net(*args).float()
        got, engine = run_onnx(data, {n: a.numpy() for n, a in zip(names, args)})
        if got.shape != tuple(ref.shape):
            raise DdpmError(f"the exported graph gives shape {got.shape} at batch {batch}, PyTorch {tuple(ref.shape)}")
        err = max(err, float(np.abs(got - ref.numpy()).max()))
        scale = max(scale, float(ref.abs().max()))
    return err, scale, engine


def export_onnx(run: str | Path, out: str | Path | None = None, *, use_ema: bool = True,
                opset: int = OPSET, tolerance: float = TOLERANCE) -> ExportResult:
    """Write ``run``'s network (EMA weights by default) as ONNX, after checking it against
    PyTorch; a graph off by more than ``tolerance`` is not written."""
    from .sampling.generate import load_model

    _require_onnx()
    check_opset(opset)
    model = load_model(run, device="cpu", use_ema=use_ema)
    path = Path(out) if out is not None else model.run_folder() / "model.onnx"
    check_writable_file(path, "ONNX file")  # before the slow export, not after it
    net = model.net.float().to(memory_format=torch.contiguous_format).eval()
    data = with_metadata(to_onnx(net, model.config, opset=opset), model.config, model.step)
    err, scale, engine = max_error(data, _Traced(net, len(input_names(model.config)) == 3), model.config)
    if not err <= tolerance * max(1.0, scale):
        raise DdpmError(f"the exported graph differs from PyTorch by {err:.2e} (tolerance {tolerance:.0e}); "
                        f"nothing written")
    atomic_write_bytes(path, data)
    return ExportResult(path, opset, input_names(model.config), err, tolerance, engine, model.step)


@dataclass(frozen=True)
class DiffusersExport:
    """A run written as a diffusers pipeline, and how closely diffusers' loaded UNet matches ddpm's network."""

    path: Path
    step: int
    max_abs_err: float
    tolerance: float

    def summary(self) -> str:
        return (f"exported step {self.step} to {self.path} (DDPMPipeline: unet/, scheduler/, model_index.json); "
                f"max |diffusers - ddpm| = {self.max_abs_err:.2e} on random inputs (tolerance {self.tolerance:.0e})")


DIFFUSERS_TOLERANCE = 1e-5  # max |diffusers - ddpm| of the reloaded UNet, relative to max(1, max |ddpm|)


@torch.inference_mode()
def export_diffusers(run: str | Path, out: str | Path, *, use_ema: bool = True,
                     tolerance: float = DIFFUSERS_TOLERANCE) -> DiffusersExport:
    """Write ``run`` (a vp run of the diffusers-unet network; EMA weights by default) as a folder
    ``DDPMPipeline.from_pretrained`` loads, after checking the reloaded UNet against ddpm's network."""
    from .checkpoint import load_checkpoint
    from .nn.diffusers_unet import import_diffusers
    from .pipelines import check_exportable, check_pipeline_out, write_pipeline
    from .sampling.generate import load_model

    out = Path(out)
    diffusers = import_diffusers("export --diffusers")
    check_exportable(load_checkpoint(run).config)  # one line, before the weights are built
    check_pipeline_out(out)
    model = load_model(run, device="cpu", use_ema=use_ema)
    net = model.net.float().to(memory_format=torch.contiguous_format).eval()
    args = random_inputs(model.config, 3, torch.Generator().manual_seed(0))
    ref = net(*args)
    errs: list[float] = []

    def reloads_equal(folder: Path) -> None:  # the written UNet, reloaded by diffusers, against ddpm's network
        unet = diffusers.UNet2DModel.from_pretrained(str(folder / "unet"), low_cpu_mem_usage=False).eval()
        got = unet(args[0], args[1], class_labels=args[2] if len(args) == 3 else None).sample
        errs.append(float((got - ref).abs().max()))
        if not errs[0] <= tolerance * max(1.0, float(ref.abs().max())):
            raise DdpmError(f"the exported UNet differs from ddpm's network by {errs[0]:.2e} "
                            f"(tolerance {tolerance:.0e}); nothing kept")

    write_pipeline(out, model.config, net, model.schedule.betas, check=reloads_equal)
    return DiffusersExport(out, model.step, errs[0], tolerance)
