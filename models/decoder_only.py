"""Decoder-only causal LMs over SID tokens: Qwen2, Qwen3 and Llama configs."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from models.backbones import DECODER_ONLY, SHAPED_LIKE, DecodeState, generic_size, positions_from_mask

CLASSES = {
    "qwen": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


SPLIT_ATTENTION = "nezha_split"  # the attention of NEZHA's training pass, registered below


def nezha_split_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, nezha_layout=None, **kwargs
) -> tuple[torch.Tensor, None]:
    """Attention over NEZHA's training layout [history | placeholder groups] without its
    4D mask (models/objectives.py, collate_nezha): the history attends causally to itself
    (SDPA's causal kernel), placeholder group g (the prompt after history item g) to the
    history tokens of items 0..g and causally to its own L tokens. Equal to SDPA under the
    layout's mask on every real token (tested); the mask made SDPA score all T x T pairs,
    most of them hidden, and run its backward on them.

    query [B, H, T, D], key/value [B, H_kv, T, D], nezha_layout = (history length, L)
    with T = history + G * L -> ([B, T, H, D], None), as transformers' sdpa returns."""
    history, levels = nezha_layout
    size, heads, length, dim = query.shape
    groups = (length - history) // levels
    if heads != key.shape[1]:  # grouped-query attention: each kv head serves heads / H_kv query heads
        key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))
    scale = dim**-0.5 if scaling is None else scaling
    q_history, q_groups = query.split([history, length - history], dim=2)
    k_history, k_groups = key.split([history, length - history], dim=2)
    v_history, v_groups = value.split([history, length - history], dim=2)
    out = F.scaled_dot_product_attention(q_history, k_history, v_history, dropout_p=dropout, is_causal=True, scale=scale)
    if groups:
        q_groups, k_groups, v_groups = (t.reshape(size, heads, groups, levels, dim) for t in (q_groups, k_groups, v_groups))
        to_history = (q_groups.flatten(2, 3) @ k_history.transpose(-1, -2)).view(size, heads, groups, levels, history)
        to_group = q_groups @ k_groups.transpose(-1, -2)  # [B, H, G, L, L]
        index = torch.arange(history, device=query.device)
        later_items = index >= levels * torch.arange(1, groups + 1, device=query.device)[:, None, None]  # [G, 1, hist]
        later_places = torch.ones(levels, levels, dtype=torch.bool, device=query.device).triu(1)
        scores = torch.cat(
            [to_history.masked_fill(later_items, float("-inf")), to_group.masked_fill(later_places, float("-inf"))], -1
        )
        probs = torch.softmax(scores.float() * scale, dim=-1).to(value.dtype)  # [B, H, G, L, hist + L]
        if dropout:
            probs = F.dropout(probs, dropout)
        from_history = probs[..., :history].flatten(2, 3) @ v_history  # [B, H, G * L, D]
        from_group = (probs[..., history:] @ v_groups).flatten(2, 3)
        out = torch.cat([out, from_history + from_group], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SPLIT_ATTENTION, nezha_split_attention)


