"""Optional ``torch.compile`` of the transformer blocks, with a clean fallback to eager.

:func:`compile_blocks` compiles each block's ``forward`` (not the module call, so forward hooks
such as :mod:`mochi_core.offload`'s stay outside the graph) and installs it as an instance
attribute: parameter names, state dicts and the model class are unchanged, and
:meth:`CompiledBlocks.remove` deletes the attribute again. All full blocks share one graph
(the parameters are graph inputs); the last block, which does not update the text, has its own.

Only the token dimensions are dynamic (``dynamic=None`` and :data:`DIT_TOKEN_DIMS` marked at
each call): the token count changes with the resolution, the frame count, the tile size and the
prompt length (the text is cropped to the longest prompt), and a static compile would recompile
for each; the hidden sizes never change, and a symbolic width would only cost kernel quality.
Tensor arguments that are views (block 0's text stream is the output of a Linear) are passed as
contiguous copies: TorchDynamo guards on a view's base, which would give block 0 a graph of its
own, so every full block shares one graph (a test holds the count to two).

Fallbacks, each logged once with its reason, leaving every block eager:

* ``torch.compile`` or TorchDynamo is unavailable here, or the backend name is unknown;
* compiling fails at a call (no C++ compiler or Triton, an unsupported op, …): that call and
  every later one run eagerly. Out-of-memory errors are not a compile failure and propagate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

Backend = str | Callable


#: Token dimensions of ``AsymmetricJointBlock.forward``'s positional arguments (x, y, c,
#: rotation, valid): x (B, N, Dx) and y (B, L, Dy) dim 1, rotation (N, heads, D/2, 2) dim 0,
#: valid (B, N+L) dim 1.
DIT_TOKEN_DIMS: dict[int, tuple[int, ...]] = {0: (1,), 1: (1,), 3: (0,), 4: (1,)}


@dataclass
class _State:
    failed: str | None = None


def _prepare(args: tuple[object, ...], token_dims: Mapping[int, tuple[int, ...]]) -> list[object]:
    """``args`` with views replaced by contiguous copies and the token dims marked dynamic."""
    prepared = list(args)
    for i, arg in enumerate(prepared):
        if not isinstance(arg, torch.Tensor):
            continue
        if arg._base is not None:
            arg = prepared[i] = arg.clone(memory_format=torch.contiguous_format)
        for dim in token_dims.get(i, ()):
            if dim < arg.dim():
                torch._dynamo.maybe_mark_dynamic(arg, dim)
    return prepared


class _GuardedForward:
    """Calls the compiled forward until it fails once, then the eager one for good."""

    def __init__(
        self, eager: Callable, compiled: Callable, state: _State,
        token_dims: Mapping[int, tuple[int, ...]],
    ) -> None:  # fmt: skip
        self.eager, self.compiled, self.state = eager, compiled, state
        self.token_dims = token_dims

    def __call__(self, *args: object, **kwargs: object) -> object:
        if self.state.failed is None:
            try:
                return self.compiled(*_prepare(args, self.token_dims), **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - any compile failure means: run eager
                self.state.failed = f"{type(error).__name__}: {str(error).strip()[:500]}"
                log.warning("torch.compile of the DiT blocks failed (%s); running them eagerly",
                            self.state.failed)  # fmt: skip
        return self.eager(*args, **kwargs)


class CompiledBlocks:
    """Handle of :func:`compile_blocks`.

    Attributes:
        reason: why the blocks are not (or no longer) compiled, or None while they are.
    """

    def __init__(self, blocks: nn.ModuleList, unavailable: str | None) -> None:
        self._blocks = blocks
        self._unavailable = unavailable
        self._state = _State()
        self._saved: list[tuple[nn.Module, object]] = []

    @property
    def reason(self) -> str | None:
        """None while compiled code runs; otherwise why it does not."""
        return self._unavailable or self._state.failed

    @property
    def active(self) -> bool:
        """Whether the blocks still run compiled code."""
        return self.reason is None and bool(self._saved)

    def _install(
        self, compile_fn: Callable[[Callable], Callable], token_dims: Mapping[int, tuple[int, ...]]
    ) -> None:
        for block in self._blocks:
            own = block.__dict__.get("forward")  # an instance forward someone else installed
            self._saved.append((block, own))
            eager = block.forward
            block.forward = _GuardedForward(eager, compile_fn(eager), self._state, token_dims)

    def remove(self) -> None:
        """Put the blocks' original ``forward`` back."""
        for block, own in self._saved:
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own
        self._saved = []


def _unavailable_reason(backend: Backend) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo  # noqa: PLC0415
    except ImportError as error:
        return f"TorchDynamo cannot be imported ({error})"
    if not dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python/platform"
    if isinstance(backend, str) and backend not in dynamo.list_backends(exclude_tags=()):
        return f"unknown torch.compile backend {backend!r}"
    return None


def compile_blocks(
    model: nn.Module, *, backend: Backend = "inductor", dynamic: bool | None = None,
    mode: str | None = None, blocks_attr: str = "blocks",
    token_dims: Mapping[int, tuple[int, ...]] = DIT_TOKEN_DIMS,
) -> CompiledBlocks:  # fmt: skip
    """``torch.compile`` each of ``model.blocks`` (falls back to eager, see the module docstring).

    Args:
        model: e.g. an ``AsymmDiT``.
        backend: a ``torch.compile`` backend name (``"inductor"``, ``"eager"``, …) or callable.
        dynamic: ``torch.compile``'s ``dynamic``; None (default) keeps every size static but
            the ``token_dims``; True makes every dimension symbolic.
        mode: ``torch.compile``'s ``mode`` (e.g. ``"max-autotune-no-cudagraphs"``), or None.
        blocks_attr: the name of the ``nn.ModuleList`` of blocks.
        token_dims: positional argument index → dims marked dynamic at each call (the
            token counts of the DiT blocks by default).

    Returns:
        a :class:`CompiledBlocks` handle (``.reason`` says why it is not active;
        ``.remove()`` restores eager blocks).
    """
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"model has no nn.ModuleList {blocks_attr!r} to compile")
    handle = CompiledBlocks(blocks, _unavailable_reason(backend))
    if handle.reason is not None:
        log.warning("not compiling the DiT blocks: %s", handle.reason)
        return handle
    options = {"backend": backend, "dynamic": dynamic, "mode": mode}
    handle._install(lambda fn: torch.compile(fn, **options), token_dims)
    log.info("DiT blocks compiled lazily at their first call (backend %s, dynamic %s)",
             backend, dynamic)  # fmt: skip
    return handle
