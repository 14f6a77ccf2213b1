"""Full ranking with an item-embedding model (SASRec): one pass over the history's item
ids, then every item scored at once. What a user would pick instead of generative
retrieval; reported beside the generative decoders in quality and latency."""

from __future__ import annotations

from dataclasses import replace

import torch

from decoders.base import Decoder, DecodeResult, ModelRequest, register
from models.backbones import ITEM, backbone_kind


@register
class FullRank(Decoder):
    name = "full_rank"
    backbone_kinds = (ITEM,)
    kind_reason = "it scores item ids against item embeddings; SID backbones generate codes instead"
    description = "SASRec-style item model: one pass, all items scored, top-K (non-generative reference)"

    @classmethod
    def requests(cls, options, settings):
        """The item model: --backbone when it is one, else --item-backbone."""
        if backbone_kind(settings.backbone) == ITEM:
            return {"next_item": ModelRequest("next_item", settings)}
        item_model = replace(settings, backbone=settings.item_backbone, width=None, layers=None, heads=None)
        return {"next_item": ModelRequest("next_item", item_model)}

    def __init__(self, catalog, k, models, options):
        super().__init__(catalog, k, models, options)
        self.lm = models["next_item"].lm

    def bare_forward(self, prompt):
        self.lm.bare_forward(prompt.items, prompt.items_mask)

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        scores = torch.log_softmax(self.lm.item_scores(prompt.items, prompt.items_mask, last_only=True).float(), -1)
        top = scores.topk(min(self.k, scores.shape[-1]), dim=-1)  # [B, K]
        return DecodeResult(sids=self.catalog.on(top.indices.device).sids[top.indices], scores=top.values)
