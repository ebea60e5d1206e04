"""The diffusion math only: the forward process, eps/x0/v conversions, the posterior, the
training loss and the variational bound. Knows nothing of the network's insides (rule 4).

Shapes: x is (B, C, H, W); t is a (B,) long tensor of indices into a levels table (the
discrete chain's steps, or a continuous process's sampling grid: ``core.processes``).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..config import DiffusionConfig
from .objectives import Objective, coef, eps_from_x0 as _eps_from_x0, get_objective
from .processes import Draw, Levels, Process
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


def target_for(objective: str | Objective, s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for this objective, at steps t of the chain ``s``."""
    obj = get_objective(objective) if isinstance(objective, str) else objective
    return obj.target(x0, eps, s.sqrt_alpha_bar[t], s.sqrt_one_minus_alpha_bar[t])


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


def interpret(levels: Levels | NoiseSchedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
              objective: str | Objective, learn_sigma: bool, clip: str = "none") -> Prediction:
    """One conversion from any objective's raw output to (eps, x0) at levels t of ``levels``,
    with optional x0 clipping."""
    lv = Levels.of_schedule(levels) if isinstance(levels, NoiseSchedule) else levels
    obj = get_objective(objective) if isinstance(objective, str) else objective
    var_frac = None
    if learn_sigma:
        out, v = out.chunk(2, dim=1)
        var_frac = (v + 1) / 2
    alpha, sigma = lv.alpha[t], lv.sigma[t]
    x0 = obj.x0(out, x_t, alpha, sigma)
    eps = obj.eps(out, x_t, alpha, sigma) if clip == "none" else None  # the prediction itself, not a round trip
    if clip != "none":
        x0 = x0.clamp(-1, 1) if clip == "clip" else dynamic_threshold(x0)
    if eps is None:
        eps = _eps_from_x0(x_t, x0, alpha, sigma)
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

    def __init__(self, net: Network, levels: Levels | NoiseSchedule, *, objective: str | Objective = "eps",
                 learn_sigma: bool = False, clip: str = "none", num_classes: int = 0,
                 process: Process | None = None):
        self.net = net
        self.obj = get_objective(objective) if isinstance(objective, str) else objective
        self.objective, self.learn_sigma, self.clip = self.obj.name, learn_sigma, clip
        self.process = process  # where sampling grids come from (None: the levels given are the grid)
        self.num_classes = num_classes  # the null class's index (0: an unconditional net)
        self.cond: torch.Tensor | None = None
        self.guidance = 0.0
        self.guide_interval: tuple[float, float] | None = None
        self.null_passes = 0  # calls that also ran the null class: each costs one more evaluation per image
        self.guide_net: Network | None = None  # autoguidance's guiding (weaker) network
        self.autoguidance = 0.0
        self.guide_passes = 0  # calls that also ran the guiding network: one more evaluation per image each
        self.autoguide_interval: tuple[float, float] | None = None
        self._set_levels(Levels.of_schedule(levels) if isinstance(levels, NoiseSchedule) else levels)

    def _set_levels(self, levels: Levels) -> None:
        self.levels = levels
        c_in = self.obj.c_in(levels.alpha, levels.sigma).float()
        self.c_in = None if bool((c_in == 1).all()) else c_in  # None: the network sees x_t as it is
        self.guide_mask = None if self.guide_interval is None else self._sigma_mask(self.guide_interval)
        self.autoguide_mask = None if self.autoguide_interval is None or self.guide_net is None \
            else self._sigma_mask(self.autoguide_interval)

    @property
    def schedule(self) -> NoiseSchedule:
        """The discrete chain (the ancestral sampler, learned variances and the likelihood need it)."""
        if self.levels.schedule is None:
            raise ValueError("this denoiser's levels have no discrete chain")
        return self.levels.schedule

    def on(self, levels: Levels) -> Denoiser:
        """A copy evaluated on another levels table (a continuous process's sampling grid)."""
        if levels is self.levels:
            return self
        d = copy.copy(self)
        d._set_levels(levels.to(self.levels.device))
        return d

    def conditioned(self, cond: torch.Tensor | None, guidance: float = 0.0,
                    interval: tuple[float, float] | None = None) -> Denoiser:
        """A copy that draws classes ``cond`` (B,) with guidance w, guided only where the noise
        level sigma_t / alpha_t (EDM's sigma units) lies in ``interval`` = [lo, hi]
        (Kynkaanniemi et al. 2024)."""
        if cond is not None and self.num_classes == 0:
            raise ValueError("class labels need a class-conditional network (num_classes > 0)")
        d = copy.copy(self)
        d.cond, d.guidance, d.null_passes, d.guide_passes = cond, float(guidance), 0, 0
        d.guide_interval = None if interval is None else (float(interval[0]), float(interval[1]))
        d.guide_mask = None if interval is None else d._sigma_mask(interval)
        return d

    def _sigma_mask(self, interval: tuple[float, float]) -> torch.Tensor:
        """(K,) bool: the level's sigma / alpha in [lo, hi]."""
        sigma = self.levels.sigma_ve
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
        d.autoguide_interval = None if interval is None else (float(interval[0]), float(interval[1]))
        d.autoguide_mask = d._sigma_mask(interval) if d.guide_net is not None and interval is not None else None
        return d

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        step = self.levels.net_t[t]
        x_in = x_t if self.c_in is None else x_t * coef(self.c_in[t], x_t)
        if self.cond is None:
            out = out_c = self.net(x_in, step).float()
        elif self.guidance == 0 or (self.guide_mask is not None and not bool(self.guide_mask[t].any())):
            out = out_c = self.net(x_in, step, self.cond).float()
        else:
            out, out_c = self._guided(x_in, t, step)
        if self.guide_net is not None and (self.autoguide_mask is None or bool(self.autoguide_mask[t].any())):
            out = self._autoguided(out, out_c, x_in, t, step)
        return interpret(self.levels, out, x_t, t, objective=self.obj, learn_sigma=self.learn_sigma,
                         clip=self.clip)

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


