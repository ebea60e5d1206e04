"""Sampling engines: which code runs the network at each sampler step.

``torch`` (the default) is eager PyTorch. ``openvino`` and ``openvino-int8`` run the same network
exported to ONNX (:func:`ddpm.export.to_onnx`) and compiled by OpenVINO's CPU plugin; only the
network moves, the sampler, the schedule, guidance and the per-image seeds stay the library's.

- ``openvino``: fp32 (inference precision f32), the same function as eager fp32 to about 1e-6.
  It is no faster than eager channels-last fp32 (``bench/engines.py``), so it is there to
  check the export path and as the base of the next one.
- ``openvino-int8``: the graph quantised to int8 by NNCF's post-training quantisation,
  calibrated on **the model's own inputs in this very sampling**: the requested sampler is first
  run for ``CALIBRATION_IMAGES`` images in eager fp32 (one batch, on a grid of at most
  ``CALIBRATION_CALLS`` steps, so the cost is fixed), and the network's inputs there (x_t, t and
  the class, guidance's null class included), shuffled across steps into as many batches, are
  the calibration set. Export, calibration and quantisation are a fixed cost of seconds, so it
  pays on large requests. It wins where the CPU has fast int8 dot products but no native
  bfloat16 (AVX-512 VNNI without AVX-512-BF16), at an FD close to fp32's (``bench/engines.py``,
  ``bench/engine_fd.py``; the figures are on the results page). Where bfloat16 is native,
  ``--precision bf16`` on the eager engine is faster and closer to fp32.

Both need the optional extra ``pip install 'ddpm[openvino]'`` (openvino, nncf, onnx) and run on
the CPU in fp32 arithmetic outside the network (``--precision fp32``). A guiding model
(autoguidance) stays on the eager engine.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DdpmError
from .runtime.precision import capped_without

ENGINES = ("torch", "openvino", "openvino-int8")
CALIBRATION_IMAGES = 64  # images sampled in eager fp32 to record the network's inputs
CALIBRATION_CALLS = 32  # network calls kept from that sampling, evenly spread over its steps


def _feed(x: torch.Tensor, t: torch.Tensor, cond: tuple, null: int | None) -> list[np.ndarray]:
    """The exported graph's inputs for one call ``net(x, t[, cond])``: t one per image, and for a
    conditional network the class indices, the null class where the caller gave none (as the
    network itself reads a missing ``cond``: unconditional sampling)."""
    feed = [x.float().contiguous().numpy(), t.float().reshape(-1).expand(len(x)).contiguous().numpy()]
    if null is not None:
        labels = cond[0] if cond and cond[0] is not None else torch.full((len(x),), null)
        feed.append(labels.long().contiguous().numpy())
    return feed


class OpenVinoNet(nn.Module):
    """A compiled OpenVINO model behind the network's call signature ``(x_t, t[, cond]) -> out``;
    ``null``: a conditional network's null class (None: unconditional)."""

    def __init__(self, compiled: Any, null: int | None):
        super().__init__()
        self.compiled, self.null = compiled, null
        self.request = compiled.create_infer_request()

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor | None) -> torch.Tensor:
        out = self.request.infer(_feed(x, t, cond, self.null))[self.compiled.output(0)]
        return torch.from_numpy(np.array(out, copy=True))


class _Recorder(nn.Module):
    """The eager network, keeping a copy of every input it is called with (as the graph takes them)."""

    def __init__(self, net: nn.Module, null: int | None):
        super().__init__()
        self.net, self.null, self.calls = net, null, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor | None) -> torch.Tensor:
        self.calls.append([a.copy() for a in _feed(x, t, cond, self.null)])
        return self.net(x, t, *cond)


