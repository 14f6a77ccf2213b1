"""Hugging Face `generate(num_beams=K)` on the NTP backbone: the reference for
correctness and the comparator of the NEZHA paper (:width=N: num_beams=N, the best K
returned).

How it differs from `beam`: on a decoder-only backbone generate expands the prompt to
B*K rows before the prefill, so the prompt is computed K times instead of once, and it
reorders the whole KV cache every step; on an encoder-decoder it runs the encoder once
per user and copies its states to the K beams, as `beam` does there. The level of each
step and (with :constrained) the verifier are applied through a logits processor on
the full-vocabulary log-probabilities, which is the scoring `beam` uses too, so both
return the same top-K.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from decoders.base import NEG_INF, DecodeResult, WideBeamDecoder, finish, register


class SidLevelProcessor(LogitsProcessor):
    """Keeps only the codes of the level being generated (and, constrained, those that
    extend a valid prefix). With the model's repeat offsets (models.repeat.PromptRepeats)
    it first adds them and normalises again: log_softmax(z) + o, renormalised, is
    log_softmax(z + o), the model's own log-probabilities (generate passes beam search's
    processors log-probabilities, greedy search's raw logits: the argmax is the same)."""

    def __init__(self, catalog, prompt_length: int, constrained: bool, device: torch.device, repeats=None):
        self.catalog, self.prompt_length, self.constrained = catalog, prompt_length, constrained
        self.offsets = catalog.on(device).offsets  # [L]
        self.repeats = repeats

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        level = input_ids.shape[1] - self.prompt_length
        start, size = self.catalog.offsets[level], self.catalog.codebook_sizes[level]
        if self.repeats is not None or self.constrained:
            generated = input_ids[:, self.prompt_length :] - self.offsets[:level]  # [B * beams, l]
        if self.repeats is not None:
            users = self.repeats.codes.shape[0]
            beams = scores.view(users, -1, scores.shape[-1])
            scores = self.repeats.add(beams.clone(), generated.view(users, beams.shape[1], level)).view_as(scores)
            scores = scores - scores.logsumexp(-1, keepdim=True)
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        if self.constrained:
            nodes = self.catalog.verifier.nodes_of(generated)
            allowed[:, start : start + size] = self.catalog.verifier.child_mask(nodes, level)
        else:
            allowed[:, start : start + size] = True
        return scores.masked_fill(~allowed, NEG_INF)


@register
class HFBeam(WideBeamDecoder):
    name = "hf_beam"
    description = (
        "transformers generate(num_beams=K): prompt prefilled once per beam, cache reordered each step; "
        ":constrained masks invalid prefixes; :width=N runs N >= K beams and returns the best K"
    )

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        levels, size = self.catalog.levels, len(prompt)
        repeats = self.repeats(prompt)
        processor = SidLevelProcessor(
            self.catalog,
            self.lm.generation_prompt_length(prompt.history),
            self.constrained,
            prompt.history.device,
            repeats,
        )
        # with one beam generate runs greedy search, which takes no beam settings and reports raw logits
        beam_settings = dict(length_penalty=0.0, early_stopping=True) if self.width > 1 else dict(output_logits=True)
        out = self.lm.lm.generate(
            input_ids=prompt.history,
            attention_mask=prompt.mask,
            num_beams=self.width,
            num_return_sequences=self.k,
            max_new_tokens=levels,
            min_new_tokens=levels,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            logits_processor=LogitsProcessorList([processor]),
            pad_token_id=0,
            eos_token_id=None,
            bos_token_id=None,
            **beam_settings,
        )
        generated = out.sequences[:, -levels:]  # [B*K, L]
        sids = (generated - processor.offsets).view(size, self.k, levels)
        if self.width > 1:
            scores = out.sequences_scores.float()
        else:  # greedy search's raw logits, with the repeat offsets after the codes before each level
            steps = [step.float() for step in out.logits]
            if repeats is not None:
                for level, step in enumerate(steps):
                    repeats.add(step.unsqueeze(1), sids[:, :, :level])
            log_probs = torch.stack([torch.log_softmax(step, -1) for step in steps], 1)  # [B, L, V]
            scores = log_probs.gather(2, generated.unsqueeze(-1)).sum((1, 2))
        scores = scores.view(size, self.k)
        # a slot generate could not fill (fewer valid SIDs than K) scores -inf or transformers' -1e9,
        # far below any SID's log-probability: absent, as the other decoders return it
        return finish(sids.clamp(min=0), scores.masked_fill(scores <= -1e9, NEG_INF))
