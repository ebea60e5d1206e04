"""The variational bound on -log p(x0) (DDPM Eq. 5) in bits per dimension, as improved-diffusion
reports it: L_T (prior) + sum_{t>0} L_{t-1} (KL terms) + L_0 (discretised Gaussian decoder).

Timestep indices t are the schedule's, 0 .. T-1: the term at t = 0 is the decoder
-log p(x0 | x_1), the term at t > 0 is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), and the prior
is KL(q(x_{T-1} | x0) || N(0, I)). Images are uint8, mapped to [-1, 1]; the decoder bins them
into 256 buckets, so the total is a bound on the discrete NLL of the 8-bit data.

All T terms cost T network evaluations per image. ``timesteps=k`` estimates the sum of the T-1
KL terms without bias from k of them per image, stratified: {1, ..., T-1} is cut into k
contiguous strata of near-equal size n_j, each image draws one t uniformly in each stratum
(independently of the other images), and the term is weighted by n_j. The decoder and the
prior are always computed in full (one network evaluation and none).

:func:`variational_bound` drives a :class:`~ddpm.core.diffusion.Denoiser` directly (any network and
schedule); :func:`nll_bits_per_dim` is the thin layer over a loaded run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..config import CLIPS, VARIANCES, Variance
from ..data.readers import to_model_range
from ..core.diffusion import Denoiser, prior_bpd, q_sample, vlb_term
from ..errors import DdpmError
from ..runtime.progress import bar as progress_bar
from ..sampling.generate import LoadedModel



@dataclass(frozen=True)
class NllReport:
    """The variational bound on the test images, in bits per dimension (means over images)."""

    bits_per_dim: float  # prior + kl + decoder
    bits_per_dim_stderr: float  # standard error over images (includes the t-sampling noise when not exact)
    prior_bpd: float  # L_T
    decoder_bpd: float  # L_0 = -log p(x0 | x_1), discretised Gaussian
    kl_bpd: float  # sum over t > 0 of the KL terms
    kl_bpd_stderr: float  # its standard error over images
    terms: tuple[float, ...]  # (T,) per-term means: terms[0] the decoder, terms[t > 0] the KL at t;
    #                            an unbiased per-term estimate (mostly noise, 0 where unvisited) when not exact
    n_images: int
    timesteps: int  # network evaluations per image: T when exact, else k KL terms + the decoder
    exact: bool
    variance: str
    sampling: str  # "all" or "stratified"
    seed: int

    @property
    def T(self) -> int:
        return len(self.terms)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["terms"] = list(self.terms)
        return d


# ---------------------------------------------------------------- timesteps


def kl_strata(T: int, k: int) -> torch.Tensor:
    """(k + 1,) edges cutting {1, ..., T-1} into k contiguous strata of near-equal size."""
    if not 1 <= k <= T - 1:
        raise DdpmError(f"the number of KL terms must be between 1 and T-1={T - 1}, got {k}")
    return 1 + torch.div(torch.arange(k + 1) * (T - 1), k, rounding_mode="floor")


def stratified_timesteps(T: int, k: int, n: int, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) timesteps, one uniform in each stratum per image, and the (k,) stratum sizes,
    which are the weights that make sum_j size_j L(t_j) unbiased for sum_{t>0} L(t)."""
    edges = kl_strata(T, k)
    sizes = edges[1:] - edges[:-1]  # (k,), all >= 1
    u = torch.rand((n, k), generator=generator, dtype=torch.float64)
    offset = (u * sizes).long().clamp(max=sizes - 1)
    return edges[:-1] + offset, sizes.double()


# ---------------------------------------------------------------- the bound


