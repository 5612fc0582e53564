"""Loading every real checkpoint format (small random weights) and refusing wrong files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mochi_core import checkpoints as ck
from mochi_core.checkpoints import CheckpointError, detect_file, load_dit, load_vae
from tests import fixtures_formats as ff


@pytest.fixture(scope="module")
def src() -> dict:
    return {"dit": ff.genmo_dit_state_dict(), "enc": ff.genmo_encoder_state_dict(),
            "dec": ff.genmo_decoder_state_dict(), "t5": ff.t5_state_dict()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, src) -> dict:
    """Every format written once: name -> (path, written Genmo-key tensors)."""
    d = tmp_path_factory.mktemp("formats")
    dit = src["dit"]
    out = {
        "genmo_fp32": ff.write_genmo_dit(d / "genmo32", dit),
        "genmo_bf16": ff.write_genmo_dit(d / "genmo16", dit, torch.bfloat16),
        "comfy": ff.write_comfy_dit(d / "comfy", dit),
        "comfy_fp8_scaled": ff.write_comfy_fp8_scaled(d / "fp8s", dit),
        "kijai_fp8": ff.write_kijai_dit(d / "kijai8", dit, fp8=True),
        "kijai_bf16": ff.write_kijai_dit(d / "kijai16", dit, fp8=False),
        "diffusers": ff.write_diffusers_transformer(d / "diffusers", dit),
    }
    out["genmo_vae"] = ff.write_genmo_vae(d / "vae", src["enc"], src["dec"])
    out["comfy_vae"] = ff.write_comfy_vae(d / "cvae", src["enc"], src["dec"])
    out["diffusers_vae"] = ff.write_diffusers_vae(d / "diffusers", src["enc"], src["dec"])
    out["aio"] = ff.write_all_in_one(d / "aio", dit, src["enc"], src["dec"], src["t5"])
    out["sd_vae"] = ff.write_sd_vae_like(d / "sd")
    out["t5"] = ff._save(d / "t5" / "t5xxl_fp16.safetensors",
                         {k: v.half() for k, v in src["t5"].items()})
    return out


def assert_loaded(model: torch.nn.Module, written: dict) -> None:
    """Every tensor equals what was written (bitwise in its stored dtype, fp32 for norms)."""
    loaded = model.state_dict()
    assert set(loaded) == set(written)
    for key, want in written.items():
        got = loaded[key]
        fp32 = key == "pos_frequencies" or "norm" in key
        assert got.dtype == (torch.float32 if fp32 else want.dtype), key
        assert torch.equal(got.float(), want.float()), key


DIT_FORMATS = ["genmo_fp32", "genmo_bf16", "comfy", "comfy_fp8_scaled", "kijai_fp8",
               "kijai_bf16", "diffusers"]


@pytest.mark.parametrize("name", DIT_FORMATS)
def test_dit_formats_load_exactly_and_run(files, name):
    path, written = files[name]
    model = load_dit(path)
    assert_loaded(model, written)
    out = ff.run_dit(model)
    assert out.shape == (1, 12, 2, 4, 4) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_fp8_scaled_layers_keep_fp8_and_their_scale(files):
    path, written = files["comfy_fp8_scaled"]
    model = load_dit(path)
    qkv = model.blocks[0].attn.qkv_x
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(qkv.scale_weight, written["blocks.0.attn.qkv_x.scale_weight"])
    assert model.t5_yproj.scale_weight is None


def test_fp8_scaled_dequantizes_on_request(files):
    path, written = files["comfy_fp8_scaled"]
    model = load_dit(path, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert not any(k.endswith("scale_weight") for k in sd)
    key = "blocks.1.mlp_x.w1.weight"
    want = (written[key].float() * written["blocks.1.mlp_x.w1.scale_weight"]).bfloat16()
    assert torch.equal(sd[key], want)
    assert sd["blocks.0.attn.q_norm_x.weight"].dtype == torch.float32
    # same function up to bf16 rounding (the fp8 path scales in bf16 at compute time)
    out, reference = ff.run_dit(model), ff.run_dit(load_dit(path))
    assert (out - reference).norm() / reference.norm() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_storage_dtype_policy(files, dtype, src):
    model = load_dit(files["genmo_fp32"][0], dtype=dtype)
    assert model.blocks[0].attn.proj_x.weight.dtype == dtype
    assert model.pos_frequencies.dtype == torch.float32
    assert model.blocks[1].attn.k_norm_y.weight.dtype == torch.float32
    norm = src["dit"]["blocks.1.attn.k_norm_y.weight"]
    assert torch.equal(model.blocks[1].attn.k_norm_y.weight, norm)
    assert torch.equal(model.pos_frequencies, src["dit"]["pos_frequencies"])


def test_diffusers_cast_on_load_keeps_fp32_where_required(files, src):
    model = load_dit(files["diffusers"][0], dtype=torch.bfloat16)
    assert torch.equal(model.pos_frequencies, src["dit"]["pos_frequencies"])
    assert torch.equal(model.blocks[0].attn.q_norm_y.weight,
                       src["dit"]["blocks.0.attn.q_norm_y.weight"])
    for key, value in model.state_dict().items():
        if key != "pos_frequencies" and "norm" not in key:
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, src["dit"][key].bfloat16()), key


def test_fp8_storage_from_fp32_is_scaled_and_close(files):
    path = files["genmo_fp32"][0]
    reference = ff.run_dit(load_dit(path))
    model = load_dit(path, dtype=torch.float8_e4m3fn)
    assert model.blocks[0].mlp_x.w2.weight.dtype == torch.float8_e4m3fn
    assert model.blocks[0].mlp_x.w2.scale_weight is not None
    assert model.x_embedder.proj.weight.dtype == torch.bfloat16
    assert model.pos_frequencies.dtype == torch.float32
    out = ff.run_dit(model)
    rel = (out - reference).norm() / reference.norm()
    assert 0 < rel < 0.1


def test_diffusers_folder_file_and_transformer_dir(files):
    root, written = files["diffusers"]
    assert detect_file(root).description == "dit/diffusers"
    assert_loaded(load_dit(root / "transformer"), written)
    one_shard = next((root / "transformer").glob("*-00002-of-00002.safetensors"))
    assert_loaded(load_dit(one_shard), written)  # a shard picks up its siblings via the index


def test_check_file_sees_every_shard_and_index_before_reading(files):
    """The loaders hand every file they resolve (the index beside a shard, every shard) to
    ``check_file`` first; a refusal stops the load with the checker's message."""
    root, written = files["diffusers"]
    folder = root / "transformer"
    one_shard = next(folder.glob("*-00002-of-00002.safetensors"))
    seen: list[Path] = []
    assert_loaded(load_dit(one_shard, check_file=seen.append), written)
    shards = sorted(folder.glob("*.safetensors"))
    index = next(folder.glob("*.safetensors.index.json"))
    assert len(shards) == 2 and set(seen) == {index, *shards}

    def refuse_first(path: Path) -> None:
        if path.name.endswith("-00001-of-00002.safetensors"):
            raise PermissionError(f"{path.name} is a link leaving the model folders")

    with pytest.raises(PermissionError, match="-00001-of-00002.safetensors is a link"):
        load_dit(one_shard, check_file=refuse_first)

    def refuse_all(path: Path) -> None:
        raise PermissionError(f"{path.name} refused")

    with pytest.raises(PermissionError, match="refused"):
        load_vae(files["comfy_vae"][0], check_file=refuse_all)
    with pytest.raises(PermissionError, match="t5xxl_fp16.safetensors refused"):
        ck.load_t5(files["t5"], check_file=refuse_all)


