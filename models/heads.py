"""The NEZHA self-draft head: a few small matmuls per SID level on top of the backbone."""

from __future__ import annotations

import torch
from torch import nn

TRANSITIONS = ("rnn", "gru", "none")


class NezhaDraftHead(nn.Module):
    """logits_l = Linear_l(s_l + h_l);  s_1 = h_0;  s_{l+1} = Transition_l(Embed_l(t_l), s_l).

    h_0 is the backbone's hidden state at the last history token, h_l the one at
    placeholder <sp_l> (zero when the model is trained without placeholders).
    transition 'none' keeps s_l = h_0: levels are predicted independently, Medusa-like.
    """

    def __init__(self, hidden_size: int, codebook_sizes: tuple[int, ...], transition: str = "rnn"):
        super().__init__()
        if transition not in TRANSITIONS:
            raise ValueError(f"unknown transition '{transition}'; choose one of {', '.join(TRANSITIONS)}")
        self.transition = transition
        self._input_tables: dict[int, tuple] = {}  # level -> (weights' identity, table): see input_table
        self.classifiers = nn.ModuleList(nn.Linear(hidden_size, size) for size in codebook_sizes)
        if transition != "none":
            self.code_embeddings = nn.ModuleList(nn.Embedding(size, hidden_size) for size in codebook_sizes[:-1])
            cell = nn.GRUCell if transition == "gru" else nn.RNNCell
            self.cells = nn.ModuleList(cell(hidden_size, hidden_size) for _ in codebook_sizes[:-1])

    def level_logits(self, level: int, state: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
        """state, placeholder: [..., d] -> [..., C_level]."""
        return self.classifiers[level](state + placeholder)

    def advance(self, level: int, state: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """state [N, d], chosen codes [N] of `level` -> state for level + 1 [N, d]."""
        if self.transition == "none":
            return state
        return self.cells[level](self.code_embeddings[level](codes), state)

    def advance_beams(self, level: int, state: torch.Tensor, parent: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """A beam search's step: state [B, beams, d], the kept beams' parents and codes
        [B, width] -> their states for level + 1 [B, width, d].

        The tanh cell is advance's arithmetic regrouped for inference: the input side
        Embed(t) W_ih^T + b_ih + b_hh is one row of a per-code table (built once per
        weights), and the recurrent side s W_hh^T is computed on the parent beams before
        they are copied (1 row per user at the first level instead of `width`)."""
        if self.transition == "rnn":
            recurrent = state @ self.cells[level].weight_hh.T  # [B, beams, d]
            kept = recurrent.gather(1, parent.unsqueeze(-1).expand(-1, -1, state.shape[-1]))
            return torch.tanh(kept + self.input_table(level)[codes])
        kept = state.gather(1, parent.unsqueeze(-1).expand(-1, -1, state.shape[-1]))
        return self.advance(level, kept.flatten(0, 1), codes.flatten()).view_as(kept)

    def input_table(self, level: int) -> torch.Tensor:
        """[C_level, d]: the tanh cell's input side for every code of `level`, rebuilt
        whenever a weight it is made of changes (training steps, loading, casting)."""
        cell, embedding = self.cells[level], self.code_embeddings[level]
        parts = (embedding.weight, cell.weight_ih, cell.bias_ih, cell.bias_hh)
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in parts)
        cached = self._input_tables.get(level)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                table = torch.addmm(cell.bias_ih + cell.bias_hh, embedding.weight, cell.weight_ih.T)
            self._input_tables[level] = cached = (key, table)
        return cached[1]

    def teacher_forced_logits(
        self, h0: torch.Tensor, placeholders: torch.Tensor, codes: torch.Tensor
    ) -> list[torch.Tensor]:
        """h0 [N, d], placeholders [N, L, d], true codes [N, L] -> per level [N, C_l]."""
        state, out = h0, []
        for level in range(len(self.classifiers)):
            out.append(self.level_logits(level, state, placeholders[:, level]))
            if level + 1 < len(self.classifiers):
                state = self.advance(level, state, codes[:, level])
        return out


class MedusaHeads(nn.Module):
    """Medusa-style heads on the NTP backbone's hidden state at the last history token:
    head j guesses the code of level j+1 (j = 1 .. L-1) at once, with no recurrence.
    Each is a residual SiLU block followed by a classifier over that level's codebook."""

    def __init__(self, hidden_size: int, codebook_sizes: tuple[int, ...]):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in codebook_sizes[1:])
        self.classifiers = nn.ModuleList(nn.Linear(hidden_size, size) for size in codebook_sizes[1:])
        for block in self.blocks:  # start as the identity, as Medusa does
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden [N, d] -> logits of levels 2..L, each [N, C_l]."""
        return [head(hidden + nn.functional.silu(block(hidden))) for block, head in zip(self.blocks, self.classifiers)]
