"""A SASRec-style item-embedding model: a causal transformer over item ids (GPT-2 config:
learned positions, dropout, layer norm, as SASRec) whose last state is scored against
every item's embedding (its input embedding, or with item_scores=separate one of its own
output table), with repeat_bias one learned offset added to the scores of the items the
history holds. Not generative: the non-generative reference row."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from models.backbones import ITEM, generic_size, positions_from_mask

# Adam moves a parameter by about lr a step whatever its gradient: over the Beauty preset's
# run (about 2,800 steps at lr 2e-3, cosine) a bare offset could move about 3, less than the
# 4-8 by which a tied model scores the last item taken above its 20th best other item on
# Beauty's validation users; scaled, the offset moves 10x as far
REPEAT_SCALE = 10.0


def history_entries(items: torch.Tensor, start: int, count: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """items [B, T] (item index + 1, 0 = PAD) -> where the history's items fall among the items
    start .. start+count-1: their columns and a weight, 1 at an item's first occurrence inside
    the block and 0 elsewhere (padding, other blocks, repeats, later positions), [B, T, T] for
    the history up to each position (causal) or [B, T] for all of it. Scattered onto scores, so
    that no [B, T, N] mask is built."""
    index = items - 1 - start
    repeat = (items.unsqueeze(2) == items.unsqueeze(1)).tril(-1).any(2)  # [B, T]: an earlier position holds it
    weight = (items > 0) & (index >= 0) & (index < count) & ~repeat
    index = index.clamp(0, count - 1)  # anywhere: its weight is 0
    if causal:
        length = items.shape[1]
        earlier = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()  # [t, j]: j <= t
        index, weight = index.unsqueeze(1).expand(-1, length, -1), weight.unsqueeze(1) & earlier
    return index, weight


class ItemSequenceModel(nn.Module):
    kind = ITEM

    def __init__(
        self,
        name: str,
        num_items: int,
        max_positions: int,
        dropout: float = 0.0,
        attention: str = "sdpa",
        shape: tuple | None = None,
        attention_dropout: float | None = None,  # None: `dropout`
        separate_scores: bool = False,
        repeat_bias: bool = False,
    ):
        super().__init__()
        hidden, layers, heads, _, ffn = shape or generic_size(name)
        config = GPT2Config(
            vocab_size=num_items + 1,
            n_positions=max_positions,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout if attention_dropout is None else attention_dropout,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
            attn_implementation=attention,
        )
        self.model = GPT2Model(config)
        self.hidden_size = hidden
        # SASRec scores against the input embeddings, so the last item taken scores highest
        # with itself; a separate table can learn what follows an item apart from what it is
        self.output_table = None
        if separate_scores:
            self.output_table = nn.Parameter(torch.empty(num_items, hidden).normal_(0.0, config.initializer_range))
        # whether people take an item again is a property of the data: on Beauty nobody does,
        # and a tied model still ranks the last item taken first (Recall@1 0.004, 0.026 without)
        self.repeat_bias = nn.Parameter(torch.zeros(())) if repeat_bias else None

    @property
    def core(self) -> nn.Module:
        return self.model

    def item_scores(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items [B, T] (item index + 1, 0 = PAD) -> scores over all items [B, T, N]."""
        return self.offset_taken(self.hidden(items, mask) @ self.item_table().T, items)

    def offset_taken(self, scores: torch.Tensor, items: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Scores of the items start .. start+n-1, at every position [B, T, n] or at the last
        [B, n], plus the repeat bias where the history up to there holds the item. In place:
        the scores are a product's output, which its backward does not read."""
        if self.repeat_bias is None:
            return scores
        index, weight = history_entries(items, start, scores.shape[-1], causal=scores.dim() == 3)
        offset = (REPEAT_SCALE * self.repeat_bias).to(scores.dtype)
        return scores.scatter_add_(-1, index, weight.to(scores.dtype) * offset)

    def item_table(self) -> torch.Tensor:
        """[N, d] the item embeddings that score a hidden state (tied: PAD's row left out)."""
        return self.model.wte.weight[1:] if self.output_table is None else self.output_table

    def hidden(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T] item ids -> [B, T, d]: one pass of the item transformer."""
        return self.model(
            input_ids=items, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).last_hidden_state

    def bare_forward(self, items, mask) -> None:
        self.hidden(items, mask)
