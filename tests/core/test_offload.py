"""Block offload on the CPU: the same output, never more than ``resident`` blocks on the
"device", and a removal that restores the model.

The CPU has no second device, so the tests stand in a fake one: ``offload._move`` is replaced by
a copy (``clone``). A block is then "on the device" exactly when its parameters are not the
original CPU tensors, which a hook of the test's own checks before every block runs.
"""

from __future__ import annotations

import pytest
import torch

from mochi_core import offload
from mochi_core.demo import DemoDiTSize, random_dit_state_dict
from mochi_core.dit import AsymmDiT, DiTConfig

SIZE = DemoDiTSize(depth=5, hidden_x=64, hidden_y=32, heads=2, mlp_x=128, mlp_y=64, t5_dim=32)


def make_dit() -> AsymmDiT:
    sd = random_dit_state_dict(0, SIZE)
    model = AsymmDiT(DiTConfig.from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 2, 4, 6, generator=gen)
    mask = torch.arange(16)[None] < torch.tensor([[7], [3]])
    return x, torch.tensor([0.8, 0.3]), torch.randn(2, 16, 32, generator=gen), mask


class FakeDevice:
    """Copies on every move (a stand-in device); counts the block tensors moved."""

    def __init__(self) -> None:
        self.moved: list[int] = []  # data_ptr of every source tensor

    def __call__(self, tensor, device, non_blocking):
        self.moved.append(tensor.data_ptr())
        return tensor.clone()


@pytest.fixture
def fake(monkeypatch) -> FakeDevice:
    device = FakeDevice()
    monkeypatch.setattr(offload, "_move", device)
    return device


def on_device(model: AsymmDiT, originals: dict[str, int]) -> set[int]:
    """Blocks whose parameters are not the original CPU storage (i.e. copies on the device)."""
    return {
        i for i, block in enumerate(model.blocks)
        if any(p.data_ptr() != originals[f"blocks.{i}.{n}"] for n, p in block.named_parameters())
    }  # fmt: skip


@pytest.mark.parametrize("resident, prefetch", [(1, True), (2, True), (3, True), (3, False),
                                                (4, True), (5, True), (9, True)])  # fmt: skip
def test_same_output_and_never_more_than_resident_blocks(fake, resident, prefetch):
    model = make_dit()
    with torch.no_grad():
        expected = model(*inputs())
    originals = {k: v.data_ptr() for k, v in model.state_dict().items()}
    handle = offload.offload_blocks(model, resident=resident, device="cpu", prefetch=prefetch)
    seen: list[tuple[int, set[int]]] = []
    for i, block in enumerate(model.blocks):  # after the offload's own hooks
        block.register_forward_pre_hook(
            lambda m, a, i=i: seen.append((i, on_device(model, originals))))
    with torch.no_grad():
        outs = [model(*inputs()) for _ in range(2)]
    assert all(torch.equal(out, expected) for out in outs)  # exact
    assert len(seen) == 2 * SIZE.depth
    for i, resident_now in seen:
        assert i in resident_now  # the running block's weights are on the device
        assert len(resident_now) <= resident, (i, resident_now)
    if resident < SIZE.depth:
        assert max(len(r) for _, r in seen) == resident  # the limit is also used
        assert on_device(model, originals) == set(range(handle.fixed)) | (
            {handle.fixed} if handle.prefetch else set())  # idle: fixed + the prefetched next
    assert handle.stats.max_resident <= resident
    first = [originals[f"blocks.{i}.mod_x.weight"] for i in range(SIZE.depth)]
    assert sum(fake.moved.count(ptr) for ptr in first) == handle.stats.loads  # all counted
    handle.remove()


def test_streamed_blocks_load_once_per_forward(fake):
    model = make_dit()
    handle = offload.offload_blocks(model, resident=3, device="cpu")
    assert (handle.fixed, handle.prefetch) == (1, True)
    with torch.no_grad():
        for _ in range(3):
            model(*inputs())
    streamed = SIZE.depth - handle.fixed
    # each forward loads every streamed block once; the last one prefetches the next forward's
    assert handle.stats.loads == handle.fixed + 3 * streamed + 1
    assert handle.stats.evictions == 3 * streamed
    assert handle.stats.max_resident == 3


def test_remove_restores_the_model(fake):
    model = make_dit()
    before = {k: (v.data_ptr(), v.device, v.dtype) for k, v in model.state_dict().items()}
    keys = list(model.state_dict())
    handle = offload.offload_blocks(model, resident=2, device="cpu")
    assert list(model.state_dict()) == keys  # names unchanged while offloaded
    with torch.no_grad():
        during = model(*inputs())
    handle.remove()
    after = {k: (v.data_ptr(), v.device, v.dtype) for k, v in model.state_dict().items()}
    assert after == before  # the very same CPU storage again
    for block in model.blocks:
        assert not block._forward_pre_hooks and not block._forward_hooks
    moved = len(fake.moved)
    with torch.no_grad():
        assert torch.equal(model(*inputs()), during)
    assert len(fake.moved) == moved  # no hooks left: nothing moves


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_failing_block_is_still_evicted(fake, prefetch):
    model = make_dit()
    originals = {k: v.data_ptr() for k, v in model.state_dict().items()}
    handle = offload.offload_blocks(model, resident=2, device="cpu", prefetch=prefetch)

    def boom(module, args):
        raise RuntimeError("boom")

    hook = model.blocks[3].register_forward_pre_hook(boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        model(*inputs())
    hook.remove()
    assert 3 not in on_device(model, originals)
    with torch.no_grad():
        model(*inputs())
    assert handle.stats.max_resident == 2


@pytest.mark.parametrize("resident", [0, -1, 1.5, True])
def test_invalid_resident_is_refused(resident):
    with pytest.raises(ValueError, match="resident must be an integer >= 1"):
        offload.offload_blocks(make_dit(), resident=resident, device="cpu")


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="'layers'"):
        offload.offload_blocks(make_dit(), resident=2, device="cpu", blocks_attr="layers")
