"""Models for decoders: training with Lightning (progress bar, best-checkpoint saving
and early stopping on val/recall@10, resume), and the one resolver that gives every
decoder the models it requests: a given checkpoint, else the runs cache (runs/, ignored
by git, keyed by the settings), else training (the models it starts from first), else
random weights with --untrained."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Sampler

from bench.data import RecData, eval_examples, letter, train_windows
from bench.data.batches import collate_eval
from bench.errors import BenchError, writable_folder
from bench.records import cpuinfo_field, cpuinfo_text
from bench.settings import DataSettings, ModelSettings
from decoders import ModelRequest
from models import objectives
from models.backbones import ENCODER_DECODER, ITEM, SHAPED_LIKE, backbone_kind, generic_size
from models.module import SidRecommender, load_checkpoint

RUNS_ENV = "BENCH_RUNS_DIR"
# Lightning's info lines (devices, an advert for its cloud logger, "fit stopped") and a
# deprecation inside its own pytree helper are not for our users to read
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")


class EpochLines(L.Callback):
    """Progress where the output is no terminal (a log file, CI): one printed line per
    epoch, since a progress bar drawn in place shows nothing in a file until the run ends."""

    def __init__(self):
        self.started = 0.0

    def on_train_start(self, trainer, module):
        self.started = time.monotonic()

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        logged = trainer.callback_metrics
        names = [name for name in ("train/loss", "val/recall@10") if name in logged]
        figures = ", ".join(f"{name} {float(logged[name]):.4f}" for name in names)
        minutes = (time.monotonic() - self.started) / 60
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {figures} ({minutes:.1f} min)", flush=True)


def process_shard(shard: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process once Lightning has set up its process group
    (DDP), else (0, 1); `shard` overrides both (tests)."""
    import torch.distributed as dist

    if shard is not None:
        return shard
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LengthBucketSampler(Sampler):
    """Shuffled batches of windows of similar length: little padding, still random.

    Each epoch: shuffle, cut into chunks of 50 batches, sort each chunk by length,
    split it into batches, shuffle the batches. Under DDP every process draws the same
    batches (same seed and epoch) and keeps every world_size-th from its rank: disjoint
    shards of the same number of batches (the last len % world_size batches of the
    epoch's shuffle are dropped, so no process waits for a gradient step the others never
    take; with fewer batches than processes they are reused)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shard: tuple[int, int] | None = None):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0
        self.shard = shard

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
        rank, world = process_shard(self.shard)
        if world > 1:
            batches = [batches[i % len(batches)] for i in range(len(self) * world)][rank::world]
        return iter(batches)

    def __len__(self):
        batches = (len(self.lengths) + self.batch_size - 1) // self.batch_size
        _, world = process_shard(self.shard)
        return batches if world == 1 else max(1, batches // world)


class ShardSampler(Sampler):
    """The validation users of this process: every world_size-th from its rank, in order,
    without padding, so across processes each user is decoded exactly once and the
    shards differ by at most one user. (Lightning's DistributedSampler would repeat users
    to even the shards when their number is not a multiple of the world size, and the
    repeated users would count twice in val/recall@10.)"""

    def __init__(self, size: int, shard: tuple[int, int] | None = None):
        self.size, self.shard = size, shard

    def __iter__(self):
        rank, world = process_shard(self.shard)
        return iter(range(rank, self.size, world))

    def __len__(self):
        rank, world = process_shard(self.shard)
        return len(range(rank, self.size, world))


def validation_loader(valid: list[dict], catalog, batch_size: int = 256) -> DataLoader:
    """Validation batches sharded by ShardSampler (pass use_distributed_sampler=False to
    the Trainer so Lightning keeps it): the val/recall@10 that torchmetrics gathers over
    the processes (sum of hits and count of users) equals one process's."""
    return DataLoader(
        valid,
        batch_size=batch_size,
        sampler=ShardSampler(len(valid)),
        collate_fn=functools.partial(collate_eval, catalog=catalog),  # picklable, for ddp_spawn
    )


def runs_dir() -> Path:
    """The runs cache: set but empty means the default, not the working folder; `~` is the
    home folder, as Lightning reads it where it writes the checkpoints."""
    return Path(os.environ.get(RUNS_ENV) or "runs").expanduser()


SHAPE = ("backbone", "item_backbone", "width", "layers", "heads")  # the model settings that make its architecture

