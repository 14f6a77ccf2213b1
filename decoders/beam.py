"""Beam search on the NTP backbone, written for SIDs: the prompt is prefilled once per
batch, then L-1 decode steps of the K beams (or :width=N of them before the last level);
on decoder-only backbones the beams share the prompt's KV cache (no copy), on
encoder-decoders each beam gets its own."""

from __future__ import annotations

import torch

from decoders.base import (
    DecodeResult,
    ValidPrefixes,
    WideBeamDecoder,
    extend_prefixes,
    finish,
    level_log_probs,
    prune,
    register,
)


class CopiedCache:
    """Beam steps where every beam has its own copy of the cache, prompt included,
    gathered again at every step: encoder-decoders (their beams' cross-attention
    memory)."""

    def __init__(self, lm, state):
        self.lm, self.state = lm, state

    def step(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """parent [B, K] beams of the previous level, tokens [B, K] -> logits [B*K, V]."""
        size = parent.shape[0]
        beams_before = self.state.next_position.shape[0] // size
        rows = (torch.arange(size, device=parent.device).unsqueeze(1) * beams_before + parent).flatten()
        self.state = self.lm.select(self.state, rows)  # copy (first step) or reorder the cache
        logits, self.state = self.lm.extend(self.state, tokens.reshape(-1, 1))
        return logits[:, -1]


class SharedPrompt:
    """Beam steps on one cache per user: the prompt is cached once, each step appends
    the K beams' tokens after it, and a 4D mask lets each beam see the prompt, its own
    ancestors and itself. Nothing of the prompt is copied or reordered; only which
    generated positions a beam sees follows its parent."""

    def __init__(self, lm, state, seen: torch.Tensor | None = None):
        """seen [B, beams, generated]: which generated columns after the prompt each beam
        sees (None: a search that starts at the prompt, one beam, nothing generated)."""
        self.lm, self.state = lm, state
        if seen is None:
            seen = torch.zeros(state.mask.shape[0], 1, 0, dtype=torch.bool, device=state.mask.device)
        self.seen = seen

    def step(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.seen = self.seen.gather(1, parent.unsqueeze(-1).expand(-1, -1, self.seen.shape[-1]))
        logits, self.state, self.seen = self.lm.extend_beams(self.state, tokens, self.seen)
        return logits.flatten(0, 1)


def continue_beam(
    catalog,
    logits,
    steps,
    scores,
    prefixes,
    k: int,
    constrained: bool,
    trail: list | None = None,
    repeats=None,
    width: int | None = None,
):
    """Beam search from level prefixes.shape[-1] to the last level.

    logits [B*beams, V]: next-token logits after each beam's prefix; steps: how the
    backbone takes the next tokens (SharedPrompt or CopiedCache); scores [B, beams];
    prefixes [B, beams, l]. Returns (prefixes [B, K, L], scores [B, K]); `trail`, when
    given, collects the kept prefixes of every level; `repeats` (models.repeat.PromptRepeats),
    the model's repeat offsets, added to the logits; `width` (default k), the beams kept
    before the last level, which keeps k."""
    size = scores.shape[0]
    valid = ValidPrefixes(catalog, prefixes) if constrained else None
    for level in range(prefixes.shape[-1], catalog.levels):
        if repeats is not None:
            repeats.add(logits.view(size, scores.shape[1], -1), prefixes)
        log_probs = level_log_probs(logits, catalog, level).view(size, scores.shape[1], -1)
        candidates = scores.unsqueeze(-1) + log_probs  # [B, beams, C]
        if valid:
            candidates = valid.mask(candidates, level)
        last = level + 1 == catalog.levels
        scores, parent, code = prune(candidates, k if last or width is None else width)  # [B, K or width] each
        prefixes = extend_prefixes(prefixes, parent, code)
        if valid and not last:
            valid.advance(parent, code, level)
        if trail is not None:
            trail.append((prefixes, scores, parent))
        if not last:
            logits = steps.step(parent, code + catalog.offsets[level])
    return prefixes, scores


def beam_search(
    lm,
    catalog,
    history,
    mask,
    k: int,
    constrained: bool,
    trail: list | None = None,
    repeats=None,
    width: int | None = None,
):
    """Prefill once, then continue_beam from the first level, on a shared prompt cache
    where the backbone offers one (decoder-only), else on copies."""
    logits, state = lm.prefill(history, mask)  # [B, V]
    size = history.shape[0]
    steps = SharedPrompt(lm, state) if hasattr(lm, "extend_beams") else CopiedCache(lm, state)
    scores = logits.new_zeros(size, 1)
    prefixes = torch.zeros(size, 1, 0, dtype=torch.long, device=logits.device)
    return continue_beam(catalog, logits, steps, scores, prefixes, k, constrained, trail, repeats, width)


@register
class BeamSearch(WideBeamDecoder):
    name = "beam"
    description = (
        "one prefill, L-1 decode steps of K beams sharing the prompt's KV cache; :constrained masks invalid "
        "prefixes; :width=N keeps N >= K beams before the last level"
    )

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        found = beam_search(
            self.lm,
            self.catalog,
            prompt.history,
            prompt.mask,
            self.k,
            self.constrained,
            repeats=self.repeats(prompt),
            width=self.width,
        )
        return finish(*found)
