"""Every setting of the suite, once: typed dataclasses grouped by what they shape.

The command line and config files are generated from them (`command_parser`, `parse`):
a flag per field (`max_history` -> `--max-history`, a bool -> `--flag/--no-flag`, a
Literal -> its choices), `--config FILE` (YAML or JSON, one section per dataclass:
`data:`, `model:`, `run:`, ...) and `--print-config`. Values come from the defaults,
then the config file, then the flags; every value is checked against its type and
bounds, so a wrong one is one error line naming it. Checkpoints and result records
embed these dataclasses as plain dicts, and the model cache key is derived from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from bench.errors import BenchError


def setting(default, help: str, low=None, high=None, below=None, positional: bool = False):
    """A field with its help text and bounds (low <= value <= high, value < below)."""
    meta = {"help": help, "low": low, "high": high, "below": below, "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSettings:
    dataset: str = setting(
        "synthetic", "synthetic (default, generated), beauty, instruments, yelp, or any name with --data-dir"
    )
    data_dir: str | None = setting(None, "folder with <Name>.inter.json and <Name>.index.json")
    collisions: Literal["last_code", "extra_level"] = setting(
        "last_code", "how SIDs shared by several items are made unique"
    )
    seed: int = setting(0, "seed of the synthetic generator, of training and of random weights", low=0, high=2**32 - 1)
    items: int | None = setting(
        None,
        "synthetic only: catalogue size, SIDs from the planted hierarchy (default: 600 items, RQ-KMeans SIDs)",
        low=100,
        high=100_000_000,
    )
    users: int | None = setting(None, "synthetic only: users generated (default: 3000)", low=10, high=10_000_000)
    sequence_length: int | None = setting(
        None, "synthetic only: items per user (default: 5 to 20, geometric)", low=3, high=10_000
    )

    def __post_init__(self):
        if self.dataset == "synthetic" and self.data_dir is not None:  # records would call the folder's data synthetic
            raise BenchError(
                f"--data-dir {self.data_dir} needs the dataset's name: pass --dataset NAME (records and the runs "
                "cache file it under that name; 'synthetic' is the generated dataset's)"
            )
        if not self.is_synthetic:
            for name in SYNTHETIC_SHAPE:
                if getattr(self, name) is not None:
                    raise BenchError(
                        f"{flag(name)} shapes the synthetic dataset only; {self.dataset} comes from its files"
                    )

    @property
    def is_synthetic(self) -> bool:
        return self.dataset == "synthetic"  # never with --data-dir (refused above)


SYNTHETIC_SHAPE = ("items", "users", "sequence_length")


@dataclass
class ModelSettings:
    """What shapes a trained model: architecture, objective options and training."""

    backbone: str | None = setting(
        None, "family-size, e.g. qwen-small, llama-base (default: qwen-tiny on synthetic, qwen-small otherwise)"
    )
    width: int | None = setting(None, "hidden size instead of the size preset's (feed-forward 3x)", low=8)
    layers: int | None = setting(None, "layers instead of the size preset's", low=1)
    heads: int | None = setting(None, "attention heads instead of the size preset's", low=1)
    max_epochs: int = setting(30, "most training epochs", low=1)
    patience: int = setting(3, "epochs without val/recall@10 gain before stopping", low=0)
    train_batch_size: int | None = setting(
        None, "training windows per step (default: 64 on synthetic, 256 otherwise)", low=1
    )
    lr: float = setting(2e-3, "peak learning rate of AdamW", low=0.0)
    weight_decay: float = setting(0.01, "AdamW weight decay of matrices", low=0.0)
    warmup_steps: int = setting(100, "steps of linear learning-rate warm-up", low=0)
    lr_schedule: Literal["constant", "cosine"] = setting(
        "constant", "after the warm-up: constant, or cosine decay to 0 at --max-epochs"
    )
    dropout: float = setting(0.1, "embedding, attention and output dropout", low=0.0, below=1.0)
    label_smoothing: float = setting(
        0.0,
        "label smoothing of every one-hot cross-entropy (torch's: that share of the target spread over all classes)",
        low=0.0,
        below=1.0,
    )
    attention_dropout: float | None = setting(
        None,
        "dropout of the attention probabilities instead of --dropout (unset: --dropout); on the CPU drawing it "
        "is about a quarter of a training step, more on NEZHA's longer 4D-masked layout",
        low=0.0,
        below=1.0,
    )
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = setting(
        "32-true",
        "training precision (Lightning's): bf16-mixed trains about 1.7x faster where the hardware has bf16 "
        "arithmetic (CPUs with AVX-512 BF16 or AMX, recent GPUs) and far slower on CPUs without it (a t5-base "
        "step: 21-26x on an AVX2 EPYC; a warning says so); 16-mixed: CUDA only",
    )
    max_history: int = setting(20, "items of history kept per example", low=1)
    encoder: Literal["bidirectional", "causal"] = setting(
        "bidirectional",
        "T5 backbones: TIGER's bidirectional encoder (trains on one example per target), or a causal one, whose "
        "states of a history prefix are those of the prefix alone, so a window's every target trains in one pass",
    )
    val_users: int = setting(3000, "valid users decoded per epoch (0 = all)", low=0)
    transition: Literal["rnn", "gru", "none"] = setting("rnn", "NEZHA head transition cell")
    placeholders: bool = setting(
        True, "NEZHA reads placeholder states (--no-placeholders: only the last history state)"
    )
    history_loss: float = setting(
        0.0,
        "NEZHA on a decoder-only backbone: weight of a next-token loss on the history tokens of its training "
        "layout, beside the head's loss (0: the head's loss alone)",
        low=0.0,
    )
    nezha_init: Literal["scratch", "ntp"] = setting(
        "scratch",
        "NEZHA's backbone starts from random weights, or from the trained NTP model of the same settings "
        "(trained first when not cached; its training time is part of the NEZHA model's, in the record)",
    )
    item_teacher: float = setting(
        0.0,
        "NTP models trained on the data (backbone, data draft), decoder-only: weight of soft targets from the "
        "trained item model (--item-backbone: its distribution over the next item, summed per code over the "
        "items sharing the target's earlier codes) against the one-hot targets (0: off)",
        low=0.0,
        high=1.0,
    )
    seen_unlikelihood: float = setting(
        0.0,
        "NTP models, decoder-only: weight of an unlikelihood term on an item the user already took, one drawn per "
        "target from the window's items before it (other than the target): -log(1 - p(its whole SID | the "
        "history)), the joint probability beam search ranks, in a context teacher forcing on the targets never "
        "reaches (0: off; not with --repeat-bias)",
        low=0.0,
    )
    medusa_mode: Literal["frozen", "joint"] = setting(
        "frozen", "Medusa heads on a frozen backbone (Medusa-1) or trained with it (Medusa-2)"
    )
    draft_backbone: str | None = setting(
        None, "the separate draft model of speculative (default: llama-micro under a Llama backbone, else qwen-micro)"
    )
    item_backbone: str = setting("sasrec-small", "the item-embedding model of full_rank and of speculative:draft=items")
    item_scores: Literal["tied", "separate"] = setting(
        "tied",
        "the item model scores its state against its input item embeddings (tied, as SASRec) or against a "
        "separate output table, which need not score the items a user just took highest",
    )
    repeat_bias: bool = setting(
        False,
        "the item model learns one offset added to the scores of the items in a user's history, the NTP model "
        "one per SID level for the codes that continue its prefix towards them: where nobody takes an item "
        "twice they learn to rank them last, where people do they can raise them",
    )
    attention: str = setting(
        "sdpa", "attention backend; only sdpa applies the 4D boolean masks of NEZHA training and tree verification"
    )
    per_objective: dict = setting(
        {}, "config file only: objective -> settings its models use instead (e.g. next_item: {dropout: 0.5})"
    )

    def __post_init__(self):
        if self.attention != "sdpa":
            raise BenchError(
                f"--attention {self.attention}: only sdpa is supported; NEZHA's training layout and the tree "
                "verification of medusa and speculative pass 4D boolean masks, which other backends (eager) "
                "add to the attention scores instead of masking"
            )
        objectives = typing.get_args(_hints(TrainSettings)["objective"])
        for objective, overrides in self.per_objective.items():
            where = f"per_objective.{objective}"
            if objective not in objectives:
                raise BenchError(f"{where}: unknown objective; known: {', '.join(objectives)}")
            if not isinstance(overrides, dict):
                raise BenchError(f"{where}: expected a mapping of settings, got {type(overrides).__name__}")
            for name, value in overrides.items():
                if name in NOT_PER_OBJECTIVE or name not in {f.name for f in fields(ModelSettings)}:
                    raise BenchError(
                        f"{where}: '{name}' cannot differ per objective; per-objective settings are the training "
                        "and head settings (the item model's size comes with item_backbone; every decoder reads "
                        "the same history)"
                    )
                check_value(ModelSettings, name, value, where)

    def for_objective(self, objective: str) -> "ModelSettings":
        """The settings one objective's models are trained with: these, with that
        objective's per_objective entries in place (and no per_objective left)."""
        overrides = {
            name: check_value(ModelSettings, name, value, f"per_objective.{objective}")
            for name, value in (self.per_objective.get(objective) or {}).items()
        }
        return dataclasses.replace(self, **overrides, per_objective={})

    def resolved(self, data: DataSettings) -> "ModelSettings":
        """The dataset-dependent defaults filled in: what a run actually uses."""
        backbone = self.backbone or ("qwen-tiny" if data.is_synthetic else "qwen-small")
        family = "llama" if backbone.startswith("llama") else "qwen"
        return dataclasses.replace(
            self,
            backbone=backbone,
            train_batch_size=self.train_batch_size or (64 if data.is_synthetic else 256),
            draft_backbone=self.draft_backbone or f"{family}-micro",
        )


