"""The NEZHA self-draft head: a few small matmuls per SID level on top of the backbone."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

TRANSITIONS = ("rnn", "gru", "none")


@dataclass(frozen=True, eq=False)
class BeamLevel:
    """One level of the draft head laid out for a beam search, where products are small
    (a few rows per user): weights transposed to [d, out] and contiguous, on which such
    products run faster than on a transposed view, and the tanh cell's input side as a
    per-code table. Built by NezhaDraftHead.beam_levels."""

    classifier: torch.Tensor  # [d, C]: Linear_l's weight, transposed
    bias: torch.Tensor  # [C]
    transition: str
    recurrent: torch.Tensor | None = None  # [d, d]: the tanh cell's W_hh^T
    inputs: torch.Tensor | None = None  # [C, d]: Embed_l(t) W_ih^T + b_ih + b_hh per code t
    cell: nn.Module | None = None  # the GRU cell and its code embedding (transition gru)
    embedding: nn.Module | None = None

    def logits(self, state: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
        """state [B, beams, d], placeholder [B, 1, d] -> [B, beams, C], NezhaDraftHead.level_logits."""
        inputs = (state + placeholder).flatten(0, 1)
        return torch.addmm(self.bias, inputs, self.classifier).view(*state.shape[:2], self.classifier.shape[1])

    def advance(self, state: torch.Tensor, parent: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """A beam search's step: state [B, beams, d], the kept beams' parents and codes
        [B, width] -> their states for the next level [B, width, d], NezhaDraftHead.advance.
        The tanh cell's recurrent side s W_hh^T is computed on the parent beams before they
        are copied (1 row per user at the first level instead of `width`)."""
        rows = parent.unsqueeze(-1).expand(-1, -1, state.shape[-1])
        if self.transition == "rnn":
            recurrent = torch.matmul(state, self.recurrent).gather(1, rows)  # [B, width, d]
            return recurrent.add_(self.inputs[codes]).tanh_()
        kept = state.gather(1, rows)
        if self.transition == "none":
            return kept
        return self.cell(self.embedding(codes.flatten()), kept.flatten(0, 1)).view_as(kept)


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
        self._beam_levels: tuple | None = None  # (weights' identity, [BeamLevel]): see beam_levels
        self._weights: list[nn.Parameter] | None = None
        self.register_load_state_dict_post_hook(self.forget_beam_levels)
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

    def beam_levels(self) -> list[BeamLevel]:
        """The head laid out for inference, one BeamLevel per level, rebuilt whenever a
        weight changes: in place (training steps, loading by copy: versions move), or
        by a cast or move or loading by assignment (both forget the layout); a fused
        optimizer's steps move no version, so training's validation forgets it too. A decoder
        fetches it once per search. Built in the weights' own dtype, also under autocast."""
        if self._weights is None:
            self._weights = list(self.parameters())  # walking the module tree per search costs more than the check
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self._weights)
        if self._beam_levels is None or self._beam_levels[0] != key:
            with torch.no_grad(), torch.autocast(self._weights[0].device.type, enabled=False):
                levels = [self._beam_level(level) for level in range(len(self.classifiers))]
            self._beam_levels = (key, levels)
        return self._beam_levels[1]

    def forget_beam_levels(self, *_) -> None:
        """Parameters may be new objects (casts, moves, load_state_dict(assign=True))."""
        self._weights = self._beam_levels = None

    def _apply(self, fn, recurse=True):
        self.forget_beam_levels()
        return super()._apply(fn, recurse)

    def _beam_level(self, level: int) -> BeamLevel:
        classifier = self.classifiers[level]
        layout = BeamLevel(classifier.weight.T.contiguous(), classifier.bias.detach(), self.transition)
        if level + 1 == len(self.classifiers) or self.transition == "none":
            return layout
        cell, embedding = self.cells[level], self.code_embeddings[level]
        if self.transition == "gru":
            return replace(layout, cell=cell, embedding=embedding)
        # the tanh cell's input side Embed(t) W_ih^T + b_ih + b_hh, one row per code
        inputs = torch.addmm(cell.bias_ih + cell.bias_hh, embedding.weight, cell.weight_ih.T)
        return replace(layout, recurrent=cell.weight_hh.T.contiguous(), inputs=inputs)

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