# settings added after models were cached: at these values they change nothing the
# model learns, so they stay out of its key and the runs trained before them still match
KEYLESS_WHEN = {
    "history_loss": 0.0,
    "attention_dropout": None,
    "nezha_init": "scratch",
    "encoder": "bidirectional",
    "item_scores": "tied",
    "repeat_bias": False,
    "item_teacher": 0.0,
    "label_smoothing": 0.0,
    "seen_unlikelihood": 0.0,
}


def cache_key(
    objective: str, settings: ModelSettings, data: RecData, seed: int, init_key: str = "", teacher_key: str = ""
) -> str:
    """Names the cached run: same catalogue, seed, objective, shaping settings, starting
    model and teacher -> same folder. A dataset read from files under a name that pins
    no sha256 (all but beauty) adds its files' sha256: the same items with other
    interactions must not find a model trained on the first ones."""
    shaping = {
        name: value
        for name, value in objectives.shaping_settings(objective, asdict(settings)).items()
        if name not in KEYLESS_WHEN or value != KEYLESS_WHEN[name]
    }
    blob = json.dumps(
        {
            "objective": objective,
            "catalog": data.catalog.fingerprint,
            "seed": seed,
            "init": init_key,
            **({"generator": data.generator} if data.generator else {}),
            **({"files": data.checksums} if data.checksums and not letter.pinned_sums(data.name) else {}),
            **({"teacher": teacher_key} if teacher_key else {}),
            **shaping,
        },
        sort_keys=True,
    )
    return f"{objective}-{settings.backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def build_model(data: RecData, objective: str, settings: ModelSettings, data_settings: DataSettings):
    """A model with random (seeded) weights for these settings."""
    L.seed_everything(data_settings.seed, workers=True, verbose=False)
    return SidRecommender.for_catalog(objective, settings, data.catalog, data_settings)


def check_precision(settings: ModelSettings) -> None:
    """A training precision this machine cannot train in, refused before any work."""
    if settings.precision == "16-mixed" and not torch.cuda.is_available():
        raise BenchError("--precision 16-mixed trains on CUDA only; use bf16-mixed or 32-true on the CPU")


def cpu_has_bf16(cpuinfo: str) -> bool | None:
    """Whether the CPU described by /proc/cpuinfo's text computes in bf16 (AVX-512 BF16 or
    AMX); None where the text lists no flags (not Linux on x86)."""
    flags = cpuinfo_field(cpuinfo, "flags")
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@functools.cache
def warn_if_slow_precision(precision: str) -> None:
    """bf16-mixed on a CPU without bf16 arithmetic emulates it: a step took 21-26x longer
    than in 32-true on an AVX2 EPYC. Said once a process, as the preset asks for bf16."""
    if precision != "bf16-mixed" or torch.cuda.is_available():
        return
    if cpu_has_bf16(cpuinfo_text()) is False:
        print(
            "warning: --precision bf16-mixed on a CPU without bf16 arithmetic (no AVX-512 BF16 or AMX) is "
            "emulated (a t5-base step took 21-26x as long as in 32-true on an AVX2 EPYC); pass --precision 32-true",
            file=sys.stderr,
        )


def check_resumable(path: str, objective: str, settings: ModelSettings, data: RecData) -> None:
    """A resumed checkpoint must hold the model these settings build, on this catalogue."""
    saved = load_checkpoint(path, data.catalog)
    if saved.objective != objective:
        raise BenchError(f"--resume {path}: the checkpoint is a {saved.objective} model, not {objective}")
    theirs = objectives.shaping_settings(objective, asdict(saved.settings))
    ours = objectives.shaping_settings(objective, asdict(settings))
    for name in (n for n in ours if n not in ("max_epochs", "patience")):  # a resumed run may only train longer
        if theirs[name] != ours[name]:
            raise BenchError(
                f"--resume {path}: the checkpoint has {name}={theirs[name]}, these settings give "
                f"{ours[name]}; pass the settings it was trained with"
            )


class RunCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, resumable into another folder (a run trained longer goes
    to the cache folder of its new settings) and from a run folder that was copied or
    moved. Lightning compares the folder the checkpoint was written in with this one and,
    where they differ, forgets the best score and takes the first resumed epoch for the
    best. Here the resumed checkpoint's state is read as that of the folder it is in
    (resumed_from): its best checkpoint is that folder's, copied here when this is
    another, with its score."""

    def __init__(self, *args, resumed_from: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumed_from = resumed_from

    def _generate_state_key(self, **kwargs) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # the key the checkpoints written by ModelCheckpoint hold

    def load_state_dict(self, state_dict: dict) -> None:
        if self.dirpath is None or self.resumed_from is None:
            return super().load_state_dict(state_dict)
        name = Path(state_dict.get("best_model_path") or "").name
        best = self.resumed_from / name if name else None
        if self.monitor and not (best and best.is_file()):  # nothing to carry over: start afresh, as Lightning does
            state_dict = {**state_dict, "best_model_score": None, "best_k_models": {}, "kth_best_model_path": ""}
        elif self.monitor and best.resolve() != Path(self.moved(name)).resolve() and rank_zero_only.rank == 0:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best, self.moved(name))
        scores = state_dict.get("best_k_models", {})  # path -> score
        super().load_state_dict(
            {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": self.moved(name) if best and best.is_file() or not self.monitor else "",
                "kth_best_model_path": self.moved(state_dict.get("kth_best_model_path")),
                "best_k_models": {self.moved(path): score for path, score in scores.items()},
                "last_model_path": self.moved(state_dict.get("last_model_path")),
            }
        )

    def moved(self, path: str | None) -> str:
        """A checkpoint's path in the folder it was written in -> the same name in this one."""
        return str(Path(self.dirpath) / Path(path).name) if path else ""


def check_asked_shape(path: str, model: SidRecommender, asked: dict | None) -> None:
    """A --ckpt decodes as the model it holds: one of another backbone or size than the
    settings given by flag or config ask for (asked: name -> value) is refused, since its
    record would claim their shape. Sizes are compared as built (--width 32 on a backbone
    that is 32 wide asks for nothing else); the item model's backbone is --item-backbone,
    or --backbone where that names an item model."""
    asked = asked or {}
    theirs = model.settings
    backbone, names = asked.get("backbone"), [n for n in ("width", "layers", "heads") if n in asked]
    if model.objective == "next_item" and (backbone is None or backbone_kind(backbone) != ITEM):
        backbone, names = asked.get("item_backbone"), []  # the SID backbone's sizes do not shape the item model
        differs = ["item_backbone"] if backbone not in (None, theirs.backbone) else []
    else:
        differs = ["backbone"] if backbone not in (None, theirs.backbone) else []
    if not differs and names and theirs.backbone in SHAPED_LIKE:  # a real model's shape takes no sizes
        differs = names
    elif not differs and names:
        own = {"width": theirs.width, "layers": theirs.layers, "heads": theirs.heads}
        sized = {**own, **{name: asked[name] for name in names}}
        if generic_size(theirs.backbone, **own) != generic_size(theirs.backbone, **sized):
            differs = names
    if differs:
        wanted = ", ".join(f"{name}={asked[name]}" for name in differs)
        flags = " ".join(f"--{name.replace('_', '-')}" for name in differs)
        raise BenchError(
            f"checkpoint {path} holds a {theirs.backbone} model of another shape than {wanted} asks for; drop "
            f"{flags} (the checkpoint's model decodes) or the checkpoint"
        )


def architecture(settings: ModelSettings) -> tuple:
    """The backbone and its sizes as built (hidden, layers, heads, kv heads, feed-forward)."""
    if settings.backbone in SHAPED_LIKE:  # a real model's shape takes no sizes
        return (settings.backbone,)
    return (settings.backbone, *generic_size(settings.backbone, settings.width, settings.layers, settings.heads))


def check_start_shape(path: str, start: SidRecommender, objective: str, settings: ModelSettings) -> None:
    """A model trained from a given checkpoint (Medusa's heads on an NTP backbone, NEZHA from
    NTP) loads its weights: the checkpoint must hold the architecture its settings build."""
    theirs, ours = architecture(start.settings), architecture(settings)
    if theirs == ours:
        return

    def said(shape: tuple) -> str:
        return shape[0] + (f" (width {shape[1]}, layers {shape[2]}, heads {shape[3]})" if len(shape) > 1 else "")

    sizes = f" --width {theirs[1]} --layers {theirs[2]} --heads {theirs[3]}" if len(theirs) > 1 else ""
    flags = f"--backbone {theirs[0]}{sizes}"
    raise BenchError(
        f"checkpoint {path} holds a {said(theirs)} model, but the {objective} model that starts from it would be "
        f"{said(ours)}; pass {flags}, or a checkpoint of that shape"
    )


