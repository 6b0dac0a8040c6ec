"""DDPM and DDIM noise schedulers as pure, jit-friendly pytrees.

Each scheduler is a frozen :func:`flax.struct.dataclass`: the noise tables (``betas``,
``alphas_cumprod``, ``final_alpha_cumprod``; float32 arrays) are pytree leaves, every config value
(``num_train_timesteps``, ``prediction_type``, ...) is static metadata. Instances can therefore be
closed over or passed into ``jax.jit`` and every method is a pure function of its arguments.

The maths and the timestep tables follow diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (0.39) so
that ``from_config(json.load(open("scheduler/scheduler_config.json")))`` reproduces a Stable
Diffusion folder's scheduler; tests check parity to 1e-6 (float32).

Conventions
- Timesteps are integers in ``[0, num_train_timesteps)``; ``t = 0`` is the least noisy.
- ``add_noise(x0, noise, t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (broadcast over the leading
  batch axis: ``t`` is a scalar or ``[B]``, ``x0`` is ``[B, ...]``).
- ``prediction_type``: ``"epsilon"`` (the model predicts the noise), ``"v_prediction"``
  (``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0``) or ``"sample"`` (predicts ``x0``).
- ``step`` never samples its own randomness: stochastic steps take an explicit ``key``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DDPMScheduler",
    "DDIMScheduler",
    "StepOutput",
    "make_betas",
    "scheduler_from_config",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class StepOutput(NamedTuple):
    """Result of one reverse step: ``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (x0 guess)."""

    prev_sample: jax.Array
    pred_original_sample: jax.Array


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023), float32 as diffusers."""
    f = np.float32
    alphas_bar_sqrt = np.sqrt(np.cumprod((f(1) - betas).astype(np.float64)).astype(f))
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (f(1) - alphas).astype(f)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded exactly as ``torch.linspace(..., dtype=float32)`` on CPU.

    PyTorch fills the first half as ``start + step * i`` and the second half as
    ``end - step * (n - 1 - i)`` with fused multiply-adds; float64 arithmetic rounded once to float32
    reproduces those values bit for bit, so our beta tables equal diffusers' exactly.
    """
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(s) + step * i
    hi = np.float64(e) - step * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The ``[num_train_timesteps]`` float32 beta table of a diffusers scheduler config.

    ``linear``: evenly spaced betas; ``scaled_linear``: evenly spaced sqrt(beta) (Stable Diffusion);
    ``squaredcos_cap_v2``: the cosine alpha-bar schedule of Nichol & Dhariwal, betas capped at 0.999.
    """
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
    elif beta_schedule == "linear":
        betas = _linspace_f32(beta_start, beta_end, T)
    elif beta_schedule == "scaled_linear":
        root = _linspace_f32(beta_start**0.5, beta_end**0.5, T)
        betas = root * root
    elif beta_schedule == "squaredcos_cap_v2":

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], np.float64
        ).astype(np.float32)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _expand(v: jax.Array, ndim: int) -> jax.Array:
    """Broadcast a per-sample coefficient ``[B]`` (or scalar) against an array of rank ``ndim``."""
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


