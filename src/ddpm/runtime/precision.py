"""Mixed precision: which autocast dtype a device runs fast, and the network under it.

``fp32`` runs the network's function exactly (the default). ``bf16`` runs convolutions and
matrix products in bfloat16 under ``torch.autocast`` with fp32 weights and fp32 loss and sampler
math. It runs natively on GPUs since Ampere and on CPUs with AVX512-BF16 or AMX, where it is
faster (sampling the seed's network 1.79x the seed's loop against 1.16x in fp32 on a 2-core
AVX-512 EPYC: BENCHMARKS.md, "Engines and precision"); elsewhere it is emulated and slower. ``fp16`` (CUDA only) adds a gradient
scaler. ``auto`` is bf16 where the hardware runs it natively, else fp32.

An explicit ``bf16`` where it is emulated runs (it is the same bf16 arithmetic, and a run's
config may carry it from a machine that has it) after one ``warning:`` line per process
quoting the measured slowdown.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, get_args

import torch

from ..config import Precision
from ..errors import DdpmError

PRECISIONS: tuple[str, ...] = get_args(Precision)
# bf16 speed over fp32 where bf16 is emulated: `python bench/bf16_cost.py` on a 2-core AMD EPYC
# with AVX2 only (bench/results/bf16_cost.json; BENCHMARKS.md, "Engines and precision")
EMULATED_BF16_SPEED = {"training": 0.179, "sampling": 0.127}
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
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "bf16" and not native_bf16(device):
        warn_emulated_bf16(device)
    if precision == "fp16" and device.type != "cuda":
        raise DdpmError("--precision fp16 needs a CUDA device (on a CPU use bf16)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
    """TF32 for fp32 matrix products and convolutions on CUDA (Ampere and later): about 8x the
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
