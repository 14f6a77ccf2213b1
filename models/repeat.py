"""The repeat bias of an NTP model over SIDs: the counterpart of the item model's
(models/sasrec.py), which a generative model needs too: beam search regenerates items
the user already took (on Beauty about one per top-20 list), where nobody takes one twice.

At level l, after a prefix of l codes, each code that continues the prefix to the first
l + 1 codes of an item of the history gets a learned offset, one per level (added once
per code, however many history items share it). Level 0 offsets the first codes of the
history's items, the last level the codes that would complete one of them: the model
learns from the data whether neighbours of what a user took are likelier (a positive
offset) and whether the items themselves come back. Added to the logits before the
softmax, in training (every target of a window, against the items before it) and in
every decoder that reads the NTP model's distribution.

Learned teacher-forced, a prefix matching a history item means a sibling of the target,
not a copy: on Beauty the last level's offset went to -8.2, yet beam still regenerates
seen items, whose last code stands about 10 logits above the rest (README, "Where they
fall short")."""

from __future__ import annotations

import torch
from torch import nn

from models.sasrec import REPEAT_SCALE


def history_codes(tokens: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, mask [B, H * L] (whole items, padded by whole items) -> codes [B, H, L] and
    whether each item slot is real [B, H]."""
    levels = starts.shape[0]
    codes = tokens.view(tokens.shape[0], -1, levels) - starts
    return codes, mask.view(codes.shape)[..., 0].bool()


def shared_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [B, H, L] -> [B, H, H, L]: whether items h and h' share their first l + 1 codes."""
    return (codes.unsqueeze(2) == codes.unsqueeze(1)).cumprod(-1).bool()


def first_holders(shared: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """shared [B, H, H, L] (shared_codes), real [B, H] -> [B, H, L]: item h is the first real
    item of the history with its first l + 1 codes (the one whose code at level l carries
    the offset, so that a code several items share is offset once)."""
    slots = shared.shape[1]
    earlier = torch.ones(slots, slots, dtype=torch.bool, device=shared.device).tril(-1)  # [h, h']: h' < h
    taken = (shared & earlier[:, :, None] & real[:, None, :, None]).any(2)  # [B, H, L]
    return real.unsqueeze(-1) & ~taken


class SidRepeatBias(nn.Module):
    """The learned offsets, one per level, and where they go in training and decoding."""

    def __init__(self, vocabulary_starts: tuple[int, ...]):
        """vocabulary_starts: the first token of each level's codes (Catalog.offsets)."""
        super().__init__()
        self.per_level = nn.Parameter(torch.zeros(len(vocabulary_starts)))  # [L], scaled by REPEAT_SCALE
        self.register_buffer("starts", torch.tensor(vocabulary_starts), persistent=False)

    def offsets(self, dtype: torch.dtype) -> torch.Tensor:
        return (REPEAT_SCALE * self.per_level).to(dtype)

    def add_to_window(self, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The NTP training pass over right-padded windows of W items: logits [B, W * L, V]
        (position j * L + l - 1 predicts level l of item j), tokens and mask [B, W * L] ->
        the logits, in place (a product's output, which its backward does not read), with
        each target's offsets against the window's items before it."""
        size, length, vocabulary = logits.shape
        levels = self.starts.shape[0]
        codes, real = history_codes(tokens, mask, self.starts)  # [B, W, L], [B, W]
        slots = codes.shape[1]  # W; windows of one item leave the scatter below empty
        shared = shared_codes(codes)  # [B, j, h, L]
        prefix = torch.cat([torch.ones_like(shared[..., :1]), shared[..., :-1]], -1)  # the first l codes
        before = torch.ones(slots, slots, dtype=torch.bool, device=codes.device).tril(-1)  # [j, h]: h < j
        weight = prefix & before[:, :, None] & first_holders(shared, real).unsqueeze(1) & real[:, :, None, None]
        weight = weight[:, 1:].transpose(2, 3)  # [B, W - 1, L, W]: target j >= 1, level, history item
        columns = tokens.view(size, slots, levels).transpose(1, 2)  # [B, L, W] each item's token per level
        columns = columns.unsqueeze(1).expand(size, slots - 1, levels, slots)
        rows = logits[:, levels - 1 : length - 1].view(size, slots - 1, levels, vocabulary)
        values = weight.to(logits.dtype) * self.offsets(logits.dtype).view(1, 1, levels, 1)
        rows.scatter_add_(-1, columns, values)
        return logits

    def for_prompt(self, history: torch.Tensor, mask: torch.Tensor) -> PromptRepeats:
        """A prompt's history [B, H * L] (left-padded by whole items): what its searches offset."""
        codes, real = history_codes(history, mask, self.starts)
        return PromptRepeats(self, codes, first_holders(shared_codes(codes), real))


class PromptRepeats:
    """The repeat offsets of one batch of prompts, added to the next-token logits of
    beams at any level."""

    def __init__(self, bias: SidRepeatBias, codes: torch.Tensor, first: torch.Tensor):
        self.bias, self.codes, self.first = bias, codes, first  # [B, H, L] each

    def rows(self, index: torch.Tensor) -> PromptRepeats:
        """The offsets of some of the prompts (index [B'])."""
        return PromptRepeats(self.bias, self.codes[index], self.first[index])

    def add(self, logits: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """logits [B, beams, V] after each beam's prefix [B, beams, l] -> the same, in place,
        plus level l's offset on the codes continuing the prefix to an item of the history."""
        level = prefixes.shape[-1]
        size, beams = prefixes.shape[:2]
        continues = (self.codes[:, None, :, :level] == prefixes[:, :, None, :]).all(-1)  # [B, beams, H]
        weight = continues & self.first[:, None, :, level]
        columns = self.codes[..., level] + self.bias.starts[level]  # [B, H] the items' tokens (padding: PAD)
        offset = self.bias.offsets(logits.dtype)[level]
        values = weight.to(logits.dtype) * offset
        return logits.scatter_add_(-1, columns[:, None].expand(size, beams, -1), values)
