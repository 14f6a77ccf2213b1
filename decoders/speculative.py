"""Speculative decoding with a separate draft model, verified strictly (AtSpeed-S style).

The draft (a smaller NTP model trained on the same data, or distilled from the backbone)
beam-searches K beams; every prefix it keeps at levels 1..L-1 becomes a node of a draft
tree. With `draft=items` the item model drafts its top K items instead, and the prefixes
of their SIDs make the tree. The backbone reads
the prompt and the whole tree in ONE pass (tree attention mask), which gives its own
distribution after every drafted prefix. Then the backbone's beam search is replayed
on those distributions: at each level, if every prefix the backbone keeps was drafted,
the level is accepted without a call; at the first level where a kept prefix is
missing, the request falls back to the backbone's own beam steps from there. The output
is therefore exactly `beam`'s top-K (lossless), only the number of backbone calls varies.

`accept=relaxed` never falls back: the backbone's beam search runs inside the draft
tree, keeping at each level the best extensions (by the backbone's scores) that the draft
also drafted, so a request costs the draft's steps and one backbone pass. Lossy where
the backbone's own top-K leaves the tree. (AtSpeed-R relaxes acceptance with a
probabilistic rule; this is its deterministic, tree-restricted cousin.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from bench.errors import BenchError
from bench.settings import setting
from decoders.base import (
    NEG_INF,
    DecodeResult,
    ModelRequest,
    NtpDecoder,
    ValidPrefixes,
    beam_width,
    extend_prefixes,
    finish,
    item_model_settings,
    level_log_probs,
    prune,
    refuse_repeat_bias,
    register,
    repeats_of,
)
from decoders.beam import SharedPrompt, beam_search, continue_beam
from decoders.full_rank import top_items
from models.backbones import DecodeState


@dataclass
class SpeculativeOptions:
    constrained: bool = setting(False, "mask prefixes that belong to no real item")
    draft_beam: int = setting(0, "beams the draft keeps, or items an item draft drafts (0: K)", low=0)
    accept: Literal["strict", "relaxed"] = setting(
        "strict", "strict: exactly beam's top-K (falls back where drafts miss); relaxed: the best drafted beams"
    )
    draft: Literal["data", "aligned", "items"] = setting(
        "data",
        "data: the draft is trained on the data; aligned: distilled on the backbone's distributions along "
        "the backbone's own top-K beams; items: the item model (--item-backbone) drafts its top draft_beam "
        "items, whose SIDs make the tree",
    )


@register
class Speculative(NtpDecoder):
    name = "speculative"
    backbone_kinds = ("decoder-only",)
    kind_reason = (
        "its verification pass reads the prompt and the draft tree in one pass with tree attention, "
        "which only a decoder-only backbone takes"
    )
    Options = SpeculativeOptions
    description = (
        "draft model beam-searches K beams (draft=items: the item model drafts K items), the backbone verifies "
        "the draft tree in one pass and keeps exactly beam's top-K, falling back to its own steps where drafts "
        "miss; :draft_beam=N drafts N >= K beams; :accept=relaxed keeps the backbone's best drafted beams, one "
        "backbone pass, lossy"
    )

    @classmethod
    def requests(cls, options, settings):
        """The NTP backbone, and a smaller NTP model (--draft-backbone) trained on the same
        data, or (draft=aligned) distilled from the backbone, or (draft=items) the item model:
        full_rank's, in full_rank's role, which a --ckpt of an item model plays."""
        shape = dict(width=None, layers=None, heads=None)  # the draft keeps its own size preset
        backbone = ModelRequest("ntp", settings)
        if options.draft == "items":
            return {"ntp": backbone, "next_item": ModelRequest("next_item", item_model_settings(settings))}
        teacher = None
        if options.draft == "aligned":  # a data draft learns offsets of its own (the same setting)
            why = "the draft is distilled from the backbone's logits without them"
            teacher = refuse_repeat_bias("speculative:draft=aligned", backbone, why)
        draft = ModelRequest("ntp", replace(settings, backbone=settings.draft_backbone, **shape), teacher=teacher)
        return {"ntp": backbone, "draft": draft}

    @classmethod
    def check_options(cls, options, catalog, k) -> int:
        """-> the draft's width (draft_beam, 0: K)."""
        width = beam_width("speculative", "draft_beam", options.draft_beam, k, catalog)
        if options.draft == "items" and width > catalog.num_items:
            raise BenchError(
                f"speculative: draft_beam={width} is above the catalogue's {catalog.num_items} items, "
                "which an item draft drafts from; ask for at most that many"
            )
        return width

    def __init__(self, catalog, k, models, options):
        width = self.check_options(options, catalog, k)
        super().__init__(catalog, k, models, replace(options, draft_beam=width))
        self.draft_beam = self.options.draft_beam
        draft = models["next_item" if self.options.draft == "items" else "draft"]
        self.draft = draft.lm
        self.draft_repeat_bias = draft.repeat_bias

    @property
    def draft_core(self):
        return self.draft.core

    def draft_tree(self, prompt):
        if self.options.draft == "items":
            _, items = top_items(self.draft, prompt, self.draft_beam)  # [B, W]
            return item_tree(self.catalog, self.catalog.on(items.device).sids[items])
        repeats = repeats_of(self.draft_repeat_bias, prompt)
        return beam_tree(
            self.draft, self.catalog, prompt.history, prompt.mask, self.draft_beam, self.constrained, repeats
        )

    def inside_tree(self, candidates, prefixes, drafted):
        """candidates [B, K, C] extending prefixes [B, K, l] -> -inf where the extended
        prefix is none of the drafted ones of length l + 1 (drafted [B, W] codes, -1: none)."""
        level = prefixes.shape[-1]
        place = self.catalog.verifier.place_values[level]
        codes = torch.arange(candidates.shape[-1], device=candidates.device)
        extended = self.catalog.verifier.encode(prefixes).unsqueeze(-1) + codes * place  # [B, K, C]
        hit = (extended.unsqueeze(-1) == drafted[:, None, None, :]) & (drafted[:, None, None, :] >= 0)
        return candidates.masked_fill(~hit.any(-1), NEG_INF)

    def refeed(self, state, prefixes):
        """The fallback's start, as beam's steps on a shared prompt: the cache of the
        prompts (one row per user, nothing copied), prefixes [B, K, l] -> the logits after
        each prefix [B*K, V] and the SharedPrompt steps that go on from them. The K
        prefixes go in as one token tree, each a chain that sees only itself."""
        size, beams, length = prefixes.shape
        tokens = (prefixes + self.catalog.on(prefixes.device).offsets[:length]).flatten(1)  # [B, K*l], beam-major
        beam = torch.arange(beams, device=tokens.device).repeat_interleave(length)
        depth = torch.arange(length, device=tokens.device).repeat(beams)
        chains = (beam[:, None] == beam[None, :]) & (depth[:, None] >= depth[None, :])  # [K*l, K*l]
        logits, extended = self.lm.extend(state, tokens, chains.unsqueeze(0))
        own = (beam[None, :] == torch.arange(beams, device=tokens.device)[:, None]).expand(size, -1, -1)  # [B, K, K*l]
        steps = SharedPrompt(self.lm, DecodeState(extended.cache, state.mask, extended.next_position), own)
        return logits.view(size, beams, length, -1)[:, :, -1].flatten(0, 1), steps

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        catalog, k, levels, size = self.catalog, self.k, self.catalog.levels, len(prompt)
        width = self.draft_beam
        tokens, tree_mask, node_codes = self.draft_tree(prompt)
        logits, node_logits, state = self.lm.tree_forward(prompt.history, prompt.mask, tokens, tree_mask)  # 1 call

        scores = logits.new_zeros(size, 1)
        prefixes = torch.zeros(size, 1, 0, dtype=torch.long, device=logits.device)
        kept = []  # (scores, prefixes) after each level
        valid = ValidPrefixes(catalog, prefixes) if self.constrained else None
        accepted = torch.full((size,), levels, dtype=torch.long, device=logits.device)  # levels decided before a miss
        strict = self.options.accept == "strict"  # relaxed keeps only drafted prefixes: agreement 1 by rule
        drafted = checked = 0  # the backbone's kept prefixes that the draft kept too, of those checked
        repeats = self.repeats(prompt)
        for level in range(levels):
            if level == 0:
                if repeats is not None:
                    repeats.add(logits.unsqueeze(1), prefixes)
                log_probs = level_log_probs(logits, catalog, 0).unsqueeze(1)
            else:
                block = node_codes[:, (level - 1) * width : level * width]  # drafted prefixes of this length
                wanted = catalog.verifier.encode(prefixes)  # [B, K]
                match = (wanted.unsqueeze(-1) == block.unsqueeze(1)) & (block.unsqueeze(1) >= 0)
                needed, hit = ~torch.isinf(scores), match.any(-1)  # [B, K] each
                if strict:
                    exact = (accepted == levels).unsqueeze(-1)  # the replay is the backbone's own beam up to here
                    drafted = drafted + (needed & hit & exact).sum()  # tensors: no sync per level
                    checked = checked + (needed & exact).sum()
                missing = (needed & ~hit).any(-1) & (accepted == levels)
                accepted[missing] = level
                node = (level - 1) * width + match.float().argmax(-1)  # [B, K]
                picked = node_logits.gather(1, node.unsqueeze(-1).expand(-1, -1, node_logits.shape[-1]))
                if repeats is not None:
                    repeats.add(picked, prefixes)
                log_probs = level_log_probs(picked, catalog, level)
            candidates = scores.unsqueeze(-1) + log_probs
            if valid:
                candidates = valid.mask(candidates, level)
            if self.options.accept == "relaxed" and level + 1 < levels:
                candidates = self.inside_tree(candidates, prefixes, node_codes[:, level * width : (level + 1) * width])
            scores, parent, code = prune(candidates, k)
            prefixes = extend_prefixes(prefixes, parent, code)
            if valid and level + 1 < levels:
                valid.advance(parent, code, level)
            kept.append((scores, prefixes))

        fallback = (accepted < levels).nonzero().flatten()
        if len(fallback):
            start = int(accepted[fallback].min())  # first level to recompute
            base_scores, base_prefixes = kept[start - 1]
            state = self.lm.select(self.lm.crop(state, prompt.history.shape[1]), fallback)
            step_logits, steps = self.refeed(state, base_prefixes[fallback])  # the kept prefixes, one call
            redo_prefixes, redo_scores = continue_beam(
                catalog,
                step_logits,
                steps,
                base_scores[fallback],
                base_prefixes[fallback],
                k,
                self.constrained,
                repeats=None if repeats is None else repeats.rows(fallback),
            )
            prefixes, scores = prefixes.clone(), scores.clone()
            prefixes[fallback], scores[fallback] = redo_prefixes, redo_scores
        stats = {"accepted_levels": float(accepted.sum()), "fallback_requests": float(len(fallback))}
        if strict:
            stats |= {"backbone_beams_drafted": float(drafted), "backbone_beams_checked": float(checked)}
        return finish(prefixes, scores, stats)


