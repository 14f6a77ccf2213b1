"""Full ranking with an item-embedding model (SASRec): one pass over the history's item
ids, then every item scored at once. What a user would pick instead of generative
retrieval; reported beside the generative decoders in quality and latency."""

from __future__ import annotations

import torch

from decoders.base import Decoder, DecodeResult, ModelRequest, item_model_settings, register
from models.backbones import ITEM

SCORES_PER_BLOCK = 2**24  # scores held at once per batch (64 MiB in fp32)


@register
class FullRank(Decoder):
    name = "full_rank"
    backbone_kinds = (ITEM,)
    kind_reason = "it scores item ids against item embeddings; SID backbones generate codes instead"
    description = "SASRec-style item model: one pass, all items scored, top-K (non-generative reference)"

    @classmethod
    def requests(cls, options, settings):
        return {"next_item": ModelRequest("next_item", item_model_settings(settings))}

    def __init__(self, catalog, k, models, options):
        super().__init__(catalog, k, models, options)
        self.lm = models["next_item"].lm

    def bare_forward(self, prompt):
        self.lm.bare_forward(prompt.items, prompt.items_mask)

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        scores, items = top_items(self.lm, prompt, self.k)
        return DecodeResult(sids=self.catalog.on(items.device).sids[items], scores=scores)


def top_items(lm, prompt, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An item model's top k items for each user, best first: their log-probabilities and
    indices, each [B, k]. Items are scored a block at a time, keeping the running top k and
    log-normaliser, so a batch never holds [B, N] scores at once (10^7 items x 256 users
    would be 10 GB)."""
    user = lm.hidden(prompt.items, prompt.items_mask)[:, -1]  # [B, d]
    table = lm.item_table()  # [N, d]
    block = max(k, SCORES_PER_BLOCK // len(user))
    best_scores, best_items, normaliser = [], [], []
    for start in range(0, len(table), block):
        scores = (user @ table[start : start + block].T).float()  # [B, block]
        scores = lm.offset_taken(scores, prompt.items, start)  # the repeat bias, if the model has one
        top = scores.topk(min(k, scores.shape[-1]), dim=-1)
        best_scores.append(top.values)
        best_items.append(top.indices + start)
        normaliser.append(scores.logsumexp(-1, keepdim=True))
    scores, order = torch.cat(best_scores, -1).topk(min(k, len(table)), dim=-1)  # [B, k]
    items = torch.cat(best_items, -1).gather(-1, order)
    return scores - torch.cat(normaliser, -1).logsumexp(-1, keepdim=True), items