# what decides which model a request gets, and the history every decoder reads: never per objective
NOT_PER_OBJECTIVE = (
    "backbone",
    "width",
    "layers",
    "heads",
    "draft_backbone",
    "item_backbone",
    "max_history",
    "per_objective",
)


@dataclass
class RunSettings:
    """The harness of `bench run`: which decoders, on which users, how measured."""

    decoder: str = setting(
        "nezha",
        "comma-separated decoder specs, e.g. greedy,beam,nezha or beam:constrained,nezha:verifier=off "
        "(see README for every decoder and option)",
    )
    constrained: bool = setting(False, "every decoder that takes the option masks invalid prefixes")
    k: int = setting(20, "recommendations per user (and the beams of a beam search unless it sets its own)", low=1)
    batch_size: int = setting(32, "users per decoding batch", low=1)
    split: Literal["test", "valid"] = setting("test", "the held-out item to predict")
    ckpt: list[str] = setting(
        [],
        "checkpoint from bench train (repeat for several models); models without one are trained first "
        "and cached under runs/",
    )
    limit_users: int | None = setting(None, "evaluate the first N users of the split", low=1)
    sample_users: int | None = setting(
        None,
        "evaluate N users of the split drawn at random (seeded by --seed): a cheaper run that stays "
        "representative, where the first N users need not be; not with --limit-users",
        low=1,
    )
    exclude_history: bool = setting(
        False,
        "drop every item the user interacted with before the target (all of them, not only the --max-history "
        "read) from each decoder's list before the metrics, as RecBole does for non-sequential models; off: "
        "lists scored as generated (TIGER's, LETTER's and RecBole's for sequential models such as SASRec)",
    )
    device: str = setting("auto", "auto, cpu or cuda")
    dtype: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32",
        "precision of every model's weights and activations, the same for every decoder (fp32 uses TF32 on CUDA)",
    )
    compile: bool = setting(
        False,
        "torch.compile every model's backbone and heads' modules (dynamic shapes), the same for every decoder "
        "(NEZHA's beam search reads its head's classifiers and tanh cells as tensors, eager); compilation "
        "happens in the untimed warm-up",
    )
    warmup: int = setting(2, "untimed passes over the first batch", low=0, high=1000)
    repeats: int = setting(
        1,
        "timed passes over all batches (every decoder in turn each time); the record gives each pass's p50",
        low=1,
        high=1000,
    )
    profile: str | None = setting(
        None, "folder for a torch.profiler table per decoder (3 decodes of the first batch, after the timed ones)"
    )
    untrained: bool = setting(
        False, "random weights, no training: latency only (metrics are meaningless and the record says so)"
    )
    out: str = setting("runs/results.json", "results file (JSON list; records are appended)")

    def __post_init__(self):  # here, so that a sweep finds it in every point before the first run
        if self.limit_users is not None and self.sample_users is not None:
            raise BenchError("--limit-users and --sample-users both choose the users; give one of them")


