"""Tiled AsymmDiT velocity: overlapping spatial tiles and temporal windows, feathered blending.

:class:`TiledModel` wraps a velocity model (``AsymmDiT`` or anything with its call signature)
into a :class:`mochi_core.sampling.ModelFn`. At every call it cuts the latent
``B × 12 × T × H × W`` into overlapping tiles of ``th × tw`` latent pixels (and, optionally,
overlapping windows of ``temporal_window`` latent frames), predicts each tile's velocity with
the wrapped model and blends the predictions with feathered weights: a linear ramp across each
overlap, product over the axes, normalized by the sum of the weights at every position. The
sampler's classifier-free guidance is unchanged: a ``[cond, uncond]`` batch simply goes through
every tile, so batched CFG still runs as one forward per tile.

Memory: the wrapped model only ever sees one tile, so the activations of a step are those of a
tile's ``T_w·(th/2)·(tw/2)`` visual tokens (plus the text); only the latent-sized accumulator
grows with the canvas. The text stream and the caption pooling are recomputed per tile (a few
hundred tokens against thousands of visual ones).

Patch grid: the DiT embeds 2×2 patches, so tile sizes, overlaps and tile offsets are even (in
latent pixels). Temporal windows have no such constraint (temporal patch size 1).

RoPE positions of a tile (``rope=``):

* ``"canvas"`` (default): each token keeps the position it has on the whole canvas
  (:func:`mochi_core.dit.rope_positions` with ``canvas_hw`` and ``offset_thw``). RoPE is
  relative: the attention logits depend only on position *differences*, so a tile seen this way
  is exactly the untiled model's attention restricted to the tile: the same distances between
  the same tokens, at the canvas's spacing ``sqrt(36864 / (cH·cW))``. What a tile lacks is the
  context outside it; the distances it sees are a subset of those the untiled model sees.
* ``"tile"``: each tile is a frame of its own and its positions re-span the whole area 36864.
  Every distance inside the tile is then stretched by ``sqrt(canvas area / tile area)``: the
  model sees the tile's content as a whole frame (zoomed in), at another apparent scale, and
  neighbouring tiles disagree about the scale of the same content (they are only blended
  afterwards). It can be useful when a canvas is far above the trained resolution and the model
  should keep its trained token spacing, at the price of repeating compositions per tile.

``"canvas"`` is the default because it is the only choice under which tiling changes nothing but
the missing context. Measured on random weights at 848×480×7 (``bench/bench_tiled_rope.py``,
tiles 32×64/8, 40×56/16 and 32×32/8 latent pixels, σ 0.9 and 0.3, 2 seeds), as the relative L2
difference to the untiled velocity, canvas vs tile:

* plain random weights, whose attention hardly depends on position: a tie, 0.139–0.293 for both
  (tile/canvas ratio 0.97–1.03, either sign); the error there is all missing context;
* position-sensitive attention (visual keys tied to queries, so tokens attend to their
  neighbours, as trained video DiTs largely do): canvas is smaller in all 12 configurations,
  e.g. 0.0420 vs 0.0448 (demo width, 32×64 tiles, σ 0.9) and 0.0038 vs 0.0040 (width 256,
  heads of 128); ratio 1.04–1.08.

Random weights cannot show how a trained model reacts to stretched distances; the argument above
is why canvas positions are the safe default, and ``"tile"`` stays available to try. The time
offset of a window does not matter for either mode (RoPE is translation invariant), so windows
keep their true frame indices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dit import rope_positions

log = logging.getLogger(__name__)

ROPE_MODES = ("canvas", "tile")
PATCH = 2  # the DiT's spatial patch size; tiles are aligned to it

Span = tuple[int, int]


@dataclass(frozen=True)
class TileOptions:
    """How to tile the DiT's input (all sizes in *latent* units: 1/8 of the video's pixels).

    Attributes:
        tile: ``(height, width)`` of a spatial tile in latent pixels, even, ≥ 2; tiles larger
            than the latent are clipped to it.
        overlap: latent pixels shared by neighbouring tiles (even, ``0 ≤ overlap < min(tile)``);
            the blending ramp spans the overlap, 0 gives hard seams.
        temporal_window: latent frames per temporal window, or None for all frames at once.
        temporal_overlap: latent frames shared by neighbouring windows (``< temporal_window``).
        rope: ``"canvas"`` (default, see the module docstring) or ``"tile"``.
    """

    tile: tuple[int, int]
    overlap: int = 8
    temporal_window: int | None = None
    temporal_overlap: int = 2
    rope: str = "canvas"

    def __post_init__(self) -> None:
        if isinstance(self.tile, Sequence):
            object.__setattr__(self, "tile", tuple(self.tile))
        if problems := self.problems():
            details = "; ".join(f"{name} {message}" for name, message in problems.items())
            raise ValueError(f"invalid tiling: {details}")

    def problems(self) -> dict[str, str]:
        """Invalid options as ``{option: message}`` (empty when all are valid)."""
        out: dict[str, str] = {}
        tile = self.tile if isinstance(self.tile, tuple) else (self.tile,)
        if len(tile) != 2 or not all(_is_int(v) and v >= 2 and v % PATCH == 0 for v in tile):
            out["tile"] = f"must be (height, width), even latent sizes >= 2, got {self.tile!r}"
        if not _is_int(self.overlap) or self.overlap < 0 or self.overlap % PATCH:
            out["overlap"] = f"must be an even number of latent pixels >= 0, got {self.overlap!r}"
        elif "tile" not in out and self.overlap >= min(tile):
            out["overlap"] = f"must be smaller than the tile {tile}, got {self.overlap}"
        window, t_overlap = self.temporal_window, self.temporal_overlap
        if window is not None and (not _is_int(window) or window < 1):
            out["temporal_window"] = f"must be None or latent frames >= 1, got {window!r}"
        if not _is_int(t_overlap) or t_overlap < 0:
            out["temporal_overlap"] = f"must be an integer >= 0, got {t_overlap!r}"
        elif _is_int(window) and window >= 1 and t_overlap >= window:
            out["temporal_overlap"] = f"must be < temporal_window={window}, got {t_overlap}"
        if self.rope not in ROPE_MODES:
            out["rope"] = f"must be one of {', '.join(ROPE_MODES)}, got {self.rope!r}"
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def axis_spans(length: int, size: int, overlap: int, align: int = 1) -> list[Span]:
    """``[start, end)`` spans of ``size`` covering ``0..length`` with at least ``overlap`` shared.

    Starts are spread evenly and rounded down to multiples of ``align``; the last span ends at
    ``length``. ``length - size`` must be a multiple of ``align`` (true for even sizes on an even
    latent). A ``size ≥ length`` gives the single span ``(0, length)``.
    """
    if size >= length:
        return [(0, length)]
    if (length - size) % align:
        raise ValueError(f"length {length} and tile {size} must differ by a multiple of {align}")
    n = math.ceil((length - overlap) / (size - overlap))
    step = (length - size) / (n - 1)
    starts = [int(i * step // align) * align for i in range(n - 1)] + [length - size]
    return [(s, s + size) for s in starts]


def feather_ramps(spans: Sequence[Span]) -> list[torch.Tensor]:
    """Blending weight of each span along its axis, fp32, positive everywhere.

    A linear ramp ``(i + 1)/(k + 1)`` rises over the ``k`` positions a span shares with its
    predecessor and falls likewise towards its successor; positions shared with no neighbour
    (including the canvas borders) get weight 1.
    """
    ramps = []
    for k, (start, end) in enumerate(spans):
        lead = spans[k - 1][1] - start if k > 0 else 0
        trail = end - spans[k + 1][0] if k + 1 < len(spans) else 0
        i = torch.arange(end - start, dtype=torch.float32)
        rise = (i + 1) / (max(lead, 0) + 1)
        fall = (end - start - i) / (max(trail, 0) + 1)
        ramps.append(torch.minimum(torch.minimum(rise, fall), torch.ones(())))
    return ramps


@dataclass(frozen=True)
class Tile:
    """One tile: its ``[start, end)`` spans in latent frames/pixels and its blending weight."""

    t: Span
    h: Span
    w: Span
    weight: torch.Tensor  # (t, h, w) fp32

    @property
    def tokens(self) -> int:
        """Visual tokens the DiT sees for this tile."""
        return (self.t[1] - self.t[0]) * (self.h[1] - self.h[0]) * (self.w[1] - self.w[0]) // 4


def tile_layout(thw: tuple[int, int, int], options: TileOptions) -> list[Tile]:
    """The tiles of a ``T × H × W`` latent (windows outermost), each with its feather weight."""
    T, H, W = thw
    window = options.temporal_window or T
    axes = (
        axis_spans(T, window, options.temporal_overlap),
        axis_spans(H, options.tile[0], options.overlap, PATCH),
        axis_spans(W, options.tile[1], options.overlap, PATCH),
    )
    ramps = [feather_ramps(spans) for spans in axes]
    tiles = []
    for t, rt in zip(axes[0], ramps[0], strict=True):
        for h, rh in zip(axes[1], ramps[1], strict=True):
            for w, rw in zip(axes[2], ramps[2], strict=True):
                weight = rt[:, None, None] * rh[None, :, None] * rw[None, None, :]
                tiles.append(Tile(t, h, w, weight))
    return tiles


class TiledModel:
    """A :class:`~mochi_core.sampling.ModelFn` that runs ``model`` tile by tile and blends.

    Args:
        model: ``AsymmDiT`` or a callable ``(x, sigma, y_feat, y_mask) -> v``; with
            ``rope="canvas"`` it must also accept ``rope_pos=`` (``AsymmDiT.forward`` does).
        options: the tiling (:class:`TileOptions`).

    The wrapper holds no per-call state: the layout is derived from each input's shape, and the
    wrapped model is not modified.
    """

    def __init__(self, model, options: TileOptions) -> None:
        if not isinstance(options, TileOptions):
            raise TypeError(f"tiling options must be a TileOptions, got {type(options).__name__}")
        self.model = model
        self.options = options
        self.patch_size = getattr(getattr(model, "config", None), "patch_size", PATCH)
        if self.patch_size != PATCH:
            raise ValueError(f"tiling supports patch size {PATCH}, the model has {self.patch_size}")

    @property
    def supports_batched_text(self) -> bool | None:
        """The wrapped model's flag (see :func:`mochi_core.sampling.supports_batched_text`)."""
        return getattr(self.model, "supports_batched_text", None)

    @property
    def attention(self) -> object:
        """The wrapped model's attention backend (read for its ``ragged_batch`` flag)."""
        return getattr(self.model, "attention", None)

    @property
    def device(self) -> torch.device:
        """Where the wrapped model's parameters are (CPU for a parameterless callable)."""
        if isinstance(self.model, torch.nn.Module):
            for p in self.model.parameters():
                return p.device
        return torch.device("cpu")

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, y_feat: torch.Tensor, y_mask: torch.Tensor
    ) -> torch.Tensor:
        """x ``B × C × T × H × W`` → blended velocity, same shape, fp32 (see ``ModelFn``)."""
        T, H, W = x.shape[2:]
        if H % PATCH or W % PATCH:
            raise ValueError(f"latent height and width must be even to tile, got {H}×{W}")
        tiles = tile_layout((T, H, W), self.options)
        log.debug("tiled DiT call: %d tiles over %d×%d×%d, max %d tokens per tile",
                  len(tiles), T, H, W, max(tile.tokens for tile in tiles))  # fmt: skip
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        total = torch.zeros((T, H, W), dtype=torch.float32, device=x.device)
        for tile in tiles:
            region = (slice(*tile.t), slice(*tile.h), slice(*tile.w))
            v = self._velocity(x[(..., *region)], sigma, y_feat, y_mask, tile, (H, W))
            weight = tile.weight.to(x.device)
            out[(..., *region)] += v.float() * weight
            total[region] += weight
        return out / total

    def _velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, y_feat: torch.Tensor, y_mask: torch.Tensor,
        tile: Tile, canvas_hw: tuple[int, int],
    ) -> torch.Tensor:  # fmt: skip
        """The wrapped model's velocity on one tile ``x`` (``B × C × t × h × w``)."""
        if self.options.rope == "tile":
            return self.model(x, sigma, y_feat, y_mask)
        p = self.patch_size
        rope_pos = rope_positions(
            x.shape[2], x.shape[3] // p, x.shape[4] // p,
            canvas_hw=(canvas_hw[0] // p, canvas_hw[1] // p),
            offset_thw=(tile.t[0], tile.h[0] // p, tile.w[0] // p), device=x.device,
        )  # fmt: skip
        return self.model(x, sigma, y_feat, y_mask, rope_pos=rope_pos)