def _import(name: str, engine: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise DdpmError(f"--engine {engine} needs the {name} package: pip install 'ddpm[openvino]'") from None


# FD of OpenVINO int8 over eager fp32 where the CPU has no VNNI, as `bench/engine_fd.py` measured it
# with OpenVINO and oneDNN capped to AVX2 (its record: bench/results/engines/engine_fd_int8_ddpm100_avx2emu.json);
# quoted by the warning below
INT8_FD_WITHOUT_VNNI = 1.71


def cpu_has_vnni() -> bool | None:
    """Whether the CPU's int8 dot products (AVX-512 VNNI or AVX-VNNI) are there and not capped off
    (ONEDNN_MAX_CPU_ISA / OV_CPU_MAX_ISA); None where the flags cannot be read (not Linux x86)."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return not capped_without("vnni") and ("avx512_vnni" in flags or "avx_vnni" in flags)


def warn_int8_without_vnni() -> None:
    """One ``warning:`` line: int8 without VNNI measured far from fp32's FD."""
    print(f"warning: this CPU has no VNNI int8 dot products; there --engine openvino-int8 measured an FD "
          f"{INT8_FD_WITHOUT_VNNI:.2f}x eager fp32's; "
          f"--engine torch is the safe choice", file=sys.stderr)


def check_engine(engine: str, model: Any, precision: str) -> None:
    """One line, before any work, for an engine that cannot run this request."""
    if engine not in ENGINES:
        raise DdpmError(f"unknown --engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "torch":
        return
    if model.schedule.alpha_bar.device.type != "cpu":
        raise DdpmError(f"--engine {engine} runs on the CPU; add --device cpu")
    if precision != "fp32":
        raise DdpmError(f"--engine {engine} sets its own arithmetic; use it with --precision fp32 (the default)")


def calibration_inputs(model: Any, cfg: Any) -> list[list[np.ndarray]]:
    """The network's inputs while the requested sampler draws CALIBRATION_IMAGES images (eager fp32)."""
    from .sampling.generate import check_sample_config, generate

    rec = _Recorder(model.net, _null_class(model))
    small = dataclasses.replace(cfg, n=CALIBRATION_IMAGES, batch_size=CALIBRATION_IMAGES, precision="fp32")
    if check_sample_config(model, small) > CALIBRATION_CALLS:  # the same sampler on a coarser grid: the
        coarse = dataclasses.replace(small, steps=CALIBRATION_CALLS)  # same noise levels' range, at a fixed cost
        try:
            check_sample_config(model, coarse)
            small = coarse
        except DdpmError:
            pass  # a sampler that cannot take that many steps: its own grid
    with torch.inference_mode():
        generate(dataclasses.replace(model, net=rec), small)
    keep = np.unique(np.linspace(0, len(rec.calls) - 1, min(CALIBRATION_CALLS, len(rec.calls))).round().astype(int))
    # each call holds one step's noise level; NNCF averages the per-batch ranges, so batches of one
    # level each would clip the others: the rows are shuffled across steps into batches as large
    pool = [np.concatenate([rec.calls[i][k] for i in keep]) for k in range(len(rec.calls[0]))]
    order = np.random.default_rng(0).permutation(len(pool[0]))
    return [[a[rows] for a in pool] for rows in np.array_split(order, len(keep))]


def with_engine(model: Any, engine: str, cfg: Any) -> Any:
    """``model`` (a LoadedModel) with its network run by ``engine``; ``cfg`` (the SampleConfig
    about to be sampled) is what int8 calibrates on."""
    check_engine(engine, model, cfg.precision)
    if engine == "torch":
        return model
    ov = _import("openvino", engine)
    nncf = _import("nncf", engine) if engine == "openvino-int8" else None
    if nncf is not None and cpu_has_vnni() is False:
        warn_int8_without_vnni()
    from .export import _require_onnx, to_onnx

    _require_onnx()
    net = copy.deepcopy(model.net).float().to(memory_format=torch.contiguous_format).eval()  # the caller's stays
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        path.write_bytes(to_onnx(net, model.config))
        graph = core.read_model(str(path))
    if nncf is not None:
        feeds = calibration_inputs(model, cfg)
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bar: the command prints its own
            # TRANSFORMER (SmoothQuant, attention's products kept apart) and MIXED (asymmetric
            # activations): 5.1% output error against 8.8% for NNCF's defaults, at their speed
            graph = nncf.quantize(graph, nncf.Dataset(feeds), subset_size=len(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                  preset=nncf.QuantizationPreset.MIXED)
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return dataclasses.replace(model, net=OpenVinoNet(compiled, _null_class(model)))


def _null_class(model: Any) -> int | None:
    """A conditional model's null class index (= its number of classes); None when unconditional."""
    return model.config.model.num_classes or None