# the Lightning strategies `bench train --strategy` accepts: data parallel, one model copy per
# process, which ddp starts as new scripts, ddp_spawn as spawned and ddp_fork as forked processes
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork")


@dataclass
class TrainSettings:
    """What `bench train` trains and where."""

    objective: Literal["ntp", "nezha", "medusa", "next_item"] = setting("ntp", "the training objective")
    init_from: str | None = setting(
        None,
        "medusa: the trained NTP checkpoint whose backbone the heads sit on; nezha with --nezha-init ntp: the one "
        "its backbone starts from (default: the runs cache's); ntp: the one training continues from, with these "
        "settings (a new schedule; its training record goes into the new one's); the runs cache names it by "
        "its contents' sha256",
    )
    resume: str | None = setting(None, "checkpoint to resume from (e.g. runs/.../last.ckpt)")
    run_dir: str | None = setting(None, "where checkpoints go (default: runs/<dataset>/<objective>-<backbone>-<hash>)")
    devices: int = setting(1, "training processes per node: GPUs, or CPU processes on a machine without one", low=1)
    strategy: str = setting(
        "auto", f"Lightning strategy: {', '.join(STRATEGIES)} (auto: ddp when there are several processes)"
    )
    num_nodes: int = setting(1, "machines taking part (each runs --devices processes)", low=1)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise BenchError(f"--strategy {self.strategy}: not a known strategy; choose one of {', '.join(STRATEGIES)}")


