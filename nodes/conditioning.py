"""Text encode node: a prompt and a negative prompt to standard CONDITIONING."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from mochi_core import text

from ._shared import CATEGORY, MochiTextEncoder, first_error, schema_error


def prompt_error(name: str, value: str | None) -> str | None:
    """The core's prompt rule (:func:`mochi_core.text.prompt_problem`); a linked input passes."""
    return None if value is None else text.prompt_problem(name, value)


def to_conditioning(features: torch.Tensor, mask: torch.Tensor) -> list:
    """Host CONDITIONING: ``[[B × L × 4096 features, {"attention_mask": B × L}]]``.

    The padded rows are zeroed (the DiT never reads them), so that they still read as padding
    after the host's ConditioningConcat, which keeps only the first conditioning's mask.
    """
    features = features.masked_fill(~mask.to(features.device).bool().unsqueeze(-1), 0.0)
    return [[features, {"attention_mask": mask.to(torch.int64)}]]


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Mochi1TextEncode",
            display_name="Mochi 1 Text Encode",
            category=f"{CATEGORY}/conditioning",
            description="Encodes a prompt and a negative prompt with T5-XXL the way Genmo does "
                        "(256 tokens, padding dropped, an empty negative prompt zeroed) into "
                        "standard CONDITIONING with an attention mask.",
            inputs=[
                MochiTextEncoder.Input("text_encoder", tooltip="From Mochi 1 T5 Text Encoder "
                                                               "Loader."),
                io.String.Input("positive", multiline=True, default="",
                                tooltip="What the video shows; at most 256 T5 tokens (longer "
                                        "prompts are truncated, with a warning in the log)."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="What to steer away from; leave empty for Genmo's "
                                        "default (an all-masked, zeroed negative)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="T5 features and attention mask of the prompt."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="T5 features and attention mask of the negative "
                                               "prompt."),
            ],
        )

    @classmethod
    def validate_inputs(cls, positive=None, negative=None) -> bool | str:
        # the prompt rule first: its length message says why prompts are capped
        return first_error(prompt_error("positive", positive), prompt_error("negative", negative),
                           schema_error(cls, locals()))

    @classmethod
    def execute(cls, text_encoder, positive, negative) -> io.NodeOutput:
        mm.load_models_gpu([text_encoder.patcher])
        cond = text_encoder.conditioner.encode([positive, negative], zero_empty=True)
        features, mask = cond.features.to(mm.intermediate_device()), cond.mask.cpu()
        return io.NodeOutput(to_conditioning(features[:1], mask[:1]),
                             to_conditioning(features[1:], mask[1:]))


NODES = [TextEncode]
