"""Mixed precision: which autocast dtype a device runs fast, and the network under it.

``fp32`` runs the network's function exactly (the default). ``bf16`` runs convolutions and
matrix products in bfloat16 under ``torch.autocast`` with fp32 weights and fp32 loss and sampler
math. It runs natively on GPUs since Ampere and on CPUs with AVX512-BF16 or AMX; elsewhere it
is emulated and much slower. Native is not the same as faster: on some CPUs with AVX512-BF16 and
no AMX the bf16 kernels are slower than fp32's. ``fp16`` (CUDA only) adds a gradient scaler.

``auto`` therefore decides by measurement on a CPU (:func:`resolve_precision`): where bf16 is
native it times the very network and batch shape of the work to come in both arithmetics, in
turns, and takes bf16 only if it is clearly faster (:data:`TRIAL_MARGIN`); the verdict is kept
per CPU model, torch version, thread count, kernel caps and shape in a small JSON cache
(``$DDPM_CACHE_DIR`` or ``$XDG_CACHE_HOME/ddpm``, default ``~/.cache/ddpm``), so the trial runs
once per machine and shape. Where bf16 is not native (or the kernels are capped below it) auto is
fp32 without a trial; on CUDA it is bf16 where the GPU has it.

An explicit ``bf16`` where it is emulated runs (it is the same bf16 arithmetic, and a run's
config may carry it from a machine that has it) after one ``warning:`` line per process
quoting the slowdown measured on such a CPU.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, get_args

import torch

from ..config import Precision
from ..errors import DdpmError

PRECISIONS: tuple[str, ...] = get_args(Precision)
# bf16 speed over fp32 where bf16 is emulated, as `bench/bf16_cost.py` measured it on an AVX2-only
# CPU (its record: bench/results/engines/bf16_cost.json); quoted by the warning below
EMULATED_BF16_SPEED = {"training": 0.179, "sampling": 0.127}
TRIAL_MARGIN = 1.10  # auto takes bf16 only when the trial finds it this much faster than fp32
TRIAL_BATCH = 32  # at most this many images per timed call: the trial stays short
TRIAL_SECONDS = 1.5  # the timed rounds stop once they have taken this long (after the first two)
TRIAL_ROUNDS = 5  # at most
_warned: set[str] = set()  # device types already warned about in this process


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
        return any(getattr(torch.cpu, c, lambda: False)() for c in checks) and not _kernels_capped()
    return False


# The kernel caps a run can set (oneDNN's, its older name, OpenVINO's) and, for each oneDNN ISA
# name they take, which of bf16 and VNNI (int8 dot products) it keeps. Not a linear order:
# AVX512_CORE drops AVX2_VNNI's VNNI.
KERNEL_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OV_CPU_MAX_ISA")
_NONE, _VNNI, _BOTH = frozenset(), frozenset({"vnni"}), frozenset({"vnni", "bf16"})
ISA_FEATURES = {"SSE41": _NONE, "AVX": _NONE, "AVX2": _NONE, "AVX2_VNNI": _VNNI, "AVX2_VNNI_2": _VNNI,
                "AVX512_CORE": _NONE, "AVX512_CORE_VNNI": _VNNI, "AVX512_CORE_BF16": _BOTH, "AVX10_1_512": _BOTH,
                "AVX512_CORE_FP16": _BOTH, "AVX10_1_512_AMX": _BOTH, "AVX512_CORE_AMX": _BOTH,
                "AVX10_1_512_AMX_FP16": _BOTH, "AVX512_CORE_AMX_FP16": _BOTH, "ALL": _BOTH}


def capped_without(feature: str, names: tuple[str, ...] = KERNEL_CAP_VARS) -> bool:
    """Whether a kernel cap in the environment (``names``) rules ``feature`` ("bf16", "vnni") out:
    how a machine without it is emulated on one that has it. Unknown cap values rule nothing out."""
    caps = (os.environ.get(k, "").upper() for k in names)
    return any(c in ISA_FEATURES and feature not in ISA_FEATURES[c] for c in caps)


def _kernels_capped() -> bool:
    """Whether the kernels were restricted below bfloat16 on purpose (ATEN_CPU_CAPABILITY=avx2,
    ONEDNN_MAX_CPU_ISA=AVX2); the CPU's own flags still say bf16 then, but the convolutions would
    emulate it."""
    return (capped_without("bf16", KERNEL_CAP_VARS[:2])
            or torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None for plain fp32."""
    if precision not in PRECISIONS:
        raise DdpmError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":  # without a trial (see resolve_precision): the hardware's rule
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "bf16" and not native_bf16(device):
        warn_emulated_bf16(device)
    if precision == "fp16" and device.type != "cuda":
        raise DdpmError("--precision fp16 needs a CUDA device (on a CPU use bf16)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trial(NamedTuple):
    """What ``auto``'s trial times: the network and one call's input of the work to come."""

    net: torch.nn.Module
    shape: tuple[int, ...]  # (B, C, H, W); B is capped at TRIAL_BATCH
    training: bool  # forward and backward (a training step), or forward alone (a sampler step)
    num_classes: int = 0  # > 0: the network takes class labels
    channels_last: bool = False


Timer = Callable[[], float]


def resolve_precision(precision: str, device: torch.device, trial: Trial | None = None, *,
                      measure: Callable[[Trial, torch.device], float] | None = None,
                      say: Callable[[str], None] | None = None) -> str:
    """The arithmetic to run, ``fp32``, ``bf16`` or ``fp16``: ``precision`` itself unless it is
    ``auto``, which a CPU with native bf16 decides by a timed ``trial`` (cached; see the module's
    docstring). ``measure`` times it (default :func:`time_trial`: bf16's speed over fp32's);
    ``say`` gets the one line a trial prints (default: stderr)."""
    autocast_dtype(precision, device)  # an unknown name, fp16 without CUDA: one line
    if precision != "auto":
        return precision
    if device.type != "cpu" or not native_bf16(device) or trial is None:
        return describe(autocast_dtype("auto", device))
    key = trial_key(trial)
    verdict = _cached(key)
    if verdict is None:
        ratio = (measure or time_trial)(trial, device)
        verdict = {"choice": "bf16" if ratio >= TRIAL_MARGIN else "fp32", "bf16_speed": round(ratio, 3)}
        _store(key, verdict)
        (say or (lambda line: print(line, file=sys.stderr)))(
            f"precision auto: {verdict['choice']} (bf16 measured {ratio:.2f}x fp32's speed here; "
            f"bf16 needs {TRIAL_MARGIN:.2f}x)")
    return verdict["choice"]


def time_trial(trial: Trial, device: torch.device, timer: Timer = time.perf_counter) -> float:
    """bf16's speed over fp32's on ``trial``: the calls in turns (fp32, bf16, bf16, fp32, ...)
    after one untimed call each, for at most TRIAL_ROUNDS rounds or TRIAL_SECONDS; the median of
    the per-round ratios. The network's weights, gradients and the random streams are left as
    they were."""
    b = min(trial.shape[0], TRIAL_BATCH)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((b, *trial.shape[1:]), generator=gen).to(device)
    if trial.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 100, (b,), generator=gen).to(device)
    cond = (torch.randint(0, trial.num_classes + 1, (b,), generator=gen).to(device),) if trial.num_classes else ()
    calls = {name: _trial_call(trial, under_autocast(trial.net, device, dtype), x, t, cond)
             for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    with torch.random.fork_rng(devices=[]):
        for call in calls.values():
            call()
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        start = timer()
        for r in range(TRIAL_ROUNDS):
            for name in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                t0 = timer()
                calls[name]()
                times[name].append(timer() - t0)
            if r >= 1 and timer() - start > TRIAL_SECONDS:
                break
    return float(statistics.median(f / max(bf, 1e-12) for f, bf in zip(times["fp32"], times["bf16"])))


def _trial_call(trial: Trial, net: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                cond: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            net(x, t, *cond)

    def step() -> None:
        with torch.enable_grad():
            net(x, t, *cond).float().square().mean().backward()
        for p in trial.net.parameters():
            p.grad = None

    return step if trial.training else forward


def trial_key(trial: Trial) -> str:
    """What a verdict holds for: the CPU, torch, threads, kernel caps and the trial's shape."""
    caps = ",".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", *KERNEL_CAP_VARS) if k in os.environ)
    params = sum(p.numel() for p in trial.net.parameters())
    b = min(trial.shape[0], TRIAL_BATCH)
    return "|".join([_cpu_model(), f"torch {torch.__version__}", f"threads {torch.get_num_threads()}",
                     f"caps {caps or 'none'}", "train" if trial.training else "sample",
                     f"{type(trial.net).__name__} {params} params", "x".join(map(str, (b, *trial.shape[1:]))),
                     f"classes {trial.num_classes}", "channels_last" if trial.channels_last else "contiguous"])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cache_file() -> Path:
    """Where auto's verdicts are kept: $DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm (~/.cache/ddpm)."""
    base = os.environ.get("DDPM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm"
    return Path(base) / "precision.json"


def _cached(key: str) -> dict | None:
    """The verdict kept for ``key``; a missing, unreadable or malformed cache is a miss."""
    try:
        verdict = json.loads(cache_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(verdict, dict) and verdict.get("choice") in ("fp32", "bf16")
    return verdict if ok else None


def _store(key: str, verdict: dict) -> None:
    """Keep ``verdict`` beside the others (atomically); a cache that cannot be written is skipped."""
    path = cache_file()
    try:
        try:
            kept = json.loads(path.read_text())
            kept = kept if isinstance(kept, dict) else {}
        except (OSError, ValueError):
            kept = {}
        kept[key] = verdict
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(kept, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass


def warn_emulated_bf16(device: torch.device) -> None:
    """One ``warning:`` line on stderr, once per process and device type."""
    if device.type in _warned:
        return
    _warned.add(device.type)
    what = "this CPU has no AVX512-BF16 or AMX" if device.type == "cpu" else f"this {device.type} device has none"
    tr, sa = EMULATED_BF16_SPEED["training"], EMULATED_BF16_SPEED["sampling"]
    print(f"warning: --precision bf16 is emulated here ({what}): measured {1 / tr:.0f}x slower training and "
          f"{1 / sa:.0f}x slower sampling than fp32 on such a CPU; --precision auto picks the fast one",
          file=sys.stderr)


def describe(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def under_autocast(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                   dtype: torch.dtype | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``net`` run under autocast, returning fp32 (so the loss and the sampler math stay fp32)."""
    if dtype is None:
        return net

    def call(x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return net(x, t, *cond).float()  # cond: the optional class labels (a conditional net)

    return call


def fast_cuda_math(enabled: bool) -> None:
    """TF32 for fp32 matrix products and convolutions on CUDA (Ampere and later): several times the
    fp32 rate with a 10-bit mantissa, which diffusion training tolerates."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once


CudaMath = tuple[bool, bool, bool]  # (matmul TF32, cuDNN TF32, cuDNN benchmark)


def cuda_math_state() -> CudaMath:
    """The process's CUDA arithmetic switches as they are now (to put them back after a call)."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


def restore_cuda_math(state: CudaMath) -> None:
    """Put back what :func:`cuda_math_state` saw: a library call leaves its caller's settings alone."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = state
