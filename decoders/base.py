"""The contract every decoder keeps, the registry, and the pieces of beam search they share.

A decoder is built for one catalogue, one K and the trained models it needs, then
called on EvalBatches. It returns the top-K SIDs per user [B, K, L] with their scores;
backbone calls are counted by the harness through a hook on `backbone_core`, never
declared by the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.data.batches import EvalBatch
    from bench.data.catalog import Catalog

NEG_INF = float("-inf")


@dataclass
class DecodeResult:
    sids: torch.Tensor  # [B, K, L] codes per level; -1 where there is no K-th candidate
    scores: torch.Tensor  # [B, K] summed log-probabilities, best first; -inf where no candidate
    stats: dict[str, float] = field(default_factory=dict)  # what only the decoder sees, summed over the batch


class Decoder:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # roles of the trained models it needs: "ntp", "nezha"
    options: ClassVar[dict[str, type]] = {}  # option name -> type, settable as name:option=value
    model_options: ClassVar[dict[str, str]] = {}  # options that pick the trained model -> its setting name
    choices: ClassVar[dict[str, tuple]] = {}  # allowed values of string options
    backbone_kinds: ClassVar[tuple[str, ...]] = ("decoder-only", "encoder-decoder")  # generative backbones
    kind_reason: ClassVar[str] = ""  # why other kinds cannot work, for the error line
    description: ClassVar[str] = ""
    lm = None  # the backbone wrapper (models.backbones) it decodes with

    def __init__(self, catalog: Catalog, k: int, models: dict, **options):
        self.catalog, self.k = catalog, k
        self.settings = options

    @property
    def backbone_core(self) -> nn.Module | None:
        """The module one call of which is one backbone forward pass (None: no backbone)."""
        return self.lm.core if self.lm is not None else None

    @property
    def draft_core(self) -> nn.Module | None:
        """The separate draft model's module, when the decoder has one (its calls are counted too)."""
        return None

    def bare_forward(self, batch: EvalBatch) -> None:
        """One backbone forward pass over the history: the floor for this decoder's latency."""
        self.lm.bare_forward(batch.history, batch.mask)

    def decode(self, batch: EvalBatch) -> DecodeResult:
        raise NotImplementedError


class NtpDecoder(Decoder):
    """A decoder on the NTP backbone that can mask invalid prefixes (':constrained')."""

    needs = ("ntp",)
    options = {"constrained": bool}

    def __init__(self, catalog: Catalog, k: int, models: dict, constrained: bool = False):
        super().__init__(catalog, k, models, constrained=constrained)
        self.lm = models["ntp"].lm
        self.constrained = constrained


REGISTRY: dict[str, type[Decoder]] = {}


def register(cls: type[Decoder]) -> type[Decoder]:
    REGISTRY[cls.name] = cls
    return cls


def parse_spec(spec: str) -> tuple[str, dict]:
    """'nezha:verifier=last:head_beam=40' -> ('nezha', {'verifier': 'last', 'head_beam': 40})."""
    name, *parts = spec.strip().split(":")
    if name not in REGISTRY:
        raise BenchError(f"unknown decoder '{name}'; choose from {', '.join(sorted(REGISTRY))}")
    allowed = REGISTRY[name].options
    options = {}
    for part in parts:
        key, has_value, value = part.partition("=")
        if key not in allowed:
            hint = f"options of {name}: {', '.join(allowed)}" if allowed else f"{name} takes no options"
            raise BenchError(f"unknown option '{key}' in decoder spec '{spec}'; {hint}")
        kind = allowed[key]
        if kind is bool:
            if has_value and value.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                raise BenchError(f"option '{key}' in '{spec}' is a flag: write '{name}:{key}' or '{key}=off'")
            options[key] = (not has_value) or value.lower() in ("1", "true", "on", "yes")
        else:
            try:
                options[key] = kind(value)
            except ValueError:
                raise BenchError(f"option '{key}' in '{spec}' needs a {kind.__name__}, got '{value}'") from None
        allowed_values = REGISTRY[name].choices.get(key)
        if allowed_values and options[key] not in allowed_values:
            raise BenchError(f"option '{key}' in '{spec}' must be one of {', '.join(allowed_values)}, got '{value}'")
    return name, options


def level_log_probs(logits: torch.Tensor, catalog: Catalog, level: int) -> torch.Tensor:
    """[..., V] backbone logits -> [..., C_level] log-probabilities of the level's codes.

    The softmax runs over the whole vocabulary (the model's own probability of the
    token); other levels' tokens are then left out, as a Hugging Face logits processor
    would mask them."""
    start = catalog.offsets[level]
    return torch.log_softmax(logits.float(), dim=-1)[..., start : start + catalog.codebook_sizes[level]]


def mask_invalid(candidates: torch.Tensor, prefixes: torch.Tensor, catalog: Catalog, level: int) -> torch.Tensor:
    """candidates [B, K, C] scores of extending each beam's prefix [B, K, level] by each
    code -> the same with -inf where the extended prefix belongs to no real item."""
    codes = (
        catalog.verifier.encode(prefixes)
        if level
        else torch.zeros(prefixes.shape[:2], dtype=torch.long, device=prefixes.device)
    )
    valid = catalog.verifier.child_mask(codes.flatten(), level).view(candidates.shape)
    return candidates.masked_fill(~valid, NEG_INF)


def prune(candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """candidates [B, K_in, C] -> the best k as (scores [B, k], parent beam [B, k], code [B, k]).

    When fewer than k candidates exist the rest are -inf placeholders."""
    batch, beams, codes = candidates.shape
    flat = candidates.reshape(batch, beams * codes)
    if flat.shape[1] < k:
        flat = torch.cat([flat, flat.new_full((batch, k - flat.shape[1]), NEG_INF)], dim=1)
    scores, index = flat.topk(k, dim=1)
    index = index.clamp(max=beams * codes - 1)
    return scores, index // codes, index % codes


def extend_prefixes(prefixes: torch.Tensor, parent: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """prefixes [B, K_in, l], parent/code [B, K] -> [B, K, l + 1]."""
    kept = prefixes.gather(1, parent.unsqueeze(-1).expand(-1, -1, prefixes.shape[-1]))
    return torch.cat([kept, code.unsqueeze(-1)], dim=-1)


def finish(prefixes: torch.Tensor, scores: torch.Tensor, stats: dict | None = None) -> DecodeResult:
    """Mark candidates with score -inf as absent (-1)."""
    sids = prefixes.masked_fill(torch.isinf(scores).unsqueeze(-1), -1)
    return DecodeResult(sids=sids, scores=scores, stats=stats or {})
