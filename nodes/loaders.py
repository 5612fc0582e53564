"""Loader nodes: the DiT (with an optional LoRA stack), the VAE halves and the T5 text encoder.

Files come from the host's own model folders (``diffusion_models``, ``vae``, ``text_encoders``,
``loras``), so the files of the native Mochi workflow are picked up where they already are.
Models are wrapped in the host's ``ModelPatcher`` with the host's devices, layers and patches
(:mod:`.managed`): the host loads them (whole or partly) when a node asks for them, offloads
them afterwards and frees them on "unload models".
"""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io, ui

from mochi_core import checkpoints, lora, pipeline
from mochi_core.compile import compile_blocks

from . import managed
from ._shared import (
    CATEGORY,
    NONE,
    ManagedText,
    MochiDecoder,
    MochiEncoder,
    MochiModel,
    MochiTextEncoder,
    choice_error,
    confined,
    file_error,
    first_error,
    model_path,
    schema_error,
)

DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIT_DTYPES = list(pipeline.WEIGHT_DTYPES)
VAE_DTYPES = ["fp32", "bf16", "fp16"]
T5_DTYPES = ["default", "fp32", "bf16"]
ATTENTION = ["sdpa", "flash", "sage"]
COMPILE = ["off", "inductor"]
LORA_SLOTS = 2


def _files(folder: str, with_none: bool = False) -> list[str]:
    names = folder_paths.get_filename_list(folder)
    return [NONE, *names] if with_none else names


def _t5_tokenizer_dir() -> str:
    """The T5 v1.1 vocabulary the host ships (the same one ``CLIPLoader(type=mochi)`` uses)."""
    import comfy.text_encoders

    return os.path.join(list(comfy.text_encoders.__path__)[0], "t5_tokenizer")


class DiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        lora_inputs = []
        for i in range(1, LORA_SLOTS + 1):
            lora_inputs += [
                io.Combo.Input(f"lora_{i}", options=_files("loras", True), default=NONE,
                               tooltip=f"LoRA {i} of the stack, from models/loras "
                                       "('none' to skip)."),
                io.Float.Input(f"lora_{i}_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip=f"Strength of LoRA {i} (0 disables it, negative "
                                       "inverts it)."),
            ]
        return io.Schema(
            node_id="Mochi1DiTLoader",
            display_name="Mochi 1 DiT Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the Mochi 1 diffusion transformer (Genmo, ComfyUI, kijai or "
                        "diffusers files) from models/diffusion_models, applies an optional "
                        "LoRA stack and hands it to the host's model management.",
            inputs=[
                io.Combo.Input("dit_name", options=_files("diffusion_models"),
                               tooltip="The DiT weights, e.g. mochi_preview_bf16.safetensors, "
                                       "from models/diffusion_models."),
                io.Combo.Input("weight_dtype", options=DIT_DTYPES, default="default",
                               tooltip="Storage dtype of the weights: 'default' keeps the "
                                       "file's dtype; fp8_e4m3fn halves memory; compute is cast "
                                       "per layer. fp8_e4m3fn_fast also multiplies in fp8 "
                                       "where the GPU can (Ada, Hopper), as the host's own "
                                       "fp8_e4m3fn_fast; elsewhere it is fp8_e4m3fn."),
                io.Combo.Input("attention", options=ATTENTION, default="sdpa",
                               tooltip="Attention backend; flash and sage fall back to sdpa "
                                       "(with a warning) when their package or a CUDA device "
                                       "is missing."),
                io.Combo.Input("compile", options=COMPILE, default="off",
                               tooltip="torch.compile the transformer blocks (the first run "
                                       "compiles, later runs are faster); falls back to eager "
                                       "with a logged reason when a compiler is missing."),
                *lora_inputs,
            ],
            outputs=[MochiModel.Output(
                display_name="model",
                tooltip="The Mochi 1 DiT under the host's model management. A custom type: the "
                        "host's samplers cannot run this model, so it only connects to Mochi 1 "
                        "Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, dit_name=None, weight_dtype=None, attention=None, compile=None,
                        **kwargs) -> bool | str:
        checks = [file_error("dit_name", "diffusion_models", dit_name),
                  choice_error("weight_dtype", weight_dtype, DIT_DTYPES),
                  choice_error("attention", attention, ATTENTION),
                  choice_error("compile", compile, COMPILE)]
        for i in range(1, LORA_SLOTS + 1):
            checks.append(file_error(f"lora_{i}", "loras", kwargs.get(f"lora_{i}", NONE),
                                     allow_none=True))
        return schema_error(cls, kwargs) or first_error(*checks)

    @classmethod
    def execute(cls, dit_name, weight_dtype, attention, compile, **kwargs) -> io.NodeOutput:
        path = model_path("diffusion_models", dit_name)
        key = managed.LastDiT.key(path, weight_dtype, attention, compile)
        base = managed.LastDiT.get(key)
        if base is None:
            place = managed.dit_placement()
            storage = pipeline.WEIGHT_DTYPES[weight_dtype]
            model = checkpoints.load_dit(
                path, dtype=storage.dtype, attention=attention,
                operations=managed.dit_operations(place.load_device, storage.fp8_fast),
                check_file=confined("dit_name", "diffusion_models"))
            if compile != "off":
                compile_blocks(model, backend=compile)  # lazily, at the first sampling step
            base = managed.managed(model, dit_name, place)
            managed.LastDiT.put(key, base)
        patcher, applied = base.clone(), []
        for i in range(1, LORA_SLOTS + 1):
            name, strength = kwargs.get(f"lora_{i}", NONE), kwargs.get(f"lora_{i}_strength", 1.0)
            if name != NONE and strength != 0:
                managed.add_lora(patcher, lora.load_lora(model_path("loras", name)), strength)
                applied.append(f"{name} x{strength:g}")
        summary = f"{dit_name} ({base.model.module.config.depth} blocks); attention {attention}"
        summary += f"; compile {compile}" if compile != "off" else ""
        summary += f"; LoRA: {', '.join(applied)}" if applied else ""
        return io.NodeOutput(patcher, ui=ui.PreviewText(summary))


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1VAELoader",
            display_name="Mochi 1 VAE Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the Mochi 1 VAE from models/vae: ComfyUI's mochi_vae.safetensors "
                        "(decoder and encoder in one file), Genmo's decoder/encoder files or a "
                        "diffusers VAE. Reports which halves it found.",
            inputs=[
                io.Combo.Input("vae_name", options=_files("vae"),
                               tooltip="A VAE file, e.g. mochi_vae.safetensors (ComfyUI) or "
                                       "decoder.safetensors (Genmo)."),
                io.Combo.Input("second_file", options=_files("vae", True), default=NONE,
                               tooltip="Optional second file for Genmo's split release (e.g. "
                                       "encoder.safetensors next to decoder.safetensors)."),
                io.Combo.Input("dtype", options=VAE_DTYPES, default="fp32",
                               tooltip="Compute dtype of the VAE; fp32 is the reference, bf16 "
                                       "saves memory (fp16 may give black frames)."),
            ],
            outputs=[
                MochiDecoder.Output(display_name="decoder",
                                    tooltip="The VAE decoder (custom type: the host's VAE type "
                                            "wraps its own model classes)."),
                MochiEncoder.Output(display_name="encoder",
                                    tooltip="The VAE encoder, for video-to-video (custom type, "
                                            "kept apart from the decoder so a wrong wire is "
                                            "refused before anything runs)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, vae_name=None, second_file=None, dtype=None) -> bool | str:
        return schema_error(cls, locals()) or first_error(
            file_error("vae_name", "vae", vae_name),
            file_error("second_file", "vae", second_file, allow_none=True),
            choice_error("dtype", dtype, VAE_DTYPES))

    @classmethod
    def execute(cls, vae_name, second_file, dtype) -> io.NodeOutput:
        paths = [model_path("vae", vae_name)]
        if second_file != NONE:
            paths.append(model_path("vae", second_file))
        inputs = "vae_name" if second_file == NONE else "vae_name / second_file"
        vae = checkpoints.load_vae(paths, dtype=DTYPES[dtype], operations=managed.VAE_OPERATIONS,
                                   check_file=confined(inputs, "vae"))
        summary = f"found: {' + '.join(vae.halves)} ({'; '.join(vae.sources)})"
        place = managed.vae_placement()
        return io.NodeOutput(vae.decoder and managed.managed(vae.decoder, vae_name, place),
                             vae.encoder and managed.managed(vae.encoder, vae_name, place),
                             ui=ui.PreviewText(summary))


class TextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1TextEncoderLoader",
            display_name="Mochi 1 T5 Text Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the T5-XXL v1.1 encoder from models/text_encoders (the "
                        "t5xxl_fp16 / t5xxl_fp8_e4m3fn files of the native workflow) with the "
                        "T5 vocabulary that ships with the host.",
            inputs=[
                io.Combo.Input("t5_name", options=_files("text_encoders"),
                               tooltip="T5-XXL encoder weights, e.g. t5xxl_fp16.safetensors."),
                io.Combo.Input("dtype", options=T5_DTYPES, default="default",
                               tooltip="Compute dtype: 'default' is bf16 where the host runs "
                                       "text encoders on the GPU (9.5 GB instead of 19) and fp32 "
                                       "(the reference) where it runs them on the CPU, e.g. with "
                                       "--lowvram; fp16 overflows in T5."),
            ],
            outputs=[MochiTextEncoder.Output(
                display_name="text_encoder",
                tooltip="The T5 encoder with its tokenizer (custom type: Mochi's conditioning "
                        "keeps Genmo's 256-token padding and empty-negative rule).")],
        )

    @classmethod
    def validate_inputs(cls, t5_name=None, dtype=None) -> bool | str:
        return schema_error(cls, locals()) or first_error(
            file_error("t5_name", "text_encoders", t5_name),
            choice_error("dtype", dtype, T5_DTYPES))

    @classmethod
    def execute(cls, t5_name, dtype) -> io.NodeOutput:
        place = managed.text_encoder_placement()
        conditioner = checkpoints.load_t5(  # refuses a file holding no T5, naming what it holds
            model_path("text_encoders", t5_name), _t5_tokenizer_dir(),
            dtype=managed.text_encoder_dtype(DTYPES[dtype], place),
            check_file=confined("t5_name", "text_encoders"))
        patcher = managed.managed(conditioner.encoder, t5_name, place, managed.WholeModelPatcher)
        return io.NodeOutput(ManagedText(conditioner, patcher))


NODES = [DiTLoader, VAELoader, TextEncoderLoader]