# What `bench tune` searches, per objective: a ModelSettings field, or `decoder:<option>` for
# an option of the objective's validation decoder -> {"low", "high"[, "log"]} or {"choices"}.
# The `tune: space:` section of a config file replaces it.
SEARCH_SPACE = {
    "common": {
        "lr": {"low": 3e-4, "high": 1e-2, "log": True},
        "weight_decay": {"low": 1e-3, "high": 0.3, "log": True},
        "dropout": {"low": 0.0, "high": 0.5},
        "width": {"choices": [64, 128, 256]},
        "layers": {"choices": [1, 2, 4]},
        "heads": {"choices": [2, 4, 8]},
        "train_batch_size": {"choices": [64, 128, 256, 512]},
        "max_history": {"choices": [10, 20, 50]},
    },
    "ntp": {"repeat_bias": {"choices": [False, True]}},
    "nezha": {"transition": {"choices": ["rnn", "gru", "none"]}, "decoder:head_beam": {"choices": [0, 40]}},
    "next_item": {"repeat_bias": {"choices": [False, True]}},
}


@dataclass
class TuneSettings:
    """An optuna search over the model settings of one objective, on validation metrics."""

    objective: Literal["ntp", "nezha", "next_item"] = setting("nezha", "the objective whose models are searched")
    trials: int = setting(20, "finished trials (complete or pruned) the study should reach", low=1)
    timeout: float | None = setting(None, "stop starting trials after this many seconds", low=1)
    study: str | None = setting(None, "study name (default: <objective>-<dataset>); the same name resumes it")
    storage: str | None = setting(
        None,
        "a journal file path (default: runs/tune/<study>/journal.log) or an RDB URL (sqlite:///f.db, postgresql+psycopg://...)",
    )
    workers: int = setting(1, "processes running trials of the one study on this machine", low=1, high=256)
    out: str | None = setting(None, "where best.yaml, trials.csv and plots go (default: runs/tune/<study>/)")
    metric: Literal["recall@10", "ndcg@10", "recall@20", "ndcg@20"] = setting(
        "recall@10", "the validation metric to maximise"
    )
    latency: bool = setting(False, "a second objective: minimise the decode p50 (ms per batch) of the harness")
    pruner: Literal["median", "none"] = setting("median", "prunes trials whose val/recall@10 falls behind")
    space: dict = setting({}, "config file only: search-space entries replacing the default space")


@dataclass
class TokenizeSettings:
    inter: str | None = setting(None, "a <Name>.inter.json with no SIDs yet (else the items of --dataset are used)")
    vectors: str | None = setting(
        None, ".npy with one row per item (row i = item id i); default: vectors from item co-occurrence"
    )
    levels: int = setting(4, "SID levels (tokens <a_N> .. <z_N>)", low=1, high=26)
    codes: int = setting(256, "codes per level", low=2)
    balanced: bool = setting(False, "cap every cluster at ceil(items / codes)")
    dim: int = setting(64, "size of co-occurrence vectors", low=1)
    out_dir: str | None = setting(None, "default: runs/tokenized/<dataset>-rq<levels>x<codes>[-balanced]")


