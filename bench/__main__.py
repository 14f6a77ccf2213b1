"""python -m bench {run,ablate,sweep,train,tune,tokenize,data,leaderboard}

run          decoders on the same batches -> metrics, latency, one JSON record each
ablate       the NEZHA ablations (verifier, placeholders, transition, head beam) beside beam
sweep        bench run once per value of one setting (batch size, K, catalogue size, ...) -> records, table, plots
train        train a model for an objective (ntp: greedy/beam/hf_beam/speculative; nezha; medusa; next_item: full_rank)
tune         optuna search over an objective's settings on validation metrics (journal file or RDB storage)
tokenize     SIDs for a catalogue by residual k-means, written in the LETTER format
data         load a dataset and print what it holds (users, catalogue, collisions)
leaderboard  result files -> Markdown tables
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from bench.errors import BenchError, writable_folder
from bench.settings import add_settings, comma_list, explicit_fields, settings_from, to_yaml

# which settings each command reads (bench/settings.py defines them once)
SECTIONS = {
    "run": ["data", "model", "run"],
    "ablate": ["data", "model", "run"],
    "sweep": ["data", "model", "run", "sweep"],
    "train": ["data", "model", "train"],
    "tune": ["data", "model", "run", "tune"],
    "tokenize": ["data", "tokenize"],
    "data": ["data"],
    "leaderboard": ["data", "model", "run", "leaderboard"],
}
# settings of a section that a command fixes itself: no flag there (tune scores on the valid split,
# ablate runs its own decoders)
HIDDEN = {
    "tune": {"run": ("decoder", "split", "ckpt", "untrained", "out", "constrained")},
    "ablate": {"run": ("decoder", "constrained")},
    "leaderboard": {"run": ("out",)},  # its records go beside its tables
}


def load_data(settings):
    from bench.data import load

    return load(settings["data"])


def cmd_data(settings) -> None:
    print(json.dumps(load_data(settings).describe(), indent=1))


STARTS_FROM_NTP = {"medusa": "Medusa", "nezha": "NEZHA", "ntp": "NTP training"}  # what --init-from starts


def cmd_train(settings) -> None:
    from bench.train import (
        cache_key,
        cached_checkpoint,
        check_precision,
        check_resumable,
        check_start_shape,
        checkpoint_key,
        runs_dir,
        train_model,
    )
    from decoders.base import item_model_settings
    from models.module import check_pairing, load_checkpoint

    job = settings["train"]
    model_settings = settings["model"].for_objective(job.objective)
    if job.objective == "next_item" and "backbone" not in settings["fixed"]:
        model_settings = item_model_settings(model_settings)  # full_rank's model, in the same cache entry
    check_pairing(job.objective, model_settings)
    check_precision(model_settings)
    if job.resume and not Path(job.resume).is_file():
        raise BenchError(f"--resume {job.resume}: no such checkpoint")
    if job.run_dir:
        writable_folder(Path(job.run_dir).expanduser(), "--run-dir", "folder for the checkpoints")
    if job.objective == "medusa" and not job.init_from:
        raise BenchError("--objective medusa trains heads on a trained NTP backbone: pass --init-from NTP.ckpt")
    starts_from_ntp = job.objective == "nezha" and model_settings.nezha_init == "ntp"
    if job.objective == "nezha" and job.init_from and not starts_from_ntp:
        raise BenchError("--init-from with --objective nezha needs --nezha-init ntp (the model records its start)")
    if job.objective == "next_item" and job.init_from:
        raise BenchError("--init-from does not apply to --objective next_item: the item model trains from scratch")
    data = load_data(settings)
    init, init_key = None, ""
    if job.init_from:
        init = load_checkpoint(job.init_from, data.catalog)
        init_key = checkpoint_key(Path(job.init_from))
        if init.objective != "ntp" or init.settings.backbone != model_settings.backbone:
            raise BenchError(
                f"--init-from {job.init_from} is a {init.objective} model with backbone {init.settings.backbone}; "
                f"{STARTS_FROM_NTP[job.objective]} needs an ntp model with backbone "
                f"{model_settings.backbone}"
            )
        check_start_shape(job.init_from, init, job.objective, model_settings)
    elif starts_from_ntp:  # the starting model the nezha decoder asks for, from the runs cache
        from bench.train import resolve_models
        from decoders import REGISTRY

        nezha = REGISTRY["nezha"]
        request = nezha.requests(nezha.Options(), settings["model"])["nezha"].init_from
        [start] = resolve_models([{"ntp": request}], data, settings["data"], [])
        init, init_key = start["ntp"].model, start["ntp"].key
    teacher, teacher_key = None, ""
    if job.objective == "ntp" and model_settings.item_teacher > 0:  # the item model, from the runs cache
        from bench.train import resolve_models
        from decoders.base import ModelRequest

        request = ModelRequest("ntp", settings["model"]).teacher
        [resolved] = resolve_models([{"next_item": request}], data, settings["data"], [])
        teacher, teacher_key = resolved["next_item"].model, resolved["next_item"].key
    key = cache_key(job.objective, model_settings, data, settings["data"].seed, init_key, teacher_key)
    run_dir = Path(job.run_dir).expanduser() if job.run_dir else runs_dir() / data.name / key  # ~: as Lightning
    if job.resume:  # before the cache: a finished run of these settings is no answer to a resume of others
        check_resumable(job.resume, job.objective, model_settings, data)
    resumed_here = job.resume and Path(job.resume).resolve().parent == run_dir.resolve()
    cached = None if resumed_here else cached_checkpoint(run_dir)  # a finished run elsewhere is not written over
    if cached:
        print(f"already trained with these settings: {cached} (delete {run_dir} to train again)")
        return
    best = train_model(
        data,
        job.objective,
        model_settings,
        settings["data"],
        run_dir,
        resume=job.resume,
        init_from=init,
        teacher=teacher,
        devices=job.devices,
        strategy=job.strategy,
        num_nodes=job.num_nodes,
    )
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # under ddp every process gets here; one prints
        print(f"best checkpoint: {best}")


def cmd_tune(settings) -> None:
    from bench.tune import tune

    tune(settings, fixed=settings.pop("fixed"))


def ablation_specs(k: int, catalog) -> list[str]:
    """NEZHA's ablations beside beam; the wider head beam is 2K, or as many beams as the
    prefixes before the last level hold (none where K already holds them all)."""
    wider = min(2 * k, math.prod(catalog.codebook_sizes[:-1]))
    return [
        "beam",
        "nezha",
        "nezha:verifier=last",
        "nezha:verifier=off",
        *([f"nezha:head_beam={wider}"] if wider > k else []),
        "nezha:placeholders=off",
        "nezha:transition=gru",
        "nezha:transition=none",
    ]


def cmd_run(settings, command: str) -> None:
    from bench.records import append_records, check_writable, results_file
    from bench.run import format_table, run

    run_settings = settings["run"]
    out = Path(run_settings.out)
    results_file(out)  # a broken results file fails before any work
    check_writable(out)
    data = load_data(settings)
    specs = ablation_specs(run_settings.k, data.catalog) if command == "ablate" else None
    if specs:  # a config's run.decoder or constrained does not apply: the records say what ran
        run_settings = replace(run_settings, decoder=",".join(specs), constrained=False)
    records = run(data, settings["data"], settings["model"], run_settings, specs=specs, asked=settings["fixed"])
    print(
        f"\n{data.name} / {run_settings.split} / {records[0]['users']} users / K={run_settings.k} / "
        f"batch {run_settings.batch_size} / {records[0]['device']}"
    )
    print(format_table(records))
    append_records(out, records)
    print(f"\n{len(records)} record(s) appended to {out}")


def cmd_sweep(settings) -> None:
    from dataclasses import fields

    from bench.records import append_records, check_writable, results_file
    from bench.run import check_run, decoder_specs, format_table, run
    from bench.settings import DataSettings
    from bench.sweep import check_sweep_targets, sweep_points, write_sweep

    out = Path(settings["run"].out)
    results_file(out)
    check_writable(out)
    tables = settings["sweep"].out_dir
    if tables:
        writable_folder(Path(tables), "--out-dir", "folder for the table and plot")
    name, points = sweep_points(settings)  # every value checked before the first run
    check_sweep_targets(name, out, tables)
    shared = None if name in {f.name for f in fields(DataSettings)} else load_data(settings)  # one for all points
    if shared is None:  # each point loads its own: a folder or name that cannot be is found before the first
        from bench.data import check_source

        for _, point in points:
            check_source(point["data"])
    for _, point in points:  # and every point's run, as far as it can be before any work (K: given one catalogue)
        check_run(shared, point["model"], point["run"], decoder_specs(point["run"]))
    records = []
    for value, point in points:
        print(f"\n--- {name} = {value}")
        data = shared or load_data(point)
        found = run(data, point["data"], point["model"], point["run"], asked=settings["fixed"] | {name})
        print(format_table(found))
        append_records(out, found)  # each point kept as soon as it is measured
        records += found
    for path in write_sweep(records, name, out, settings["sweep"].out_dir):
        print(f"written: {path}")


def cmd_tokenize(settings) -> None:
    from bench.data import tokenizer
    from bench.records import replace_files
    from bench.data.catalog import MAX_SIDS

    args = settings["tokenize"]
    if args.codes**args.levels >= MAX_SIDS:  # the SIDs could be written but never loaded
        raise BenchError(
            f"--codes {args.codes} --levels {args.levels}: a code space of {args.codes}**{args.levels} SIDs is too "
            "large for 64-bit SID codes (2**62 at most); use fewer levels or codes"
        )
    if args.inter:  # a catalogue with no SIDs yet: interactions only
        inter = Path(args.inter)
        item_ids, sequences = tokenizer.read_interactions(inter)
        stem, name, source = inter.name.removesuffix(".inter.json"), settings["data"].dataset, inter.parent
    else:
        data = load_data(settings)
        item_ids, sequences, name = data.catalog.item_ids, data.sequences, data.name
        source = Path(data.source) if Path(data.source).is_dir() else None
        inter = next(source.glob("*.inter.json"), None) if source else None
        stem = inter.name.removesuffix(".inter.json") if inter else name.capitalize()
    out = Path(
        args.out_dir
        or Path("runs") / "tokenized" / f"{name}-rq{args.levels}x{args.codes}{'-balanced' if args.balanced else ''}"
    )
    tokenizer.check_out_dir(out, source, stem)
    if args.vectors:
        vectors, origin = tokenizer.load_vectors(Path(args.vectors), len(item_ids)), args.vectors
    else:
        vectors = tokenizer.cooccurrence_vectors(sequences, len(item_ids), dim=args.dim, seed=settings["data"].seed)
        origin = f"PPMI co-occurrence SVD ({args.dim} dims) of the training parts"
    sizes = [args.codes] * args.levels
    codes = tokenizer.rq_kmeans(vectors, sizes, seed=settings["data"].seed, balanced=args.balanced)
    try:  # both files whole, or neither: an earlier tokenization there stays readable if this one dies
        out.mkdir(parents=True, exist_ok=True)
        if inter:
            users = inter.read_bytes()
        else:
            users = json.dumps({u: [item_ids[i] for i in seq] for u, seq in zip(data.user_ids, sequences)}).encode()
        index = tokenizer.letter_index_text(item_ids, codes).encode()
        replace_files({out / f"{stem}.inter.json": users, out / f"{stem}.index.json": index})
    except OSError as exc:
        raise tokenizer.unwritable(out, exc.strerror or str(exc)) from None
    report = {
        "vectors": origin,
        "balanced": args.balanced,
        **tokenizer.codebook_report(codes, sizes),
        "written_to": str(out),
    }
    print(json.dumps(report, indent=1))
    rule = " --collisions extra_level" if tokenizer.needs_extra_level(item_ids, codes) else ""
    print(f"use it with: python -m bench run --dataset {name}-rq --data-dir {out}{rule}")


def cmd_leaderboard(settings) -> None:
    from bench.leaderboard import run_files, write_leaderboard

    args = settings["leaderboard"]
    if not args.files:  # run every decoder on the same models and batches, then its tables
        if not args.out_dir:
            raise BenchError(
                "leaderboard needs result files (python -m bench leaderboard results/records/*.json) or --out-dir "
                "FOLDER to run every decoder on --dataset and write its tables there"
            )
        from bench.leaderboard import measure_board

        if args.only:
            raise BenchError("--only selects rows of result files; when the leaderboard runs, pass --decoder")

        for path in measure_board(load_data(settings), settings, Path(args.out_dir), args.name):
            print(f"written: {path}")
        return
    if settings["given"]:
        raise BenchError(
            f"--{settings['given'][0].replace('_', '-')} applies when the leaderboard runs the decoders; with "
            "result files it only reads them (drop the files, or the setting)"
        )
    paths = [Path(p) for p in args.files]
    only = comma_list(args.only) if args.only else None
    if args.out_dir:
        for path in run_files(paths, Path(args.out_dir), args.name, only):
            print(f"written: {path}")
        if not args.out:
            return
    if args.name:
        raise BenchError("--name names the files of --out-dir; give --out-dir FOLDER with it")
    table = write_leaderboard(paths, Path(args.out) if args.out else None, only)
    print(f"written to {args.out}" if args.out else table)


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments get the same one error line as every other bad input, not a usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


COMMANDS = {
    "run": ("evaluate decoders: quality and latency on the same batches", lambda s: cmd_run(s, "run")),
    "ablate": ("NEZHA ablations beside beam, on the same batches", lambda s: cmd_run(s, "ablate")),
    "sweep": ("bench run once per value of one setting; a table and plots of latency against it", cmd_sweep),
    "train": ("train a model (Lightning: progress bar, checkpoints, early stopping)", cmd_train),
    "tune": ("optuna search over the settings of an objective, on validation metrics", cmd_tune),
    "tokenize": ("SIDs by residual k-means (RQ-KMeans), written as a LETTER index", cmd_tokenize),
    "data": ("load a dataset and describe it", cmd_data),
    "leaderboard": ("Markdown tables from result files", cmd_leaderboard),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    for command, (text, _) in COMMANDS.items():
        add_settings(sub.add_parser(command, help=text, description=text), SECTIONS[command], HIDDEN.get(command))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported in one line
        return exc.code
    try:
        settings = settings_from(args, SECTIONS[args.command], HIDDEN.get(args.command))
        if args.print_config:
            print(to_yaml(settings), end="")
            return 0
        if args.command in ("tune", "train", "run", "ablate", "sweep"):
            # tune: not searched; train: the item model's backbone; run: what a --ckpt must match
            settings["fixed"] = explicit_fields(args, "model")
        if args.command == "leaderboard":  # run settings given, which reading files would ignore
            hidden = HIDDEN["leaderboard"]
            given = (explicit_fields(args, s) - set(hidden.get(s, ())) for s in ("data", "model", "run"))
            settings["given"] = sorted(set().union(*given))
        COMMANDS[args.command][1](settings)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no result was written and earlier results are intact", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc):
            raise
        print(
            "error: out of memory; lower --batch-size, --k, a decoder's beam option or the model size", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
