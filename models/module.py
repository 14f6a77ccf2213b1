"""The LightningModule shared by every objective, and checkpoint loading with checks."""

from __future__ import annotations

import functools
import inspect
import math
import pickle
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from bench.data.catalog import Catalog, level_starts
from bench.errors import BenchError
from bench.metrics import target_ranks
from bench.settings import DataSettings, ModelSettings, from_dict
from models import objectives
from models.backbones import DECODER_ONLY, ITEM, SHAPED_LIKE, backbone_kind, build_backbone, generic_size
from models.heads import MedusaHeads, NezhaDraftHead
from models.repeat import SidRepeatBias

COMPILE_BACKEND = "inductor"  # torch.compile's; tests use "eager" (tracing without code generation)
VALIDATION_DECODER = {"ntp": "beam", "nezha": "nezha", "medusa": "medusa", "next_item": "full_rank"}


class SidRecommender(L.LightningModule):
    """A backbone over SID tokens, plus the NEZHA draft head (objective 'nezha') or the
    Medusa heads (objective 'medusa').

    An NTP model given a teacher (distil_from) trains as an aligned draft (objectives'
    aligned_loss); the teacher is not part of the module, so checkpoints hold the draft only.

    Its hyperparameters are plain data (the objective, the full ModelSettings and
    DataSettings as dicts, the catalogue's fingerprint), so checkpoints load with
    torch.load(weights_only=True). Validation decodes the valid split with the
    objective's decoder (VALIDATION_DECODER) and logs val/recall@10, the quantity early
    stopping and checkpointing watch."""

    def __init__(
        self,
        objective: str,
        settings: dict,
        data: dict,
        dataset: str,
        catalog_fingerprint: str,
        codebook_sizes: list[int],
        num_items: int,
        val_k: int = 10,
        catalog: Catalog | None = None,
    ):
        super().__init__()
        if objective not in objectives.OBJECTIVES:
            raise BenchError(f"unknown objective '{objective}'; choose one of {', '.join(objectives.OBJECTIVES)}")
        self.save_hyperparameters(ignore=["catalog"])
        self.objective = objective
        self.settings = from_dict(ModelSettings, settings, "model settings")
        self.data_settings = from_dict(DataSettings, data, "data settings")
        check_pairing(objective, self.settings)
        levels = len(codebook_sizes)
        vocab_size = 1 + sum(codebook_sizes) + levels
        max_history = self.settings.max_history
        positions = max_history + 2 if objective == "next_item" else (max_history + 2) * levels
        self.lm = build_backbone(
            self.settings.backbone,
            vocab_size,
            positions,
            dropout=self.settings.dropout,
            num_items=num_items,
            attention=self.settings.attention,
            width=self.settings.width,
            layers=self.settings.layers,
            heads=self.settings.heads,
            attention_dropout=self.settings.attention_dropout,
            causal_encoder=self.settings.encoder == "causal",
            separate_item_scores=objective == "next_item" and self.settings.item_scores == "separate",
            repeat_bias=objective == "next_item" and self.settings.repeat_bias,
        )
        hidden, sizes = self.lm.hidden_size, tuple(codebook_sizes)
        self.head = NezhaDraftHead(hidden, sizes, self.settings.transition) if objective == "nezha" else None
        self.medusa = MedusaHeads(hidden, sizes) if objective == "medusa" else None
        self.repeat_bias = None  # the NTP model's offsets for what the history holds (models/repeat.py)
        if objective == "ntp" and self.settings.repeat_bias:
            self.repeat_bias = SidRepeatBias(level_starts(codebook_sizes))
        if objective == "medusa" and self.settings.medusa_mode == "frozen":
            self.lm.requires_grad_(False)
        self.catalog = catalog
        self.val_recall = MeanMetric()
        self._val_decoder = None
        self.compiled = False  # by compile_modules (bench run --compile)
        # epochs and wall seconds of training up to this checkpoint (see on_save_checkpoint)
        self.training_record: dict | None = None
        # the training record of the model whose weights this one started from (init_from)
        self.started_from: dict | None = None
        # the training record of the model it learned from (distil_from): its time is part of this one's
        self.taught_by: dict | None = None

    @classmethod
    def for_catalog(
        cls, objective: str, settings: ModelSettings, catalog: Catalog, data: DataSettings | None = None
    ) -> "SidRecommender":
        return cls(
            objective=objective,
            settings=asdict(settings),
            data=asdict(data or DataSettings(dataset=catalog.name)),
            dataset=catalog.name,
            catalog_fingerprint=catalog.fingerprint,
            codebook_sizes=list(catalog.codebook_sizes),
            num_items=catalog.num_items,
            catalog=catalog,
        )

    def compile_modules(self) -> None:
        """torch.compile in place: the backbone's core (what every decoder calls and the
        floor times) and every leaf module of the heads; dynamic shapes, so batches of
        other history lengths reuse the compiled code instead of recompiling. NEZHA's
        beam search reads its head's classifiers and tanh cells as tensors laid out for
        inference (BeamLevel), eager; a GRU cell is still called as its compiled module."""
        self.lm.core.compile(dynamic=True, backend=COMPILE_BACKEND)
        for head in (self.head, self.medusa):
            for module in head.modules() if head is not None else ():
                if not list(module.children()):
                    module.compile(dynamic=True, backend=COMPILE_BACKEND)
        self.compiled = True

    teacher: SidRecommender | None = None
    item_teacher_targets: objectives.ItemTeacherTargets | None = None  # with an item model as the teacher

    def distil_from(self, teacher: SidRecommender) -> None:
        """Train as a draft aligned to `teacher` (a trained NTP model of the same catalogue),
        or (item_teacher > 0) on soft targets from `teacher`, a trained item model."""
        if self.objective != "ntp" or self.lm.kind != DECODER_ONLY or teacher.objective not in ("ntp", "next_item"):
            raise BenchError(
                "only a decoder-only NTP model is distilled: from an NTP model (an aligned draft) or from the "
                "item model (--item-teacher)"
            )
        if (teacher.objective == "next_item") != (self.settings.item_teacher > 0):
            raise BenchError(
                f"item_teacher={self.settings.item_teacher} does not go with a {teacher.objective} teacher: the "
                "item model (next_item) teaches when item_teacher > 0, an NTP model (an aligned draft) when it is 0"
            )
        if teacher.settings.max_history < self.settings.max_history:
            raise BenchError(
                f"the teacher reads histories of up to {teacher.settings.max_history} items, this model "
                f"{self.settings.max_history}; give it a teacher trained with --max-history {self.settings.max_history}"
            )
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))  # not a submodule: not saved
        self.taught_by = {"objective": teacher.objective, **(teacher.training_record or {})}
        self.teacher_cache: dict[tuple, tuple] = {}  # history -> the teacher's tree and targets (objectives)
        if teacher.objective == "next_item":
            self.item_teacher_targets = objectives.ItemTeacherTargets(self.catalog)

    @property
    def aligned(self) -> bool:
        """An aligned draft: distilled along an NTP model's beams (not from the item model)."""
        return self.teacher is not None and self.teacher.objective == "ntp"

    def on_fit_start(self):
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.item_teacher_targets is not None:
            self.item_teacher_targets.to(self.device)

    def collate(self, windows: list[dict]) -> dict:
        return objectives.collate(
            self.objective,
            windows,
            self.catalog,
            self.lm.kind,
            self.settings.placeholders,
            aligned=self.aligned,
            causal_encoder=self.settings.encoder == "causal",
            item_ids=self.item_teacher_targets is not None,
            seen=self.settings.seen_unlikelihood > 0,  # an aligned draft collates its own layout whatever it says
        )

    def training_step(self, batch, batch_idx):
        loss = objectives.loss(self.objective, self, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=next(iter(batch.values())).shape[0])
        return loss

    def on_train_start(self):
        self._fit_clock = time.perf_counter() - (self.training_record or {}).get("seconds", 0.0)  # a resume counts on

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every checkpoint says how long its weights took to train: the epochs completed
        and the wall seconds (validation included), on which machine, and the training
        records of the model it started from and of the model it learned from (whose
        times are part of its own)."""
        from bench.records import device_name

        checkpoint["training"] = {
            "epochs": self.current_epoch + 1,
            "seconds": round(time.perf_counter() - self._fit_clock, 1),
            "device": device_name(self.device),
            **({"started_from": self.started_from} if self.started_from else {}),
            **({"taught_by": self.taught_by} if self.taught_by else {}),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.training_record = dict(checkpoint.get("training") or {})
        self.started_from = self.training_record.get("started_from", self.started_from)
        self.taught_by = self.training_record.get("taught_by", self.taught_by)

    def on_validation_epoch_start(self):
        """The NEZHA head's inference layout is rebuilt from the trained weights: the head
        notices steps that move the weights' version counters, which a fused AdamW does not."""
        if self.head is not None:
            self.head.forget_beam_levels()

    def validation_step(self, batch, batch_idx):
        if self._val_decoder is None:
            from decoders import build_decoder

            spec = VALIDATION_DECODER[self.objective]
            self._val_decoder = build_decoder(spec, self.catalog, self.hparams.val_k, {self.objective: self})
        result = self._val_decoder.decode(batch.prompt)
        ranks = target_ranks(self.catalog.items_of(result.sids), batch.targets)
        # per-user hits: under DDP the metric sums hits and users over the processes, exact
        # as long as no user is validated twice (bench.train.validation_loader: no padding)
        self.val_recall.update((ranks > 0).float())
        self.log("val/recall@10", self.val_recall, prog_bar=True, batch_size=len(batch))

    def configure_optimizers(self):
        trained = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.settings.lr,
        )
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else 0
        factor = functools.partial(
            lr_factor, warmup=self.settings.warmup_steps, total=total, cosine=self.settings.lr_schedule == "cosine"
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(step: int, warmup: int, total: int, cosine: bool) -> float:
    """The learning rate's share of its peak at an optimizer step: linear warm-up over
    `warmup` steps, then constant, or a cosine down to 0 at step `total` (the run's last)."""
    warmup = max(1, warmup)
    if step < warmup:
        return (step + 1) / warmup
    if not cosine or total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def check_pairing(objective: str, settings: ModelSettings) -> None:
    """Which objectives a backbone can be trained with, as one clear error."""
    backbone = settings.backbone
    kind = backbone_kind(backbone)
    if backbone not in SHAPED_LIKE:  # --width, --layers, --heads the backbone cannot take, before any training
        generic_size(backbone, settings.width, settings.layers, settings.heads)
    if (objective == "next_item") != (kind == ITEM):
        if kind == ITEM:
            raise BenchError(
                f"{backbone} is an item-embedding model (SASRec); it trains only with objective "
                "next_item and decodes with full_rank"
            )
        raise BenchError(f"objective next_item needs an item-embedding backbone (sasrec-*), not {backbone}")
    if objective == "nezha" and settings.history_loss and kind != DECODER_ONLY:
        raise BenchError(
            f"--history-loss trains the history tokens of NEZHA's one-pass layout, which only a decoder-only "
            f"backbone has; {backbone} is {kind}"
        )
    own = (
        ("--item-teacher", settings.item_teacher),
        ("--repeat-bias", settings.repeat_bias),
        ("--seen-unlikelihood", settings.seen_unlikelihood),
    )
    for name, value in own:
        if objective == "ntp" and value and kind != DECODER_ONLY:
            raise BenchError(
                f"{name} trains on the NTP layout of a decoder-only backbone (one causal pass over a window); "
                f"{backbone} is {kind}"
            )
    if objective == "ntp" and settings.seen_unlikelihood and settings.repeat_bias:
        raise BenchError(
            "--seen-unlikelihood scores seen items' SIDs without the repeat bias's offsets: drop one of "
            "--seen-unlikelihood and --repeat-bias"
        )
    if objective == "medusa" and kind != DECODER_ONLY:
        raise BenchError(
            f"Medusa heads need a decoder-only backbone (their tree check uses tree attention); {backbone} is {kind}"
        )


def load_checkpoint(path: str | Path, catalog: Catalog) -> SidRecommender:
    """Load a checkpoint written by `bench train`, refusing one made for another catalogue.

    weights_only: a checkpoint is data (tensors and plain types); one that asks the
    unpickler for anything else (code) is refused, not run."""
    path = Path(path)
    if path.is_dir():
        raise BenchError(f"checkpoint {path} is a folder; pass the .ckpt file in it (best.ckpt of a run folder)")
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist; train one with: python -m bench train")
    try:
        with warnings.catch_warnings():  # torch's note on an old pickle protocol: the error below says what matters
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a pickled object the weights-only unpickler refused
            raise BenchError(
                f"{path} is not a readable checkpoint (UnpicklingError); pass a .ckpt written by python -m bench train"
            ) from None
        raise BenchError(
            f"{path} holds more than tensors and plain data (loading it could run code), so it was not loaded; "
            "pass a .ckpt written by python -m bench train"
        ) from None
    except Exception as exc:  # any unreadable file gets the same one-line answer
        raise BenchError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}); pass a .ckpt written by python -m bench train"
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    expected = set(inspect.signature(SidRecommender.__init__).parameters) - {"self", "catalog"}
    if not isinstance(hparams, dict) or not {"objective", "settings", "catalog_fingerprint"} <= set(hparams):
        raise BenchError(
            f"{path} is not a checkpoint of this suite (no objective, settings or catalogue recorded); "
            "pass a .ckpt written by python -m bench train"
        )
    if set(hparams) - expected:
        raise BenchError(
            f"checkpoint {path} records unknown settings ({', '.join(sorted(set(hparams) - expected))}); "
            "it was written by another version of the suite: train it again"
        )
    if hparams["catalog_fingerprint"] != catalog.fingerprint:
        raise BenchError(
            f"checkpoint {path} was trained on dataset '{hparams.get('dataset')}' (catalogue "
            f"{hparams['catalog_fingerprint']}), not on '{catalog.name}' ({catalog.fingerprint}); "
            f"train one with: python -m bench train --dataset {catalog.name}"
        )
    try:
        model = SidRecommender(**hparams, catalog=catalog)
    except BenchError as exc:
        raise BenchError(f"checkpoint {path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise BenchError(f"checkpoint {path} has malformed settings ({exc})") from None
    state = checkpoint.get("state_dict")
    try:
        if not isinstance(state, dict):
            raise KeyError("no state_dict")
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise BenchError(f"checkpoint {path} does not match its recorded model ({str(exc).splitlines()[0]})") from None
    training = checkpoint.get("training")
    model.training_record = training if isinstance(training, dict) else None
    return model.eval()