@dataclass
class SweepSettings:
    vary: str = setting(
        "",
        "the setting swept and its values, e.g. batch_size=1,16,256 or items=10000,1000000 (a data, model or "
        "run setting); every other setting as for bench run",
    )
    out_dir: str | None = setting(None, "folder for the table and plot (default: beside the --out records)")


@dataclass
class LeaderboardSettings:
    files: list[str] = setting([], "result files", positional=True)
    out: str | None = setting(None, "write the tables to this file")
    out_dir: str | None = setting(
        None, "write <dataset>-<cpu|gpu>.md, .csv, .json and -pareto.png per run into this folder"
    )
    name: str | None = setting(
        None, "the stem of the files written to --out-dir instead of <dataset>-<cpu|gpu>, e.g. beauty-cpu-ablation"
    )
    only: str | None = setting(
        None, "with result files: the rows of these decoders alone (comma-separated), e.g. beam,nezha,nezha:verifier=off"
    )

    def __post_init__(self):
        if self.name is not None and (not self.name or any(c in self.name for c in "/\\") or self.name[0] == "."):
            raise BenchError(f"--name {self.name!r}: give a file name stem, without folders")


SECTIONS = {
    "data": DataSettings,
    "model": ModelSettings,
    "run": RunSettings,
    "train": TrainSettings,
    "tune": TuneSettings,
    "tokenize": TokenizeSettings,
    "leaderboard": LeaderboardSettings,
    "sweep": SweepSettings,
}
_UNSET = object()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def unwrap_optional(annotation) -> tuple[object, bool]:
    """int | None -> (int, True); Literal[...] -> (Literal[...], False)."""
    args = typing.get_args(annotation)
    if type(None) in args and typing.get_origin(annotation) is not Literal:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def type_name(annotation) -> str:
    base, optional = unwrap_optional(annotation)
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(base)))
    elif typing.get_origin(base) is list:
        text = "a list"
    elif base is dict:
        text = "a mapping"
    else:
        text = {int: "an integer", float: "a number", str: "a string", bool: "a flag (true/false)"}[base]
    return text + (" or null" if optional else "")


def from_text(text: str, annotation):
    """A command-line string -> a value of the annotated type (ValueError if it is none)."""
    base, optional = unwrap_optional(annotation)
    named = typing.get_origin(base) is Literal and text in typing.get_args(base)  # e.g. transition=none
    if optional and text.lower() in ("none", "null") and not named:
        return None
    if base is bool:
        if text.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
            raise ValueError(f"'{text}' is not a flag value (true/false, on/off)")
        return text.lower() in ("1", "true", "on", "yes")
    if typing.get_origin(base) is Literal:
        if text not in typing.get_args(base):
            raise ValueError(f"'{text}' is not {type_name(base)}")
        return text
    try:
        return base(text)
    except ValueError:
        raise ValueError(f"'{text}' is not {type_name(base)}") from None


def value_of_text(cls, name: str, text: str):
    """A setting's value written as on the command line, or the text itself where it is no
    value of the setting's type (check_value then names what it should be)."""
    try:
        return from_text(text, _hints(cls)[name])
    except ValueError:
        return text


