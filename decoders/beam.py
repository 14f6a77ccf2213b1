"""Beam search on the NTP backbone, written for SIDs: the prompt is prefilled once per
batch, its KV cache is copied to the K beams, then L-1 single-token decode steps."""
from __future__ import annotations

import torch

from decoders.base import (Decoder, DecodeResult, extend_prefixes, finish, level_log_probs, mask_invalid, prune,
                           register)


@register
class BeamSearch(Decoder):
    name = "beam"
    needs = ("ntp",)
    options = {"constrained": bool}
    description = "one prefill, KV cache copied to K beams, L-1 decode steps; :constrained masks invalid prefixes"

    def __init__(self, catalog, k, models, constrained: bool = False):
        super().__init__(catalog, k, models, constrained=constrained)
        self.lm = models["ntp"].lm
        self.constrained = constrained

    @property
    def backbone_core(self):
        return self.lm.core

    def bare_forward(self, batch):
        self.lm.hidden(batch.history, batch.mask)

    @torch.no_grad()
    def decode(self, batch) -> DecodeResult:
        catalog, lm = self.catalog, self.lm
        size = len(batch)
        logits, state = lm.prefill(batch.history, batch.mask)                 # [B, V]
        scores = logits.new_zeros(size, 1)                                     # [B, beams]
        prefixes = torch.zeros(size, 1, 0, dtype=torch.long, device=logits.device)
        for level in range(catalog.levels):
            log_probs = level_log_probs(logits, catalog, level).view(size, scores.shape[1], -1)
            candidates = scores.unsqueeze(-1) + log_probs                      # [B, beams, C]
            if self.constrained:
                candidates = mask_invalid(candidates, prefixes, catalog, level)
            scores, parent, code = prune(candidates, self.k)                   # [B, K] each
            prefixes = extend_prefixes(prefixes, parent, code)
            if level + 1 < catalog.levels:
                rows = (torch.arange(size, device=parent.device).unsqueeze(1) * candidates.shape[1] + parent).flatten()
                state = lm.select(state, rows)                                 # copy (level 0) or reorder the cache
                tokens = (code + catalog.offsets[level]).reshape(-1, 1)        # [B*K, 1]
                step_logits, state = lm.extend(state, tokens)
                logits = step_logits[:, -1]
        return finish(prefixes, scores)
