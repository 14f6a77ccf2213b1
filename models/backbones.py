"""Backbones built from Hugging Face configs (random init, named size presets).

Every backbone is wrapped to offer the same few operations, so decoders never touch
architecture details:
    prefill(ids, mask)       -> logits at the last prompt position, DecodeState
    extend(state, tokens)    -> logits at each new position, DecodeState (KV cache grows)
    select(state, rows)      -> DecodeState with cache rows gathered (beam copy / reorder)
    hidden(ids, mask)        -> last-layer hidden states of every prompt position
`core` is the module whose forward pass counts as one backbone call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bench.errors import BenchError

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384),
    "base": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=768),
}
FAMILIES = {"qwen": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
BACKBONES = tuple(f"{family}-{size}" for family in FAMILIES for size in SIZES)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] left-padding mask -> [B, T] position ids counting real tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class DecodeState:
    cache: object            # the model's KV cache
    mask: torch.Tensor       # [N, T_seen] attention mask over cached positions
    next_position: torch.Tensor  # [N] position id of the next token


class DecoderOnlyLM(nn.Module):
    """A Qwen2- or Llama-family causal LM over the SID vocabulary."""

    def __init__(self, name: str, vocab_size: int, max_positions: int):
        super().__init__()
        family, _, size = name.partition("-")
        if family not in FAMILIES or size not in SIZES:
            raise BenchError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
        config_cls, model_cls = FAMILIES[family]
        config = config_cls(vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=0,
                            bos_token_id=None, eos_token_id=None, tie_word_embeddings=True, **SIZES[size])
        self.name = name
        self.lm = model_cls(config)
        self.hidden_size = config.hidden_size

    @property
    def core(self) -> nn.Module:
        return self.lm.model

    def logits(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Training pass: [B, T] -> [B, T, V]."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    def hidden(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """[B, T] -> [B, T, d] last-layer hidden states (after the final norm)."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        return self.core(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state

    def prefill(self, input_ids, attention_mask) -> tuple[torch.Tensor, DecodeState]:
        """Left-padded prompt [B, T] -> logits of the next token [B, V] and the cache."""
        positions = positions_from_mask(attention_mask)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], DecodeState(out.past_key_values, attention_mask, positions[:, -1] + 1)

    def extend(self, state: DecodeState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """tokens [N, m] appended after the cached positions -> logits [N, m, V]."""
        steps = tokens.shape[1]
        mask = torch.cat([state.mask, state.mask.new_ones(tokens.shape)], dim=1)
        positions = state.next_position[:, None] + torch.arange(steps, device=tokens.device)
        out = self.lm(input_ids=tokens, attention_mask=mask, position_ids=positions,
                      past_key_values=state.cache, use_cache=True)
        return out.logits, DecodeState(out.past_key_values, mask, state.next_position + steps)

    @staticmethod
    def select(state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """Gather rows [N'] of the cache: repeats rows to copy a prompt to beams, or reorders beams."""
        state.cache.reorder_cache(rows)
        return DecodeState(state.cache, state.mask[rows], state.next_position[rows])


def build_backbone(name: str, vocab_size: int, max_positions: int) -> DecoderOnlyLM:
    return DecoderOnlyLM(name, vocab_size, max_positions)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
