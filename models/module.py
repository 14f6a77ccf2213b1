"""The LightningModule shared by every objective, and checkpoint loading with checks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from bench.data.catalog import Catalog
from bench.errors import BenchError
from bench.metrics import target_ranks
from models import objectives
from models.backbones import DECODER_ONLY, ITEM, backbone_kind, build_backbone
from models.heads import MedusaHeads, NezhaDraftHead

VALIDATION_DECODER = {"ntp": "beam", "nezha": "nezha", "medusa": "medusa", "next_item": "full_rank"}


class SidRecommender(L.LightningModule):
    """A backbone over SID tokens, plus the NEZHA draft head (objective 'nezha') or the
    Medusa heads (objective 'medusa').

    Validation decodes the valid split with the objective's decoder (VALIDATION_DECODER)
    and logs val/recall@10, the quantity early stopping and checkpointing watch."""

    def __init__(
        self,
        objective: str,
        backbone: str,
        dataset: str,
        catalog_fingerprint: str,
        codebook_sizes: list[int],
        max_history: int = 20,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        dropout: float = 0.1,
        transition: str = "rnn",
        placeholders: bool = True,
        medusa_mode: str = "frozen",
        val_k: int = 10,
        num_items: int = 0,
        catalog: Catalog | None = None,
    ):
        super().__init__()
        if objective not in objectives.OBJECTIVES:
            raise BenchError(f"unknown objective '{objective}'; choose one of {', '.join(objectives.OBJECTIVES)}")
        self.save_hyperparameters(ignore=["catalog"])
        check_pairing(objective, backbone)
        levels = len(codebook_sizes)
        vocab_size = 1 + sum(codebook_sizes) + levels
        positions = max_history + 2 if objective == "next_item" else (max_history + 2) * levels
        self.lm = build_backbone(backbone, vocab_size, positions, dropout=dropout, num_items=num_items)
        self.head = (
            NezhaDraftHead(self.lm.hidden_size, tuple(codebook_sizes), transition) if objective == "nezha" else None
        )
        self.medusa = MedusaHeads(self.lm.hidden_size, tuple(codebook_sizes)) if objective == "medusa" else None
        if objective == "medusa" and medusa_mode not in objectives.MEDUSA_MODES:
            raise BenchError(f"unknown Medusa mode '{medusa_mode}'; choose one of {', '.join(objectives.MEDUSA_MODES)}")
        if objective == "medusa" and medusa_mode == "frozen":
            self.lm.requires_grad_(False)
        self.catalog = catalog
        self.val_recall = MeanMetric()
        self._val_decoder = None

    @classmethod
    def for_catalog(cls, objective: str, backbone: str, catalog: Catalog, **settings) -> "SidRecommender":
        return cls(
            objective=objective,
            backbone=backbone,
            dataset=catalog.name,
            catalog_fingerprint=catalog.fingerprint,
            codebook_sizes=list(catalog.codebook_sizes),
            num_items=catalog.num_items,
            catalog=catalog,
            **settings,
        )

    def collate(self, windows: list[dict]) -> dict:
        return objectives.collate(
            self.hparams.objective, [w["items"] for w in windows], self.catalog, self.lm.kind, self.hparams.placeholders
        )

    def training_step(self, batch, batch_idx):
        loss = objectives.loss(self.hparams.objective, self, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=next(iter(batch.values())).shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        if self._val_decoder is None:
            from decoders import build_decoder

            spec = VALIDATION_DECODER[self.hparams.objective]
            if self.hparams.objective == "medusa":
                spec += f":mode={self.hparams.medusa_mode}"
            self._val_decoder = build_decoder(spec, self.catalog, self.hparams.val_k, {self.hparams.objective: self})
        result = self._val_decoder.decode(batch)
        ranks = target_ranks(self.catalog.items_of(result.sids), batch.targets)
        self.val_recall.update((ranks > 0).float())
        self.log("val/recall@10", self.val_recall, prog_bar=True, batch_size=len(batch))

    def configure_optimizers(self):
        trained = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def check_pairing(objective: str, backbone: str) -> None:
    """Which objectives a backbone can be trained with, as one clear error."""
    kind = backbone_kind(backbone)
    if (objective == "next_item") != (kind == ITEM):
        if kind == ITEM:
            raise BenchError(
                f"{backbone} is an item-embedding model (SASRec); it trains only with objective "
                "next_item and decodes with full_rank"
            )
        raise BenchError(f"objective next_item needs an item-embedding backbone (sasrec-*), not {backbone}")
    if objective == "medusa" and kind != DECODER_ONLY:
        raise BenchError(
            f"Medusa heads need a decoder-only backbone (their tree check uses tree attention); {backbone} is {kind}"
        )


def load_checkpoint(path: str | Path, catalog: Catalog) -> SidRecommender:
    """Load a checkpoint written by `bench train`, refusing one made for another catalogue."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist; train one with: python -m bench train")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file gets the same one-line answer
        raise BenchError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}); pass a .ckpt written by python -m bench train"
        ) from None
    settings = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(settings, dict) or "objective" not in settings or "catalog_fingerprint" not in settings:
        raise BenchError(
            f"{path} is not a checkpoint of this suite (no objective or catalogue recorded); "
            "pass a .ckpt written by python -m bench train"
        )
    if settings["catalog_fingerprint"] != catalog.fingerprint:
        raise BenchError(
            f"checkpoint {path} was trained on dataset '{settings['dataset']}' (catalogue "
            f"{settings['catalog_fingerprint']}), not on '{catalog.name}' ({catalog.fingerprint}); "
            f"train one with: python -m bench train --dataset {catalog.name}"
        )
    model = SidRecommender(**settings, catalog=catalog)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise BenchError(f"checkpoint {path} does not match its recorded model ({str(exc).splitlines()[0]})") from None
    return model.eval()
