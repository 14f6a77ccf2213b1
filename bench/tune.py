"""`bench tune`: optuna searches over the settings of one objective, on validation metrics.

Each trial trains a model with sampled settings (Lightning; bad trials pruned by
optuna-integration's pruning callback on val/recall@10) and scores its best checkpoint
with the harness of `bench run` on the VALID split (the test split is never read): the
metric, and with --latency the decode p50 as a second objective. Studies live in an
optuna storage: a journal file (default, several local worker processes) or any RDB
URL optuna takes (SQLite, PostgreSQL: many machines). A study killed mid-trial resumes
under the same name: finished trials are kept, the trial that was running is marked
failed and not counted, and the search goes on until --trials trials have finished.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from bench.data import NAME
from bench.errors import BenchError, writable_folder
from bench.records import save_figure_atomically, write_atomically
from bench.settings import SEARCH_SPACE, DataSettings, ModelSettings, TuneSettings, check_value
from bench.train import runs_dir
from models.backbones import DECODER_ONLY, backbone_kind
from models.module import VALIDATION_DECODER

FINISHED = ("COMPLETE", "PRUNED")


def search_space(settings: TuneSettings, fixed: set[str] = frozenset()) -> dict[str, dict]:
    """The objective's space (the common entries and its own), or the config's `space`
    instead when it has one, less the settings fixed for every trial. Every entry is
    checked: a range low <= high (above 0 with log), inside the setting's own type and bounds."""
    from decoders import REGISTRY

    space = settings.space or {**SEARCH_SPACE["common"], **SEARCH_SPACE[settings.objective]}
    known = {f.name for f in dataclasses.fields(ModelSettings)}
    decoder = _decoder_options(settings.objective)
    options = REGISTRY[VALIDATION_DECODER[settings.objective]].Options
    for name, spec in space.items():
        option = name.removeprefix("decoder:")
        if (name.startswith("decoder:") and option not in decoder) or (
            not name.startswith("decoder:") and name not in known
        ):
            raise BenchError(
                f"unknown parameter '{name}' in the search space; use a model setting "
                f"({', '.join(sorted(known))}) or decoder:<option> of {VALIDATION_DECODER[settings.objective]} "
                f"({', '.join(sorted(decoder)) or 'none'})"
            )
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise BenchError(
                f"search space entry '{name}' must be {{choices: [...]}} or {{low: x, high: y[, log: true]}}"
            )
    checked = {
        name: _check_entry(name, spec, options if name.startswith("decoder:") else ModelSettings)
        for name, spec in space.items()
    }
    return {name: spec for name, spec in checked.items() if name not in fixed}


