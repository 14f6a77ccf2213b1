"""Training with Lightning: progress bar, best-checkpoint saving and early stopping on
val/recall@10, resume from a checkpoint. `ensure_model` caches the models that
`bench run` trains itself under runs/ (ignored by git), keyed by their settings."""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Sampler

from bench.data import RecData, eval_examples, train_windows
from bench.data.batches import collate_eval
from bench.errors import BenchError
from models.backbones import ENCODER_DECODER
from models.module import SidRecommender, load_checkpoint

RUNS_ENV = "BENCH_RUNS_DIR"


@dataclass
class TrainSettings:
    backbone: str = "qwen-small"
    max_epochs: int = 30
    patience: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    dropout: float = 0.1
    max_history: int = 20
    val_users: int = 3000  # valid users decoded each epoch (first N; 0 = all)
    transition: str = "rnn"  # nezha only
    placeholders: bool = True  # nezha only
    medusa_mode: str = "frozen"  # medusa only: frozen backbone (Medusa-1) or joint (Medusa-2)
    draft_backbone: str = "qwen-micro"  # the separate draft model of `speculative`
    item_backbone: str = "sasrec-small"  # the item-embedding model of `full_rank`
    seed: int = 0

    def relevant(self, objective: str) -> dict:
        """The settings that shape a model of this objective (and so name its cache)."""
        skip = {"draft_backbone", "item_backbone"}
        if objective != "nezha":
            skip |= {"transition", "placeholders"}
        if objective != "medusa":
            skip.add("medusa_mode")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def key(self, objective: str, data: RecData, init_from: str = "") -> str:
        """Names the cached run: same data, objective and settings -> same folder."""
        blob = json.dumps(
            {
                "objective": objective,
                "catalog": data.catalog.fingerprint,
                "init": init_from,
                **self.relevant(objective),
            },
            sort_keys=True,
        )
        return f"{objective}-{self.backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


class LengthBucketSampler(Sampler):
    """Shuffled batches of windows of similar length: little padding, still random.

    Each epoch: shuffle, cut into chunks of 50 batches, sort each chunk by length,
    split it into batches, shuffle the batches."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        chunk = self.batch_size * 50
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs"))


def build_model(data: RecData, objective: str, settings: TrainSettings) -> SidRecommender:
    """A model with random (seeded) weights for these settings."""
    L.seed_everything(settings.seed, workers=True, verbose=False)
    return SidRecommender.for_catalog(
        objective,
        settings.backbone,
        data.catalog,
        max_history=settings.max_history,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        dropout=settings.dropout,
        transition=settings.transition,
        placeholders=settings.placeholders,
        medusa_mode=settings.medusa_mode,
    )


def check_resumable(path: str, model: SidRecommender, data: RecData) -> None:
    """A resumed checkpoint must hold the model these settings build, on this catalogue."""
    saved = load_checkpoint(path, data.catalog).hparams
    for name in ("objective", "backbone", "transition", "placeholders", "medusa_mode", "max_history"):
        if saved.get(name) != model.hparams[name]:
            raise BenchError(
                f"--resume {path}: the checkpoint has {name}={saved.get(name)}, these settings give "
                f"{model.hparams[name]}; pass the settings it was trained with"
            )


def train_model(
    data: RecData,
    objective: str,
    settings: TrainSettings,
    run_dir: Path,
    resume: str | None = None,
    progress: bool = True,
    init_from: SidRecommender | None = None,
) -> Path:
    """Train and return the path of the best checkpoint (by val/recall@10).

    init_from: a trained NTP model whose backbone weights the new model starts from
    (Medusa heads are trained on top of the NTP backbone)."""
    model = build_model(data, objective, settings)
    if resume:
        check_resumable(resume, model, data)
    if init_from is not None:
        model.lm.load_state_dict(init_from.lm.state_dict())
    windows = train_windows(data, settings.max_history, per_target=model.lm.kind == ENCODER_DECODER)
    train_loader = DataLoader(
        windows,
        collate_fn=model.collate,
        batch_sampler=LengthBucketSampler([len(w) for w in windows["items"]], settings.batch_size, settings.seed),
    )
    valid = eval_examples(data, "valid", settings.max_history, settings.val_users or None)
    valid_loader = DataLoader(valid, batch_size=256, collate_fn=lambda rows: collate_eval(rows, data.catalog))
    best = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir,
        filename="best",
        monitor="val/recall@10",
        mode="max",
        save_last=True,
        enable_version_counter=False,
    )
    stop = L.pytorch.callbacks.EarlyStopping(monitor="val/recall@10", mode="max", patience=settings.patience)
    trainer = L.Trainer(
        max_epochs=settings.max_epochs,
        callbacks=[best, stop],
        default_root_dir=run_dir,
        accelerator="auto",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs"),
        enable_progress_bar=progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        # the CSV logger's folder sits inside the run folder, which Lightning takes for leftovers
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(model, train_loader, valid_loader, ckpt_path=resume)
    (run_dir / "settings.json").write_text(
        json.dumps({"objective": objective, "dataset": data.name, **settings.relevant(objective)}, indent=1)
    )
    return Path(best.best_model_path)


def ensure_model(
    data: RecData,
    objective: str,
    settings: TrainSettings,
    progress: bool = True,
    init_from: tuple[str, SidRecommender] | None = None,
) -> SidRecommender:
    """The cached model for these settings, training it first when there is none.

    init_from: (cache key, model) of the NTP model a Medusa model is built on."""
    run_dir = runs_dir() / data.name / settings.key(objective, data, init_from[0] if init_from else "")
    best = run_dir / "best.ckpt"
    if not best.exists() or not (run_dir / "settings.json").exists():
        print(f"training a {objective} model ({settings.backbone}) on {data.name}; cached in {run_dir}")
        best = train_model(
            data, objective, settings, run_dir, progress=progress, init_from=init_from[1] if init_from else None
        )
    model = load_checkpoint(best, data.catalog)
    model.cache_key = run_dir.name
    return model
