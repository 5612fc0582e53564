"""Parity of AsymmDiT with diffusers' MochiTransformer3DModel and the ComfyUI host's AsymmDiTJoint.

Random Genmo-keyed weights, CPU, fp32, relative L2 error ≤ 1.5e-6, for a tiny config and for two
blocks at full width (3072/1536, 24 heads), on a 2 × 8 × 12 latent with a 256-token prompt of
which 40 are real. The measured errors are printed at the end of the module (run with ``-s``)
and written to ``dit_parity_errors.json`` in pytest's base temporary directory.

Conventions (see ``tests/oracles.py``): diffusers gets ``timestep = (1 − σ)·1000`` and returns
``v``; the host gets ``σ``, keeps ``max(1, mask.sum())`` text tokens and returns ``−v``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

from mochi_core.dit import AsymmDiT, DiTConfig
from tests.oracles import (
    comfy_dit,
    comfy_velocity,
    diffusers_dit,
    diffusers_velocity,
    random_dit_state_dict,
)

TOL = 1.5e-6  # about 3x the largest measured error (4.6e-7, full width vs host)
CONFIGS = {
    "tiny": DiTConfig(
        depth=3, hidden_size_x=96, hidden_size_y=96, num_heads=2, mlp_hidden_x=256,
        mlp_hidden_y=256, t5_feat_dim=64,
    ),  # fmt: skip
    "full_width_depth2": dataclasses.replace(DiTConfig.mochi_preview(), depth=2),
}
L_TEXT, N_REAL = 256, 40


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@dataclass
class Models:
    name: str
    config: DiTConfig
    ours: AsymmDiT
    diffusers: torch.nn.Module
    host: torch.nn.Module

    def ours_v(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ours(*args)


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    """Collects ``{config: {check: error}}``; printed and saved when the module ends."""
    measured: dict[str, dict[str, float]] = {}
    yield measured
    lines = [f"{cfg:>18} {check:<44} {err:.3e}" for cfg, checks in measured.items()
             for check, err in checks.items()]  # fmt: skip
    print("\nDiT parity (relative L2 error, fp32 CPU):\n" + "\n".join(lines))  # noqa: T201
    path = tmp_path_factory.getbasetemp() / "dit_parity_errors.json"
    path.write_text(json.dumps(measured, indent=2))


@pytest.fixture(
    scope="module",
    params=["tiny", pytest.param("full_width_depth2", marks=pytest.mark.slow)],
)
def models(request) -> Models:
    """Our model and both oracles sharing one set of random weights (assigned, not copied)."""
    config = CONFIGS[request.param]
    sd = random_dit_state_dict(config, torch.Generator().manual_seed(0))
    ours = AsymmDiT(config, device="meta")
    ours.load_state_dict(sd, strict=True, assign=True)
    oracles = diffusers_dit(config, sd), comfy_dit(config, sd)
    return Models(request.param, config, ours.eval(), *oracles)


def inputs(config: DiTConfig, lengths: list[int], seed: int = 1):
    """x (B, 12, 2, 8, 12), sigma (B,), T5 features (B, 256, E), right-padded masks."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    x = torch.randn(B, config.in_channels, 2, 8, 12, generator=gen)
    sigma = torch.tensor([0.7, 0.2, 0.45][:B])
    y_feat = torch.randn(B, L_TEXT, config.t5_feat_dim, generator=gen)
    y_mask = torch.arange(L_TEXT)[None, :] < torch.tensor(lengths)[:, None]
    return x, sigma, y_feat, y_mask


def check(errors: dict, models: Models, name: str, err: float) -> float:
    errors.setdefault(models.name, {})[name] = err
    return err


def test_padded_prompt_vs_diffusers(models, errors):
    args = inputs(models.config, [N_REAL])
    ours = models.ours_v(*args)
    assert 0.1 < ours.std().item() < 10.0  # O(1) outputs: the comparison is meaningful
    assert check(errors, models, "padded prompt vs diffusers",
                 rel_err(ours, diffusers_velocity(models.diffusers, *args))) <= TOL  # fmt: skip


def test_padded_prompt_vs_host(models, errors):
    args = inputs(models.config, [N_REAL])
    err = rel_err(models.ours_v(*args), comfy_velocity(models.host, *args))
    assert check(errors, models, "padded prompt vs host", err) <= TOL


def test_ragged_batch_vs_diffusers(models, errors):
    """Batched CFG: two prompts of different lengths in one call (diffusers loops per sample)."""
    args = inputs(models.config, [N_REAL, 9])
    err = rel_err(models.ours_v(*args), diffusers_velocity(models.diffusers, *args))
    assert check(errors, models, "ragged batch [40, 9] vs diffusers", err) <= TOL


def test_empty_prompt_vs_diffusers(models, errors):
    """Genmo's zeroed empty prompt (mask all False): zero text tokens in both."""
    args = inputs(models.config, [0])
    err = rel_err(models.ours_v(*args), diffusers_velocity(models.diffusers, *args))
    assert check(errors, models, "empty prompt (0 tokens) vs diffusers", err) <= TOL


def test_host_keeps_one_token_of_an_empty_prompt(models, errors):
    """The host crops to ``max(1, mask.sum())`` tokens, so an empty prompt keeps its first row.

    With the zeroed empty prompt (features 0, mask all False) the host differs from the
    reference, and it equals our model given that one row as a real token: the pooled vector is
    unchanged (the mean of one zero row is the zero mean token) and the joint attention then sees
    the same single text token.
    """
    x, sigma, y_feat, y_mask = inputs(models.config, [0])
    y_feat = torch.zeros_like(y_feat)
    host = comfy_velocity(models.host, x, sigma, y_feat, y_mask)
    gap = rel_err(models.ours_v(x, sigma, y_feat, y_mask), host)
    assert check(errors, models, "empty prompt: host vs ours (0 tokens)", gap) > 1e-3
    one_token = torch.zeros_like(y_mask)
    one_token[:, 0] = True
    err = rel_err(models.ours_v(x, sigma, y_feat, one_token), host)
    assert check(errors, models, "empty prompt: host vs ours (1 token kept)", err) <= TOL