def _check_entry(name: str, spec: dict, cls) -> dict:
    """One search-space entry against the shape optuna takes and the setting's declared bounds
    -> the entry with its values in the setting's type, so that `lr: {low: 0, high: 1}` is a
    float range (optuna samples a range of two ints as integers)."""
    unknown = set(spec) - ({"choices"} if "choices" in spec else {"low", "high", "log"})
    if unknown:
        raise BenchError(
            f"search space entry '{name}': unknown key(s) {', '.join(sorted(map(str, unknown)))}; an entry is "
            "{choices: [...]} or {low: x, high: y[, log: true]}"
        )
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise BenchError(f"search space entry '{name}': choices must be a non-empty list")
        values = spec["choices"]
        if not all(value is None or isinstance(value, (bool, int, float, str)) for value in values):
            raise BenchError(f"search space entry '{name}': choices must be numbers, text, true/false or null")
    else:
        low, high = values = [spec["low"], spec["high"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise BenchError(f"search space entry '{name}': low and high must be numbers; list other values as choices")
        if low > high:
            raise BenchError(f"search space entry '{name}': low {low} is above high {high}; swap them")
        if spec.get("log") and low <= 0:
            raise BenchError(f"search space entry '{name}': log: true needs low above 0, not {low}")
    typed = [check_value(cls, name.removeprefix("decoder:"), value, f"search space entry '{name}'") for value in values]
    return {**spec, "choices": typed} if "choices" in spec else {**spec, "low": typed[0], "high": typed[1]}


def _decoder_options(objective: str) -> set[str]:
    from decoders.base import option_names

    return option_names(VALIDATION_DECODER[objective])


def distribution(spec: dict):
    """A checked search-space entry -> the optuna distribution it is sampled from."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if "choices" in spec:
        return CategoricalDistribution(spec["choices"])
    kind = IntDistribution if isinstance(spec["low"], int) else FloatDistribution
    return kind(spec["low"], spec["high"], log=spec.get("log", False))


def suggest(trial, space: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    params = {}
    for name, spec in space.items():
        sampled = distribution(spec)
        if isinstance(sampled, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, sampled.choices)
        elif isinstance(sampled, IntDistribution):
            params[name] = trial.suggest_int(name, sampled.low, sampled.high, log=sampled.log)
        else:
            params[name] = trial.suggest_float(name, sampled.low, sampled.high, log=sampled.log)
    return params


def check_space_matches(study, space: dict, where: str) -> None:
    """A resumed study's trials sampled each parameter as this space does (optuna fails
    every new trial of a parameter whose kind, log scale or choices changed)."""
    from optuna.distributions import CategoricalDistribution

    for name, spec in space.items():
        new = distribution(spec)
        for trial in study.get_trials(deepcopy=False):
            old = trial.distributions.get(name)
            if old is None:
                continue
            if type(old) is not type(new) or getattr(old, "log", None) != getattr(new, "log", None) or (
                isinstance(old, CategoricalDistribution) and old.choices != new.choices
            ):
                raise BenchError(
                    f"{where} sampled {name} from {describe(old)} (trial {trial.number}), this search space from "
                    f"{describe(new)}; choose another --study name, or search {name} as before"
                )


def check_trial_folders(study, out: Path, where: str) -> None:
    """A trial's checkpoints go to <out>/trials/trial-<number>: a folder numbered beyond the
    study's trials is another study's (the same name in another storage), whose models the
    new trials would write over."""
    made = len(study.get_trials(deepcopy=False))
    numbers = [path.name.removeprefix("trial-") for path in (out / "trials").glob("trial-*")]
    foreign = sorted(int(n) for n in numbers if n.isdigit() and int(n) >= made)
    if foreign:
        raise BenchError(
            f"{out / 'trials'} holds trial-{foreign[0]}, which {where} has not made (a study of that name in "
            "another storage?); its checkpoints would be written over: pass another --out"
        )


def discard_empty_study(study, study_file: Path | None, existed: bool) -> None:
    """A refused command leaves no study it made behind: a study without trials is
    deleted, and a journal or SQLite file the command made is removed with it."""
    import optuna

    if study.get_trials(deepcopy=False):
        return
    optuna.delete_study(study_name=study.study_name, storage=study._storage)
    if study_file is not None and not existed and study_file.is_file():
        study_file.unlink()


def describe(sampled) -> str:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(sampled, CategoricalDistribution):
        return f"choices {list(sampled.choices)}"
    kind = "integers" if isinstance(sampled, IntDistribution) else "floats"
    return f"{kind} {sampled.low}..{sampled.high}" + (" (log)" if sampled.log else "")


def default_params(space: dict, model: ModelSettings, objective: str) -> dict:
    """The run's own settings for the objective (per_objective entries in place) as a point
    of the space (where they lie in it): trial 0 of a new study, so the search reports its
    gain over them."""
    from models.backbones import SIZES, backbone_kind, generic_size

    model = model.for_objective(objective)
    current = dataclasses.asdict(model)
    if model.backbone.partition("-")[2] in SIZES and backbone_kind(model.backbone):
        hidden, layers, heads, _, _ = generic_size(model.backbone, model.width, model.layers, model.heads)
        current.update(width=hidden, layers=layers, heads=heads)
    options = _decoder_defaults(objective)
    params = {}
    for name, spec in space.items():
        value = options.get(name.removeprefix("decoder:")) if name.startswith("decoder:") else current.get(name)
        inside = value in spec["choices"] if "choices" in spec else spec["low"] <= (value or 0) <= spec["high"]
        if value is not None and inside:
            params[name] = value
    return params


def _decoder_defaults(objective: str) -> dict:
    from decoders import REGISTRY

    return dataclasses.asdict(REGISTRY[VALIDATION_DECODER[objective]].Options())


def trial_settings(params: dict, model: ModelSettings, objective: str) -> tuple[ModelSettings, str]:
    """Sampled params -> the trial's model settings and its validation decoder spec."""
    model_params = {k: v for k, v in params.items() if not k.startswith("decoder:")}
    options = "".join(f":{k.removeprefix('decoder:')}={v}" for k, v in params.items() if k.startswith("decoder:"))
    return dataclasses.replace(model.for_objective(objective), **model_params), VALIDATION_DECODER[objective] + options


def masked(text: str, url: str) -> str:
    """text (an error line, a log line) with the password of the RDB URL in it shown as ***."""
    password = re.search(r"://[^/@:]*:([^/]*)@", url)
    return text.replace(f":{password[1]}@", ":***@") if password and password[1] else text


def check_journal(path: Path) -> None:
    """A journal file optuna can append to: missing, empty, or an optuna journal (its first
    line a JSON record with op_code); anything else is refused before optuna writes to it."""
    if path.is_dir():
        raise BenchError(f"--storage {path} is a folder; give a journal file ({path / 'journal.log'}) or an RDB URL")
    if path.is_symlink() and not path.exists():
        raise BenchError(f"--storage {path} is a link to nothing ({os.readlink(path)}); give a journal file")
    if path.exists() and not path.is_file():
        raise BenchError(f"--storage {path} is no regular file; give a journal file or an RDB URL")
    writable_folder(path.parent, f"--storage {path}", "journal file")
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with open(path, "r+b") as f:  # read and write access, nothing written
            record = json.loads(f.readline(1 << 20))
    except OSError as exc:
        raise BenchError(f"--storage {path}: cannot read and write it ({exc.strerror or exc})") from None
    except ValueError:  # not JSON, not UTF-8
        record = None
    if not (isinstance(record, dict) and {"op_code", "worker_id"} <= set(record)):
        raise BenchError(
            f"--storage {path} is not an optuna journal (its first line is no journal record); "
            "it was left untouched: give a new file or an RDB URL"
        )


def check_sqlite(url: str) -> None:
    """A SQLite URL names a file that is new, empty or an optuna database: a study in memory
    would be lost (and each worker would open its own), and optuna would add its tables to
    another program's database."""
    import sqlite3

    if not url.startswith("sqlite:"):
        return
    path = storage_file(url)
    if path is None:
        raise BenchError(
            f"--storage {url} keeps the study in memory, lost when the command ends; give a file (sqlite:///study.db)"
        )
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise BenchError(f"--storage {url}: {path} is no SQLite database ({exc}); give a new file") from None
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise BenchError(
            f"--storage {url}: {path} is another program's database (tables {', '.join(sorted(tables)[:5])}); "
            "it was left untouched: give a new file"
        )


def storage_file(url: str) -> Path | None:
    """The file a storage keeps its studies in: a journal's path, a SQLite URL's database
    (None in memory); None for a database server."""
    if "://" not in url:
        return Path(url)
    if not url.startswith("sqlite:"):
        return None
    path = url.partition("://")[2].removeprefix("/")
    return None if path in ("", ":memory:") or "mode=memory" in path else Path(path.partition("?")[0])


def repair_journal(path: Path) -> None:
    """Before a command's workers open a journal: a last record cut off by a killed write
    (no newline after it) is removed, which optuna would otherwise leave in the middle of the
    records appended after it, and any other record that is not JSON is refused, the file
    left as it was."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file():
        return
    lock = JournalFileSymlinkLock(str(path))  # the lock optuna's own writes hold: no record is cut while written
    lock.acquire()
    try:
        content = path.read_bytes()
        whole = content[: content.rfind(b"\n") + 1]
        for number, line in enumerate(whole.splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:  # not JSON, not UTF-8
                raise BenchError(
                    f"--storage {path}: line {number} is no journal record (the file is damaged); it was left "
                    "untouched: restore it from a copy, or give a new file"
                ) from None
        if len(whole) < len(content):
            with open(path, "r+b") as f:
                f.truncate(len(whole))
            print(
                f"{path}: removed its last record, {len(content) - len(whole)} bytes cut off by a killed write; "
                "the study resumes from the records before it",
                flush=True,
            )
    finally:
        lock.release()


def storage_of(url_or_path: str):
    """An optuna storage: an RDB URL (with heartbeats, so a killed worker's trial fails)
    or a journal file."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url_or_path:
        check_sqlite(url_or_path)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
        try:
            return optuna.storages.RDBStorage(url_or_path, heartbeat_interval=10, grace_period=30)
        except Exception as exc:  # any driver's connection error is one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"cannot open the study storage {url_or_path}: {reason[:200]}"
            raise BenchError(masked(message, url_or_path)) from None
    check_journal(Path(url_or_path))
    try:
        Path(url_or_path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # made by someone else since the check, or gone read-only
        raise BenchError(f"--storage {url_or_path}: cannot make its folder ({exc.strerror or exc})") from None
    return JournalStorage(JournalFileBackend(url_or_path))


def data_description(data: DataSettings) -> str:
    """What makes a study's data: the SID collision rule and, for the generated dataset,
    its shape and seed (a real dataset's content is its name's); users as generated, so
    that --users 3000 is the default's data."""
    from bench.data.synthetic import USERS

    values = {"collisions": data.collisions}
    if data.is_synthetic:
        values |= {"seed": data.seed, "items": data.items, "users": data.users or USERS}
        values["sequence_length"] = data.sequence_length
    return ", ".join(f"{name} {value}" for name, value in values.items() if value is not None)


def open_study(settings: TuneSettings, study_name: str, storage_url: str, data: DataSettings, create: bool):
    import optuna

    directions = ["maximize", "minimize"] if settings.latency else ["maximize"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if settings.pruner == "none" or settings.latency:
        pruner = optuna.pruners.NopPruner()
    storage = storage_of(storage_url)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        directions=directions,
        pruner=pruner,
        sampler=optuna.samplers.TPESampler(seed=None),
        load_if_exists=True,
    )
    wanted = {
        "objective": settings.objective,
        "dataset": data.dataset,
        "data": data_description(data),  # studies made before it have none: not compared
        "metric": settings.metric,
        "latency": settings.latency,
    }
    if create and not study.user_attrs:
        for key, value in wanted.items():
            study.set_user_attr(key, value)
    mismatch = {k: v for k, v in study.user_attrs.items() if k in wanted and wanted[k] != v}
    if mismatch:
        raise BenchError(
            masked(f"study '{study_name}' in {storage_url} was made for ", storage_url)
            + ", ".join(f"{k}={v}" for k, v in study.user_attrs.items())
            + "; choose another --study name"
        )
    return study


def fail_stale_trials(study) -> int:
    """Trials left RUNNING by a killed run are failed (a journal has no heartbeat)."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stale)


def finished(study) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def failed(study) -> int:
    return sum(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False))


# what fails one trial and not the search: a run the harness refuses for the sampled
# settings (a head beam below K), a library's error on them
TRIAL_ERRORS = (RuntimeError, ValueError, BenchError)


def run_trial(trial, settings: dict, data, out: Path) -> tuple[float, ...]:
    """Train with the sampled settings, then score the best checkpoint on the valid split."""
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from bench.run import run
    from bench.train import train_model

    tune: TuneSettings = settings["tune"]
    params = suggest(trial, search_space(tune, settings["fixed"]))
    model, spec = trial_settings(params, settings["model"], tune.objective)
    run_dir = out / "trials" / f"trial-{trial.number}"
    callbacks = (
        [] if tune.latency or tune.pruner == "none" else [PyTorchLightningPruningCallback(trial, "val/recall@10")]
    )
    try:
        best = train_model(data, tune.objective, model, settings["data"], run_dir, progress=False, callbacks=callbacks)
    except BenchError as exc:  # settings that cannot build a model (e.g. width not divisible by heads)
        raise optuna.TrialPruned(str(exc)) from None
    harness = dataclasses.replace(settings["run"], split="valid", ckpt=[str(best)], untrained=False)
    record = run(data, settings["data"], model, harness, specs=[spec], progress=False)[0]
    trial.set_user_attr("decoder", spec)
    trial.set_user_attr("checkpoint", str(best))
    value = record["metrics"][tune.metric]
    return (value, record["latency_ms"]["p50"]) if tune.latency else (value,)


def worker(settings: dict, study_name: str, storage_url: str, out: str, threads: int, failed_before: int) -> None:
    """One process of a search: trials until the study has enough finished ones, or
    --trials failed ones since the command began (`failed_before`, counted once by the
    command: a worker that starts late must not count its siblings' failures as earlier)."""
    import optuna

    from bench.data import load

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is our line, not optuna's warning
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(threads)
    tune: TuneSettings = settings["tune"]
    data = load(settings["data"])
    study = open_study(tune, study_name, storage_url, settings["data"], create=False)
    target = tune.trials

    def objective(trial):
        try:
            return run_trial(trial, settings, data, Path(out))
        except TRIAL_ERRORS as exc:  # the trial fails, its line names the error, the search goes on
            trial.set_user_attr("error", (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
            raise

    def stop_when_done(study, trial):
        """Enough finished trials, or as many failed ones since this command began (a
        space whose every point fails would otherwise keep several workers going forever)."""
        if finished(study) >= target or failed(study) - failed_before >= target:
            study.stop()

    def line(study, trial):
        values = "/".join(f"{v:.4f}" for v in trial.values) if trial.values else "-"
        epoch = trial.last_step
        if trial.state.name == "FAIL":
            values = f"({trial.user_attrs.get('error', 'error')})"
        elif trial.state.name == "PRUNED" and epoch is None:
            values = "before training (settings that build no model)"
        elif trial.state.name == "PRUNED":  # optuna keeps the last reported value: the pruner's, not the objective
            values = f"after epoch {epoch + 1} (val/recall@10 {trial.intermediate_values[epoch]:.4f})"
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        print(f"trial {trial.number} {trial.state.name.lower()} {values} in {seconds:.0f} s: {params}", flush=True)

    remaining = target - finished(study)
    if remaining > 0 and failed(study) - failed_before < target:
        alone = tune.workers == 1  # one bar on a terminal; several workers' bars would interleave, their lines do not
        study.optimize(
            objective,
            n_trials=remaining if alone else None,
            timeout=tune.timeout,
            callbacks=[line, stop_when_done],
            catch=TRIAL_ERRORS,
            show_progress_bar=alone and sys.stderr.isatty(),
        )


PLOTS = ("history.png", "importances.png", "pareto.png")


def check_export_targets(out: Path) -> None:
    """An export replaces an earlier search's files only: best.yaml and trials.csv must be
    ours where they exist (their first lines), and plots of those names come with them."""
    marks = {"best.yaml": "# best trial ", "trials.csv": "number,state,"}
    ours = False
    for name, mark in marks.items():
        if (out / name).exists():
            try:
                first = (out / name).read_text(encoding="utf-8").partition("\n")[0]
            except (OSError, ValueError):
                first = ""
            if not first.startswith(mark):
                raise BenchError(f"{out / name} exists and is no output of bench tune; pass another --out")
            ours = True
    taken = [name for name in PLOTS if (out / name).exists()]
    if taken and not ours:
        raise BenchError(f"{out / taken[0]} exists and is no output of bench tune; pass another --out")


def export(study, settings: dict, out: Path) -> Path:
    """best.yaml (a config `bench train` and `bench run` take), trials.csv, plots."""
    import optuna
    from optuna.visualization import matplotlib as plots

    out.mkdir(parents=True, exist_ok=True)
    tune: TuneSettings = settings["tune"]
    trials = [t for t in study.get_trials(deepcopy=False)]
    table = io.StringIO(newline="")  # every file below is put in place whole: a killed export keeps the last
    names = sorted({k for t in trials for k in t.params})
    writer = csv.writer(table)
    objectives = [tune.metric] + (["p50_ms"] if tune.latency else [])
    writer.writerow(["number", "state", *objectives, "pruned_after_epoch", "seconds", *names])
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
        pruned = t.state.name == "PRUNED"
        values = t.values if t.values and not pruned else [""] * len(objectives)
        epoch = t.last_step + 1 if pruned and t.last_step is not None else ""
        writer.writerow([t.number, t.state.name, *values, epoch, seconds, *(t.params.get(n, "") for n in names)])
    write_atomically(out / "trials.csv", table.getvalue())
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        raise BenchError(f"no trial of study '{study.study_name}' completed; see {out / 'trials.csv'}")
    best = max(study.best_trials, key=lambda t: t.values[0])
    model, spec = trial_settings(best.params, settings["model"], tune.objective)
    run = dataclasses.replace(settings["run"], decoder=spec, split="test", ckpt=[])
    config = {
        "data": dataclasses.asdict(settings["data"]),
        "model": dataclasses.asdict(model),
        "run": dataclasses.asdict(run),
        "train": {"objective": tune.objective},
    }
    header = (
        f"# best trial {best.number} of study '{study.study_name}': validation {tune.metric} "
        f"{best.values[0]:.4f}" + (f", p50 {best.values[1]:.1f} ms" if tune.latency else "") + "\n"
    )
    write_atomically(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = (lambda t: t.values[0]) if tune.latency else None  # without one optuna draws the best so far
        history, importances, pareto = PLOTS
        figures = {history: plots.plot_optimization_history(study, target=first, target_name=tune.metric)}
        if len(complete) > 1 and best.params:
            figures[importances] = plots.plot_param_importances(study, target=first, target_name=tune.metric)
        if tune.latency:
            figures[pareto] = plots.plot_pareto_front(study, target_names=[tune.metric, "p50 ms"])
        for name, axes in figures.items():
            save_figure_atomically(axes.figure, out / name, bbox_inches="tight")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return out / "best.yaml"


def fixed_settings(objective: str, model: ModelSettings, given: set[str]) -> set[str]:
    """The model settings every trial keeps: those given by flag or config (for all
    objectives or the searched one's per_objective entry), and those the
    backbone cannot train with (an NTP repeat bias off a decoder-only backbone would fail
    every trial that samples it)."""
    backbone = model.for_objective(objective).backbone
    unusable = objective == "ntp" and backbone is not None and backbone_kind(backbone) != DECODER_ONLY
    own = {name.rpartition(".")[2] for name in given if name.startswith(f"per_objective.{objective}.")}
    return set(given) | own | ({"repeat_bias"} if unusable else set())


def tune(settings: dict, fixed: set[str] = frozenset()) -> None:
    """fixed: model settings given by flag or config, the same for every trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_settings: TuneSettings = settings["tune"]
    data_settings: DataSettings = settings["data"]
    settings = {**settings, "fixed": fixed_settings(tune_settings.objective, settings["model"], fixed)}
    space = search_space(tune_settings, settings["fixed"])  # an unknown parameter fails before any work
    if tune_settings.objective == "nezha" and settings["model"].for_objective("nezha").nezha_init != "scratch":
        raise BenchError(
            "bench tune trains every NEZHA trial from random weights (a warm start would need an NTP model per "
            "sampled setting); pass --nezha-init scratch"
        )
    if tune_settings.objective == "ntp" and settings["model"].for_objective("ntp").item_teacher > 0:
        raise BenchError(
            "bench tune trains every NTP trial on the data alone (a teacher would need an item model per sampled "
            "setting); pass --item-teacher 0, and train the chosen settings with a teacher by bench train"
        )
    study_name = tune_settings.study or f"{tune_settings.objective}-{data_settings.dataset}"
    names_a_folder = not (tune_settings.out and tune_settings.storage)  # runs/tune/<study>/ by default
    if names_a_folder and not NAME.fullmatch(study_name):
        hint = (
            "choose another --study, or give both --out and --storage"
            if tune_settings.study
            else "a dataset folder comes with --data-dir FOLDER beside --dataset NAME"
        )
        raise BenchError(
            f"study name {study_name!r} is not a name (letters, digits, '-', '_' and '.', not starting with '.'); "
            + hint
        )
    cores = os.cpu_count() or 1
    if tune_settings.workers > cores:  # each worker trains on its own cores
        raise BenchError(f"--workers {tune_settings.workers}: this machine has {cores} cores; run at most one per core")
    out = Path(tune_settings.out or runs_dir() / "tune" / study_name).expanduser()  # ~: as Lightning writes there
    writable_folder(out, "--out", "folder")
    check_export_targets(out)
    storage_url = tune_settings.storage or str(runs_dir() / "tune" / study_name / "journal.log")
    if "://" not in storage_url:
        storage_url = str(Path(storage_url).expanduser())
        check_journal(Path(storage_url))
        repair_journal(Path(storage_url))
    study_file = storage_file(storage_url)
    study_file_existed = study_file is not None and study_file.exists()
    study = open_study(tune_settings, study_name, storage_url, data_settings, create=True)
    where = masked(f"study '{study_name}' in {storage_url}", storage_url)
    check_space_matches(study, space, where)
    try:
        check_trial_folders(study, out, where)
    except BenchError:
        discard_empty_study(study, study_file, study_file_existed)
        raise
    stale = fail_stale_trials(study) if "://" not in storage_url else 0
    if not study.trials:
        study.enqueue_trial(default_params(space, settings["model"], tune_settings.objective))
    pruner = (
        "none"
        if tune_settings.latency or tune_settings.pruner == "none"
        else "median (2 startup trials, 1 warm-up epoch)"
    )
    print(
        f"study '{study_name}' in {masked(storage_url, storage_url)}: "
        f"{finished(study)} of {tune_settings.trials} trials finished"
        + (f", {stale} interrupted trial(s) marked failed" if stale else "")
        + f"; objective: validation {tune_settings.metric}"
        + (" and decode p50" if tune_settings.latency else "")
        + f"; pruner: {pruner}; {tune_settings.workers} worker(s); searching {', '.join(space) or 'nothing'}",
        flush=True,
    )
    begin = time.time()
    threads = max(1, (os.cpu_count() or 1) // tune_settings.workers)
    failed_before = failed(study)
    if tune_settings.workers == 1:
        worker(settings, study_name, storage_url, str(out), torch.get_num_threads(), failed_before)
    else:
        context = multiprocessing.get_context("spawn")
        arguments = (settings, study_name, storage_url, str(out), threads, failed_before)
        processes = [context.Process(target=worker, args=arguments) for _ in range(tune_settings.workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    best_config = export(study, settings, out)
    best = max(study.best_trials, key=lambda t: t.values[0])
    print(
        f"{finished(study)} trials finished in {time.time() - begin:.0f} s; best: trial {best.number}, "
        f"{tune_settings.metric} {best.values[0]:.4f}"
        + (f"; Pareto front: {len(study.best_trials)} trial(s)" if tune_settings.latency else "")
    )
    if tune_settings.latency:
        for trial in sorted(study.best_trials, key=lambda t: t.values[1]):
            print(f"  trial {trial.number}: {tune_settings.metric} {trial.values[0]:.4f}, p50 {trial.values[1]:.1f} ms")
    print(f"best settings: {best_config} (python -m bench train --config {best_config}); trials and plots in {out}")
