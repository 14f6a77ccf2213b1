"""NEZHA: one backbone pass over [history, <sp_1> .. <sp_L>], then beam search inside
the self-draft head, with the hash-set verifier pruning invalid prefixes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from bench.errors import BenchError
from bench.settings import setting
from decoders.base import (
    Decoder,
    DecodeResult,
    ModelRequest,
    ValidPrefixes,
    beam_width,
    extend_prefixes,
    finish,
    prune,
    register,
)


@dataclass
class NezhaOptions:
    verifier: Literal["every", "last", "off"] = setting("every", "levels at which invalid prefixes are masked")
    head_beam: int = setting(0, "beams inside the head (0: K)", low=0)
    transition: Literal["rnn", "gru", "none"] | None = setting(None, "model ablation: the head's transition cell")
    placeholders: bool | None = setting(None, "model ablation: placeholders=off reads only the last history state")


@register
class Nezha(Decoder):
    name = "nezha"
    Options = NezhaOptions
    description = (
        "one backbone pass, beam search in the draft head; :verifier=every|last|off, "
        ":head_beam=N beams inside the head (default K); model ablations :transition=rnn|gru|none, "
        ":placeholders=off"
    )

    @classmethod
    def requests(cls, options, settings):
        """The NEZHA model; the ablation options pick the model's own settings. With
        nezha_init=ntp its backbone starts from the trained NTP model of the same settings."""
        picked = {name: getattr(options, name) for name in ("transition", "placeholders")}
        request = ModelRequest("nezha", replace(settings, **{k: v for k, v in picked.items() if v is not None}))
        if request.settings.nezha_init == "ntp":
            request.init_from = ModelRequest("ntp", settings)
        return {"nezha": request}

    @classmethod
    def check_options(cls, options, catalog, k):
        beam_width("nezha", "head_beam", options.head_beam, k, catalog, last_keeps_k=True)

    def __init__(self, catalog, k, models, options):
        model = models["nezha"]
        for option in ("transition", "placeholders"):
            wanted, trained = getattr(options, option), getattr(model.settings, option)
            if wanted is not None and trained != wanted:
                raise BenchError(
                    f"nezha: {option}={wanted} asked for, but the model was trained with "
                    f"{option}={trained}; drop --ckpt to train a matching one"
                )
        options = replace(
            options,
            head_beam=beam_width("nezha", "head_beam", options.head_beam, k, catalog, last_keeps_k=True),
            transition=model.settings.transition,
            placeholders=model.settings.placeholders,
        )
        super().__init__(catalog, k, models, options)
        self.lm, self.head = model.lm, model.head
        self.verifier, self.head_beam, self.placeholders = options.verifier, options.head_beam, options.placeholders

    def placeholder_tokens(self, device) -> torch.Tensor | None:
        """The placeholder token ids on `device` [L], None without placeholders."""
        return self.catalog.on(device).placeholder_tokens if self.placeholders else None

    def prompt_forward(self, prompt) -> bool:
        """The pass over [history, <sp_1..sp_L>] alone: what the head adds lies above it."""
        self.lm.nezha_states(prompt.history, prompt.mask, self.placeholder_tokens(prompt.history.device))
        return True

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        catalog, levels, size = self.catalog, self.catalog.levels, len(prompt)
        h0, placeholder_states = self.lm.nezha_states(
            prompt.history, prompt.mask, self.placeholder_tokens(prompt.history.device)
        )  # [B, d], [B, L, d]
        if placeholder_states is None:
            placeholder_states = h0.new_zeros(size, levels, h0.shape[-1])
        layout = self.head.beam_levels()
        state = h0.unsqueeze(1)  # [B, beams, d]
        scores = h0.new_zeros(size, 1, 1, dtype=torch.float32)  # [B, beams, 1]
        valid = ValidPrefixes(catalog, h0.new_zeros(size, 1, 0, dtype=torch.long)) if self.verifier != "off" else None
        # verified at every level, a beam's trie node names its prefix: the SIDs are read off
        # the leaves at the end instead of being carried along
        prefixes = None if self.verifier == "every" else torch.zeros(size, 1, 0, dtype=torch.long, device=h0.device)
        for level in range(levels):
            logits = layout[level].logits(state, placeholder_states[:, level : level + 1])  # [B, beams, C]
            candidates = torch.log_softmax(logits.float(), dim=-1).add_(scores)
            if valid and (self.verifier == "every" or level == levels - 1):
                candidates = valid.mask(candidates, level)
            width = self.k if level == levels - 1 else self.head_beam
            best, parent, code = prune(candidates, width)
            scores = best.unsqueeze(-1)
            if prefixes is not None:
                prefixes = extend_prefixes(prefixes, parent, code)
            if valid and (self.verifier == "every" or level + 1 < levels):
                valid.advance(parent, code, level)
            if level + 1 < levels:
                state = layout[level].advance(state, parent, code)  # [B, width, d]
        return finish(valid.sids() if prefixes is None else prefixes, scores.squeeze(-1))
