"""Backbones built from Hugging Face configs (random init, named size presets).

Every backbone is wrapped to offer the same few operations, so decoders never touch
architecture details:
    prefill(ids, mask)       -> logits at the last prompt position, DecodeState
    extend(state, tokens)    -> logits at each new position, DecodeState (KV cache grows);
                                with a tree mask the new tokens are a token tree (Medusa)
    tree_forward(...)        -> prompt and a token tree in one pass (speculative verification)
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
    "micro": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96),
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
    last_hidden: torch.Tensor | None = None   # [N, d] hidden state of the last prompt token (after prefill)


def tree_attention(prefix_mask: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
    """prefix_mask [B, T] (1 = real token), tree_mask [B or 1, N, N] (node i sees node j iff
    j is i or an ancestor of i) -> bool [B, 1, N, T + N] for N tree tokens after T others."""
    size, nodes = prefix_mask.shape[0], tree_mask.shape[-1]
    seen = prefix_mask.bool()[:, None, None, :].expand(size, 1, nodes, prefix_mask.shape[1])
    return torch.cat([seen, tree_mask.bool().expand(size, nodes, nodes).unsqueeze(1)], dim=-1)


class DecoderOnlyLM(nn.Module):
    """A Qwen2- or Llama-family causal LM over the SID vocabulary."""

    def __init__(self, name: str, vocab_size: int, max_positions: int, dropout: float = 0.0):
        super().__init__()
        family, _, size = name.partition("-")
        if family not in FAMILIES or size not in SIZES:
            raise BenchError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
        config_cls, model_cls = FAMILIES[family]
        config = config_cls(vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=0,
                            bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
                            attention_dropout=dropout, **SIZES[size])
        self.name = name
        self.lm = model_cls(config)
        self.hidden_size = config.hidden_size
        # the Qwen2/Llama blocks have no residual dropout; small recommendation data needs some,
        # so training passes drop input embeddings and final hidden states (identity in eval)
        self.dropout = nn.Dropout(dropout)

    @property
    def core(self) -> nn.Module:
        return self.lm.model

    def logits(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Training pass: [B, T] -> [B, T, V]."""
        return self.lm.lm_head(self.hidden(input_ids, attention_mask, position_ids))

    def hidden(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """[B, T] -> [B, T, d] last-layer hidden states (after the final norm)."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        embeds = self.dropout(self.lm.get_input_embeddings()(input_ids))
        hidden = self.core(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        return self.dropout(hidden.last_hidden_state)

    def prefill(self, input_ids, attention_mask) -> tuple[torch.Tensor, DecodeState]:
        """Left-padded prompt [B, T] -> logits of the next token [B, V] and the cache."""
        positions = positions_from_mask(attention_mask)
        out = self.core(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        last = out.last_hidden_state[:, -1]
        return self.lm.lm_head(last), DecodeState(out.past_key_values, attention_mask, positions[:, -1] + 1, last)

    def extend(self, state: DecodeState, tokens: torch.Tensor,
               tree_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """tokens [N, m] appended after the cached positions -> logits [N, m, V].

        With tree_mask [N or 1, m, m] the m tokens form a tree (see tree_attention): each
        sees the cache, its ancestors and itself, at position next + its depth."""
        mask = torch.cat([state.mask, state.mask.new_ones(tokens.shape)], dim=1)
        if tree_mask is None:
            positions = state.next_position[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
            attention = mask
        else:
            positions = state.next_position[:, None] + tree_mask.sum(-1).expand(tokens.shape) - 1
            attention = tree_attention(state.mask, tree_mask)
        out = self.lm(input_ids=tokens, attention_mask=attention, position_ids=positions,
                      past_key_values=state.cache, use_cache=True)
        return out.logits, DecodeState(out.past_key_values, mask, positions.max(dim=1).values + 1)

    def tree_forward(self, input_ids, attention_mask, tree_tokens, tree_mask) -> tuple[torch.Tensor, torch.Tensor, DecodeState]:
        """A left-padded prompt [B, T] and a token tree [B, N] after it, in ONE pass.

        -> logits at the last prompt token [B, V], at every tree node [B, N, V], and the
        cache (crop it to T to drop the tree)."""
        size, length = input_ids.shape
        positions = positions_from_mask(attention_mask)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        prompt_rows = causal & attention_mask.bool()[:, None, :]
        prompt_rows |= torch.eye(length, dtype=torch.bool, device=input_ids.device)   # pad rows see themselves
        prompt_part = torch.cat([prompt_rows, prompt_rows.new_zeros(size, length, tree_tokens.shape[1])], dim=-1)
        attention = torch.cat([prompt_part.unsqueeze(1), tree_attention(attention_mask, tree_mask)], dim=2)
        tree_positions = positions[:, -1:] + tree_mask.sum(-1).expand(tree_tokens.shape)
        out = self.lm(input_ids=torch.cat([input_ids, tree_tokens], 1), attention_mask=attention,
                      position_ids=torch.cat([positions, tree_positions], 1), use_cache=True)
        state = DecodeState(out.past_key_values, attention_mask, positions[:, -1] + 1)
        return out.logits[:, length - 1], out.logits[:, length:], state

    @staticmethod
    def select(state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """Gather rows [N'] of the cache: repeats rows to copy a prompt to beams, or reorders beams."""
        state.cache.reorder_cache(rows)
        last = state.last_hidden[rows] if state.last_hidden is not None else None
        return DecodeState(state.cache, state.mask[rows], state.next_position[rows], last)

    @staticmethod
    def crop(state: DecodeState, length: int) -> DecodeState:
        """Drop cached positions beyond `length` (e.g. a verified token tree)."""
        state.cache.crop(length - state.cache.get_seq_length())     # negative: tokens to remove
        return DecodeState(state.cache, state.mask[:, :length], state.next_position, state.last_hidden)


def build_backbone(name: str, vocab_size: int, max_positions: int, dropout: float = 0.0) -> DecoderOnlyLM:
    return DecoderOnlyLM(name, vocab_size, max_positions, dropout)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
