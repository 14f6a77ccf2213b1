"""The most popular training items for every user: the floor any recommender must beat."""

from __future__ import annotations

import torch

from decoders.base import Decoder, DecodeResult, register


@register
class Popularity(Decoder):
    name = "popularity"
    needs = ("popularity",)
    backbone_kinds = ()
    description = "the K most frequent items of the training split; no model"

    def __init__(self, catalog, k, models):
        super().__init__(catalog, k, models)
        counts = torch.as_tensor(models["popularity"], dtype=torch.float)
        top = counts.topk(min(k, catalog.num_items))
        self.sids, self.scores = catalog.sids[top.indices], torch.log(top.values / counts.sum())

    def decode(self, batch) -> DecodeResult:
        size = len(batch)
        return DecodeResult(
            sids=self.sids.to(batch.history.device).expand(size, -1, -1),
            scores=self.scores.to(batch.history.device).expand(size, -1),
        )