def loss_weight(cfg: DiffusionConfig, obj: Objective | NoiseSchedule, alpha: torch.Tensor,
                sigma: torch.Tensor | None = None) -> torch.Tensor | None:
    """The per-sample weight of the objective's loss, from a weighting stated in x0 units and
    divided by the objective's own (d out / d x0)^2: ``min_snr``: min(SNR, gamma) (Hang et al.
    Eq. 9); ``edm``: EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 with
    sigma = sigma_t / alpha_t (Karras et al. Table 1; 1 on EDM's own preconditioned output).
    ``uniform``: None (the objective's own loss, unweighted). The older call
    ``loss_weight(cfg, schedule, t)`` reads the discrete chain at steps t."""
    if isinstance(obj, NoiseSchedule):  # (cfg, schedule, t)
        s, t = obj, alpha
        obj, alpha, sigma = get_objective(cfg.objective), s.sqrt_alpha_bar[t], s.sqrt_one_minus_alpha_bar[t]
    if cfg.loss_weighting == "uniform":
        return None
    scale2 = obj.out_per_x0(alpha, sigma) ** 2
    if cfg.loss_weighting == "min_snr":
        w = (alpha**2 / sigma**2).clamp(max=cfg.min_snr_gamma)
    else:
        sd, sv = cfg.sigma_data, sigma / alpha
        w = (sv**2 + sd**2) / (sv * sd) ** 2
    return (w / scale2).float()


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
    """(n,) training steps t of the discrete chain ``s`` (``core.noise_levels``'s draws)."""
    from .processes import VP
    return VP(cfg, s).draw(n, cfg.t_sampling, device=device, generator=generator).index


def training_losses(net: Network, s: NoiseSchedule | Levels | None, cfg: DiffusionConfig, x0: torch.Tensor,
                    t: torch.Tensor | Draw, noise: torch.Tensor, *, learn_sigma: bool = False,
                    cond: torch.Tensor | None = None, objective: Objective | None = None) -> LossTerms:
    """DDPM Algorithm 1 for any process, objective, weighting and loss type: ``t`` is a
    :class:`~ddpm.core.processes.Draw` of levels (or steps of the chain ``s``); with learned
    variances the improved-DDPM hybrid L_simple + lambda L_vlb, stop-gradient on the mean in
    L_vlb (the discrete chain only). ``cond``: (B,) class labels for a conditional net (the null
    class where dropped)."""
    obj = objective or get_objective(cfg.objective, cfg.sigma_data)
    if isinstance(t, Draw):
        draw = t
    else:
        lv = Levels.of_schedule(s) if isinstance(s, NoiseSchedule) else s
        draw = Draw(lv.alpha[t], lv.sigma[t], lv.net_t[t], t)
    x_t = coef(draw.alpha, x0) * x0 + coef(draw.sigma, x0) * noise
    c_in = obj.c_in(draw.alpha, draw.sigma).float()
    x_in = x_t if bool((c_in == 1).all()) else x_t * coef(c_in, x_t)  # 1 on a variance-preserving process
    out = (net(x_in, draw.net_t) if cond is None else net(x_in, draw.net_t, cond)).float()
    vlb = None
    if learn_sigma:
        sched = s if isinstance(s, NoiseSchedule) else getattr(s, "schedule", None)
        if sched is None or draw.index is None:
            raise ValueError("learned variances need the discrete chain")
        out, v = out.chunk(2, dim=1)
        frozen = torch.cat([out.detach(), v], dim=1)
        pred = interpret(sched, frozen, x_t, draw.index, objective=obj, learn_sigma=True)
        vlb = vlb_term(sched, pred, x0, x_t, draw.index, variance="learned")
    per = _elementwise(cfg.loss, out, obj.target(x0, noise, draw.alpha, draw.sigma)).flatten(1).mean(1)
    w = loss_weight(cfg, obj, draw.alpha, draw.sigma)
    if w is not None:
        per = per * w
    loss = per.mean()
    if vlb is not None:
        # L_vlb = T * E_t[L_t]; improved-diffusion's lambda = 1e-3 with this scaling
        loss = loss + cfg.vlb_weight * sched.T * vlb.mean()
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
