"""Greedy decoding on the NTP backbone: the argmax code at each level, one candidate."""

from __future__ import annotations

import torch

from decoders.base import DecodeResult, NoOptions, NtpDecoder, level_log_probs, register


@register
class Greedy(NtpDecoder):
    name = "greedy"
    Options = NoOptions
    description = "argmax per level; returns one candidate whatever K is"

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        logits, state = self.lm.prefill(prompt.history, prompt.mask)
        codes, score = [], logits.new_zeros(len(prompt))
        repeats = self.repeats(prompt)
        for level in range(self.catalog.levels):
            if repeats is not None:  # the codes so far as one beam's prefix [B, 1, level]
                prefix = torch.stack(codes, -1) if codes else prompt.history.new_zeros(len(prompt), 0)
                repeats.add(logits.unsqueeze(1), prefix.unsqueeze(1))
            best, code = level_log_probs(logits, self.catalog, level).max(dim=-1)
            score, codes = score + best, codes + [code]
            if level + 1 < self.catalog.levels:
                step_logits, state = self.lm.extend(state, (code + self.catalog.offsets[level]).unsqueeze(1))
                logits = step_logits[:, -1]
        return DecodeResult(sids=torch.stack(codes, dim=-1).unsqueeze(1), scores=score.unsqueeze(1))