@flax.struct.dataclass
class _Scheduler:
    """Shared tables and maths of the DDPM and DDIM schedulers (see module docstring)."""

    betas: jax.Array  # [T] float32
    alphas_cumprod: jax.Array  # [T] float32
    final_alpha_cumprod: jax.Array  # [] float32 (alpha-bar used for t < 0)
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    timestep_spacing: str = flax.struct.field(pytree_node=False, default="leading")
    steps_offset: int = flax.struct.field(pytree_node=False, default=0)
    clip_sample: bool = flax.struct.field(pytree_node=False, default=True)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def _tables(cls, cfg: Mapping[str, Any], set_alpha_to_one: bool):
        betas = make_betas(
            cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02),
            cfg.get("beta_schedule", "linear"), cfg.get("trained_betas"), cfg.get("rescale_betas_zero_snr", False),
        )
        alphas = (np.float32(1.0) - betas).astype(np.float32)
        acp = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        final = np.float32(1.0) if set_alpha_to_one else acp[0]
        return jnp.asarray(betas), jnp.asarray(acp), jnp.asarray(final, jnp.float32)

    @staticmethod
    def _check(cfg: Mapping[str, Any]) -> None:
        pt = cfg.get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {pt!r} is not supported; use one of {PREDICTION_TYPES}")
        sp = cfg.get("timestep_spacing", "leading")
        if sp not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {sp!r} is not supported; use one of {TIMESTEP_SPACINGS}")
        if cfg.get("thresholding", False):
            raise ValueError("scheduler config: thresholding=True (dynamic thresholding) is not supported")

    # -- forward process ----------------------------------------------------------------------
    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``timesteps`` int scalar or ``[B]``."""
        acp = self.alphas_cumprod.astype(original_samples.dtype)[jnp.asarray(timesteps)]
        s = _expand(acp**0.5, original_samples.ndim)
        n = _expand((1 - acp) ** 0.5, original_samples.ndim)
        return s * original_samples + n * noise

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
        acp = self.alphas_cumprod.astype(sample.dtype)[jnp.asarray(timesteps)]
        return _expand(acp**0.5, sample.ndim) * noise - _expand((1 - acp) ** 0.5, sample.ndim) * sample

    def training_target(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """The regression target of the denoiser for this scheduler's ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.get_velocity(sample, noise, timesteps)
        return sample

    # -- reverse process ----------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Inference timesteps (descending, ``[num_inference_steps]`` int32), diffusers' spacing rules.

        ``leading``: ``arange(n) * (T // n)`` reversed, plus ``steps_offset``; ``trailing``:
        ``round(arange(T, 0, -T / n)) - 1``; ``linspace``: ``round(linspace(0, T - 1, n))`` reversed.
        Returns a host numpy array (shapes derived from it are static).
        """
        n, T = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        return ts.astype(np.int32)

    def _alpha_prev(self, prev_t: jax.Array) -> jax.Array:
        prev_t = jnp.asarray(prev_t)
        return jnp.where(prev_t >= 0, self.alphas_cumprod[jnp.maximum(prev_t, 0)], self.final_alpha_cumprod)

    def _predict_x0_eps(self, model_output, t, sample):
        a_t = _expand(self.alphas_cumprod[jnp.asarray(t)], sample.ndim)
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "v_prediction":
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        else:
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def predict_original(self, model_output: jax.Array, t: jax.Array, sample: jax.Array) -> jax.Array:
        """x0 implied by ``model_output`` at timestep ``t`` (no clipping)."""
        return self.replace(clip_sample=False)._predict_x0_eps(model_output, t, sample)[0]

    def predict_epsilon(self, model_output: jax.Array, t: jax.Array, sample: jax.Array) -> jax.Array:
        """Noise implied by ``model_output`` at timestep ``t``."""
        return self.replace(clip_sample=False)._predict_x0_eps(model_output, t, sample)[1]


@flax.struct.dataclass
class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021) as diffusers' ``DDIMScheduler``; ``eta=0`` is deterministic.

    Defaults follow diffusers (``clip_sample=True``, ``set_alpha_to_one=True``); Stable Diffusion
    folders override them through :meth:`from_config`.
    """

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides) -> "DDIMScheduler":
        """Build from a diffusers ``scheduler_config.json`` dict (unknown keys are ignored)."""
        cfg = {**(config or {}), **overrides}
        cls._check(cfg)
        betas, acp, final = cls._tables(cfg, bool(cfg.get("set_alpha_to_one", True)))
        return cls(
            betas=betas, alphas_cumprod=acp, final_alpha_cumprod=final,
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            prediction_type=cfg.get("prediction_type", "epsilon"),
            timestep_spacing=cfg.get("timestep_spacing", "leading"),
            steps_offset=int(cfg.get("steps_offset", 0)),
            clip_sample=bool(cfg.get("clip_sample", True)),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        )

    def previous_timestep(self, t: jax.Array, num_inference_steps: int) -> jax.Array:
        """diffusers' DDIM rule ``t - T // n`` (may be negative: then alpha-bar = final_alpha_cumprod)."""
        return jnp.asarray(t) - self.num_train_timesteps // int(num_inference_steps)

    def step(
        self,
        model_output: jax.Array,
        t: jax.Array,
        sample: jax.Array,
        *,
        num_inference_steps: int,
        eta: float = 0.0,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
        use_clipped_model_output: bool = False,
    ) -> StepOutput:
        """One DDIM update x_t -> x_{t - T//n}.

        ``model_output``, ``sample``: ``[B, ...]``; ``t``: int scalar or ``[B]`` (may be traced).
        ``eta > 0`` adds ``eta * sigma_t`` times Gaussian noise drawn from ``key`` (or the given
        ``variance_noise``); one of them is required then.
        """
        prev_t = self.previous_timestep(t, num_inference_steps)
        a_t = _expand(self.alphas_cumprod[jnp.asarray(t)], sample.ndim)
        a_prev = _expand(self._alpha_prev(prev_t), sample.ndim)
        x0, eps = self._predict_x0_eps(model_output, t, sample)
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        if use_clipped_model_output:
            eps = (sample - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if not (isinstance(eta, (int, float)) and eta == 0):
            if variance_noise is None:
                if key is None:
                    raise ValueError("DDIMScheduler.step: eta > 0 needs an explicit PRNG `key` or `variance_noise`")
                variance_noise = jax.random.normal(key, model_output.shape, model_output.dtype)
            prev = prev + std * variance_noise
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype))


