"""The diffusion math only: the forward process, eps/x0/v conversions, the posterior, the
training loss and the variational bound. Knows nothing of the network's insides (rule 4).

Shapes: x is (B, C, H, W); t is a (B,) long tensor of indices into the schedule.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..config import DiffusionConfig
from .schedules import NoiseSchedule

Network = Callable[..., torch.Tensor]  # (x_t, t[, cond]) -> output; cond (B,) long class labels


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a[t] shaped (B, 1, ..., 1) to broadcast over x, cast to x's arithmetic ``dtype`` (the
    schedule is float64; x is float32 on every hot path); stays on t's device (no host sync)."""
    return a[t].to(dtype).reshape(-1, *([1] * (ndim - 1)))


def q_sample(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM Eq. 4: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    return extract(s.sqrt_alpha_bar, t, x0.ndim) * x0 + extract(s.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise


def x0_from_eps(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDPM Eq. 4 solved for x0."""
    n = x_t.ndim
    return extract(s.sqrt_recip_alpha_bar, t, n) * x_t - extract(s.sqrt_recipm1_alpha_bar, t, n) * eps


def eps_from_x0(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """DDPM Eq. 4 solved for eps."""
    n = x_t.ndim
    return (extract(s.sqrt_recip_alpha_bar, t, n) * x_t - x0) / extract(s.sqrt_recipm1_alpha_bar, t, n)


def v_from(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho Sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
    return extract(s.sqrt_alpha_bar, t, x0.ndim) * eps - extract(s.sqrt_one_minus_alpha_bar, t, x0.ndim) * x0


def x0_from_v(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho: x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    return extract(s.sqrt_alpha_bar, t, x_t.ndim) * x_t - extract(s.sqrt_one_minus_alpha_bar, t, x_t.ndim) * v


def target_for(objective: str, s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for this objective."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    return v_from(s, x0, t, eps)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen Sec. 2.3: clip each image to its own percentile of |x0| (at least 1), rescale."""
    q = torch.quantile(x0.abs().flatten(1), percentile, dim=1).clamp(min=1.0)
    q = q.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-q, q) / q


class Prediction(NamedTuple):
    """The network's output in every form the samplers use."""

    eps: torch.Tensor
    x0: torch.Tensor
    var_frac: torch.Tensor | None  # learned interpolation in [0, 1] between log beta-tilde and log beta


def interpret(s: NoiseSchedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
              objective: str, learn_sigma: bool, clip: str = "none") -> Prediction:
    """One conversion from any objective's raw output to (eps, x0), with optional x0 clipping."""
    var_frac = None
    if learn_sigma:
        out, v = out.chunk(2, dim=1)
        var_frac = (v + 1) / 2
    if objective == "eps":
        eps, x0 = out, x0_from_eps(s, x_t, t, out)
    elif objective == "x0":
        x0, eps = out, None
    else:
        x0, eps = x0_from_v(s, x_t, t, out), None
    if clip != "none":
        x0 = x0.clamp(-1, 1) if clip == "clip" else dynamic_threshold(x0)
        eps = None
    if eps is None:
        eps = eps_from_x0(s, x_t, t, x0)
    return Prediction(eps, x0, var_frac)


class Denoiser:
    """The network plus the conversions: ``denoiser(x_t, t) -> Prediction``.

    ``t`` indexes ``schedule``; the network sees ``schedule.timesteps[t]``, the step it was
    trained on. The condition lives here, so every sampler takes it without a change: build
    one with :meth:`conditioned` (class labels ``cond`` (B,) long, ``guidance`` w, an optional
    noise range). ``cond=None`` is unconditional (a conditional net then sees its null class).

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6, with their w):
    ``out = out_c + w (out_c - out_u)``, so w = 0 is the plain conditional model and
    diffusers' ``guidance_scale`` is w + 1. It is applied to the raw output before
    :func:`interpret`: eps, x0 and v are affine in each other at fixed x_t, so guiding any of
    them guides eps the same way, and clipping acts on the guided x0. With learned variances
    the mean channels are guided and the conditional variance is kept. Conditional and null
    predictions come from one batched forward pass; w = 0 skips the null pass entirely.

    Autoguidance (Karras et al. 2024; :meth:`autoguided`) guides away from a weaker network of
    the same kind instead of the null class, so it needs no labels: ``out + w (out_c - out_guide)``,
    added to classifier-free guidance's term when both are on.
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, *, objective: str = "eps",
                 learn_sigma: bool = False, clip: str = "none", num_classes: int = 0):
        self.net, self.schedule = net, schedule
        self.objective, self.learn_sigma, self.clip = objective, learn_sigma, clip
        self.num_classes = num_classes  # the null class's index (0: an unconditional net)
        self.cond: torch.Tensor | None = None
        self.guidance = 0.0
        self.guide_mask: torch.Tensor | None = None  # (T,) bool: guide at these t (None: all)
        self.null_passes = 0  # calls that also ran the null class: each costs one more evaluation per image
        self.guide_net: Network | None = None  # autoguidance's guiding (weaker) network
        self.autoguidance = 0.0
        self.guide_passes = 0  # calls that also ran the guiding network: one more evaluation per image each
        self.autoguide_mask: torch.Tensor | None = None  # (T,) bool: autoguide at these t (None: all)

    def conditioned(self, cond: torch.Tensor | None, guidance: float = 0.0,
                    interval: tuple[float, float] | None = None) -> Denoiser:
        """A copy that draws classes ``cond`` (B,) with guidance w, guided only where the noise
        level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in ``interval`` = [lo, hi]
        (Kynkaanniemi et al. 2024; EDM's sigma units)."""
        if cond is not None and self.num_classes == 0:
            raise ValueError("class labels need a class-conditional network (num_classes > 0)")
        d = copy.copy(self)
        d.cond, d.guidance, d.guide_mask, d.null_passes, d.guide_passes = cond, float(guidance), None, 0, 0
        if interval is not None:
            d.guide_mask = self._sigma_mask(interval)
        return d

    def _sigma_mask(self, interval: tuple[float, float]) -> torch.Tensor:
        """(T,) bool: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) in [lo, hi]."""
        ab = self.schedule.alpha_bar
        sigma = ((1 - ab) / ab).sqrt()
        return (sigma >= interval[0]) & (sigma <= interval[1])

    def autoguided(self, guide_net: Network | None, w: float,
                   interval: tuple[float, float] | None = None) -> Denoiser:
        """A copy guided by a weaker network of the same kind (Karras et al. 2024, Eq. 2 with
        their w = 1 + ours): ``out = out + w (out - out_guide)`` on the raw output, the guide
        seeing the same x_t, t and class. Composes with classifier-free guidance (both terms
        are added); works for unconditional networks too. w = 0 (or no net) is off. With
        ``interval`` = [lo, hi] only noise levels sigma_t in it are guided (the guide is not
        run elsewhere), as :meth:`conditioned` does for classifier-free guidance."""
        d = copy.copy(self)
        d.guide_net, d.autoguidance, d.guide_passes = (guide_net, float(w), 0) if guide_net is not None and w \
            else (None, 0.0, 0)
        d.autoguide_mask = self._sigma_mask(interval) if d.guide_net is not None and interval is not None else None
        return d

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        step = self.schedule.timesteps[t]
        if self.cond is None:
            out = out_c = self.net(x_t, step).float()
        elif self.guidance == 0 or (self.guide_mask is not None and not bool(self.guide_mask[t].any())):
            out = out_c = self.net(x_t, step, self.cond).float()
        else:
            out, out_c = self._guided(x_t, t, step)
        if self.guide_net is not None and (self.autoguide_mask is None or bool(self.autoguide_mask[t].any())):
            out = self._autoguided(out, out_c, x_t, t, step)
        return interpret(self.schedule, out, x_t, t, objective=self.objective,
                         learn_sigma=self.learn_sigma, clip=self.clip)

    def _mean_channels(self, out: torch.Tensor) -> int:
        return out.shape[1] // 2 if self.learn_sigma else out.shape[1]  # guidance moves the mean only

    def _guided(self, x_t: torch.Tensor, t: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ho & Salimans Eq. 6 on the raw output, both passes in one batch of 2B; (guided, conditional)."""
        null = torch.full_like(self.cond, self.num_classes)
        self.null_passes += 1
        both = self.net(torch.cat([x_t, x_t]), torch.cat([step, step]), torch.cat([self.cond, null]))
        out_c, out_u = both.float().chunk(2)
        c = self._mean_channels(out_c)
        mean = out_c[:, :c] + self.guidance * (out_c[:, :c] - out_u[:, :c])
        if self.guide_mask is not None:  # outside the interval: the plain conditional output
            mean = torch.where(extract(self.guide_mask, t, x_t.ndim, torch.bool), mean, out_c[:, :c])
        return (torch.cat([mean, out_c[:, c:]], dim=1) if self.learn_sigma else mean), out_c

    def _autoguided(self, out: torch.Tensor, out_c: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    step: torch.Tensor) -> torch.Tensor:
        """``out + w (out_c - out_guide)``: out_c is the guided network's own (conditional) output."""
        self.guide_passes += 1
        bad = (self.guide_net(x_t, step) if self.cond is None else self.guide_net(x_t, step, self.cond)).float()
        c = self._mean_channels(out)
        mean = out[:, :c] + self.autoguidance * (out_c[:, :c] - bad[:, :c])
        if self.autoguide_mask is not None:  # outside the interval: the output without autoguidance
            mean = torch.where(extract(self.autoguide_mask, t, x_t.ndim, torch.bool), mean, out[:, :c])
        return torch.cat([mean, out[:, c:]], dim=1) if self.learn_sigma else mean


class Posterior(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor


def q_posterior(s: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Posterior:
    """DDPM Eqs. 6-7: q(x_{t-1} | x_t, x0) = N(mu-tilde, beta-tilde)."""
    n = x_t.ndim
    mean = extract(s.posterior_mean_coef1, t, n) * x0 + extract(s.posterior_mean_coef2, t, n) * x_t
    return Posterior(mean, extract(s.posterior_variance, t, n).expand_as(x_t),
                     extract(s.posterior_log_variance_clipped, t, n).expand_as(x_t))


def p_log_variance(s: NoiseSchedule, t: torch.Tensor, ndim: int, *, variance: str,
                   var_frac: torch.Tensor | None = None) -> torch.Tensor:
    """log sigma_t^2 of p(x_{t-1}|x_t): beta-tilde, beta (DDPM Sec. 3.2), or learned
    (Improved DDPM Eq. 15)."""
    min_log = extract(s.posterior_log_variance_clipped, t, ndim)
    if variance == "learned":
        if var_frac is None:
            raise ValueError("learned variance needs a model trained with learn_sigma")
        # Eq. 15 with the true beta_t at every t (improved-diffusion's LEARNED_RANGE), so the
        # decoder's variance at t=0 is learned too
        max_log = extract(torch.log(s.betas), t, ndim)
        return var_frac * max_log + (1 - var_frac) * min_log
    if variance != "beta":
        return min_log
    # "beta" uses beta-tilde at t=0 as improved-diffusion's FIXED_LARGE does, so L_0 stays finite
    betas = torch.cat([s.posterior_variance[1:2], s.betas[1:]]) if s.T > 1 else s.betas
    return extract(torch.log(betas), t, ndim)


# ---------------------------------------------------------------- training loss


class LossTerms(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    per_sample: torch.Tensor  # (B,) the weighted simple loss per sample, before the mean
    vlb: torch.Tensor | None  # (B,) L_t in bits/dim, when learning variances


def _elementwise(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    return F.smooth_l1_loss(pred, target, reduction="none")


def snr(s: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at t (computed in float64, float32 out)."""
    ab = s.alpha_bar[t]
    return (ab / (1 - ab)).float()


def loss_weight(cfg: DiffusionConfig, s: NoiseSchedule, t: torch.Tensor) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al. Eq. 9), expressed for the chosen objective."""
    if cfg.loss_weighting == "uniform":
        return None
    r = snr(s, t)
    w = r.clamp(max=cfg.min_snr_gamma)
    if cfg.objective == "eps":
        return w / r
    if cfg.objective == "v":
        return w / (r + 1)
    return w


def sample_noise(x0: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise, plus per-channel offset noise (Guttenberg 2023) when offset > 0."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset > 0:
        b, c = x0.shape[:2]
        noise = noise + offset * torch.randn((b, c, *([1] * (x0.ndim - 2))), generator=generator,
                                             device=x0.device, dtype=x0.dtype)
    return noise


def sample_timesteps(cfg: DiffusionConfig, s: NoiseSchedule, n: int, *, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) training steps t. ``uniform``: DDPM's t ~ U{0..T-1}. ``lognormal``: EDM's noise-level
    distribution (Karras et al. 2022, Sec. 5): ln sigma ~ N(P_mean, P_std^2), mapped to the t
    whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is nearest in ln sigma (sigma_t rises
    with t), so that training spends its steps at the noise levels that matter most."""
    if cfg.t_sampling == "uniform":
        return torch.randint(0, cfg.timesteps, (n,), device=device, generator=generator)
    z = torch.randn(n, device=device, generator=generator, dtype=torch.float64)
    log_sigma = cfg.lognormal_mean + cfg.lognormal_std * z
    ab = s.alpha_bar.to(device)
    log_sig_t = 0.5 * (torch.log1p(-ab) - torch.log(ab))  # ascending in t
    hi = torch.searchsorted(log_sig_t, log_sigma).clamp(1, len(ab) - 1)
    lo = hi - 1
    nearer_lo = (log_sigma - log_sig_t[lo]) < (log_sig_t[hi] - log_sigma)
    return torch.where(nearer_lo, lo, hi).long()


def training_losses(net: Network, s: NoiseSchedule, cfg: DiffusionConfig, x0: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, *, learn_sigma: bool = False,
                    cond: torch.Tensor | None = None) -> LossTerms:
    """DDPM Algorithm 1 (any objective, weighting and loss type); with learned variances the
    improved-DDPM hybrid L_simple + lambda L_vlb, stop-gradient on the mean in L_vlb.
    ``cond``: (B,) class labels for a conditional net (the null class where dropped)."""
    x_t = q_sample(s, x0, t, noise)
    out = (net(x_t, t) if cond is None else net(x_t, t, cond)).float()
    vlb = None
    if learn_sigma:
        out, v = out.chunk(2, dim=1)
        frozen = torch.cat([out.detach(), v], dim=1)
        pred = interpret(s, frozen, x_t, t, objective=cfg.objective, learn_sigma=True)
        vlb = vlb_term(s, pred, x0, x_t, t, variance="learned")
    per = _elementwise(cfg.loss, out, target_for(cfg.objective, s, x0, t, noise)).flatten(1).mean(1)
    w = loss_weight(cfg, s, t)
    if w is not None:
        per = per * w
    loss = per.mean()
    if vlb is not None:
        # L_vlb = T * E_t[L_t]; improved-diffusion's lambda = 1e-3 with this scaling
        loss = loss + cfg.vlb_weight * s.T * vlb.mean()
    return LossTerms(loss, per.detach(), None if vlb is None else vlb.detach())


# ---------------------------------------------------------------- variational bound


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """DDPM Eq. 13: log-probability of 8-bit data x in [-1, 1] under a Gaussian binned into
    256 buckets of width 2/255, the outer buckets extended to infinity. Elementwise, nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term(s: NoiseSchedule, pred: Prediction, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor, *, variance: str) -> torch.Tensor:
    """DDPM Eq. 5: L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, and the
    decoder's -log p(x0|x1) for t = 0. Per sample, in bits per dimension."""
    true = q_posterior(s, x0, x_t, t)
    mean = q_posterior(s, pred.x0, x_t, t).mean
    logvar = p_log_variance(s, t, x_t.ndim, variance=variance, var_frac=pred.var_frac)
    kl = normal_kl(true.mean, true.log_variance, mean, logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def prior_bpd(s: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T|x0) || N(0, I)) per sample, in bits per dimension."""
    t = torch.full((x0.shape[0],), s.T - 1, device=x0.device, dtype=torch.long)
    mean = extract(s.sqrt_alpha_bar, t, x0.ndim) * x0
    logvar = torch.log(extract(1 - s.alpha_bar, t, x0.ndim)).expand_as(x0)
    return normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1) / math.log(2.0)
