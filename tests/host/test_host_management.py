"""The models under the host's own memory management, as a 12-24 GB GPU or ``--lowvram`` runs
them (issue 11), driven in this process on the CPU.

On a CPU the host loads every model whole, so a server never shows what a partial load does.
These tests call the host's real code paths themselves: the loader nodes' patchers,
``ModelPatcher.load(lowvram_model_memory=...)`` / ``partially_load`` with budgets smaller than
the model, ``load_models_gpu``, the host's conditioning nodes. A load "to the GPU" goes to the
``meta`` device: whatever the host moves lands there, whatever it leaves behind stays on the CPU,
so a tensor the host neither moved nor casts shows up as a CPU tensor in a module it does not
cast (on a GPU: the device mix of the first op that reads it).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mochi_core import checkpoints, demo, lora, memory
from mochi_core.estimates import LiveBytes
from mochi_core.pipeline import WEIGHT_DTYPES
from mochi_core.text import TextConditioning
from tests.host.inprocess import host_nodes, import_pack, use_model_folder

pytestmark = pytest.mark.host

META, CPU = torch.device("meta"), torch.device("cpu")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack's nodes on the host, the demo checkpoints (and a LoRA) in its model folders."""
    nodes = import_pack()
    folder = tmp_path_factory.mktemp("models")
    made = demo.make_demo_checkpoints(folder)
    use_model_folder(folder)
    sd = checkpoints.load_dit_state_dict(made.dit)[0]
    g = torch.Generator().manual_seed(0)
    out_features, in_features = sd["blocks.0.attn.qkv_x.weight"].shape
    save_file({"blocks.0.attn.qkv_x.lora_A": torch.randn(4, in_features, generator=g) * 0.1,
               "blocks.0.attn.qkv_x.lora_B": torch.randn(out_features, 4, generator=g) * 0.1},
              folder / "lora.safetensors")
    nodes.files = {"dit": made.dit.name, "t5": made.t5.name, "vae": made.vae.name,
                   "lora": "lora.safetensors", "folder": folder}
    return nodes


@pytest.fixture(autouse=True)
def fresh_loader(pack):
    """Every test loads its own DiT (the loader keeps the last one; these tests move theirs)."""
    pack.managed.LastDiT._key = pack.managed.LastDiT._patcher = None
    yield
    pack.managed.LastDiT._key = pack.managed.LastDiT._patcher = None


def load_dit(pack, weight_dtype: str = "default", lora_strength: float = 0.0):
    """The Mochi 1 DiT Loader's output patcher."""
    loras = {"lora_1": pack.files["lora"] if lora_strength else "none",
             "lora_1_strength": lora_strength, "lora_2": "none", "lora_2_strength": 1.0}
    return pack.loaders.DiTLoader.execute(pack.files["dit"], weight_dtype, "sdpa", "off",
                                          **loras).result[0]


