"""Text conditioning: T5 v1.1 XXL encoder features for the Mochi DiT (SPEC §5).

The encoder is ``transformers.T5EncoderModel`` built from a state dict in the layout ComfyUI
uses for its text encoders (``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``,
``t5xxl_fp8_e4m3fn_scaled.safetensors``, or the ``text_encoders.t5xxl.transformer.`` part of an
all-in-one checkpoint). The configuration is inferred from the tensor shapes, so nothing is
downloaded, and a scaled-down random T5 in the same layout loads the same way.

The tokenizer is the real T5 v1.1 SentencePiece vocabulary, read from a directory holding
``tokenizer.json`` (ComfyUI ships one in ``comfy/text_encoders/t5_tokenizer``; this module finds
it on the filesystem without importing ComfyUI).

Precision: weights may be stored in fp16 or fp8, but by default (``T5Conditioner.from_file``,
the command line) they are upcast and the encoder runs in **fp32 on the CPU**, as Genmo does.
The ComfyUI loader runs it where the host runs text encoders: in bf16 on a GPU, in fp32 on the
CPU (``nodes/managed.py``). T5 in fp16 is known to overflow to inf/NaN in its
feed-forward activations, and a zeroed prompt would then poison the features.
"""

from __future__ import annotations

import logging
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Tokens per prompt, fixed by the DiT (Genmo asserts L == 256).
MAX_TOKENS = 256
#: Where ComfyUI keeps the T5 tokenizer, relative to a directory on ``sys.path``.
TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "t5_tokenizer"
#: Key prefixes under which T5 weights are found in known checkpoint layouts.
KNOWN_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "")


#: Longest prompt accepted. T5 reads only the first 256 tokens (about 1,000 characters);
#: text beyond this many characters is refused as a mistake (a pasted file, a runaway string).
MAX_PROMPT_CHARS = 20_000


def unicode_problem(name: str, value: str) -> str | None:
    """A message when ``value`` is not valid Unicode text (it holds an unpaired surrogate, which
    no file, JSON encoder or tokenizer takes), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"{name} is not valid Unicode text (an unpaired surrogate at character "
                f"{err.start}); remove it or re-type the text")
    return None


def prompt_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot be a prompt called ``name``, or None when it can.

    Refused: text that is not a string, that is not valid Unicode (an unpaired surrogate), that
    holds a NUL character, or that is longer than :data:`MAX_PROMPT_CHARS` characters. Empty text
    is allowed here (an empty negative prompt is Genmo's default); see :func:`is_blank`.
    """
    if not isinstance(value, str):
        return f"{name} must be text; got {type(value).__name__}"
    if len(value) > MAX_PROMPT_CHARS:
        return (f"{name} is {len(value):,} characters long; at most {MAX_PROMPT_CHARS:,} are "
                f"accepted (T5 reads only the first {MAX_TOKENS} tokens, about 1,000 characters)")
    if problem := unicode_problem(name, value):
        return problem
    if "\x00" in value:
        return f"{name} holds a NUL character (at character {value.index(chr(0))}); remove it"
    return None


#: Code points that show nothing although they are neither whitespace nor control or format
#: characters: Unicode's other default-ignorable code points (the combining grapheme joiner,
#: the Hangul fillers, the Khmer inherent vowels, the Mongolian and other variation selectors,
#: the reserved U+2065, U+FFF0–U+FFF8 and U+E0000–U+E0FFF) and the blank braille pattern U+2800.
INVISIBLE = frozenset({0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2065, 0x2800, 0x3164, 0xFFA0,
                       *range(0x180B, 0x1810), *range(0xFE00, 0xFE10), *range(0xFFF0, 0xFFF9),
                       *range(0xE0000, 0xE1000)})


