"""The contract every decoder keeps, the registry, and the pieces of beam search they share.

A decoder declares its options (a dataclass) and the models it needs (`requests`, by
role); it is built for one catalogue, one K and those models, then called on prompts
(never on targets: the Spec-Bench contract). It returns the top-K SIDs per user
[B, K, L] with their scores; backbone calls are counted by the harness through a hook
on `backbone_core`, never declared by the decoder.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from bench.errors import BenchError
from bench.settings import ModelSettings, check_value, from_text, setting, unwrap_optional
from models.backbones import ITEM, backbone_kind

if TYPE_CHECKING:
    from bench.data.batches import Prompt
    from bench.data.catalog import Catalog
    from models.repeat import PromptRepeats

NEG_INF = float("-inf")


@dataclass
class DecodeResult:
    sids: torch.Tensor  # [B, K, L] codes per level; -1 where there is no K-th candidate
    scores: torch.Tensor  # [B, K] summed log-probabilities, best first; -inf where no candidate
    stats: dict[str, float] = field(default_factory=dict)  # what only the decoder sees, summed over the batch


@dataclass
class ModelRequest:
    """A model a decoder needs: the objective it is trained with, the settings that shape
    it, the model it starts from (Medusa heads sit on a trained NTP backbone) and the
    model it is distilled from (an aligned draft learns its backbone's top-K; an NTP model
    with item_teacher > 0 the item model's distribution over the next item)."""

    objective: str
    settings: ModelSettings
    init_from: ModelRequest | None = None
    teacher: ModelRequest | None = None

    def __post_init__(self):
        own = self.settings.for_objective(self.objective)  # a preset's per-objective settings
        if self.objective == "ntp" and self.teacher is not None:  # an aligned draft learns from its backbone alone
            own = replace(own, item_teacher=0.0, label_smoothing=0.0, seen_unlikelihood=0.0)  # (a KL alone)
        elif self.objective == "ntp" and own.item_teacher > 0:  # trained on the data, it learns from the item model
            self.teacher = ModelRequest("next_item", item_model_settings(self.settings))
        self.settings = own

    def starts(self) -> list[ModelRequest]:
        """The models this one is trained from (init_from, teacher), and theirs, in turn."""
        found, pending = [], [self.init_from, self.teacher]
        while pending:
            start = pending.pop()
            if start is not None:
                found.append(start)
                pending += [start.init_from, start.teacher]
        return found


def item_model_settings(settings):
    """The item model's settings: --backbone when it is one, else --item-backbone (with
    that preset's size: width, layers, heads and the encoder shape the SID backbone)."""
    if backbone_kind(settings.backbone) == ITEM:
        return settings
    return replace(
        settings, backbone=settings.item_backbone, width=None, layers=None, heads=None, encoder="bidirectional"
    )


@dataclass
class NoOptions:
    pass


class Decoder:
    """Subclasses set `name`, `Options` (a dataclass of their spec options: `name:option=value`)
    and `requests` (the models they need, by role), and implement `decode`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    backbone_kinds: ClassVar[tuple[str, ...]] = ("decoder-only", "encoder-decoder")  # generative backbones
    kind_reason: ClassVar[str] = ""  # why other kinds cannot work, for the error line
    description: ClassVar[str] = ""
    lm = None  # the backbone wrapper (models.backbones) it decodes with

    def __init__(self, catalog: Catalog, k: int, models: dict, options):
        self.catalog, self.k, self.options = catalog, k, options

    @classmethod
    def requests(cls, options, settings: ModelSettings) -> dict[str, ModelRequest]:
        """role -> the model that plays it (a `--ckpt` of objective X plays role X)."""
        return {}

    @classmethod
    def check_options(cls, options, catalog: Catalog, k: int) -> None:
        """Refuse options that cannot work with this catalogue and K (a BenchError):
        `bench run` calls it before any model is trained; a decoder's __init__ again."""

    @property
    def backbone_core(self) -> nn.Module | None:
        """The module one call of which is one backbone forward pass (None: no backbone)."""
        return self.lm.core if self.lm is not None else None

    @property
    def draft_core(self) -> nn.Module | None:
        """The separate draft model's module, when the decoder has one (its calls are counted too)."""
        return None

    def bare_forward(self, prompt: Prompt) -> None:
        """One backbone forward pass over the history alone: the floor, defined the same
        way for every decoder on a backbone."""
        self.lm.bare_forward(prompt.history, prompt.mask)

    def prompt_forward(self, prompt: Prompt) -> bool:
        """A decoder whose one pass reads more than the history (NEZHA's placeholders) runs
        that pass here and returns True: its own floor, reported beside the common one."""
        return False

    def decode(self, prompt: Prompt) -> DecodeResult:
        """The top-K SIDs for each user of the prompt; a decoder never sees the targets."""
        raise NotImplementedError


def repeats_of(bias, prompt: Prompt) -> PromptRepeats | None:
    """An NTP model's repeat offsets (models.repeat.SidRepeatBias) for this prompt's
    histories; None for a model trained without them."""
    return None if bias is None else bias.for_prompt(prompt.history, prompt.mask)


@dataclass
class ConstrainedOption:
    constrained: bool = setting(False, "mask prefixes that belong to no real item")


@dataclass
class BeamOptions(ConstrainedOption):
    width: int = setting(0, "beams kept before the last level, which keeps the best K (0: K)", low=0)


class NtpDecoder(Decoder):
    """A decoder on the NTP backbone that can mask invalid prefixes (':constrained')."""

    Options = ConstrainedOption

    def __init__(self, catalog: Catalog, k: int, models: dict, options):
        super().__init__(catalog, k, models, options)
        self.lm = models["ntp"].lm
        self.repeat_bias = models["ntp"].repeat_bias  # None: a model trained without --repeat-bias
        self.constrained = getattr(options, "constrained", False)

    def repeats(self, prompt: Prompt) -> PromptRepeats | None:
        return repeats_of(self.repeat_bias, prompt)

    @classmethod
    def requests(cls, options, settings: ModelSettings) -> dict[str, ModelRequest]:
        return {"ntp": ModelRequest("ntp", settings)}


class WideBeamDecoder(NtpDecoder):
    """A beam search on the NTP backbone that can keep more beams than K before the last
    level (':width=N'): a wider search finds likelier SIDs, at more cost a step."""

    Options = BeamOptions

    def __init__(self, catalog: Catalog, k: int, models: dict, options):
        width = beam_width(self.name, "width", options.width, k, catalog, last_keeps_k=True)
        super().__init__(catalog, k, models, replace(options, width=width))  # records hold the width searched
        self.width = width

    @classmethod
    def check_options(cls, options, catalog: Catalog, k: int) -> None:
        beam_width(cls.name, "width", options.width, k, catalog, last_keeps_k=True)


def refuse_repeat_bias(decoder: str, request: ModelRequest, why: str) -> ModelRequest:
    """An NTP model trained with --repeat-bias needs its offsets wherever its logits are
    read: a decoder that does not add them refuses the model in one line."""
    if request.objective == "ntp" and request.settings.repeat_bias:
        raise BenchError(
            f"{decoder} does not add the NTP model's repeat bias: {why}; run it without --repeat-bias, "
            "or decode the model trained with it by greedy, beam, hf_beam or speculative (with a data or item draft)"
        )
    return request


REGISTRY: dict[str, type[Decoder]] = {}


def register(cls: type[Decoder]) -> type[Decoder]:
    REGISTRY[cls.name] = cls
    return cls


def parse_spec(spec: str):
    """'nezha:verifier=last:head_beam=40' -> ('nezha', NezhaOptions(verifier='last', head_beam=40, ...)).

    The options are the fields of the decoder's Options dataclass, typed and bounded there."""
    name, *parts = spec.strip().split(":")
    if name not in REGISTRY:
        raise BenchError(f"unknown decoder '{name}'; choose from {', '.join(sorted(REGISTRY))}")
    options_cls = REGISTRY[name].Options
    hints = typing.get_type_hints(options_cls)
    values = {}
    for part in parts:
        key, has_value, text = part.partition("=")
        if key not in hints:
            hint = f"options of {name}: {', '.join(hints)}" if hints else f"{name} takes no options"
            raise BenchError(f"unknown option '{key}' in decoder spec '{spec}'; {hint}")
        if key in values:
            raise BenchError(f"option '{key}' is given twice in decoder spec '{spec}'; give it once")
        if not has_value or not text.strip():
            if has_value or unwrap_optional(hints[key])[0] is not bool:
                raise BenchError(f"option '{key}' in '{spec}' needs a value: {name}:{key}=VALUE")
            text = "true"
        try:
            values[key] = check_value(options_cls, key, from_text(text, hints[key]), f"decoder spec '{spec}'")
        except ValueError as exc:
            raise BenchError(f"option '{key}' in '{spec}': {exc}") from None
    return name, options_cls(**values)


def beam_width(decoder: str, option: str, width: int, k: int, catalog: Catalog, last_keeps_k: bool = False) -> int:
    """A decoder's own beam width option: 0 means K; below K or beyond what the search can
    hold is refused: the code space, or (a search whose last level keeps K) the prefixes
    of the levels before the last."""
    if width and width < k:
        raise BenchError(f"{decoder}: {option}={width} is below K={k}; it must be at least K")
    prefixes = math.prod(catalog.codebook_sizes[:-1])
    if last_keeps_k and width > prefixes:
        raise BenchError(
            f"{decoder}: {option}={width} is above the {prefixes} prefixes of the levels before the last, "
            "which the beams hold; more beams cannot find more"
        )
    if width > catalog.code_space:
        raise BenchError(
            f"{decoder}: {option}={width} is above the {catalog.code_space} SIDs of the code space; "
            "more beams cannot find more"
        )
    return width or k


def option_names(name: str) -> set[str]:
    return {f.name for f in fields(REGISTRY[name].Options)}


def level_log_probs(logits: torch.Tensor, catalog: Catalog, level: int) -> torch.Tensor:
    """[..., V] backbone logits -> [..., C_level] log-probabilities of the level's codes.

    The softmax runs over the whole vocabulary (the model's own probability of the
    token); other levels' tokens are then left out, as a Hugging Face logits processor
    would mask them."""
    start = catalog.offsets[level]
    return torch.log_softmax(logits.float(), dim=-1)[..., start : start + catalog.codebook_sizes[level]]


class ValidPrefixes:
    """Each beam's node in the verifier's trie, carried along a beam search: masking
    a level is one gather of the beams' rows, following the kept beams one more."""

    def __init__(self, catalog: Catalog, prefixes: torch.Tensor):
        """prefixes [B, beams, l]: where the search starts (l = 0: at the root)."""
        self.verifier = catalog.verifier
        self.nodes = self.verifier.nodes_of(prefixes)  # [B, beams]

    def mask(self, candidates: torch.Tensor, level: int) -> torch.Tensor:
        """candidates [B, beams, C] scores of extending each beam by each code -> the
        same, in place, with -inf where the extended prefix belongs to no real item
        (every search passes a sum it has just made)."""
        return candidates.masked_fill_(self.verifier.missing_children(self.nodes, level), NEG_INF)

    def advance(self, parent: torch.Tensor, code: torch.Tensor, level: int) -> None:
        """parent, code [B, K]: the kept beams (prune's output) -> their nodes one level down."""
        self.nodes = self.verifier.child(self.nodes.gather(1, parent), code, level)

    def sids(self) -> torch.Tensor:
        """After the last level's advance: each beam's SID [B, K, L], read off its trie node."""
        return self.verifier.sids_of(self.nodes)


def prune(candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """candidates [B, K_in, C] -> the best k as (scores [B, k], parent beam [B, k], code [B, k]).

    When fewer than k candidates exist the rest are -inf placeholders."""
    batch, beams, codes = candidates.shape
    flat = candidates.reshape(batch, beams * codes)
    padded = flat.shape[1] < k
    if padded:
        flat = torch.cat([flat, flat.new_full((batch, k - flat.shape[1]), NEG_INF)], dim=1)
    scores, index = flat.topk(k, dim=1)
    if padded:  # a placeholder's index points past the candidates
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
