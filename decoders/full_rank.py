"""Full ranking with an item-embedding model (SASRec): one pass over the history's item
ids, then every item scored at once. What a user would pick instead of generative
retrieval; reported beside the generative decoders in quality and latency."""

from __future__ import annotations

import torch

from decoders.base import Decoder, DecodeResult, register


@register
class FullRank(Decoder):
    name = "full_rank"
    needs = ("next_item",)
    backbone_kinds = ("item",)
    kind_reason = "it scores item ids against item embeddings; SID backbones generate codes instead"
    description = "SASRec-style item model: one pass, all items scored, top-K (non-generative reference)"

    def __init__(self, catalog, k, models):
        super().__init__(catalog, k, models)
        self.lm = models["next_item"].lm

    def bare_forward(self, batch):
        self.lm.bare_forward(batch.items, batch.items_mask)

    @torch.no_grad()
    def decode(self, batch) -> DecodeResult:
        scores = torch.log_softmax(self.lm.item_scores(batch.items, batch.items_mask, last_only=True).float(), -1)
        top = scores.topk(min(self.k, scores.shape[-1]), dim=-1)  # [B, K]
        return DecodeResult(sids=self.catalog.sids.to(top.indices.device)[top.indices], scores=top.values)