def is_blank(value: str) -> bool:
    """True when ``value`` has no visible character: only whitespace, control characters (NUL
    among them), invisible format characters such as the zero-width space (U+200B) or the
    byte-order mark, and the other invisible code points of :data:`INVISIBLE` (a Hangul filler,
    a variation selector). Such text says nothing to T5; as a prompt it is a mistake."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") or ord(ch) in INVISIBLE
               for ch in value)


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts for the DiT.

    Attributes:
        features: ``B × L × D`` float T5 features (D = 4096 for T5-XXL), fp32 from the encoder.
        mask: ``B × L`` bool, True for real tokens. T5 padding is on the right, so the real
            tokens are a prefix; an all-False row is a zeroed (empty) prompt.
    """

    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        f, m = self.features, self.mask
        if f.ndim != 3 or m.ndim != 2 or f.shape[:2] != m.shape:
            raise ValueError(
                f"TextConditioning needs features B×L×D and mask B×L, got "
                f"{tuple(f.shape)} and {tuple(m.shape)}"
            )
        if m.dtype != torch.bool:
            raise ValueError(f"TextConditioning mask must be bool, got {m.dtype}")

    @classmethod
    def packed(cls, features: torch.Tensor, mask: torch.Tensor) -> TextConditioning:
        """Conditioning whose real tokens are moved, in order, to the front of each row, so
        that any ``mask`` (e.g. two prompts joined, each with its padding) becomes a right-padded
        prefix. The DiT gives text tokens no positions, so the result means the same; a mask
        that already is a prefix is kept as it is (no copy)."""
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
        if bool((order == torch.arange(mask.shape[1], device=mask.device)).all()):
            return cls(features, mask)
        rows = order.unsqueeze(-1).expand(-1, -1, features.shape[-1])
        return cls(torch.gather(features, 1, rows), torch.gather(mask, 1, order))

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> TextConditioning:
        """The same conditioning on ``device``."""
        return TextConditioning(self.features.to(device), self.mask.to(device))

    def expand(self, batch: int) -> TextConditioning:
        """Repeat a batch of 1 to ``batch`` rows (a no-op when the size already matches)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a text batch of {self.batch_size} to {batch}")
        return TextConditioning(
            self.features.expand(batch, -1, -1), self.mask.expand(batch, -1)
        )

    @staticmethod
    def cat(items: Sequence[TextConditioning]) -> TextConditioning:
        """Concatenate along the batch, right-padding shorter token lengths with masked zeros."""
        length = max(c.features.shape[1] for c in items)
        feats, masks = [], []
        for c in items:
            pad = length - c.features.shape[1]
            feats.append(torch.nn.functional.pad(c.features, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, pad), value=False))
        return TextConditioning(torch.cat(feats), torch.cat(masks))


# --------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_candidates(explicit: str | Path | None) -> list[Path]:
    """Directories to look in, in order: the explicit one, then ComfyUI's location relative to
    every ``sys.path`` entry, the working directory and the ancestors of this package (a node
    pack lives in ``ComfyUI/custom_nodes/<pack>``; the dev tree keeps a host in ``.host``)."""
    if explicit is not None:
        return [Path(explicit)]
    roots = [Path(p) for p in sys.path if p] + [Path.cwd()]
    for parent in Path(__file__).resolve().parents:
        roots += [parent, parent / ".host" / "ComfyUI"]
    return [root / TOKENIZER_SUBDIR for root in roots]


def find_tokenizer_dir(explicit: str | Path | None = None) -> Path:
    """The directory holding the real T5 v1.1 ``tokenizer.json``.

    Args:
        explicit: a directory to use; when given, no other place is searched.

    Raises:
        FileNotFoundError: naming the places searched.
    """
    candidates = _tokenizer_candidates(explicit)
    for directory in candidates:
        if (directory / "tokenizer.json").is_file():
            return directory
    shown = ", ".join(str(c) for c in candidates[:6])
    raise FileNotFoundError(
        f"T5 tokenizer not found (looked for tokenizer.json in {shown}"
        f"{', ...' if len(candidates) > 6 else ''}); pass the directory explicitly "
        f"(e.g. --tokenizer ComfyUI/{TOKENIZER_SUBDIR.as_posix()})"
    )


def load_tokenizer(directory: str | Path | None = None):
    """The T5 v1.1 fast tokenizer from a local directory (never downloads)."""
    from transformers import T5TokenizerFast  # noqa: PLC0415  (heavy import)

    path = find_tokenizer_dir(directory)
    log.debug("T5 tokenizer from %s", path)
    return T5TokenizerFast.from_pretrained(str(path), local_files_only=True, legacy=False)


# --------------------------------------------------------------------------------------------
# Encoder weights


def _find_prefix(keys: Iterable[str]) -> str:
    anchor = "encoder.final_layer_norm.weight"
    found = sorted(k[: -len(anchor)] for k in keys if k.endswith(anchor))
    for prefix in KNOWN_PREFIXES:
        if prefix in found:
            return prefix
    if found:
        return found[0]
    raise ValueError(f"not a T5 encoder state dict: no '{anchor}' key")


def normalize_t5_state_dict(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Hugging Face ``T5EncoderModel`` keys from a ComfyUI-layout T5 state dict.

    Strips the prefix (e.g. ``text_encoders.t5xxl.transformer.``), folds fp8 ``scale_weight``
    scalars into their weights, drops ``scale_input`` and the ``scaled_fp8`` marker, keeps one
    copy of the tied embedding as ``shared.weight``, and casts every tensor to ``dtype``.
    Tensors are read one at a time, so ``sd`` may be a lazy mapping over a file.
    """
    prefix = _find_prefix(sd.keys())
    keys = [k[len(prefix) :] for k in sd if k.startswith(prefix)]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        tensor = sd[prefix + key].to(torch.float32)
        if key.endswith(".weight") and (scale := prefix + key[:-6] + "scale_weight") in sd:
            tensor = tensor * sd[scale].to(torch.float32)
        out[key] = tensor.to(dtype)
    embed = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and embed is not None:
        out["shared.weight"] = embed
    return out