def beam_tree(lm, catalog, history, mask, width: int, constrained: bool, repeats=None):
    """The prefixes a beam search of `width` beams keeps at levels 1..L-1, as a token tree
    (with `repeats`, the model's repeat offsets for these histories).

    -> node tokens [B, N], tree mask [B, N, N] (a node sees itself and its ancestors),
    node prefix codes [B, N] (-1 where the search had no candidate); N = width * (L - 1),
    nodes in blocks of `width`, one block per depth. The draft's tree in `speculative`,
    and the teacher's tree an aligned draft is distilled along."""
    trail = []
    beam_search(lm, catalog, history, mask, width, constrained, trail, repeats)
    size, levels, device = history.shape[0], catalog.levels, history.device
    tokens, codes, masks = [], [], []
    eye = torch.eye(width, dtype=torch.bool, device=device).expand(size, width, width)
    for depth in range(1, levels):
        prefixes, scores, parent = trail[depth - 1]  # [B, W, depth], [B, W], [B, W]
        tokens.append(prefixes[:, :, -1] + catalog.offsets[depth - 1])
        codes.append(catalog.verifier.encode(prefixes).masked_fill(torch.isinf(scores), -1))
        if depth == 1:
            masks.append(eye)
        else:
            # a node sees itself and what its parent (one depth up, same block layout) sees
            above = masks[-1].gather(1, parent.unsqueeze(-1).expand(-1, -1, masks[-1].shape[-1]))
            masks.append(torch.cat([above, eye], dim=-1))
    nodes = width * (levels - 1)
    tree_mask = torch.zeros(size, nodes, nodes, dtype=torch.bool, device=device)
    for depth, block in enumerate(masks):
        tree_mask[:, depth * width : (depth + 1) * width, : block.shape[-1]] = block
    return torch.cat(tokens, 1), tree_mask, torch.cat(codes, 1)


