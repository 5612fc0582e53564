"""Full-size resource estimates computed from the real configuration, without running it.

Every figure comes from modules built on the ``meta`` device (shapes only, no memory, no
compute) and from our own forward pass traced on meta tensors, not from numbers typed by hand:

* :func:`weight_bytes` — the bytes of every parameter and buffer for a storage precision.
  ``fp8`` stores the Linear/Conv weights (the tensors with two or more dims) in one byte and the
  biases in bf16, as the fp8 checkpoints do; the RoPE frequencies and QK-norm weights are fp32
  in every mode (SPEC §8.6), and so is anything the model keeps in fp32.
* :func:`dit_forward_trace` — one forward of :class:`~mochi_core.dit.AsymmDiT` on meta tensors:
  the FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions
  and attention; elementwise work is not counted) and the **activation memory model**: the peak,
  over the forward, of the bytes of all live tensors created during it (weights and inputs
  excluded), with attention replaced by a kernel that allocates only its output, as the fused
  GPU kernels (flash / memory-efficient SDPA) do. Allocator caching and fragmentation, CUDA
  context and library workspaces are not included, so a real GPU needs some margin on top.

These are estimates for a GPU: nothing here was measured on one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .dit import AsymmDiT, DiTConfig, rope_positions, rope_rotation

STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


def weight_bytes(module: torch.nn.Module, storage: str) -> int:
    """Bytes of ``module``'s parameters and buffers stored as ``storage`` (fp32/bf16/fp8).

    Tensors that the module itself keeps in fp32 (built in fp32 while the rest is built in
    another dtype, see :func:`fp32_kept_names`) count 4 bytes in every mode.
    """
    kept = fp32_kept_names(module)
    total = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name in kept:
            size = 4
        elif storage == "fp8" and t.dim() < 2:
            size = 2  # biases and norm weights of fp8 files are bf16
        else:
            size = STORAGE_BYTES[storage]
        total += t.numel() * size
    return total


def fp32_kept_names(module: torch.nn.Module) -> set[str]:
    """Names of the tensors ``module`` keeps in fp32 whatever dtype it is built in.

    Found by building nothing: a module is passed already built on meta in bf16, so every
    floating tensor still in fp32 is one its constructor forces to fp32.
    """
    return {
        name for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.dtype == torch.float32
    }  # fmt: skip


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Tracing a forward on meta tensors


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages created by the ops run under it, and their peak.

    A storage counts from the op that creates it until the last tensor viewing it is freed.
    Views of tensors created before the mode (weights, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key, (nbytes, refs) in list(self.live.items()):
            if all(ref() is None for ref in refs):
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {
            t.untyped_storage()._cdata
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self.live:
                self.live[key][1].append(weakref.ref(t))
            elif key not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.live[key] = (nbytes, [weakref.ref(t)])
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def output_only_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Stand-in for a fused attention kernel: allocates only the output (``B × heads × S × D``)
    and its per-row log-sum-exp, like flash / memory-efficient SDPA on a GPU."""
    torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # logsumexp
    return torch.empty_like(q)


@dataclass(frozen=True)
class ForwardTrace:
    """One traced forward: visual and text tokens, FLOPs, activation peak in bytes."""

    tokens: int
    text_tokens: int
    flops: int
    activation_peak: int


