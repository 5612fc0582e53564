"""Block offload: keep only ``resident`` transformer blocks on the compute device.

:func:`offload_blocks` wraps the ``blocks`` of a model (``AsymmDiT.blocks``) from the outside with
forward pre/post hooks; the modules, their parameter objects and their names are unchanged, so
state dicts and ``torch.compile`` of the blocks keep working.

* The first ``resident − 2`` blocks (``resident − 1`` without prefetch) stay on the device; the
  others are *streamed*: a block is copied to the device just before it runs and dropped right
  after, so at most ``resident`` blocks are ever on the device at once.
* Every block's weights have a master copy in CPU memory, pinned when the device is CUDA, so a
  copy to the device is asynchronous. With ``prefetch`` the next streamed block is copied on a
  side CUDA stream while the current one computes; the compute stream waits on that copy's
  event before the block runs, and the copied tensors are recorded on the compute stream so the
  caching allocator never reuses them early. Dropping a block is free: its parameters point back
  to their CPU masters (inference never changes the weights).
* On a CPU "device" the same logic runs; the moves are no-ops, but they are counted in
  :attr:`BlockOffload.stats` like real ones.
* Everything outside ``blocks`` is moved to the device once. :meth:`BlockOffload.remove`
  removes the hooks and puts every tensor back on the device it came from.

Weights must not be changed in place while the offload is active: apply or remove LoRAs before
offloading or after :meth:`BlockOffload.remove` (a streamed block's device copy is dropped, not
written back).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

Slot = tuple[nn.Module, str, bool]  # (module, tensor name, is a parameter)


@dataclass
class OffloadStats:
    """Counts of block transfers: ``loads`` (CPU → device), ``evictions`` (dropped from the
    device) and the largest number of blocks ever on the device at once."""

    loads: int = 0
    evictions: int = 0
    max_resident: int = 0


def _move(tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """Copy ``tensor`` to ``device`` (a no-op returning ``tensor`` when it is already there)."""
    return tensor.to(device, non_blocking=non_blocking)


def _slots(module: nn.Module, skip: nn.Module | None = None) -> Iterator[Slot]:
    """Every parameter and buffer slot of ``module`` (each module's own), except under ``skip``."""
    skipped = set(skip.modules()) if skip is not None else set()
    for mod in module.modules():
        if mod in skipped:
            continue
        for name, p in mod._parameters.items():
            if p is not None:
                yield mod, name, True
        for name, b in mod._buffers.items():
            if b is not None:
                yield mod, name, False


def _get(slot: Slot) -> torch.Tensor:
    mod, name, is_param = slot
    tensor = mod._parameters[name] if is_param else mod._buffers[name]
    return tensor.data if is_param else tensor


def _set(slot: Slot, value: torch.Tensor) -> None:
    """Point a slot at ``value``; a parameter keeps its ``nn.Parameter`` object."""
    mod, name, is_param = slot
    if is_param:
        mod._parameters[name].data = value
    else:
        mod._buffers[name] = value


class _Group:
    """The tensors of one block (or of the rest of the model): slots, CPU masters, origins."""

    def __init__(self, slots: list[Slot], pin: bool) -> None:
        self.slots = slots
        tensors = [_get(s) for s in slots]
        self.origins = [t.device for t in tensors]
        cpu = [t.to("cpu") for t in tensors]
        self.masters = [t.pin_memory() if pin else t for t in cpu]
        self.event: torch.cuda.Event | None = None
        self.copies: list[torch.Tensor] = []

    def point_to(self, tensors: list[torch.Tensor]) -> None:
        for slot, tensor in zip(self.slots, tensors, strict=True):
            _set(slot, tensor)

    def restore(self) -> None:
        self.point_to([m.to(d) for m, d in zip(self.masters, self.origins, strict=True)])


class BlockOffload:
    """Streams the blocks of a model through the device; see the module docstring.

    Use :func:`offload_blocks` to make one. Attributes: ``device``, ``resident`` (the limit),
    ``fixed`` (how many leading blocks stay on the device), ``stats`` (:class:`OffloadStats`).
    """

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, *, device: torch.device, resident: int,
        prefetch: bool, pin_memory: bool,
    ) -> None:  # fmt: skip
        self.device, self.resident, self.stats = device, resident, OffloadStats()
        depth = len(blocks)
        self.prefetch = prefetch and resident >= 2 and resident < depth
        self.fixed = depth if resident >= depth else resident - (2 if self.prefetch else 1)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda and self.prefetch else None
        self._rest = _Group(list(_slots(model, skip=blocks)), pin=False)
        self._on_device: set[int] = set()
        self._rest.point_to([_move(m, device, False) for m in self._rest.masters])
        self._groups: list[_Group] = []
        for i, block in enumerate(blocks):  # one block at a time: no second copy of the model
            self._groups.append(_Group(list(_slots(block)), pin=pin_memory))
            self._groups[i].point_to(self._groups[i].masters)  # CPU masters; loaded when needed
            if i < self.fixed:
                self._load(i, on_side_stream=False)
        self._hooks = [h for i, block in enumerate(blocks) for h in (
            block.register_forward_pre_hook(self._pre_hook(i)),
            block.register_forward_hook(self._post_hook(i), always_call=True),
        )]  # fmt: skip
        log.info("block offload: %d of %d blocks resident on %s (%d fixed, prefetch %s)",
                 min(resident, depth), depth, device, self.fixed, self.prefetch)  # fmt: skip

    @property
    def on_device(self) -> frozenset[int]:
        """Indices of the blocks whose weights are on the device now."""
        return frozenset(self._on_device)

    def _load(self, i: int, on_side_stream: bool) -> None:
        """Copy block ``i`` to the device (asynchronously on the side stream when CUDA)."""
        if i in self._on_device:
            return
        group = self._groups[i]
        stream = self._stream if on_side_stream else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            group.copies = [_move(m, self.device, self._cuda) for m in group.masters]
            if stream is not None:
                group.event = torch.cuda.Event()
                group.event.record(stream)
        group.point_to(group.copies)
        self._on_device.add(i)
        self.stats.loads += 1
        self.stats.max_resident = max(self.stats.max_resident, len(self._on_device))

    def _ready(self, i: int) -> None:
        """Make the compute stream wait for block ``i``'s pending copy."""
        group = self._groups[i]
        if group.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(group.event)
            for tensor in group.copies:
                tensor.record_stream(compute)
            group.event = None

    def _evict(self, i: int) -> None:
        group = self._groups[i]
        group.point_to(group.masters)
        group.copies, group.event = [], None
        self._on_device.discard(i)
        self.stats.evictions += 1

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if i < self.fixed:
                return
            nxt = i + 1 if i + 1 < len(self._groups) else self.fixed
            keep = {i, nxt} if self.prefetch else {i}
            for j in self._on_device - keep - set(range(self.fixed)):
                self._evict(j)  # left over by a forward that raised
            self._load(i, on_side_stream=False)
            self._ready(i)
            if self.prefetch:
                self._load(nxt, on_side_stream=True)

        return hook

    def _post_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if i >= self.fixed:
                self._evict(i)

        return hook

    def remove(self) -> None:
        """Remove the hooks and put every tensor back on the device it came from."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for group in [*self._groups, self._rest]:
            group.restore()
        self._on_device.clear()


def offload_blocks(
    model: nn.Module, *, resident: int, device: torch.device | str, prefetch: bool = True,
    pin_memory: bool | None = None, blocks_attr: str = "blocks",
) -> BlockOffload:  # fmt: skip
    """Keep at most ``resident`` of ``model.blocks`` on ``device``; the rest stream from the CPU.

    Args:
        model: e.g. an ``AsymmDiT`` (anywhere: CPU, or already on the device).
        resident: the most blocks on the device at once (>= 1); ``len(blocks)`` or more keeps
            them all there (plain placement, no streaming).
        device: the compute device; everything outside the blocks is moved there.
        prefetch: copy the next streamed block while the current one runs (needs resident >= 2).
        pin_memory: pin the CPU masters; default True exactly when ``device`` is CUDA.
        blocks_attr: the name of the ``nn.ModuleList`` of blocks.

    Returns:
        the :class:`BlockOffload` handle; ``handle.remove()`` undoes everything.

    Raises:
        ValueError: for ``resident < 1`` or a model without such a block list.
    """
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"model has no non-empty nn.ModuleList {blocks_attr!r} to offload")
    if isinstance(resident, bool) or not isinstance(resident, int) or resident < 1:
        raise ValueError(f"resident must be an integer >= 1 (blocks on the device), "
                         f"got {resident!r}")  # fmt: skip
    device = torch.device(device)
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    return BlockOffload(model, blocks, device=device, resident=resident, prefetch=prefetch,
                        pin_memory=pin and torch.cuda.is_available())  # fmt: skip