def t5_config_from_state_dict(sd: Mapping[str, torch.Tensor]):
    """A ``T5Config`` (encoder only) inferred from normalized state-dict shapes.

    d_model and vocab from ``shared.weight``; heads and buckets from the relative attention
    bias; d_kv from the q projection; d_ff from ``wi_0`` (gated-gelu, T5 v1.1) or ``wi`` (relu).
    """
    from transformers import T5Config  # noqa: PLC0415

    attn = "encoder.block.0.layer.0.SelfAttention."
    ff = "encoder.block.0.layer.1.DenseReluDense."
    needed = ["shared.weight", attn + "q.weight", attn + "relative_attention_bias.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"T5 state dict is missing {missing}")
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd[attn + "relative_attention_bias.weight"].shape
    inner = sd[attn + "q.weight"].shape[0]
    gated = ff + "wi_0.weight" in sd
    d_ff = sd[ff + ("wi_0.weight" if gated else "wi.weight")].shape[0]
    layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False, dropout_rate=0.0,
    )  # fmt: skip


def build_t5_encoder(
    sd: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """A ``T5EncoderModel`` in eval mode holding the weights of ``sd`` (no random init).

    Raises:
        ValueError: naming missing and unexpected keys.
    """
    from transformers import T5EncoderModel  # noqa: PLC0415

    weights = normalize_t5_state_dict(sd, dtype)
    config = t5_config_from_state_dict(weights)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"T5 weights do not match {config.num_layers}-layer T5 (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")  # fmt: skip
    model.load_state_dict(weights, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared
    log.info("T5 encoder: %d layers, d_model %d, %d heads, %s on %s",
             config.num_layers, config.d_model, config.num_heads, dtype, device)  # fmt: skip
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Prompt encoding


class T5Conditioner:
    """Prompts → :class:`TextConditioning` with T5 v1.1 (Genmo's settings, SPEC §5).

    Tokenization: ``max_tokens`` (256) tokens, EOS appended, right-padded with id 0, truncated
    with a warning; the attention mask is passed to T5. Features are T5's ``last_hidden_state``
    (after the final layer norm) in fp32.

    Args:
        encoder: a ``T5EncoderModel`` (see :func:`build_t5_encoder`).
        tokenizer: the T5 v1.1 tokenizer (see :func:`load_tokenizer`).
    """

    def __init__(self, encoder, tokenizer, *, max_tokens: int = MAX_TOKENS) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        tokenizer_dir: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> T5Conditioner:
        """Build from ComfyUI-layout T5 weights; fp32 on the CPU by default (see module doc)."""
        tokenizer = load_tokenizer(tokenizer_dir)  # fail on a missing tokenizer before loading
        return cls(build_t5_encoder(sd, dtype=dtype, device=device), tokenizer)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        tokenizer_dir: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> T5Conditioner:
        """Build from a ``.safetensors`` file (tensors read and cast one at a time)."""
        from .safetensors_io import LazyTensors  # noqa: PLC0415

        log.info("loading T5 from %s", path)
        return cls.from_state_dict(LazyTensors(path), tokenizer_dir, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.encoder.shared.weight.device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``B × max_tokens`` (long) and mask ``B × max_tokens`` (bool)."""
        for i, ids in enumerate(self.tokenizer(list(prompts))["input_ids"]):
            if len(ids) > self.max_tokens:
                log.warning("prompt %d has %d tokens; truncated to %d",
                            i, len(ids), self.max_tokens)  # fmt: skip
        enc = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )  # fmt: skip
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    def encode(self, prompts: str | Sequence[str], zero_empty: bool = True) -> TextConditioning:
        """Encode prompts to ``B × 256 × d_model`` fp32 features and a ``B × 256`` mask.

        Args:
            prompts: one prompt or a list (encoded as one batch).
            zero_empty: Genmo's behaviour: an empty (or whitespace) prompt gets ids 0 and an
                all-False mask, i.e. no text tokens at all; its features are stored as zeros
                (the DiT never reads masked rows). False keeps ComfyUI's behaviour: the prompt
                is the EOS token alone.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.tokenize(prompts)
        empty = torch.tensor([zero_empty and not p.strip() for p in prompts])
        ids[empty], mask[empty] = 0, False
        d_model = self.encoder.config.d_model
        feats = torch.zeros(len(prompts), self.max_tokens, d_model, dtype=torch.float32)
        if not bool(empty.all()):
            keep = ~empty
            with torch.no_grad():
                out = self.encoder(
                    input_ids=ids[keep].to(self.device), attention_mask=mask[keep].to(self.device)
                ).last_hidden_state
            feats[keep] = out.float().cpu()
        if not torch.isfinite(feats).all():
            raise FloatingPointError("T5 produced non-finite features; run it in fp32")
        return TextConditioning(feats, mask)
