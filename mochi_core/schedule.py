"""Sigma schedules for Mochi's flow-matching sampler (SPEC §4.1, §4.4).

``σ = 1`` is pure noise and ``σ = 0`` is data. Genmo samples on a "linear-quadratic" schedule:
σ falls linearly from 1 to ``1 − threshold_noise`` over the first ``linear_steps`` steps, then
follows a quadratic down to 0 whose slope is continuous at the joint. Every schedule here has
``num_steps + 1`` values, starts at its initial noise level and ends with 0.0.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Genmo's default noise threshold where the linear part of the schedule hands over.
DEFAULT_THRESHOLD_NOISE = 0.025


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def linear_quadratic_schedule(
    num_steps: int,
    threshold_noise: float = DEFAULT_THRESHOLD_NOISE,
    linear_steps: int | None = None,
) -> list[float]:
    """Genmo's linear-quadratic sigma schedule.

    Args:
        num_steps: number of sampler steps S (>= 1).
        threshold_noise: the "time" ``1 − σ`` reached at the end of the linear part, in (0, 1).
        linear_steps: steps in the linear part L, ``1 <= L < S``; ``S // 2`` by default.

    Returns:
        S + 1 sigmas, ``[1.0, ..., 0.0]``, strictly decreasing. With S == 1 the schedule is
        ``[1.0, 0.0]`` (a single Euler step; Genmo's formula is undefined there).
    """
    _check_steps(num_steps)
    if not 0.0 < threshold_noise < 1.0:
        raise ValueError(f"threshold_noise must be in (0, 1), got {threshold_noise!r}")
    if num_steps == 1:
        return [1.0, 0.0]
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 1 <= linear_steps < num_steps:
        raise ValueError(
            f"linear_steps must satisfy 1 <= linear_steps < num_steps ({num_steps}), "
            f"got {linear_steps!r}"
        )
    s, n_lin, thr = num_steps, linear_steps, threshold_noise
    linear = [i * thr / n_lin for i in range(n_lin)]
    n_quad = s - n_lin
    gap = n_lin - thr * s
    quad_coef = gap / (n_lin * n_quad**2)
    lin_coef = thr / n_lin - 2 * gap / n_quad**2
    const = quad_coef * n_lin**2
    quadratic = [quad_coef * i**2 + lin_coef * i + const for i in range(n_lin, s)]
    sigmas = [1.0 - t for t in linear + quadratic + [1.0]]
    sigmas[-1] = 0.0  # exact, whatever the rounding of 1.0 - 1.0
    return sigmas


def denoise_schedule(
    num_steps: int,
    denoise: float,
    threshold_noise: float = DEFAULT_THRESHOLD_NOISE,
    linear_steps: int | None = None,
) -> list[float]:
    """The schedule for partial denoising (video-to-video), SPEC §4.4.

    Computes the linear-quadratic schedule for ``round(num_steps / denoise)`` steps and keeps its
    last ``num_steps + 1`` values, so sampling starts at a lower noise level ``σ₀ < 1`` and still
    ends at 0. ``linear_steps`` applies to the longer schedule (default: half of it).

    Args:
        num_steps: the steps actually run (>= 1).
        denoise: fraction of the full schedule to run, in (0, 1]; 1.0 gives the full schedule.

    Returns:
        num_steps + 1 sigmas ending with 0.0.
    """
    _check_steps(num_steps)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise!r}")
    total = max(num_steps, round(num_steps / denoise))
    sigmas = linear_quadratic_schedule(total, threshold_noise, linear_steps)
    kept = sigmas[-(num_steps + 1) :]
    log.debug("denoise %.3f: %d of %d steps, sigma0 = %.4f", denoise, num_steps, total, kept[0])
    return kept