def unreached(patcher, device: torch.device) -> list[str]:
    """Tensors the host neither moved to ``device`` nor casts per call (their module is not
    marked ``comfy_cast_weights``): on a GPU, each is a CPU tensor an op mixes with GPU ones."""
    modules = dict(patcher.model.named_modules())
    return [name for name, t in [*patcher.model.named_parameters(),
                                 *patcher.model.named_buffers()]
            if t.device != device
            and not getattr(modules[name.rpartition(".")[0]], "comfy_cast_weights", False)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def dit_inputs(config, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, 2, 4, 6, generator=g)
    y = torch.randn(1, 5, config.t5_feat_dim, generator=g)
    return x, torch.tensor([0.7]), y, torch.tensor([[True, True, True, False, False]])


# --------------------------------------------------------------------------------------------
# 1. Partial load: the host places what fits and casts the rest, every tensor included


@pytest.mark.parametrize("weight_dtype", ["default", "bf16", "fp8_e4m3fn"])
@pytest.mark.parametrize("share", [3, 0])
def test_a_partial_load_places_or_casts_every_tensor(pack, weight_dtype, share):
    """A budget of a third of the model (a 24 GB card under the bundled workflow) or none at all
    (``--novram``): what the host does not place it must cast, the RoPE frequencies and QK-norm
    weights included, and it must know that it loaded the model partially."""
    patcher = load_dit(pack, weight_dtype)
    size = patcher.model_size()
    patcher.load(META, lowvram_model_memory=size // share if share else 0.1)
    left = unreached(patcher, META)
    assert not left, f"left on the CPU and not cast by the host ({len(left)}): {left[:6]}"
    cast = [n for n, m in patcher.model.named_modules() if getattr(m, "comfy_cast_weights", 0)]
    assert patcher.model.model_lowvram and cast, "the host believes it loaded the model whole"
    assert patcher.loaded_size() < size
    assert (patcher.loaded_size() > 0) == bool(share)


@pytest.mark.parametrize("weight_dtype", ["default", "bf16", "fp32"])
def test_the_host_layers_compute_what_the_core_computes_bit_for_bit(pack, weight_dtype):
    """Loaded whole, partly or not at all, through the host's plain or casting layers: the same
    velocity as the core's own layers (``mochi_core.ops.cast``, the CLI's), bit for bit."""
    dtype = WEIGHT_DTYPES[weight_dtype].dtype
    core = checkpoints.load_dit(pack.files["folder"] / pack.files["dit"], dtype=dtype)
    inputs = dit_inputs(core.config)
    with torch.no_grad():
        expected = core(*inputs)
        for budget in (None, 3, 0):
            patcher = load_dit(pack, weight_dtype)
            size = patcher.model_size()
            patcher.load(CPU, lowvram_model_memory=size // budget if budget else 0.1,
                         full_load=budget is None)
            assert torch.equal(patcher.model.module(*inputs), expected), budget


def test_scaled_fp8_keeps_its_fp8_weights_under_the_host_layers(pack):
    """The host's scaled-fp8 layers hold the fp8 weights and their scales (not dequantized), and
    compute as close to the fp32 model as the core's own fp8 layers do."""
    path = pack.files["folder"] / pack.files["dit"]
    fp32, core = checkpoints.load_dit(path), checkpoints.load_dit(path, dtype=torch.float8_e4m3fn)
    patcher = load_dit(pack, "fp8_e4m3fn")
    layer = patcher.model.module.blocks[0].attn.qkv_x
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight, core.blocks[0].attn.qkv_x.weight)
    assert torch.equal(layer.scale_weight, core.blocks[0].attn.qkv_x.scale_weight)
    patcher.load(CPU, lowvram_model_memory=patcher.model_size() // 3)
    inputs = dit_inputs(fp32.config)
    with torch.no_grad():
        reference, ours = fp32(*inputs), core(*inputs)
        host = patcher.model.module(*inputs)
    assert (host - reference).abs().max() <= 1.5 * (ours - reference).abs().max()


def test_the_vae_streams_every_weight_under_a_small_budget(pack):
    """The VAE is built with the host's casting layers too: under ``--novram`` (or a small
    card) nothing is left uncast, and a streamed decoder decodes what the core's decodes."""
    decoder = pack.loaders.VAELoader.execute(pack.files["vae"], "none", "fp32").result[0]
    decoder.load(META, lowvram_model_memory=0.1)
    assert not unreached(decoder, META) and decoder.model.model_lowvram
    decoder = pack.loaders.VAELoader.execute(pack.files["vae"], "none", "fp32").result[0]
    decoder.load(CPU, lowvram_model_memory=0.1)
    core = checkpoints.load_vae(pack.files["folder"] / pack.files["vae"]).decoder
    z = torch.randn(1, 12, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(decoder.model.module(z), core(z))


def test_fp8_fast_multiplies_in_fp8_where_the_host_says_the_device_can(
    pack, monkeypatch, scaled_mm_calls
):
    """weight_dtype fp8_e4m3fn_fast is the host's own fp8_optimizations: on a device its
    ``supports_fp8_compute`` refuses (this CPU) it is fp8_e4m3fn, bit for bit; on one it accepts
    (an Ada or Hopper GPU, simulated by that function) its fp8 layers multiply in fp8."""
    import comfy.model_management  # noqa: PLC0415

    path = pack.files["folder"] / pack.files["dit"]
    fp32 = checkpoints.load_dit(path)
    inputs = dit_inputs(fp32.config)
    def velocity(weight_dtype: str) -> torch.Tensor:
        pack.managed.LastDiT._key = pack.managed.LastDiT._patcher = None
        patcher = load_dit(pack, weight_dtype)
        patcher.load(CPU)
        with torch.no_grad():
            return patcher.model.module(*inputs)

    storage = velocity("fp8_e4m3fn")
    assert torch.equal(velocity("fp8_e4m3fn_fast"), storage) and scaled_mm_calls == []
    monkeypatch.setattr(comfy.model_management, "supports_fp8_compute", lambda device=None: True)
    fast = velocity("fp8_e4m3fn_fast")
    assert len(scaled_mm_calls) >= fp32.config.depth, "the host's fp8 layers did not run fp8"
    with torch.no_grad():
        reference = fp32(*inputs)
    # measured: 4.1e-2 (storage), 6.1e-2 (the host's fast layers: unscaled activations)
    assert rel_err(fast, reference) <= 1.6 * rel_err(storage, reference)


# --------------------------------------------------------------------------------------------
# 2. The T5 is loaded whole or not at all


def test_the_t5_is_loaded_whole_or_not_at_all(pack):
    """transformers' T5 has plain layers, which fail when split between two devices: a budget
    short of the whole model leaves it all on the offload device (where it then runs), a
    partial unload offloads it all."""
    t5 = pack.loaders.TextEncoderLoader.execute(pack.files["t5"], "default").result[0]
    patcher = t5.patcher
    patcher.load_device = META
    size = patcher.model_size()

    def devices():
        return {t.device.type for t in patcher.model.parameters()}

    patcher.partially_load(META, extra_memory=size // 2)
    assert devices() == {"cpu"}, "the T5 was split between two devices"
    assert patcher.loaded_size() == 0
    patcher.partially_load(META, extra_memory=2 * size)
    assert devices() == {"meta"}
    t5 = pack.loaders.TextEncoderLoader.execute(pack.files["t5"], "default").result[0]
    patcher = t5.patcher  # on the CPU, where a partial unload can be carried out here
    patcher.partially_load(CPU, extra_memory=2 * size)
    patcher.partially_unload(CPU, memory_to_free=size // 4)
    placed = [n for n, m in patcher.model.named_modules() if getattr(m, "comfy_patched_weights",
                                                                     False)]
    assert not placed, f"the T5 was unloaded partly; still placed: {placed[:4]}"


def test_the_t5_runs_in_fp32_on_the_cpu_by_default(pack):
    """On the CPU (this host, and ``--lowvram``/``--novram`` on a GPU machine) 'default' is fp32,
    the reference precision (bf16 on a GPU: ``test_placement_flags``)."""
    t5 = pack.loaders.TextEncoderLoader.execute(pack.files["t5"], "default").result[0]
    assert {p.dtype for p in t5.conditioner.encoder.parameters()} == {torch.float32}
    assert t5.patcher.load_device == CPU


# --------------------------------------------------------------------------------------------
# 3. LoRA as host patches


def qkv_x(patcher) -> torch.Tensor:
    return patcher.model.module.blocks[0].attn.qkv_x.weight


def merged_reference(pack, weight_dtype: str, strength: float) -> torch.nn.Module:
    path = pack.files["folder"] / pack.files["dit"]
    model = checkpoints.load_dit(path, dtype=WEIGHT_DTYPES[weight_dtype].dtype)
    lora.apply_lora(model, lora.load_lora(pack.files["folder"] / pack.files["lora"]), strength)
    return model


def test_a_lora_is_a_host_patch_applied_when_the_host_loads_the_model(pack):
    """Nothing is merged at load: the weights stay the file's, the LoRA is a host patch, and the
    host's load gives the merged weight of ``lora.apply_lora``, bit for bit."""
    import comfy.model_management as mm  # noqa: PLC0415

    plain = qkv_x(load_dit(pack)).clone()
    patcher = load_dit(pack, lora_strength=0.8)
    assert torch.equal(qkv_x(patcher), plain), "the LoRA was merged into the loaded weights"
    assert list(patcher.patches) == ["module.blocks.0.attn.qkv_x.weight"]
    mm.load_models_gpu([patcher])
    expected = merged_reference(pack, "default", 0.8).blocks[0].attn.qkv_x.weight
    assert torch.equal(qkv_x(patcher), expected)


def test_a_lora_on_streamed_weights_is_patched_on_the_fly(pack):
    """With nothing placed (``--novram``) the host patches the LoRA layer per call: the same
    velocity as the merged model, bit for bit in fp32."""
    patcher = load_dit(pack, lora_strength=0.8)
    patcher.load(CPU, lowvram_model_memory=0.1)
    assert patcher.lowvram_patch_counter() > 0
    reference = merged_reference(pack, "default", 0.8)
    inputs = dit_inputs(reference.config)
    with torch.no_grad():
        assert torch.equal(patcher.model.module(*inputs), reference(*inputs))


def test_a_lora_keeps_fp8_weights_fp8(pack):
    """On an fp8 model the patched layer stays fp8 (the host re-quantizes it, stochastically
    rounded), so the memory check does not offer 'fp8 weights' to an fp8 model."""
    import comfy.model_management as mm  # noqa: PLC0415

    patcher = load_dit(pack, "fp8_e4m3fn", lora_strength=0.8)
    mm.load_models_gpu([patcher])
    assert qkv_x(patcher).dtype == torch.float8_e4m3fn
    module = patcher.model.module
    text = TextConditioning(torch.zeros(1, 4, module.config.t5_feat_dim),
                            torch.ones(1, 4, dtype=torch.bool))
    job = memory.dit_job(module, (1, 12, 28, 60, 106), [text, text], True, None)
    assert job.storage_dtype == torch.float8_e4m3fn
    options = memory.dit_alternatives(job, job.need() // 2, 20 * 2**30, CPU)
    assert not any(o.startswith("fp8 weights") for o in options), options


def test_a_strength_change_reuses_the_loaded_dit(pack, monkeypatch):
    """A strength change clones the DiT the loader already made: no file is read again (the
    server-side measurement is in ``test_lowvram_servers``)."""
    first = load_dit(pack, lora_strength=0.8)
    reads = []
    real = checkpoints.load_dit_state_dict
    monkeypatch.setattr(checkpoints, "load_dit_state_dict",
                        lambda *a, **k: reads.append(a) or real(*a, **k))
    second = load_dit(pack, lora_strength=0.4)
    assert reads == [], "the DiT file was read again for a strength change"
    assert second.model is first.model and second.patches_uuid != first.patches_uuid
    assert second.patches["module.blocks.0.attn.qkv_x.weight"][0][0] == 0.4


# --------------------------------------------------------------------------------------------
# 5. Pixels to images


def test_pixels_become_images_without_full_size_copies(pack):
    """The conversion allocates its result and at most one chunk of frames besides (it made
    two or three full-clip fp32 copies on the decoder's device), with the same values."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 25, 32, 48, generator=g) * 1.2
    tracker = LiveBytes()
    with tracker:
        images = pack.vae.pixels_to_image(pixels)
    extra = tracker.peak - images.nbytes  # one chunk of 8 frames: under a third of 25 frames
    assert extra <= images.nbytes // 3, (extra, images.nbytes)
    expected = ((pixels.permute(0, 2, 3, 4, 1).reshape(25, 32, 48, 3) + 1.0) / 2.0).clamp(0, 1)
    assert torch.equal(images, expected)


def test_the_decode_estimate_counts_the_image_conversion():
    from mochi_core.vae import DecoderConfig  # noqa: PLC0415

    job = memory.DecodeJob(DecoderConfig(), (1, 12, 28, 60, 106), torch.float32, 1, 32, 4)
    assert job.image_chunk_bytes() == 4 * 3 * memory.IMAGE_CHUNK_FRAMES * 480 * 848
    assert job.need() >= job.output_bytes() + job.image_chunk_bytes()


# --------------------------------------------------------------------------------------------
# 6. The host's conditioning nodes


@pytest.fixture(scope="module")
def prompts(pack):
    """Two prompts of different lengths through Mochi 1 Text Encode."""
    t5 = pack.loaders.TextEncoderLoader.execute(pack.files["t5"], "fp32").result[0]
    encode = pack.conditioning.TextEncode.execute
    first, _ = encode(t5, "a red fox in the snow", "").result
    second, empty = encode(t5, "golden light", "").result
    return first, second, empty


def real_tokens(cond) -> torch.Tensor:
    features, extra = cond[0]
    return features[0][extra["attention_mask"][0].bool()]


def test_conditioning_concat_attends_both_prompts_real_tokens(pack, prompts):
    """ConditioningConcat joins the features and keeps the first mask: the sampler uses the
    real tokens of both prompts (the second's padding reads as padding), as if encoded so."""
    core_nodes = host_nodes()  # the host's own nodes.py

    first, second, _ = prompts
    (joined,) = core_nodes.ConditioningConcat().concat(first, second)
    got = pack.sampling.conditioning_to_text(joined)
    want = torch.cat([real_tokens(first), real_tokens(second)])
    length = want.shape[0]
    assert got.mask[0].tolist() == [True] * length + [False] * (got.mask.shape[1] - length)
    assert torch.equal(got.features[0, :length], want.float())
    model = checkpoints.load_dit(pack.files["folder"] / pack.files["dit"])
    x, sigma, _, _ = dit_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, sigma, got.features, got.mask),
                           model(x, sigma, want[None].float(), torch.ones(1, length).bool()))


def test_average_and_zero_out_conditioning_are_accepted(pack, prompts):
    core_nodes = host_nodes()  # the host's own nodes.py

    first, second, empty = prompts
    (average,) = core_nodes.ConditioningAverage().addWeighted(first, second, 0.5)
    (zeroed,) = core_nodes.ConditioningZeroOut().zero_out(first)
    model = checkpoints.load_dit(pack.files["folder"] / pack.files["dit"])
    x, sigma, _, _ = dit_inputs(model.config)
    for cond in (average, zeroed, empty):
        text = pack.sampling.conditioning_to_text(cond)
        with torch.no_grad():
            assert torch.isfinite(model(x, sigma, text.features, text.mask)).all()


def test_conditioning_the_sampler_cannot_honour_is_refused_by_name(pack, prompts):
    core_nodes = host_nodes()  # the host's own nodes.py

    first, second, _ = prompts
    (combined,) = core_nodes.ConditioningCombine().combine(first, second)
    with pytest.raises(ValueError, match="2 conditionings.*ConditioningCombine"):
        pack.sampling.conditioning_to_text(combined)
    (ranged,) = core_nodes.ConditioningSetTimestepRange().set_range(first, 0.2, 0.8)
    with pytest.raises(ValueError, match="cannot honour start_percent, end_percent"):
        pack.sampling.conditioning_to_text(ranged)


def test_packing_keeps_a_prefix_mask_as_it_is():
    features = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    packed = TextConditioning.packed(features, mask)
    assert packed.features is features and packed.mask is mask
    holes = TextConditioning.packed(features, torch.tensor([[False, True, False, True]] * 2))
    assert holes.mask.tolist() == [[True, True, False, False]] * 2
    assert torch.equal(holes.features[:, :2], features[:, [1, 3]])
