"""Beam search on the NTP backbone, written for SIDs: the prompt is prefilled once per
batch, its KV cache is copied to the K beams, then L-1 single-token decode steps."""

from __future__ import annotations

import torch

from decoders.base import (
    DecodeResult,
    NtpDecoder,
    extend_prefixes,
    finish,
    level_log_probs,
    mask_invalid,
    prune,
    register,
)


def continue_beam(lm, catalog, logits, state, scores, prefixes, k: int, constrained: bool, trail: list | None = None):
    """Beam search from level prefixes.shape[-1] to the last level.

    logits [B*beams, V]: next-token logits after each beam's prefix; state: the cache of
    those rows; scores [B, beams]; prefixes [B, beams, l]. Returns (prefixes [B, K, L],
    scores [B, K]); `trail`, when given, collects the kept prefixes of every level."""
    size = scores.shape[0]
    for level in range(prefixes.shape[-1], catalog.levels):
        log_probs = level_log_probs(logits, catalog, level).view(size, scores.shape[1], -1)
        candidates = scores.unsqueeze(-1) + log_probs  # [B, beams, C]
        if constrained:
            candidates = mask_invalid(candidates, prefixes, catalog, level)
        scores, parent, code = prune(candidates, k)  # [B, K] each
        prefixes = extend_prefixes(prefixes, parent, code)
        if trail is not None:
            trail.append((prefixes, scores, parent))
        if level + 1 < catalog.levels:
            rows = (torch.arange(size, device=parent.device).unsqueeze(1) * candidates.shape[1] + parent).flatten()
            state = lm.select(state, rows)  # copy (first step) or reorder the cache
            tokens = (code + catalog.offsets[level]).reshape(-1, 1)  # [B*K, 1]
            step_logits, state = lm.extend(state, tokens)
            logits = step_logits[:, -1]
    return prefixes, scores


def beam_search(lm, catalog, history, mask, k: int, constrained: bool, trail: list | None = None):
    """Prefill once, then continue_beam from the first level."""
    logits, state = lm.prefill(history, mask)  # [B, V]
    scores = logits.new_zeros(history.shape[0], 1)
    prefixes = torch.zeros(history.shape[0], 1, 0, dtype=torch.long, device=logits.device)
    return continue_beam(lm, catalog, logits, state, scores, prefixes, k, constrained, trail)


@register
class BeamSearch(NtpDecoder):
    name = "beam"
    description = "one prefill, KV cache copied to K beams, L-1 decode steps; :constrained masks invalid prefixes"

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        return finish(*beam_search(self.lm, self.catalog, prompt.history, prompt.mask, self.k, self.constrained))