@flax.struct.dataclass
class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampler (Ho et al. 2020) as diffusers' ``DDPMScheduler``.

    ``variance_type`` is one of ``fixed_small`` (posterior variance, default), ``fixed_small_log``
    (same value via log/exp) and ``fixed_large`` (beta_t); learned variances are not supported.
    """

    variance_type: str = flax.struct.field(pytree_node=False, default="fixed_small")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides) -> "DDPMScheduler":
        """Build from a diffusers ``scheduler_config.json`` dict (unknown keys are ignored)."""
        cfg = {**(config or {}), **overrides}
        cls._check(cfg)
        vt = cfg.get("variance_type", "fixed_small")
        if vt not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {vt!r} is not supported; use one of {VARIANCE_TYPES}")
        betas, acp, final = cls._tables(cfg, True)
        return cls(
            betas=betas, alphas_cumprod=acp, final_alpha_cumprod=final,
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            prediction_type=cfg.get("prediction_type", "epsilon"),
            timestep_spacing=cfg.get("timestep_spacing", "leading"),
            steps_offset=int(cfg.get("steps_offset", 0)),
            clip_sample=bool(cfg.get("clip_sample", True)),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
            variance_type=vt,
        )

    def previous_timestep(self, t: jax.Array, num_inference_steps: int | None = None) -> jax.Array:
        """``t - 1`` for the full chain, ``t - T // n`` on an ``n``-step leading schedule."""
        if num_inference_steps is None:
            return jnp.asarray(t) - 1
        return jnp.asarray(t) - self.num_train_timesteps // int(num_inference_steps)

    def step(
        self,
        model_output: jax.Array,
        t: jax.Array,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        num_inference_steps: int | None = None,
        prev_t: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
    ) -> StepOutput:
        """One ancestral step x_t -> x_{prev_t} (no noise is added at ``t == 0``).

        ``prev_t`` defaults to :meth:`previous_timestep`; pass the next entry of the timestep table
        for non-leading spacings (diffusers looks it up the same way). Needs ``key`` or
        ``variance_noise`` for the noise term.
        """
        t = jnp.asarray(t)
        if prev_t is None:
            prev_t = self.previous_timestep(t, num_inference_steps)
        a_t = _expand(self.alphas_cumprod[t], sample.ndim)
        a_prev = _expand(jnp.where(jnp.asarray(prev_t) >= 0,
                                   self.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0), sample.ndim)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        x0, _ = self._predict_x0_eps(model_output, t, sample)
        mean = (a_prev**0.5 * cur_beta / b_t) * x0 + (cur_alpha**0.5 * b_prev / b_t) * sample
        var = jnp.maximum(b_prev / b_t * cur_beta, 1e-20)
        if self.variance_type == "fixed_small":
            std = var**0.5
        elif self.variance_type == "fixed_small_log":
            std = jnp.exp(0.5 * jnp.log(var))
        else:  # fixed_large
            std = cur_beta**0.5
        if variance_noise is None:
            if key is None:
                raise ValueError("DDPMScheduler.step needs an explicit PRNG `key` or `variance_noise`")
            variance_noise = jax.random.normal(key, model_output.shape, model_output.dtype)
        noise_on = _expand(t > 0, sample.ndim)
        prev = mean + jnp.where(noise_on, std * variance_noise, 0.0)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype))


def scheduler_from_config(config: Mapping[str, Any], kind: str | None = None) -> _Scheduler:
    """Scheduler from a diffusers config dict; ``kind`` "ddim" | "ddpm" overrides ``_class_name``.

    Any other diffusers class (PNDM, Euler, ...) maps to DDIM over the same noise tables, which is how
    the sampling code uses Stable Diffusion folders whatever scheduler they ship.
    """
    name = (kind or config.get("_class_name", "DDIMScheduler")).lower()
    if name.startswith("ddpm"):
        return DDPMScheduler.from_config(config)
    cfg = dict(config)
    if not name.startswith("ddim"):
        cfg.setdefault("clip_sample", False)
        cfg.setdefault("set_alpha_to_one", False)
    return DDIMScheduler.from_config(cfg)
