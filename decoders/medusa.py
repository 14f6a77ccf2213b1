"""Medusa-style decoding on the NTP backbone: extra heads guess every level at once,
one more backbone pass checks all guesses through a tree attention mask.

Call 1 (prefill): the backbone's own distribution of level 1 and the Medusa heads'
guesses of levels 2..L from the last history token's hidden state. The candidate tree
is the product of the top `tree` codes per level (level 1 from the backbone, the rest
from the heads); its nodes are all prefixes of length 1..L-1. Call 2: those nodes in
one pass, each seeing the prompt and its ancestors, which gives the backbone's
distribution after every node. The result is beam search run on the backbone's own
scores but restricted to the tree: with heads that always contain beam search's
choices it returns exactly what `beam` returns. A last-level width of 0 scores every
code of the last level (the verification pass gives that distribution for free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from bench.errors import BenchError
from bench.settings import setting
from decoders.base import (
    NEG_INF,
    Decoder,
    DecodeResult,
    ModelRequest,
    ValidPrefixes,
    extend_prefixes,
    finish,
    level_log_probs,
    prune,
    refuse_repeat_bias,
    register,
)
from models.backbones import DECODER_ONLY


def parse_tree(spec: str, k: int, codebook_sizes: tuple[int, ...]) -> list[int]:
    """'20x3x3x0' -> [20, 3, 3, 0]; default: K at level 1, 3 in between, every code last."""
    levels = len(codebook_sizes)
    if not spec:
        return [min(k, codebook_sizes[0])] + [min(3, c) for c in codebook_sizes[1:-1]] + [0]
    try:
        widths = [int(w) for w in spec.split("x")]
    except ValueError:
        raise BenchError(
            f"medusa: tree '{spec}' must be {levels} numbers joined by x, e.g. "
            f"{'x'.join(['20'] + ['3'] * (levels - 2) + ['0'])}"
        ) from None
    if len(widths) != levels:
        raise BenchError(f"medusa: tree '{spec}' has {len(widths)} widths; the SIDs have {levels} levels")
    for level, (width, size) in enumerate(zip(widths, codebook_sizes)):
        last = level == levels - 1
        if width > size or width < (0 if last else 1):
            low = 0 if last else 1
            raise BenchError(f"medusa: tree width {width} at level {level + 1} must be between {low} and {size}")
    return widths


def product_tree(widths: list[int], device) -> tuple[torch.Tensor, list[int]]:
    """The full product tree of depth len(widths) over per-level choices, nodes listed
    depth by depth in row-major order -> (ancestor-or-self mask [N, N], first node index
    of each depth)."""
    counts = [math.prod(widths[:depth]) for depth in range(1, len(widths) + 1)]
    starts = [sum(counts[:d]) for d in range(len(counts))]
    total = sum(counts)
    mask = torch.eye(total, dtype=torch.bool, device=device)
    for depth in range(1, len(counts)):
        child = torch.arange(counts[depth], device=device)
        parent = child // widths[depth]
        # a node sees its parent and everything its parent sees
        mask[starts[depth] + child] |= mask[starts[depth - 1] + parent]
    return mask, starts


@dataclass
class MedusaOptions:
    tree: str = setting("", "codes per level, e.g. 20x3x3x0 (level 1 from the backbone, the rest from the heads)")
    constrained: bool = setting(False, "mask prefixes that belong to no real item")
    mode: Literal["frozen", "joint"] | None = setting(None, "heads on a frozen backbone (Medusa-1) or joint (Medusa-2)")


@register
class Medusa(Decoder):
    name = "medusa"
    Options = MedusaOptions
    backbone_kinds = (DECODER_ONLY,)
    kind_reason = (
        "its verification pass feeds a token tree with tree attention and its own position ids, "
        "which only a decoder-only backbone takes"
    )
    description = (
        "Medusa heads guess levels 2..L, one tree-masked backbone pass scores the tree; "
        ":tree=20x3x3x0 codes per level, :mode=frozen|joint (Medusa-1/-2)"
    )

    @classmethod
    def requests(cls, options, settings):
        """Heads trained on a trained NTP model of the same settings."""
        mode = options.mode or settings.medusa_mode
        why = "its heads and tree check read the logits without it"
        backbone = refuse_repeat_bias("medusa", ModelRequest("ntp", settings), why)
        return {"medusa": ModelRequest("medusa", replace(settings, medusa_mode=mode), backbone)}

    @classmethod
    def check_options(cls, options, catalog, k):
        parse_tree(options.tree, k, catalog.codebook_sizes)

    def __init__(self, catalog, k, models, options):
        widths = parse_tree(options.tree, k, catalog.codebook_sizes)
        model = models["medusa"]
        trained = model.settings.medusa_mode
        if options.mode is not None and trained != options.mode:
            raise BenchError(f"medusa: the model was trained with mode '{trained}', not '{options.mode}'")
        super().__init__(catalog, k, models, replace(options, tree="x".join(map(str, widths)), mode=trained))
        self.lm, self.heads = model.lm, model.medusa
        self.widths, self.constrained = widths, options.constrained
        self._tree = None

    def tree(self, device):
        if self._tree is None:
            self._tree = product_tree(self.widths[:-1], device)
        return self._tree

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        catalog, levels, size = self.catalog, self.catalog.levels, len(prompt)
        logits, state = self.lm.prefill(prompt.history, prompt.mask)  # call 1
        guesses = [level_log_probs(logits, catalog, 0)] + [g.float() for g in self.heads(state.last_hidden)]
        top_codes, allowed, rank = [], [], []
        for level, guess in enumerate(guesses):
            width = self.widths[level] or catalog.codebook_sizes[level]
            codes = guess.topk(width, dim=-1).indices  # [B, width]
            top_codes.append(codes)
            rank.append(
                torch.full_like(guess, -1, dtype=torch.long).scatter(
                    1, codes, torch.arange(width, device=codes.device).expand(size, -1)
                )
            )
            allowed.append(rank[-1] >= 0)
        tree_mask, starts = self.tree(logits.device)
        # node tokens, depth by depth: the last code of each prefix in row-major order
        tokens = []
        for depth in range(1, levels):
            repeat = math.prod(self.widths[: depth - 1])
            tokens.append(top_codes[depth - 1].repeat(1, repeat) + catalog.offsets[depth - 1])
        node_logits, _ = self.lm.extend(state, torch.cat(tokens, dim=1), tree_mask)  # call 2: [B, N, V]

        scores = logits.new_zeros(size, 1)
        prefixes = torch.zeros(size, 1, 0, dtype=torch.long, device=logits.device)
        valid = ValidPrefixes(catalog, prefixes) if self.constrained else None
        for level in range(levels):
            if level == 0:
                log_probs = guesses[0].unsqueeze(1)  # [B, 1, C]
            else:
                node = torch.full_like(scores, starts[level - 1], dtype=torch.long)
                for j in range(level):
                    stride = math.prod(self.widths[j + 1 : level])
                    node += rank[j].gather(1, prefixes[:, :, j]).clamp(min=0) * stride
                picked = node_logits.gather(1, node.unsqueeze(-1).expand(-1, -1, node_logits.shape[-1]))
                log_probs = level_log_probs(picked, catalog, level)  # [B, beams, C]
            candidates = (scores.unsqueeze(-1) + log_probs).masked_fill(~allowed[level].unsqueeze(1), NEG_INF)
            if valid:
                candidates = valid.mask(candidates, level)
            scores, parent, code = prune(candidates, self.k)
            prefixes = extend_prefixes(prefixes, parent, code)
            if valid and level + 1 < levels:
                valid.advance(parent, code, level)
        return finish(prefixes, scores, {"tree_tokens": float(size * tree_mask.shape[0])})