@pytest.mark.parametrize(("name", "words"), [
    ("genmo_fp32", ["looks like dit/genmo", "Mochi 1 DiT Loader"]),
    ("comfy_vae", ["looks like vae/comfy_combined", "Mochi 1 VAE Loader"]),
    ("sd15", ["another architecture"]),
    ("empty", ["looks like an empty checkpoint (no tensors)"]),
])
def test_t5_loader_refuses_a_file_that_is_not_a_t5(files, tmp_path, name, words):
    """A DiT, a VAE, a Stable Diffusion checkpoint or an empty file given as the T5 encoder:
    the error names the file and what it looks like (and, for a Mochi file, its loader)."""
    if name == "sd15":
        path = tmp_path / "sd15.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                   "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)},
                  str(path))
    elif name == "empty":
        path = tmp_path / "empty.safetensors"
        save_file({}, str(path))
    else:
        path = files[name][0]
    with pytest.raises(CheckpointError) as err:
        ck.load_t5(path)
    for word in [path.name, "no T5-XXL encoder found", *words]:
        assert word in str(err.value), (word, str(err.value))


def run_vae(vae: ck.MochiVAE) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        frames = vae.decoder(torch.randn(1, 12, 2, 2, 2, generator=g))
        assert frames.shape == (1, 3, 7, 16, 16) and torch.isfinite(frames).all()
        latents = vae.encoder.encode(torch.rand(1, 3, 7, 16, 16, generator=g) * 2 - 1)
        assert latents.shape == (1, 12, 2, 2, 2) and torch.isfinite(latents).all()


def assert_vae_equal(vae: ck.MochiVAE, src: dict, dtype=torch.float32) -> None:
    for half, key in (("encoder", "enc"), ("decoder", "dec")):
        loaded = getattr(vae, half).state_dict()
        assert set(loaded) == set(src[key])
        for k, v in src[key].items():
            assert loaded[k].dtype == dtype and torch.equal(loaded[k], v.to(dtype)), k


