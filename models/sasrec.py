"""A SASRec-style item-embedding model: a causal transformer over item ids (GPT-2 config:
learned positions, dropout, layer norm, as SASRec) whose last state is scored against
every item's embedding (its input embedding, or with item_scores=separate one of its own
output table). Not generative: the non-generative reference row."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from models.backbones import ITEM, generic_size, positions_from_mask


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

    @property
    def core(self) -> nn.Module:
        return self.model

    def item_scores(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items [B, T] (item index + 1, 0 = PAD) -> scores over all items [B, T, N]."""
        return self.hidden(items, mask) @ self.item_table().T

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
