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
