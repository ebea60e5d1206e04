"""Process-wide settings that only the ``ddpm`` command makes, for its own process.

``import ddpm`` changes nothing in the caller's process. The command's entry point
(:func:`ddpm.cli.main`) calls :func:`apply_command_defaults` before torch loads:

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning, which keeps
  training several times faster when anything else shares the CPU (``bench/levers.py``). libgomp
  reads the variable once, when torch loads it, so it is set only if torch is not loaded yet.
  The user's own ``OMP_WAIT_POLICY`` always wins; ``DDPM_OMP_WAIT_POLICY=off`` leaves libgomp's
  default, any other value of it is used instead of PASSIVE.
- glibc's allocator keeps freed memory for reuse (:func:`keep_freed_memory`): by default glibc
  hands every block over about 32 MB back to the kernel when it is freed and maps it afresh,
  zero-filled page by page, the next time, so a network pass whose activations pass that size
  (a guided pass of 2B rows, a large sampling batch) spends a growing share of its time in page
  faults (``bench/guidance_cost.py`` measures it). ``DDPM_MALLOC=off``,
  or any ``MALLOC_*`` variable of the user's own, or a preloaded allocator, leaves it alone.
- TF32 matrix products and cuDNN's autotuner on CUDA, for the command's sampling and
  evaluation (:func:`command_cuda_math`); training follows ``train.tf32``.

:func:`process_settings` says what is in effect, for logs and benchmark records.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

OMP_VAR = "OMP_WAIT_POLICY"
DDPM_OMP_VAR = "DDPM_OMP_WAIT_POLICY"  # ddpm's choice for its own command; "off": none
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"

DDPM_MALLOC_VAR = "DDPM_MALLOC"  # "off": glibc's default thresholds
KEEP_BYTES = 1 << 30  # blocks under 1 GiB come from the reusable heap, and up to 1 GiB of freed heap is kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

# Filled in by apply_command_defaults: who set OMP_WAIT_POLICY for this process, if anyone.
_applied: dict[str, str | None] = {}


def apply_command_defaults(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set the command's OpenMP wait policy and allocator (see the module's docstring); the
    OpenMP value set, or None."""
    keep_freed_memory(environ)
    want = environ.get(DDPM_OMP_VAR, DEFAULT_OMP_WAIT_POLICY).strip()
    if OMP_VAR in environ:
        _applied["omp_set_by"] = "user"
    elif "torch" in sys.modules:  # too late: libgomp has read its environment already
        _applied["omp_set_by"] = "nobody (torch was loaded first)"
    elif want.lower() in ("", "off", "none", "default"):
        _applied["omp_set_by"] = f"nobody ({DDPM_OMP_VAR}={want or '(empty)'})"
    else:
        environ[OMP_VAR] = want
        _applied["omp_set_by"] = "ddpm"
        return want
    return None


def keep_freed_memory(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make glibc's malloc keep and reuse freed blocks under 1 GiB instead of unmapping them
    (``mallopt(M_MMAP_THRESHOLD)`` and ``M_TRIM_THRESHOLD``); True if it was set. A no-op
    (False) off glibc, with ``DDPM_MALLOC=off``, when the user set a ``MALLOC_*`` variable or
    preloads another allocator (``LD_PRELOAD``), and on any failure. It may be called at any
    time; it acts on later allocations."""
    if environ.get(DDPM_MALLOC_VAR, "").strip().lower() in ("off", "none", "default", "0"):
        _applied["malloc"] = f"glibc default ({DDPM_MALLOC_VAR}=off)"
        return False
    if any(k.startswith("MALLOC_") for k in environ) or "GLIBC_TUNABLES" in environ \
            or "malloc" in environ.get("LD_PRELOAD", ""):
        _applied["malloc"] = "the user's"
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only; AttributeError elsewhere
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    except (OSError, AttributeError, TypeError):
        ok = False
    _applied["malloc"] = f"glibc, blocks under {KEEP_BYTES >> 20} MiB kept" if ok else "platform default"
    return ok


def command_cuda_math(enabled: bool = True) -> None:
    """The command's CUDA arithmetic: TF32 and cuDNN's autotuner (library callers choose their own)."""
    from .precision import fast_cuda_math

    fast_cuda_math(enabled)


def process_settings() -> dict[str, object]:
    """What this process runs with: the OpenMP wait policy libgomp read (None: its default, spin
    then sleep), who set it, and, once torch is loaded, its threads and CUDA arithmetic."""
    out: dict[str, object] = {"omp_wait_policy": os.environ.get(OMP_VAR) or None,
                              "omp_wait_policy_set_by": _applied.get("omp_set_by", "user" if OMP_VAR in os.environ
                                                                     else "nobody"),
                              "malloc": _applied.get("malloc", "platform default")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        out["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["cuda_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
            out["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return out
