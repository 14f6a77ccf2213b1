"""Greedy decoding on the NTP backbone: the argmax code at each level, one candidate."""

from __future__ import annotations

import torch

from decoders.base import Decoder, DecodeResult, level_log_probs, register


@register
class Greedy(Decoder):
    name = "greedy"
    needs = ("ntp",)
    description = "argmax per level; returns one candidate whatever K is"

    def __init__(self, catalog, k, models):
        super().__init__(catalog, k, models)
        self.lm = models["ntp"].lm

    @torch.no_grad()
    def decode(self, batch) -> DecodeResult:
        logits, state = self.lm.prefill(batch.history, batch.mask)
        codes, score = [], logits.new_zeros(len(batch))
        for level in range(self.catalog.levels):
            best, code = level_log_probs(logits, self.catalog, level).max(dim=-1)
            score, codes = score + best, codes + [code]
            if level + 1 < self.catalog.levels:
                step_logits, state = self.lm.extend(state, (code + self.catalog.offsets[level]).unsqueeze(1))
                logits = step_logits[:, -1]
        return DecodeResult(sids=torch.stack(codes, dim=-1).unsqueeze(1), scores=score.unsqueeze(1))
