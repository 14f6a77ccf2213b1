"""Backbones built from Hugging Face configs (random init, named size presets), and the
registry that names them: <family>-<size>, e.g. qwen-small, llama-base, t5-small,
sasrec-small, or a preset shaped like a real model (qwen3-0.6b, llama-3.2-1b).

Generative backbones (over SID tokens) offer the same operations, so decoders never
touch architecture details:
    prefill(ids, mask)       -> logits at the last prompt position, DecodeState
    extend(state, tokens)    -> logits at each new position, DecodeState (KV cache grows)
    select(state, rows)      -> DecodeState with cache rows gathered (beam copy / reorder)
    bare_forward(ids, mask)  -> one forward pass over the prompt (the latency floor)
    nezha_states(...)        -> h_0 and the placeholder states, in one backbone pass
decoder-only ones also take a token tree (tree_forward, extend with a tree mask), which
Medusa and speculative verification need. `core` is the module one forward pass of
which counts as one backbone call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import BenchError

# generic sizes: hidden, layers, attention heads, key-value heads, feed-forward width
SIZES = {
    "micro": (32, 1, 2, 1, 96),
    "tiny": (64, 2, 4, 2, 192),
    "small": (128, 2, 4, 2, 384),
    "base": (256, 4, 8, 4, 768),
}
DECODER_ONLY, ENCODER_DECODER, ITEM = "decoder-only", "encoder-decoder", "item"
FAMILY_KIND = {"qwen": DECODER_ONLY, "llama": DECODER_ONLY, "t5": ENCODER_DECODER, "sasrec": ITEM}
# presets shaped like the backbones of the NEZHA paper (random weights, our vocabulary)
SHAPED_LIKE = {
    "qwen3-0.6b": (
        "qwen3",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rope_theta=500000.0,
        ),
    ),
}
BACKBONES = tuple(f"{family}-{size}" for family in FAMILY_KIND for size in SIZES) + tuple(SHAPED_LIKE)


def backbone_kind(name: str) -> str:
    """decoder-only, encoder-decoder or item; a clear error for an unknown name."""
    if name in SHAPED_LIKE:
        return DECODER_ONLY
    family, _, size = name.partition("-")
    if family not in FAMILY_KIND or size not in SIZES:
        raise BenchError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    return FAMILY_KIND[family]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] left-padding mask -> [B, T] position ids counting real tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class DecodeState:
    cache: object  # the model's KV cache
    mask: torch.Tensor  # [N, T_seen] attention mask over the cached prompt (and steps)
    next_position: torch.Tensor  # [N] position id of the next token
    last_hidden: torch.Tensor | None = None  # [N, d] after the decoder-only prefill: what Medusa's heads read
    memory: torch.Tensor | None = None  # [N, T, d] encoder output (encoder-decoder only)


def build_backbone(
    name: str,
    vocab_size: int,
    max_positions: int,
    dropout: float = 0.0,
    num_items: int = 0,
    attention: str = "sdpa",
    width: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    attention_dropout: float | None = None,
    causal_encoder: bool = False,
    separate_item_scores: bool = False,
    repeat_bias: bool = False,
):
    """attention: the Hugging Face attention backend, pinned to sdpa by ModelSettings: the
    4D boolean masks of NEZHA training and tree verification are masks only there.
    attention_dropout: of the attention probabilities (None: `dropout`).
    causal_encoder: an encoder-decoder's encoder masks causally (--encoder causal).
    separate_item_scores: an item model scores against its own output table (--item-scores separate).
    repeat_bias: an item model learns an offset for the items the history holds (--repeat-bias)."""
    from models.decoder_only import DecoderOnlyLM
    from models.encoder_decoder import EncoderDecoderLM
    from models.sasrec import ItemSequenceModel

    kind = backbone_kind(name)
    if causal_encoder and kind != ENCODER_DECODER:
        raise BenchError(f"--encoder causal: {name} is {kind} and has no encoder; the setting is for t5-* backbones")
    if name in SHAPED_LIKE:
        if (width, layers, heads) != (None, None, None):
            raise BenchError(f"{name} has the shape of the real model; --width, --layers and --heads apply to sizes")
        return DecoderOnlyLM(name, vocab_size, max_positions, dropout, attention, attention_dropout=attention_dropout)
    shape = generic_size(name, width, layers, heads)
    if kind == ENCODER_DECODER:
        return EncoderDecoderLM(name, vocab_size, dropout, attention, shape, causal_encoder, attention_dropout)
    if kind == ITEM:
        return ItemSequenceModel(
            name,
            num_items,
            max_positions,
            dropout,
            attention,
            shape,
            attention_dropout,
            separate_item_scores,
            repeat_bias,
        )
    return DecoderOnlyLM(name, vocab_size, max_positions, dropout, attention, shape, attention_dropout)


def generic_size(
    name: str, width: int | None = None, layers: int | None = None, heads: int | None = None
) -> tuple[int, int, int, int, int]:
    """The size preset's (hidden, layers, heads, kv heads, feed-forward), with width (the
    feed-forward follows at 3x), layers or heads overridden; kv heads follow at half the
    heads, or the largest divisor of the heads below that (grouped attention needs one)."""
    hidden, depth, attention_heads, kv_heads, ffn = SIZES[name.partition("-")[2]]
    if width:
        hidden, ffn = width, 3 * width
    if heads:
        attention_heads, kv_heads = heads, max(d for d in range(1, max(1, heads // 2) + 1) if heads % d == 0)
    if hidden % attention_heads:
        raise BenchError(f"{name}: width {hidden} is not divisible by {attention_heads} heads")
    if backbone_kind(name) == DECODER_ONLY and (hidden // attention_heads) % 2:
        raise BenchError(
            f"{name}: width {hidden} over {attention_heads} heads gives heads of {hidden // attention_heads} "
            "dimensions; rotary position embeddings need an even number: change --width or --heads"
        )
    return hidden, layers or depth, attention_heads, kv_heads, ffn


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