def bound_term(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, *, variance: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo draw of the term at t (decoder at 0, KL above): x_t ~ q(x_t | x0), then
    DDPM Eq. 5's term; (B,) bits per dimension, float64."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(denoiser.schedule, x0, t, noise)
    pred = denoiser(x_t, t)
    return vlb_term(denoiser.schedule, pred, x0, x_t, t, variance=variance).double()


class _Totals:
    """Per-image parts of the bound over the batches, and the per-term sums (on x0's device)."""

    def __init__(self, T: int, device: torch.device):
        self.prior: list[torch.Tensor] = []
        self.decoder: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.term_sums = torch.zeros(T, dtype=torch.float64, device=device)


def _kl_draws(T: int, k: int | None, b: int, t_gen: torch.Generator, device: torch.device
              ) -> list[tuple[torch.Tensor, float]]:
    """(t, weight) per network evaluation for a batch of b images: every t > 0 with weight 1,
    or one t per stratum and image weighted by the stratum's size."""
    if k is None:
        return [(torch.full((b,), t, device=device, dtype=torch.long), 1.0) for t in range(1, T)]
    ts, sizes = stratified_timesteps(T, k, b, t_gen)
    return [(ts[:, j].to(device), sizes[j].item()) for j in range(k)]


def _batch_bound(denoiser: Denoiser, x0: torch.Tensor, k: int | None, variance: str,
                 gen: torch.Generator, t_gen: torch.Generator, tot: _Totals, tick) -> None:
    b, dev = x0.shape[0], x0.device
    t0 = torch.zeros(b, device=dev, dtype=torch.long)
    dec = bound_term(denoiser, x0, t0, variance=variance, generator=gen)
    tot.term_sums.index_add_(0, t0, dec)
    tick()
    kl = torch.zeros(b, dtype=torch.float64, device=dev)
    for t, weight in _kl_draws(denoiser.schedule.T, k, b, t_gen, dev):
        term = weight * bound_term(denoiser, x0, t, variance=variance, generator=gen)
        kl += term
        tot.term_sums.index_add_(0, t, term)
        tick()
    tot.prior.append(prior_bpd(denoiser.schedule, x0).double().cpu())
    tot.decoder.append(dec.cpu())
    tot.kl.append(kl.cpu())


@torch.inference_mode()
def variational_bound(denoiser: Denoiser, x0: torch.Tensor, *, timesteps: int | None = None,
                      variance: Variance = "beta_tilde", batch_size: int = 256, seed: int = 0,
                      progress: bool = False) -> NllReport:
    """DDPM Eq. 5 on data ``x0`` (float, model range [-1, 1], (N, C, H, W)) under ``denoiser``:
    all T terms when ``timesteps`` is None (or >= T-1), else a stratified unbiased estimate of the
    KL sum from ``timesteps`` terms per image. Means over images, bits per dimension."""
    if variance not in VARIANCES:
        raise DdpmError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
    if variance == "learned" and not denoiser.learn_sigma:
        raise DdpmError("variance 'learned' needs a model trained with learned variances (learn_sigma)")
    if batch_size < 1 or len(x0) < 1:
        raise DdpmError(f"need at least one image and batch size >= 1, got {len(x0)} and {batch_size}")
    T = denoiser.schedule.T
    if T < 2:
        raise DdpmError("the variational bound needs T >= 2")
    k = None if timesteps is None or timesteps >= T - 1 else timesteps
    if k is not None:
        kl_strata(T, k)  # raises on k < 1
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    t_gen = torch.Generator().manual_seed(seed + 1)  # t on the CPU: the same t on any device
    tot = _Totals(T, x0.device)
    per_batch = T if k is None else k + 1
    with progress_bar(per_batch * math.ceil(len(x0) / batch_size), desc="nll", unit="term",
                      enabled=progress) as bar:  # on stderr with the time left, when it is a terminal
        for start in range(0, len(x0), batch_size):
            xb = x0[start:start + batch_size]
            _batch_bound(denoiser, xb, k, variance, gen, t_gen, tot, lambda: bar.update(1))
    return _report(tot, len(x0), T, k, variance, seed)


def _report(tot: _Totals, n: int, T: int, k: int | None, variance: str, seed: int) -> NllReport:
    prior, dec, kl = torch.cat(tot.prior), torch.cat(tot.decoder), torch.cat(tot.kl)
    total = prior + dec + kl

    def stderr(v: torch.Tensor) -> float:
        return v.std().item() / math.sqrt(n) if n > 1 else float("nan")

    return NllReport(
        bits_per_dim=total.mean().item(), bits_per_dim_stderr=stderr(total), prior_bpd=prior.mean().item(),
        decoder_bpd=dec.mean().item(), kl_bpd=kl.mean().item(), kl_bpd_stderr=stderr(kl),
        terms=tuple((tot.term_sums.cpu() / n).tolist()), n_images=n, timesteps=T if k is None else k + 1,
        exact=k is None, variance=variance, sampling="all" if k is None else "stratified", seed=seed)


def check_has_bound(config) -> None:
    """One line for a run whose process has no discrete variational bound to evaluate."""
    if config.diffusion.process != "vp":
        raise DdpmError(f"the likelihood (DDPM's variational bound, Eq. 5) is the discrete chain's (vp); this run's "
                        f"process is {config.diffusion.process}")


def nll_bits_per_dim(model: LoadedModel, images_uint8: torch.Tensor, *, timesteps: int | None = None,
                     batch_size: int = 256, seed: int = 0, variance: Variance | None = None,
                     clip: str = "clip", progress: bool = False) -> NllReport:
    """The bound on the NLL of 8-bit images under a loaded run, bits/dim (improved-diffusion's
    ``calc_bpd_loop``). ``variance`` defaults to "learned" for a learn_sigma model, else
    "beta_tilde"; ``clip`` treats the predicted x0 as the samplers do ("clip", as
    improved-diffusion's image_nll.py; "none" for the raw network)."""
    mc = model.config
    check_has_bound(mc)
    shape = (mc.model.channels, mc.data.image_size, mc.data.image_size)
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or tuple(images_uint8.shape[1:]) != shape:
        raise DdpmError(f"expected uint8 images of shape (N, {', '.join(map(str, shape))}), "
                        f"got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if clip not in CLIPS:
        raise DdpmError(f"unknown clip {clip!r}; choose one of: {', '.join(CLIPS)}")
    if variance is None:
        variance = "learned" if mc.model.learn_sigma else "beta_tilde"
    dev = model.schedule.alpha_bar.device
    x0 = to_model_range(images_uint8).to(dev)
    return variational_bound(model.denoiser(clip), x0, timesteps=timesteps, variance=variance,
                             batch_size=batch_size, seed=seed, progress=progress)


# ---------------------------------------------------------------- reporting


def term_bins(report: NllReport, bins: int = 10) -> list[tuple[int, int, float]]:
    """The KL terms summed over ``bins`` contiguous ranges of t in [1, T-1]: (first, last, bpd)."""
    T = report.T
    bins = max(1, min(bins, T - 1))
    edges = kl_strata(T, bins).tolist()
    return [(lo, hi - 1, math.fsum(report.terms[lo:hi])) for lo, hi in zip(edges[:-1], edges[1:])]


def format_nll(report: NllReport, bins: int = 10) -> str:
    """A short table: the prior, the KL terms in ``bins`` ranges of t, the decoder and the total."""
    how = (f"all {report.T} terms" if report.exact else
           f"stratified estimate, {report.timesteps - 1} of {report.T - 1} KL terms per image + decoder")
    lines = [f"NLL bound {report.bits_per_dim:.4f} ± {report.bits_per_dim_stderr:.4f} bits/dim "
             f"({report.n_images} images; {how}; variance {report.variance})",
             f"  {'term':<22}{'bits/dim':>10}{'share':>8}"]
    total = report.bits_per_dim if report.bits_per_dim else 1.0

    def row(name: str, v: float) -> str:
        return f"  {name:<22}{v:>10.4f}{100 * v / total:>7.1f}%"

    lines.append(row(f"L_T prior (t={report.T - 1})", report.prior_bpd))
    for lo, hi, v in reversed(term_bins(report, bins)):
        lines.append(row(f"KL t={lo}..{hi}" if hi > lo else f"KL t={lo}", v))
    lines.append(row("L_0 decoder (t=0)", report.decoder_bpd))
    lines.append(row("total", report.bits_per_dim))
    return "\n".join(lines)


__all__ = ["NllReport", "VARIANCES", "bound_term", "format_nll", "kl_strata", "nll_bits_per_dim",
           "stratified_timesteps", "term_bins", "variational_bound"]