def item_tree(catalog, sids):
    """Drafted items' SIDs [B, W, L] -> the prefixes they hold at levels 1..L-1 as a token
    tree laid out as beam_tree's: node tokens [B, N], tree mask [B, N, N], node prefix codes
    [B, N] (-1 where the block has no more distinct prefixes); N = W * (L - 1), one block of
    W nodes per depth, each distinct prefix once."""
    size, width, levels = sids.shape
    encode = catalog.verifier.encode
    codes, founders = [], []  # per depth [B, W]: node prefix codes, the drafted item each node was read from
    for depth in range(1, levels):
        prefixes, order = encode(sids[:, :, :depth]).sort(dim=-1, stable=True)  # [B, W] each
        first = torch.ones_like(prefixes, dtype=torch.bool)
        first[:, 1:] = prefixes[:, 1:] != prefixes[:, :-1]
        slot = (first.cumsum(-1) - 1).masked_fill(~first, width)  # repeats go to a spare column, dropped
        node_codes = prefixes.new_full((size, width + 1), -1).scatter_(1, slot, prefixes)[:, :width]
        founder = order.new_zeros(size, width + 1).scatter_(1, slot, order)[:, :width]
        codes.append(node_codes)
        founders.append(founder)
    codes, founders = torch.cat(codes, 1), torch.cat(founders, 1)  # [B, N]
    node_sids = sids.gather(1, founders.unsqueeze(-1).expand(-1, -1, levels))  # [B, N, L]
    node_depth = torch.arange(1, levels, device=sids.device).repeat_interleave(width)  # [N]
    tokens = node_sids.gather(2, (node_depth - 1).expand(size, -1).unsqueeze(-1)).squeeze(-1)
    tokens = tokens + catalog.on(sids.device).offsets[:-1].repeat_interleave(width)  # no host list in a decode
    # node j sees node i where i's prefix is the start of j's, of i's length: its ancestors and itself
    starts = torch.stack([encode(node_sids[:, :, :length]) for length in range(1, levels)], -1)  # [B, N, L-1]
    prefix_of = starts[:, :, node_depth - 1] == codes.unsqueeze(1)  # [B, N, N]
    seen = prefix_of & (node_depth[None, :] <= node_depth[:, None])
    real = codes >= 0
    seen &= real.unsqueeze(1) & real.unsqueeze(2)
    return tokens, seen | torch.eye(len(node_depth), dtype=torch.bool, device=sids.device), codes