def check_value(cls, name: str, value, source: str):
    """A value from a config file, checkpoint or flag -> itself when it fits the field's
    type and bounds, else one BenchError naming where it came from."""
    annotation = _hints(cls)[name]
    base, optional = unwrap_optional(annotation)
    fits = (
        (value is None and optional)
        or (typing.get_origin(base) is Literal and value in typing.get_args(base))
        or (typing.get_origin(base) is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
        or (base is dict and isinstance(value, dict))
        or (base is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (base in (int, str, bool) and type(value) is base)
    )
    if not fits:
        raise BenchError(f"{source}: {name} = {value!r} is not {type_name(annotation)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        meta = next(f for f in fields(cls) if f.name == name).metadata
        where = flag(name) if source == "command line" else f"{source}: {name}"
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every bound
            raise BenchError(f"{where} {value}: must be a finite number")
        if meta.get("low") is not None and value < meta["low"]:
            raise BenchError(f"{where} {value}: must be at least {meta['low']}")
        if meta.get("high") is not None and value > meta["high"]:
            raise BenchError(f"{where} {value}: must be at most {meta['high']}")
        if meta.get("below") is not None and value >= meta["below"]:
            raise BenchError(f"{where} {value}: must be below {meta['below']}")
    return float(value) if base is float and value is not None else value


def from_dict(cls, values: dict, source: str):
    """A dataclass from a plain dict (a config section, a checkpoint's settings), every
    key known and every value checked."""
    if not isinstance(values, dict):
        raise BenchError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise BenchError(f"{source}: unknown setting '{key}'; known: {', '.join(sorted(known))}")
    checked = {key: check_value(cls, key, value, source) for key, value in values.items()}
    try:
        return cls(**checked)
    except BenchError as exc:  # a check across settings (__post_init__), named with its source
        raise BenchError(f"{source}: {exc}") from None


class _TypedValue(argparse.Action):
    """Converts a flag's text with from_text so a bad value is one error line."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is _UNSET:  # a positional list given no value: argparse passes its default
            return
        annotation = self.const
        base, _ = unwrap_optional(annotation)
        try:
            if typing.get_origin(base) is list:
                items = values if isinstance(values, list) else [values]
                current = getattr(namespace, self.dest, _UNSET)
                value = (current if isinstance(current, list) else []) + items
            else:
                value = from_text(values, annotation)
        except ValueError as exc:
            parser.error(f"argument {option_string or self.dest}: {exc}")
        setattr(namespace, self.dest, value)


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: how --decoder and --only list decoder specs."""
    return [item.strip() for item in text.split(",") if item.strip()]


def add_settings(parser: argparse.ArgumentParser, sections: list[str], hidden: dict | None = None) -> None:
    """A flag per field of each section's dataclass, and --config / --print-config.

    hidden: section -> fields that get no flag here (their defaults or the config hold)."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} settings")
        for f in fields(cls):
            if f.name in (hidden or {}).get(section, ()):
                continue
            annotation = _hints(cls)[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata["help"] + (f" (default: {default})" if default not in (None, [], "") else "")
            if unwrap_optional(annotation)[0] is dict:
                continue  # config files only
            if f.metadata["positional"]:
                group.add_argument(f.name, nargs="*", default=_UNSET, action=_TypedValue, const=annotation, help=text)
            elif unwrap_optional(annotation)[0] is bool:
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=_UNSET, help=text)
            else:
                base = unwrap_optional(annotation)[0]
                choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
                metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
                group.add_argument(
                    flag(f.name), default=_UNSET, action=_TypedValue, const=annotation, metavar=metavar, help=text
                )
    if "model" in sections:
        parser.add_argument(
            "--preset",
            help=f"tuned settings from the package: {', '.join(preset_names())} or none "
            "(default: the dataset's preset when there is one)",
        )
    parser.add_argument("--config", help="YAML or JSON file of settings, one section per group (see --print-config)")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as YAML and exit")


def load_yaml(text: str):
    """yaml.safe_load, refusing a mapping that gives a key twice (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:  # the keys as YAML builds them: 1 and 01 are one key, 1 and '1' two
                if key_node.tag == "tag:yaml.org,2002:merge":
                    key = "<<"
                elif isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                else:
                    continue  # a list or mapping as a key: SafeLoader refuses it below
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (line {line}); give it once"
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    # 1e-3 is a number, as in YAML 1.2 and on the command line (PyYAML's YAML 1.1 wants 1.0e-3)
    exponent = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_config(path: str) -> dict:
    import yaml

    from bench.data.letter import DuplicateKey, unique_keys

    file = Path(path)
    if file.exists() and not file.is_file():  # a folder, a pipe: there, but no config to read
        raise BenchError(f"config file {path} is no regular file; pass a YAML or JSON file of settings")
    if not file.is_file():
        raise BenchError(f"config file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
        content = json.loads(text, object_pairs_hook=unique_keys) if file.suffix == ".json" else load_yaml(text)
    except DuplicateKey as exc:
        raise BenchError(
            f"config file {path} is not valid JSON (key '{exc.args[0]}' is given twice; give it once)"
        ) from None
    except (UnicodeDecodeError, RecursionError):
        raise BenchError(f"config file {path} is not a readable text config") from None
    except (ValueError, yaml.YAMLError) as exc:  # json's errors are ValueErrors
        kind = "JSON" if file.suffix == ".json" else "YAML"
        raise BenchError(f"config file {path} is not valid {kind} ({str(exc).splitlines()[0]})") from None
    content = content or {}
    if not isinstance(content, dict):
        raise BenchError(f"config file {path}: expected sections such as data:, model:, run:")
    for section in content:
        if section not in SECTIONS:
            raise BenchError(f"config file {path}: unknown section '{section}'; known: {', '.join(SECTIONS)}")
    return content


PRESETS = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def preset_of(args: argparse.Namespace, config: dict) -> tuple[str | None, dict]:
    """The preset a command starts from: --preset NAME, else the dataset's own preset
    when the package has one (bench/presets/<dataset>.yaml); --preset none: none."""
    name = getattr(args, "preset", None)
    if name is None:
        dataset = getattr(args, "dataset", _UNSET)
        if dataset is _UNSET:
            dataset = (config.get("data") or {}).get("dataset", DataSettings.dataset)
        name = dataset if dataset in preset_names() else "none"
    if name == "none":
        return None, {}
    if name not in preset_names():
        raise BenchError(f"--preset {name}: no such preset; choose one of {', '.join(preset_names() + ['none'])}")
    return name, read_config(str(PRESETS / f"{name}.yaml"))


def without(per_objective, names) -> dict:
    """per_objective entries less the given settings: a later source that sets a setting
    for every objective overrides an earlier source's per-objective value of it."""
    if not isinstance(per_objective, dict):
        return per_objective
    return {
        objective: {k: v for k, v in entries.items() if k not in names} if isinstance(entries, dict) else entries
        for objective, entries in per_objective.items()
    }


def merged(preset: dict, config: dict) -> dict:
    """A config section over a preset's: per_objective entries merge per objective, and a
    setting the config gives for all objectives beats the preset's per-objective value."""
    out = {**preset, **config}
    preset_objectives = without(preset.get("per_objective"), set(config))
    if preset_objectives is not None:
        out["per_objective"] = preset_objectives
    if isinstance(preset_objectives, dict) and isinstance(config.get("per_objective"), dict):
        objectives = {**preset_objectives, **config["per_objective"]}
        out["per_objective"] = {
            name: {**(preset_objectives.get(name) or {}), **(config["per_objective"].get(name) or {})}
            for name in objectives
        }
    return out


def settings_from(args: argparse.Namespace, sections: list[str], hidden: dict | None = None) -> dict:
    """section -> dataclass: defaults, then the preset (the dataset's, or --preset), then
    the --config file, then the flags given."""
    config = read_config(args.config) if args.config else {}
    preset_name, preset = preset_of(args, config) if "model" in sections else (None, {})
    out = {}
    for section in sections:
        cls = SECTIONS[section]
        from_dict(cls, preset.get(section) or {}, f"preset {preset_name}, section {section}")
        given = config.get(section) or {}
        values = merged(preset.get(section) or {}, given) if isinstance(given, dict) else given  # from_dict says why
        built = from_dict(cls, values, f"config file {args.config}, section {section}")
        flagless = (hidden or {}).get(section, ())
        given = {
            f.name: getattr(args, f.name)
            for f in fields(cls)
            if f.name not in flagless and getattr(args, f.name, _UNSET) is not _UNSET
        }
        for name, value in given.items():
            check_value(cls, name, value, "command line")
        if "per_objective" in {f.name for f in fields(cls)}:
            given["per_objective"] = without(built.per_objective, set(given))
        out[section] = dataclasses.replace(built, **given)
    if "model" in out and "data" in out:
        out["model"] = out["model"].resolved(out["data"])
    return out


def explicit_fields(args: argparse.Namespace, section: str) -> set[str]:
    """The fields of a section set by a flag or by the --config file (a preset's are not:
    a search may move them); a config's per-objective entries as per_objective.<objective>.<name>."""
    config = read_config(args.config).get(section) or {} if args.config else {}
    flags = {f.name for f in fields(SECTIONS[section]) if getattr(args, f.name, _UNSET) is not _UNSET}
    entries = config.get("per_objective") if isinstance(config.get("per_objective"), dict) else {}
    own = {f"per_objective.{objective}.{name}" for objective, given in entries.items() for name in given or {}}
    return flags | set(config) | own


def to_yaml(settings: dict) -> str:
    import yaml

    return yaml.safe_dump({section: asdict(value) for section, value in settings.items()}, sort_keys=False)