def dit_forward_trace(
    config: DiTConfig,
    latent_thw: tuple[int, int, int],
    *,
    text_tokens: int = 256,
    batch: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    storage_dtype: torch.dtype | None = None,
) -> ForwardTrace:
    """Trace one DiT forward on meta tensors at latent size ``(T, H, W)``.

    ``storage_dtype`` is the dtype the weights are stored in (default: ``compute_dtype``);
    fp8 storage makes every Linear cast its weight to ``compute_dtype`` at call time, and those
    transient copies count as activations.
    """
    T, H, W = latent_thw
    model, x, y_feat = _meta_inputs(config, latent_thw, text_tokens, batch, compute_dtype,
                                    storage_dtype)  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter:
        _meta_forward(model, x, y_feat, model.attention)  # torch SDPA, counted from the shapes
    p = config.patch_size
    return ForwardTrace(
        tokens=T * (H // p) * (W // p), text_tokens=text_tokens,
        flops=counter.get_total_flops(), activation_peak=_activation_peak(model, x, y_feat),
    )  # fmt: skip


def trace_dit_activations(
    config: DiTConfig,
    latent_thw: tuple[int, int, int],
    *,
    text_tokens: int = 256,
    batch: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    storage_dtype: torch.dtype | None = None,
) -> int:
    """The activation peak of :func:`dit_forward_trace` alone (no FLOP count), in bytes."""
    return _activation_peak(*_meta_inputs(config, latent_thw, text_tokens, batch,
                                          compute_dtype, storage_dtype))  # fmt: skip


def _activation_peak(model: AsymmDiT, x: torch.Tensor, y_feat: torch.Tensor) -> int:
    tracker = LiveBytes()
    with tracker:
        _meta_forward(model, x, y_feat, output_only_attention)
    return tracker.peak


def _meta_inputs(
    config: DiTConfig, latent_thw: tuple[int, int, int], text_tokens: int, batch: int,
    compute_dtype: torch.dtype, storage_dtype: torch.dtype | None,
) -> tuple[AsymmDiT, torch.Tensor, torch.Tensor]:
    T, H, W = latent_thw
    model = AsymmDiT(config, device="meta", dtype=storage_dtype or compute_dtype,
                     compute_dtype=compute_dtype)  # fmt: skip
    x = torch.empty(batch, config.in_channels, T, H, W, device="meta")
    y_feat = torch.empty(batch, text_tokens, config.t5_feat_dim, device="meta")
    return model, x, y_feat


def _meta_forward(
    model: AsymmDiT, x: torch.Tensor, y_feat: torch.Tensor, attention: Callable
) -> torch.Tensor:
    """:meth:`AsymmDiT.forward` for meta tensors, whose text is already cropped to its real
    tokens (the crop reads mask values, which meta tensors do not have): the same modules
    called in the same order."""
    B, _, T, H, W = x.shape
    p, dtype = model.config.patch_size, model.resolved_compute_dtype()
    y_mask = torch.ones(y_feat.shape[:2], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        sigma = torch.empty(B, device=x.device)
        c, y = model._conditioning(sigma, y_feat, y_mask, dtype)
        x_tok = model.x_embedder(x.to(dtype))
        rotation = rope_rotation(model.pos_frequencies, rope_positions(T, H // p, W // p)
                                 .to(x.device))  # fmt: skip
        for block in model.blocks:
            x_tok, y = block(x_tok, y, c, rotation, None, attention)
        return model.final_layer(x_tok, c)


def analytic_forward_flops(config: DiTConfig, tokens: int, text_tokens: int) -> int:
    """Matmul + attention FLOPs of one forward from the config alone (B = 1), to cross-check
    the counted figure: 2·(in·out) per token per Linear, 4·S²·D_x for attention per block."""
    c, n, m = config, tokens, text_tokens
    hx, hy = c.hidden_size_x, c.hidden_size_y
    per_block = (
        n * (hx * 3 * hx + hx * hx + hx * 2 * c.mlp_hidden_x + c.mlp_hidden_x * hx)
        + m * (hy * 3 * hx + hx * hy + hy * 2 * c.mlp_hidden_y + c.mlp_hidden_y * hy)
        + hx * (4 * hx + 4 * hy)  # modulation Linears (one conditioning vector)
    )
    last = per_block - m * (hx * hy + hy * 2 * c.mlp_hidden_y + c.mlp_hidden_y * hy) - hx * 3 * hy
    attention = 4 * (n + m) ** 2 * hx
    p2c, e = c.patch_size**2 * c.in_channels, c.t5_feat_dim
    outside = (
        n * p2c * hx
        + n * hx * p2c
        + hx * 2 * hx  # patch embedding, final linear and mod
        + c.timestep_dim * hx
        + hx * hx  # timestep MLP
        + (1 + m) * e * 2 * e
        + e * e
        + e * hx
        + m * e * hy  # caption pooling, text projection
    )
    pool_attention = 4 * (1 + m) * e
    return 2 * ((c.depth - 1) * per_block + last + outside) + c.depth * attention + pool_attention
