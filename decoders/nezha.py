"""NEZHA: one backbone pass over [history, <sp_1> .. <sp_L>], then beam search inside
the self-draft head, with the hash-set verifier pruning invalid prefixes."""

from __future__ import annotations

import torch

from bench.errors import BenchError
from decoders.base import Decoder, DecodeResult, extend_prefixes, finish, mask_invalid, prune, register
from models.heads import TRANSITIONS

VERIFIER_MODES = ("every", "last", "off")


@register
class Nezha(Decoder):
    name = "nezha"
    needs = ("nezha",)
    options = {"verifier": str, "head_beam": int, "transition": str, "placeholders": bool}
    model_options = {"transition": "transition", "placeholders": "placeholders"}
    choices = {"verifier": VERIFIER_MODES, "transition": TRANSITIONS}
    description = (
        "one backbone pass, beam search in the draft head; :verifier=every|last|off, "
        ":head_beam=N beams inside the head (default K); model ablations :transition=rnn|gru|none, "
        ":placeholders=off"
    )

    def __init__(
        self,
        catalog,
        k,
        models,
        verifier: str = "every",
        head_beam: int = 0,
        transition: str | None = None,
        placeholders: bool | None = None,
    ):
        model = models["nezha"]
        for option, wanted in (("transition", transition), ("placeholders", placeholders)):
            if wanted is not None and model.hparams[option] != wanted:
                raise BenchError(
                    f"nezha: {option}={wanted} asked for, but the model was trained with "
                    f"{option}={model.hparams[option]}; drop --ckpt to train a matching one"
                )
        super().__init__(
            catalog,
            k,
            models,
            verifier=verifier,
            head_beam=head_beam or k,
            transition=model.hparams.transition,
            placeholders=model.hparams.placeholders,
        )
        if head_beam and head_beam < k:
            raise BenchError(f"nezha: head_beam={head_beam} is below K={k}; it must be at least K")
        self.lm, self.head = model.lm, model.head
        self.verifier, self.head_beam = verifier, head_beam or k
        # built once, not per batch inside the timed decode: [L] token ids, None without placeholders
        device = next(model.parameters()).device
        self._placeholder_ids = (
            torch.tensor(catalog.placeholder_tokens, device=device) if model.hparams.placeholders else None
        )

    def placeholder_tokens(self, device) -> torch.Tensor | None:
        """The placeholder token ids on `device` (a no-op move when the model lives there)."""
        return None if self._placeholder_ids is None else self._placeholder_ids.to(device)

    def bare_forward(self, batch):
        self.lm.nezha_states(batch.history, batch.mask, self.placeholder_tokens(batch.history.device))

    @torch.no_grad()
    def decode(self, batch) -> DecodeResult:
        catalog, levels, size = self.catalog, self.catalog.levels, len(batch)
        h0, placeholder_states = self.lm.nezha_states(
            batch.history, batch.mask, self.placeholder_tokens(batch.history.device)
        )  # [B, d], [B, L, d]
        if placeholder_states is None:
            placeholder_states = h0.new_zeros(size, levels, h0.shape[-1])
        state = h0.unsqueeze(1)  # [B, beams, d]
        scores = h0.new_zeros(size, 1)
        prefixes = torch.zeros(size, 1, 0, dtype=torch.long, device=h0.device)
        for level in range(levels):
            logits = self.head.level_logits(level, state, placeholder_states[:, level].unsqueeze(1))
            candidates = scores.unsqueeze(-1) + torch.log_softmax(logits.float(), dim=-1)  # [B, beams, C]
            if self.verifier == "every" or (self.verifier == "last" and level == levels - 1):
                candidates = mask_invalid(candidates, prefixes, catalog, level)
            width = self.k if level == levels - 1 else self.head_beam
            scores, parent, code = prune(candidates, width)
            prefixes = extend_prefixes(prefixes, parent, code)
            if level + 1 < levels:
                kept = state.gather(1, parent.unsqueeze(-1).expand(-1, -1, state.shape[-1]))  # [B, width, d]
                state = self.head.advance(level, kept.flatten(0, 1), code.flatten()).view(size, width, -1)
        return finish(prefixes, scores)