def test_vae_genmo_files(files, src):
    enc, dec = files["genmo_vae"]
    vae = load_vae([enc, dec])
    assert vae.halves == ("encoder", "decoder")
    assert_vae_equal(vae, src)
    run_vae(vae)
    assert load_vae(dec).halves == ("decoder",)  # kijai's decoder file has this layout
    assert load_vae(enc).halves == ("encoder",)


def test_vae_comfy_combined_and_diffusers(files, src):
    path, _ = files["comfy_vae"]
    assert detect_file(path).description == "vae/comfy_combined (encoder+decoder)"
    assert_vae_equal(load_vae(path), src, torch.bfloat16)
    root, _ = files["diffusers"]
    vae = load_vae(root)
    assert_vae_equal(vae, src)
    run_vae(vae)
    assert load_vae(root, dtype=torch.float16).decoder.output_proj.weight.dtype == torch.float16


def test_all_in_one_yields_dit_vae_and_t5(files, src):
    path = files["aio"]
    fmt = detect_file(path)
    assert fmt.kind == "all_in_one" and fmt.parts == ("dit", "vae:encoder+decoder", "t5")
    model = load_dit(path)
    assert torch.equal(model.t5_yproj.weight, src["dit"]["t5_yproj.weight"].bfloat16())
    ff.run_dit(model)
    assert_vae_equal(load_vae(path), src, torch.bfloat16)
    t5 = ck.load_t5_state_dict(path, dtype=torch.bfloat16)
    assert set(t5) == set(src["t5"])
    assert torch.equal(t5["shared.weight"], src["t5"]["shared.weight"].bfloat16())
    with pytest.raises(CheckpointError, match="no T5-XXL encoder found; it looks like dit/comfy"):
        ck.load_t5(files["comfy"][0])


@pytest.mark.parametrize(("name", "description"), [
    ("genmo_fp32", "dit/genmo"), ("comfy", "dit/comfy"),
    ("comfy_fp8_scaled", "dit/comfy_fp8_scaled"), ("kijai_fp8", "dit/kijai_fp8"),
    ("kijai_bf16", "dit/genmo"), ("sd_vae", "vae/stable_diffusion (not a Mochi VAE)"),
    ("t5", "t5/t5xxl_encoder"),
])
def test_detect_file_descriptions(files, name, description):
    path = files[name][0] if isinstance(files[name], tuple) else files[name]
    assert detect_file(path).description == description


def test_detect_genmo_vae_halves(files):
    enc, dec = files["genmo_vae"]
    assert detect_file(enc).description == "vae/genmo_encoder (encoder)"
    assert detect_file(dec).description == "vae/genmo_decoder (decoder)"


@pytest.mark.parametrize(("name", "loader", "words"), [
    ("sd_vae", load_dit, ["sd_vae.safetensors", "not a Mochi DiT", "stable_diffusion"]),
    ("sd_vae", load_vae, ["sd_vae.safetensors", "not a Mochi VAE"]),
    ("t5", load_dit, ["t5xxl_fp16.safetensors", "t5/"]),
    ("comfy", load_vae, ["mochi_preview_bf16.safetensors", "dit/comfy"]),
])
def test_wrong_model_is_refused_clearly(files, name, loader, words):
    path = files[name][0] if isinstance(files[name], tuple) else files[name]
    with pytest.raises(CheckpointError) as err:
        loader(path)
    for word in words:
        assert word in str(err.value)