@contextmanager
def attention_implementation(config, name: str):
    """The backbone's layers use attention `name` inside the block (they read it per call)."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def tree_attention(prefix_mask: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
    """prefix_mask [B, T] (1 = real token), tree_mask [B or 1, N, N] (node i sees node j iff
    j is i or an ancestor of i) -> bool [B, 1, N, T + N] for N tree tokens after T others."""
    size, nodes = prefix_mask.shape[0], tree_mask.shape[-1]
    seen = prefix_mask.bool()[:, None, None, :].expand(size, 1, nodes, prefix_mask.shape[1])
    return torch.cat([seen, tree_mask.bool().expand(size, nodes, nodes).unsqueeze(1)], dim=-1)


class DecoderOnlyLM(nn.Module):
    kind = DECODER_ONLY

    def __init__(
        self,
        name: str,
        vocab_size: int,
        max_positions: int,
        dropout: float = 0.0,
        attention: str = "sdpa",
        shape: tuple | None = None,
        attention_dropout: float | None = None,  # None: `dropout`
    ):
        super().__init__()
        if name in SHAPED_LIKE:
            family, shape = SHAPED_LIKE[name]
        else:
            family = name.partition("-")[0]
            hidden, layers, heads, kv_heads, ffn = shape or generic_size(name)
            shape = dict(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                intermediate_size=ffn,
            )
        config_cls, model_cls = CLASSES[family]
        config = config_cls(
            vocab_size=vocab_size,
            max_position_embeddings=max_positions,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=True,
            attention_dropout=dropout if attention_dropout is None else attention_dropout,
            attn_implementation=attention,
            **shape,
        )
        self.lm = model_cls(config)
        self.hidden_size = config.hidden_size
        # the Qwen/Llama blocks have no residual dropout; small recommendation data needs some,
        # so training passes drop input embeddings and final hidden states (identity in eval)
        self.dropout = nn.Dropout(dropout)

    @property
    def core(self) -> nn.Module:
        return self.lm.model

    def logits(self, input_ids, attention_mask) -> torch.Tensor:
        """Training pass: [B, T] -> [B, T, V]."""
        return self.lm.lm_head(self.hidden(input_ids, attention_mask))

    def hidden(self, input_ids, attention_mask, position_ids=None, nezha_layout=None) -> torch.Tensor:
        """[B, T] -> [B, T, d] last-layer hidden states (after the final norm). A 4D
        attention mask [B, 1, T, T] is used as given; with nezha_layout = (history length,
        L) the NEZHA training layout that mask describes is attended by
        nezha_split_attention instead, which never builds the T x T scores."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        embeds = self.dropout(self.lm.get_input_embeddings()(input_ids))
        if nezha_layout is None:
            hidden = self.core(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        else:  # the 4D mask still goes in: given one, transformers builds no mask of its own
            with attention_implementation(self.lm.config, SPLIT_ATTENTION):
                hidden = self.core(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    nezha_layout=nezha_layout,
                )
        return self.dropout(hidden.last_hidden_state)

    def bare_forward(self, history, mask) -> None:
        self.hidden(history, mask)

    def nezha_states(self, history, mask, placeholders: torch.Tensor | None):
        """One pass over [history, <sp_1..sp_L>] (left-padded) -> h_0 [B, d] and the
        placeholder states [B, L, d] (None without placeholders)."""
        if placeholders is None:
            return self.hidden(history, mask)[:, -1], None
        levels = placeholders.shape[0]
        tail = placeholders.expand(history.shape[0], levels)
        hidden = self.hidden(torch.cat([history, tail], 1), torch.cat([mask, torch.ones_like(tail)], 1))
        return hidden[:, -levels - 1], hidden[:, -levels:]

    def generation_prompt_length(self, history) -> int:
        """How many tokens of `generate`'s output precede the generated SID."""
        return history.shape[1]

    def prefill(self, input_ids, attention_mask) -> tuple[torch.Tensor, DecodeState]:
        """Left-padded prompt [B, T] -> logits of the next token [B, V] and the cache."""
        positions = positions_from_mask(attention_mask)
        out = self.core(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        last = out.last_hidden_state[:, -1]
        return self.lm.lm_head(last), DecodeState(out.cache, attention_mask, positions[:, -1] + 1, last)

    def extend(
        self, state: DecodeState, tokens: torch.Tensor, tree_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
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
        logits, cache = self.cached_pass(state, tokens, attention, positions)
        return logits, DecodeState(cache, mask, positions.max(dim=1).values + 1)

    def extend_beams(
        self, state: DecodeState, tokens: torch.Tensor, seen: torch.Tensor
    ) -> tuple[torch.Tensor, DecodeState, torch.Tensor]:
        """One step of K beams on a cache the beams of a prompt share (beam.SharedPrompt).

        state: the cache of B prompts [B, T] and the S tokens generated so far after them
        (K columns per step, or a refed tree of prefixes: speculative's fallback); tokens
        [B, K], one per beam; seen [B, K, S] which of the S generated columns each beam
        descends from -> logits [B, K, V], the state, and
        seen [B, K, S + K] (each beam also sees its new token)."""
        size, beams = tokens.shape
        seen = torch.cat([seen, torch.eye(beams, dtype=torch.bool, device=tokens.device).expand(size, -1, -1)], -1)
        prompt = state.mask.bool()[:, None, :].expand(size, beams, state.mask.shape[1])
        attention = torch.cat([prompt, seen], -1).unsqueeze(1)  # [B, 1, K, T + S + K]
        positions = state.next_position[:, None].expand(size, beams)
        logits, cache = self.cached_pass(state, tokens, attention, positions)
        return logits, DecodeState(cache, state.mask, state.next_position + 1), seen

    def cached_pass(self, state: DecodeState, tokens, attention, positions):
        """tokens [N, m] after the cached ones, with their mask and positions -> logits [N, m, V], cache."""
        out = self.lm(
            input_ids=tokens,
            attention_mask=attention,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
        )
        return out.logits, out.cache

    def tree_forward(self, input_ids, attention_mask, tree_tokens, tree_mask):
        """A left-padded prompt [B, T] and a token tree [B, N] after it, in ONE pass.

        -> logits at the last prompt token [B, V], at every tree node [B, N, V], and the
        cache (crop it to T to drop the tree)."""
        size, length = input_ids.shape
        positions = positions_from_mask(attention_mask)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        prompt_rows = causal & attention_mask.bool()[:, None, :]
        prompt_rows |= torch.eye(length, dtype=torch.bool, device=input_ids.device)  # pad rows see themselves
        prompt_part = torch.cat([prompt_rows, prompt_rows.new_zeros(size, length, tree_tokens.shape[1])], dim=-1)
        attention = torch.cat([prompt_part.unsqueeze(1), tree_attention(attention_mask, tree_mask)], dim=2)
        tree_positions = positions[:, -1:] + tree_mask.sum(-1).expand(tree_tokens.shape)
        out = self.lm(
            input_ids=torch.cat([input_ids, tree_tokens], 1),
            attention_mask=attention,
            position_ids=torch.cat([positions, tree_positions], 1),
            use_cache=True,
        )
        state = DecodeState(out.cache, attention_mask, positions[:, -1] + 1)
        return out.logits[:, length - 1], out.logits[:, length:], state

    @staticmethod
    def select(state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """Gather rows [N'] of the cache: repeats rows to copy a prompt to beams, or reorders beams.
        last_hidden is left behind: only Medusa reads it, right after the prefill."""
        state.cache.reorder_cache(rows)
        return DecodeState(state.cache, state.mask[rows], state.next_position[rows])

    @staticmethod
    def crop(state: DecodeState, length: int) -> DecodeState:
        """Drop cached positions beyond `length` (e.g. a verified token tree)."""
        state.cache.crop(length - state.cache.get_seq_length())  # negative: tokens to remove
        return DecodeState(state.cache, state.mask[:, :length], state.next_position, state.last_hidden)
