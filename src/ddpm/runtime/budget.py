"""Every request is bounded: the memory and work it needs, estimated before it starts, against
what this machine has; what cannot fit is refused in one line that says the estimate and the limit.

The network's peak is traced, not guessed: the network runs on PyTorch's ``meta`` device (shapes
only, nothing allocated) under a dispatch mode that adds up every tensor while it is alive, the
tensors autograd keeps for the backward pass included. The estimate is ``MARGIN`` times that
trace, for the allocator and the convolutions' workspaces: a real CPU forward or training step
stays below it and above a quarter of it (tests/runtime/test_budget.py measures both).
"""
from __future__ import annotations

import functools
import os
import re
import weakref
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import AnyModelConfig, RunConfig
from ..errors import DdpmError

ENV = "DDPM_MEMORY_LIMIT"  # bytes (or 512M, 4G, 1.5GiB) this process may use; overrides what the machine says
MARGIN = 2.0  # traced peak -> the estimate: room for what the trace does not see (allocator, threads)
GIB = 2**30
MAX_STEPS = 1_000_000  # sampler steps (network evaluations of one batch) one request may take
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class Need(NamedTuple):
    """One part of a request's memory: what it is, and its bytes."""

    what: str
    bytes: int


class Available(NamedTuple):
    """The memory this process may still take, and where that figure comes from."""

    bytes: int
    source: str


def parse_size(text: str) -> int:
    """'4G', '512MiB', '1.5g', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if m is None:
        raise DdpmError(f"{ENV} must be a size such as 4G, 512M or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def available_memory(device: torch.device | str = "cpu") -> Available:
    """What this process may still allocate: ``DDPM_MEMORY_LIMIT`` if set, else a CUDA device's
    free memory, else the least of MemAvailable and the cgroup's room (memory.max - memory.current)."""
    if os.environ.get(ENV):
        return Available(parse_size(os.environ[ENV]), ENV)
    dev = torch.device(device)
    if dev.type == "cuda":
        return Available(torch.cuda.mem_get_info(dev)[0], f"free on {dev}")
    found = [a for a in (_meminfo() or _sysconf(), _cgroup_room()) if a is not None]
    return min(found, key=lambda a: a.bytes) if found else Available(2**62, "unknown")


def _meminfo() -> Available | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return Available(int(line.split()[1]) * 1024, "available")
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> Available | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return Available(max(0, int(limit) - used), "left in this container's memory limit")
    except (OSError, ValueError):
        return None


def _sysconf() -> Available | None:
    try:
        return Available(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free")
    except (ValueError, OSError, AttributeError):
        return None


class _LivePeak(TorchDispatchMode):
    """The most bytes alive at once among the tensors made under it (views share their base's)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.owner: dict[int, list[int]] = {}  # id(tensor) -> [bytes, tensors sharing them]

    def _free(self, key: int, rec: list[int]) -> None:
        self.owner.pop(key, None)
        rec[1] -= 1
        if rec[1] == 0:
            self.live -= rec[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        rets = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or id(t) in self.owner:
                continue
            if i < len(rets) and rets[i].alias_info is not None:  # a view or an in-place result: no new bytes
                rec = next((self.owner[id(a)] for a in args if isinstance(a, torch.Tensor) and id(a) in self.owner),
                           None)
                if rec is None:
                    continue
            else:
                rec = [t.untyped_storage().nbytes(), 0]
                self.live += rec[0]
                self.peak = max(self.peak, self.live)
            rec[1] += 1
            self.owner[id(t)] = rec
            weakref.finalize(t, self._free, id(t), rec)
        return out


@functools.lru_cache(maxsize=64)
def network_peak(model: AnyModelConfig, image_size: int, batch: int, *, train: bool) -> int:
    """Bytes the network's activations (training: and its gradients) hold at their peak, for one
    forward (training: forward and backward) of ``batch`` images; traced on the meta device.
    0 where the config describes no network that runs at that size (a caller's own network, e.g. a
    test's closed-form one, sampled under a stand-in config): the other parts are still checked."""
    from ..nn import build_network

    x = torch.empty(batch, model.channels, image_size, image_size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    cond = torch.zeros(batch, dtype=torch.long, device="meta") if model.num_classes else None
    try:
        with torch.device("meta"):
            net = build_network(model).train(train)
        with _LivePeak() as mode:
            if train:
                net(x, t, cond).float().square().mean().backward()
            else:
                with torch.inference_mode():
                    net(x, t, cond)
    except (RuntimeError, ValueError, DdpmError):
        return 0
    return mode.peak


def parameter_bytes(model: AnyModelConfig) -> int:
    """fp32 bytes of the network's weights."""
    from ..nn import build_network

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build_network(model).parameters()) * 4
    except (RuntimeError, ValueError, DdpmError):
        return 0


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"


def check_fits(needs: list[Need], available: Available, *, advice: str) -> None:
    """One line when the parts of a request add up to more than is available."""
    total = sum(n.bytes for n in needs)
    if total > available.bytes:
        parts = ", ".join(f"{n.what}: {gib(n.bytes)}" for n in needs if n.bytes)
        raise DdpmError(f"this request needs about {gib(total)} ({parts}); this machine has {gib(available.bytes)} "
                        f"{'available' if available.source == 'available' else f'({available.source})'}; {advice}")


def smaller_batch(fits: Callable[[int], bool], batch: int, share: float) -> int:
    """A batch size below ``batch`` that ``fits`` (0: not even one image), starting from
    ``share`` of it (memory grows about linearly with the batch) and shrinking until it fits."""
    b = min(batch - 1, int(batch * share))
    while b >= 1 and not fits(b):
        b = int(b * 0.8)
    return max(b, 0)


def check_steps(steps: int, what: str) -> None:
    """Work bounds: a request of more sampler steps than ``MAX_STEPS`` is refused before the first."""
    if steps > MAX_STEPS:
        raise DdpmError(f"{what} makes {steps:,} sampler steps (network evaluations) per batch, more than the "
                        f"{MAX_STEPS:,} a request may take")



def training_needs(cfg: RunConfig, batch: int, frozen_nets: int = 0) -> list[Need]:
    """The memory of one training step on ``batch`` images: the network's activations and
    gradients, its weights with Adam's two moments and the EMA copy (and ``frozen_nets`` more
    copies: a distillation's teacher and target), the batch's own few tensors."""
    m, size = cfg.model, cfg.data.image_size
    weights = parameter_bytes(m) * (4 + frozen_nets)
    step = int(MARGIN * network_peak(m, size, batch, train=True))
    return [Need(f"a training step at batch size {batch}", step),
            Need("the weights, Adam's moments and the EMA", weights),
            Need("the batch", 4 * 4 * batch * m.channels * size * size)]


def check_training_memory(cfg: RunConfig, device: torch.device | str, *, world: int = 1, frozen_nets: int = 0) -> None:
    """One line, before the data is loaded, when a training step cannot fit in the memory left
    (each of ``world`` processes takes its share of the batch)."""
    have = available_memory(device)
    batch = max(1, cfg.train.batch_size // world)
    needs = training_needs(cfg, batch, frozen_nets)
    total = sum(n.bytes for n in needs)
    if total <= have.bytes:
        return
    fits = lambda b: sum(n.bytes for n in training_needs(cfg, b, frozen_nets)) <= have.bytes
    b = smaller_batch(fits, batch, have.bytes / total)
    check_fits(needs, have, advice=f"try --batch-size {b * world}" if b else
               f"not even at --batch-size 1; try a smaller --image-size than {cfg.data.image_size}"
               + ("" if cfg.model.grad_checkpoint else " or --grad-checkpoint"))
