"""The most popular training items for every user: the floor any recommender must beat."""

from __future__ import annotations

import torch

from decoders.base import Decoder, DecodeResult, ModelRequest, register


@register
class Popularity(Decoder):
    name = "popularity"
    backbone_kinds = ()
    description = "the K most frequent items of the training split; no model"

    @classmethod
    def requests(cls, options, settings):
        return {"popularity": ModelRequest("popularity", settings)}

    def __init__(self, catalog, k, models, options):
        super().__init__(catalog, k, models, options)
        counts = torch.as_tensor(models["popularity"], dtype=torch.float)
        top = counts.topk(min(k, catalog.num_items))
        self.sids, self.scores = catalog.sids[top.indices], torch.log(top.values / counts.sum())

    def decode(self, prompt) -> DecodeResult:
        size = len(prompt)
        if self.sids.device != prompt.history.device:  # once: moved where the prompts live
            self.sids, self.scores = self.sids.to(prompt.history.device), self.scores.to(prompt.history.device)
        return DecodeResult(sids=self.sids.expand(size, -1, -1), scores=self.scores.expand(size, -1))