def check_cluster(num_nodes: int) -> None:
    """Several machines meet where the environment says: a cluster's scheduler (SLURM, LSF,
    torchrun, MPI) or, for Lightning's own launcher, MASTER_ADDR, MASTER_PORT and NODE_RANK.
    Without them each machine would wait for the others for 30 minutes."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    schedulers = (SLURMEnvironment, LSFEnvironment, TorchElasticEnvironment, MPIEnvironment)
    if num_nodes == 1 or any(env.detect() for env in schedulers):
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if name not in os.environ]
    if "GROUP_RANK" in os.environ and "NODE_RANK" in missing:  # Lightning reads it where NODE_RANK is unset
        missing.remove("NODE_RANK")
    if missing:
        raise BenchError(
            f"--num-nodes {num_nodes} needs {', '.join(missing)} set on every machine (MASTER_ADDR, MASTER_PORT: "
            "node 0's address and a free port there; NODE_RANK: the machine's number from 0), or a cluster "
            "scheduler (SLURM, LSF, torchrun, MPI) to start the command; see the README on distributed training"
        )


def check_checkpoint_folder(run_dir: Path, objective: str) -> None:
    """Where a training writes its checkpoints, checked before it starts: no epoch is lost to it."""
    writable_folder(run_dir, f"training the {objective} model", f"--run-dir or {RUNS_ENV} (the runs cache)")


def train_model(
    data: RecData,
    objective: str,
    settings: ModelSettings,
    data_settings: DataSettings,
    run_dir: Path,
    resume: str | None = None,
    progress: bool = True,
    init_from: SidRecommender | None = None,
    teacher: SidRecommender | None = None,
    callbacks: list | None = None,
    devices: int = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
) -> Path:
    """Train and return the path of the best checkpoint (by val/recall@10), on every rank.

    init_from: a trained NTP model whose backbone weights the new model starts from
    (Medusa heads are trained on top of the NTP backbone); teacher: a trained model the
    new one is distilled from (an NTP model for an aligned draft, the item model for an
    NTP model with item_teacher > 0); callbacks: more Lightning
    callbacks (a search's pruning callback).

    devices, strategy, num_nodes go to Lightning's Trainer as they are: devices x
    num_nodes processes (GPUs, or CPU processes on a machine without one), data parallel
    with strategy ddp / ddp_spawn / ddp_fork (auto: ddp when there are several). The process group
    backend is Lightning's choice: NCCL on GPUs, gloo on CPU. Each process trains on its
    own shard of the windows (LengthBucketSampler; train_batch_size is per process) and
    validates its own users (ShardSampler, no user twice); Lightning's rank 0 writes the
    checkpoints and logs, and settings.json."""
    check_precision(settings)
    check_checkpoint_folder(run_dir, objective)
    warn_if_slow_precision(settings.precision)
    model = build_model(data, objective, settings, data_settings)
    if init_from is not None:
        if objective == "medusa" and init_from.repeat_bias is not None:
            raise BenchError(
                "Medusa heads read the NTP backbone's logits without its repeat bias: start them from an NTP "
                "model trained without --repeat-bias"
            )
        if objective == "ntp" and (init_from.repeat_bias is None) != (model.repeat_bias is None):
            raise BenchError(
                f"--init-from: that NTP model was trained {'with' if init_from.repeat_bias is not None else 'without'} "
                "--repeat-bias; continue it with the same"
            )
        model.lm.load_state_dict(init_from.lm.state_dict())
        if model.repeat_bias is not None:
            model.repeat_bias.load_state_dict(init_from.repeat_bias.state_dict())
        model.started_from = {"objective": init_from.objective, **(init_from.training_record or {})}
    if teacher is not None:
        model.distil_from(teacher)
    elif objective == "ntp" and settings.item_teacher > 0:
        raise BenchError(f"item_teacher={settings.item_teacher} needs the item model as the teacher; none was given")
    per_target = model.lm.kind == ENCODER_DECODER and settings.encoder == "bidirectional"
    windows = train_windows(data, settings.max_history, per_target=per_target)
    train_loader = DataLoader(
        windows,
        collate_fn=model.collate,
        batch_sampler=LengthBucketSampler([len(w) for w in windows], settings.train_batch_size, data_settings.seed),
    )
    check_cluster(num_nodes)
    valid = eval_examples(data, "valid", settings.max_history, settings.val_users or None)
    if len(valid) < devices * num_nodes:  # a process without users would wait forever for the others' metric
        raise BenchError(
            f"--val-users {len(valid)}: fewer valid users than training processes ({devices} devices x "
            f"{num_nodes} nodes); every process validates at least one"
        )
    valid_loader = validation_loader(valid, data.catalog)
    resumed_from = Path(resume).resolve().parent if resume else None  # where its run folder really is
    best = RunCheckpoint(
        dirpath=run_dir,
        filename="best",
        monitor="val/recall@10",
        mode="max",
        enable_version_counter=False,
        resumed_from=resumed_from,
    )
    # every epoch's end, overwritten: Lightning's save_last writes only when `best` improves,
    # which would resume a run from its last gain and under-count its epochs
    last = RunCheckpoint(dirpath=run_dir, filename="last", enable_version_counter=False, resumed_from=resumed_from)
    stop = L.pytorch.callbacks.EarlyStopping(monitor="val/recall@10", mode="max", patience=settings.patience)
    interactive = sys.stdout.isatty()
    trainer = L.Trainer(
        max_epochs=settings.max_epochs,
        precision=settings.precision,
        callbacks=[best, last, stop, *([EpochLines()] if progress and not interactive else []), *(callbacks or [])],
        default_root_dir=run_dir,
        accelerator="auto",
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs"),
        enable_progress_bar=progress and interactive,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        # the CSV logger's folder sits inside the run folder, which Lightning takes for leftovers
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        # a small dataset's epoch of fewer steps than the logging interval is no problem of the user's
        warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging")
        trainer.fit(model, train_loader, valid_loader, ckpt_path=resume)
    if trainer.is_global_zero:
        if resume and not (run_dir / "last.ckpt").exists():  # resumed with no epoch left: the run ends where it was
            shutil.copyfile(resume, run_dir / "last.ckpt")
        training = record_training_totals(Path(best.best_model_path), run_dir / "last.ckpt")
        (run_dir / "settings.json").write_text(
            json.dumps(
                {
                    "objective": objective,
                    "data": asdict(data_settings),
                    "model": asdict(settings),
                    "training": training,
                },
                indent=1,
            )
        )
    trainer.strategy.barrier()  # under ddp every rank returns once the run is complete
    return Path(best.best_model_path)


def record_training_totals(best: Path, last: Path) -> dict:
    """Add to the best checkpoint's training record how long the whole run took: the
    record of the last checkpoint (saved after every epoch; training went on after the
    best one until early stopping or --max-epochs)."""
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    final = torch.load(last, map_location="cpu", weights_only=True).get("training") or {}
    training = dict(checkpoint.get("training") or {})
    training.update(epochs_run=final.get("epochs"), seconds_run=final.get("seconds"))
    checkpoint["training"] = training
    partial = best.with_suffix(".ckpt.tmp")
    torch.save(checkpoint, partial)
    os.replace(partial, best)
    return training


def cached_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint of a finished run (settings.json is written last), else None."""
    best = run_dir / "best.ckpt"
    return best if best.exists() and (run_dir / "settings.json").exists() else None


@dataclass
class ResolvedModel:
    model: object  # a SidRecommender, or what a fitted objective computes (item counts)
    source: str  # where it came from, for the record
    key: str  # names it in the runs cache (or the checkpoint's path)


def resolve_models(
    requests: list[dict[str, ModelRequest]],
    data: RecData,
    data_settings: DataSettings,
    checkpoints: list[str],
    untrained: bool = False,
    progress: bool = True,
    asked: dict | None = None,
) -> list[dict[str, ResolvedModel]]:
    """For each decoder's requests (role -> ModelRequest), role -> the model that plays it.

    A checkpoint given with --ckpt plays every role named like its objective (the models
    a request starts from are looked up by their objective); a decoder checks that the
    model fits its options. Every checkpoint must play some role: that is checked before
    anything is trained. asked: the shaping model settings given by flag or config, by
    name (check_asked_shape)."""
    given = [(str(path), load_checkpoint(path, data.catalog)) for path in checkpoints]
    objectives_given = [model.objective for _, model in given]
    for objective in set(objectives_given):
        if objectives_given.count(objective) > 1:
            paths = ", ".join(path for path, model in given if model.objective == objective)
            raise BenchError(f"several --ckpt of objective '{objective}' ({paths}); pass one per objective")
    wanted, needed = set(), set()  # the roles a checkpoint can play; the objectives of the models asked for
    for per_decoder in requests:
        for role, request in per_decoder.items():
            wanted.add(role)
            needed.add(request.objective)
            if not untrained:
                check_precision(request.settings)
            for start in request.starts():
                wanted.add(start.objective)
                needed.add(start.objective)
                if not untrained:
                    check_precision(start.settings)
    for path, model in given:
        if model.objective not in wanted:
            trained = sorted(o for o in needed if o not in objectives.FITTED)
            if not trained:
                raise BenchError(f"checkpoint {path}: the chosen decoders use no trained model; drop --ckpt {path}")
            raise BenchError(
                f"checkpoint {path} was trained with objective '{model.objective}', but the chosen decoders "
                f"need: {', '.join(trained)}; train one with: python -m bench train --objective {trained[0]}"
            )
    for path, model in given:
        check_asked_shape(path, model, asked)
    if not untrained:  # a model trained from a given checkpoint: its shape is checked before any training
        for request in (r for each in requests for top in each.values() for r in (top, *top.starts())):
            for path, model in given:
                if request.init_from is not None and model.objective == request.init_from.objective:
                    check_start_shape(path, model, request.objective, request.settings)
    built: dict[str, ResolvedModel] = {}

    def provide(role: str, request: ModelRequest) -> ResolvedModel:
        for path, model in given:
            if model.objective == role:
                return ResolvedModel(model, path, checkpoint_key(Path(path)))
        if request.objective in objectives.FITTED:
            return ResolvedModel(objectives.FITTED[request.objective](data), "training split counts", "")
        init = teacher = None
        if request.init_from is not None and not untrained:
            init = provide(request.init_from.objective, request.init_from)
        if request.teacher is not None and not untrained:
            teacher = provide(request.teacher.objective, request.teacher)
        key = cache_key(
            request.objective,
            request.settings,
            data,
            data_settings.seed,
            init.key if init else "",
            teacher.key if teacher else "",
        )
        if key not in built:
            if untrained:
                model = build_model(data, request.objective, request.settings, data_settings)
                built[key] = ResolvedModel(model, "random weights (--untrained)", key)
            else:
                model = ensure_model(data, request, data_settings, key, progress, init.model if init else None, teacher)
                how = distilled(teacher) if teacher else "trained"
                source = f"{how} by bench ({request.settings.backbone}, runs cache {key})"
                built[key] = ResolvedModel(model, source, key)
        return built[key]

    return [{role: provide(role, request) for role, request in per_decoder.items()} for per_decoder in requests]


def distilled(teacher: ResolvedModel) -> str:
    """How a model with a teacher was trained, for messages and records' sources."""
    how = "with soft targets from" if teacher.model.objective == "next_item" else "aligned to"
    return f"{how} {teacher.source if teacher.key.startswith('sha256:') else teacher.key}"


def checkpoint_key(path: Path) -> str:
    """A given checkpoint's part of the cache keys of the models that start or learn from
    it: its contents, so another file at the same path is another start."""
    return f"sha256:{letter.sha256_of(path)[:16]}"


def ensure_model(
    data: RecData,
    request: ModelRequest,
    data_settings: DataSettings,
    key: str,
    progress: bool = True,
    init_from: SidRecommender | None = None,
    teacher: ResolvedModel | None = None,
) -> SidRecommender:
    """The cached model under this key, training it first when there is none."""
    run_dir = runs_dir() / data.name / key
    best = cached_checkpoint(run_dir)
    if best is None:
        check_checkpoint_folder(run_dir, request.objective)
        what = f"{request.objective} model" + (f" {distilled(teacher)}" if teacher else "")
        print(f"training a {what} ({request.settings.backbone}) on {data.name}; cached in {run_dir}")
        best = train_model(
            data,
            request.objective,
            request.settings,
            data_settings,
            run_dir,
            progress=progress,
            init_from=init_from,
            teacher=teacher.model if teacher else None,
        )
    return load_checkpoint(best, data.catalog)