def test_checkpoint_of_another_model_is_named(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
          "first_stage_model.decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)}
    save_file(sd, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(CheckpointError, match="sd15.safetensors: not a Mochi DiT.*another arch"):
        load_dit(tmp_path / "sd15.safetensors")


def test_truncated_file(files, tmp_path):
    data = files["comfy"][0].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        load_dit(path)


def test_wrong_shape_and_missing_key_are_named(tmp_path, src):
    sd = dict(src["dit"])
    sd["blocks.1.attn.proj_x.weight"] = torch.zeros(64, 63)
    del sd["blocks.0.mlp_y.w2.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "dit/genmo" in msg
    assert "missing (1): blocks.0.mlp_y.w2.weight" in msg
    assert "wrong shape (1): blocks.1.attn.proj_x.weight (64, 63) != (64, 64)" in msg


def test_unexpected_key_is_named(tmp_path, src):
    sd = {ck.COMFY_PREFIX + k: v for k, v in src["dit"].items()}
    sd[ck.COMFY_PREFIX + "blocks.0.attn.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): blocks\.0\.attn\.extra\.weight"):
        load_dit(tmp_path / "extra.safetensors")


def test_pickle_payload_is_live(tmp_path):
    """Sanity check of the payload used below: unpickling it does create its marker."""
    marker = tmp_path / "proof"
    pickle.loads(ff.pickle_payload(marker))  # noqa: S301  (our own harmless payload)
    assert marker.exists()


@pytest.mark.parametrize("loader", [load_dit, load_vae, detect_file])
def test_pickle_files_are_never_unpickled(tmp_path, loader):
    marker = tmp_path / "UNPICKLED"
    for path in ff.write_pickle_files(tmp_path / "evil", marker):
        with pytest.raises(CheckpointError) as err:
            loader(path)
        assert path.name in str(err.value)
        assert "pickle" in str(err.value) or "zip" in str(err.value)
    assert not marker.exists()


def test_missing_path_and_ambiguous_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.safetensors"):
        load_dit(tmp_path / "nothing.safetensors")
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    with pytest.raises(CheckpointError, match="a.safetensors"):
        detect_file(tmp_path)


def test_gguf_in_safetensors_is_refused(tmp_path, src):
    sd = dict(src["dit"])
    sd["blocks.0.mlp_x.w2.Q8_0_qweight"] = torch.zeros(64, 136, dtype=torch.uint8)
    del sd["blocks.0.mlp_x.w2.weight"]
    save_file(sd, str(tmp_path / "q8.safetensors"))
    with pytest.raises(CheckpointError, match="GGUF"):
        load_dit(tmp_path / "q8.safetensors")


def test_fixture_writers_use_the_real_layouts(files):
    """The fixtures themselves follow SPEC §2 (dtypes and marker keys as in the real files)."""
    from mochi_core.safetensors_io import read_header

    fp8 = read_header(files["comfy_fp8_scaled"][0]).tensors
    assert fp8["model.diffusion_model.scaled_fp8"].dtype == "F8_E4M3"
    assert fp8["model.diffusion_model.blocks.0.attn.qkv_x.weight"].dtype == "F8_E4M3"
    assert fp8["model.diffusion_model.blocks.0.attn.qkv_x.scale_weight"].shape == ()
    kijai = read_header(files["kijai_fp8"][0]).tensors
    assert kijai["t_embedder.mlp.0.weight"].dtype == "BF16"
    assert kijai["blocks.0.mod_x.weight"].dtype == "F8_E4M3"
    assert Path(files["diffusers"][0], "transformer",
                "diffusion_pytorch_model.safetensors.index.json").exists()


# ---- against the real diffusers classes (authentic key layout, numerical check) ---------------

DIFFUSERS_DIT = ff.DiTConfig(depth=2, hidden_size_x=48, hidden_size_y=24, num_heads=4,
                             mlp_hidden_x=128, mlp_hidden_y=64, t5_feat_dim=64, pool_heads=8)


def _randomize_module(model: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.3 if p.dim() < 2 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_real_diffusers_transformer_file_loads_and_matches_diffusers(tmp_path):
    from diffusers import MochiTransformer3DModel

    from tests.oracles import diffusers_velocity

    c = DIFFUSERS_DIT
    reference = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        num_layers=c.depth, pooled_projection_dim=c.hidden_size_y, in_channels=12,
        text_embed_dim=c.t5_feat_dim, time_embed_dim=256).eval()
    (tmp_path / "transformer").mkdir()
    save_file(_randomize_module(reference, 11),
              str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    model = load_dit(tmp_path)
    assert model.config == c
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 12, 2, 4, 6, generator=g), torch.randn(1, 6, 64, generator=g)
    mask, sigma = torch.tensor([[True] * 4 + [False] * 2]), torch.tensor([0.4])
    with torch.no_grad():
        ours = model(x, sigma, y, mask)
    theirs = diffusers_velocity(reference, x, sigma, y, mask)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_real_diffusers_vae_file_converts_exactly(tmp_path):
    from diffusers import AutoencoderKLMochi

    enc, dec = ff.SMALL_ENCODER, ff.SMALL_DECODER
    reference = AutoencoderKLMochi(
        in_channels=15, out_channels=3, encoder_block_out_channels=enc.channels,
        decoder_block_out_channels=dec.channels, latent_channels=12,
        layers_per_block=dec.num_res_blocks, temporal_expansions=dec.temporal_expansions,
        spatial_expansions=dec.spatial_expansions, add_attention_block=enc.attention)
    sd = _randomize_module(reference, 12)
    (tmp_path / "vae").mkdir()
    save_file(sd, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert detect_file(tmp_path).description == "vae/diffusers (encoder+decoder)"
    vae = load_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae.halves == ("encoder", "decoder")
    back = ff.genmo_to_diffusers_vae(vae.encoder.state_dict(), vae.decoder.state_dict())
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
