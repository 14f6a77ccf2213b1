"""python -m bench {run,ablate,train,tokenize,data,leaderboard}

run          decoders on the same batches -> metrics, latency, one JSON record each
ablate       the NEZHA ablations (verifier, placeholders, transition, head beam) beside beam
train        train a model for an objective (ntp: greedy/beam/hf_beam/speculative; nezha; medusa; next_item: full_rank)
tokenize     SIDs for a catalogue by residual k-means, written in the LETTER format
data         load a dataset and print what it holds (users, catalogue, collisions)
leaderboard  result files -> Markdown tables
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.errors import BenchError

DEFAULT_OUT = Path("runs") / "results.json"


def add_data_args(p: argparse.ArgumentParser, collisions: bool = True) -> None:
    p.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic (default, generated), beauty, instruments, yelp, or any name with --data-dir",
    )
    p.add_argument("--data-dir", help="folder with <Name>.inter.json and <Name>.index.json")
    if collisions:
        p.add_argument(
            "--collisions",
            default="last_code",
            choices=["last_code", "extra_level"],
            help="how SIDs shared by several items are made unique",
        )
    p.add_argument("--seed", type=int, default=0)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        help="family-size, e.g. qwen-small, llama-base (default: qwen-tiny on synthetic, qwen-small otherwise)",
    )
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3, help="epochs without val/recall@10 gain before stopping")
    p.add_argument("--train-batch-size", type=int, help="default: 64 on synthetic, 256 otherwise")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dropout", type=float, default=0.1, help="embedding, attention and output dropout")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-history", type=int, default=20, help="items of history kept per example")
    p.add_argument("--val-users", type=int, default=3000, help="valid users decoded per epoch (0 = all)")
    p.add_argument("--transition", default="rnn", choices=["rnn", "gru", "none"], help="NEZHA head transition cell")
    p.add_argument("--no-placeholders", action="store_true", help="NEZHA head reads only the last history state")
    p.add_argument(
        "--medusa-mode",
        default="frozen",
        choices=["frozen", "joint"],
        help="Medusa heads on a frozen backbone (Medusa-1) or trained with it (Medusa-2)",
    )
    p.add_argument(
        "--draft-backbone",
        help="the separate draft model of speculative (default: the micro size of the backbone's family)",
    )
    p.add_argument("--item-backbone", default="sasrec-small", help="the item-embedding model of full_rank")


def train_settings(args):
    from bench.train import TrainSettings

    small = args.dataset == "synthetic" and not args.data_dir
    if args.max_epochs < 1 or args.patience < 0 or args.max_history < 1:
        raise BenchError("--max-epochs and --max-history must be at least 1, --patience at least 0")
    backbone = args.backbone or ("qwen-tiny" if small else "qwen-small")
    return TrainSettings(
        backbone=backbone,
        max_epochs=args.max_epochs,
        patience=args.patience,
        batch_size=args.train_batch_size or (64 if small else 256),
        lr=args.lr,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
        max_history=args.max_history,
        val_users=args.val_users,
        transition=args.transition,
        placeholders=not args.no_placeholders,
        medusa_mode=args.medusa_mode,
        draft_backbone=args.draft_backbone or ("llama-micro" if backbone.startswith("llama") else "qwen-micro"),
        item_backbone=args.item_backbone,
        seed=args.seed,
    )


def cmd_data(args) -> None:
    from bench.data import load_dataset

    data = load_dataset(args.dataset, args.data_dir, args.collisions, args.seed)
    print(json.dumps(data.describe(), indent=1))


def cmd_train(args) -> None:
    from bench.data import load_dataset
    from bench.train import runs_dir, train_model
    from models.module import check_pairing, load_checkpoint

    settings = train_settings(args)
    check_pairing(args.objective, settings.backbone)
    data = load_dataset(args.dataset, args.data_dir, args.collisions, args.seed)
    run_dir = Path(args.run_dir) if args.run_dir else runs_dir() / data.name / settings.key(args.objective, data)
    if args.resume and not Path(args.resume).is_file():
        raise BenchError(f"--resume {args.resume}: no such checkpoint")
    init = None
    if args.objective == "medusa":
        if not args.init_from:
            raise BenchError("--objective medusa trains heads on a trained NTP backbone: pass --init-from NTP.ckpt")
        init = load_checkpoint(args.init_from, data.catalog)
        if init.hparams.objective != "ntp" or init.hparams.backbone != settings.backbone:
            raise BenchError(
                f"--init-from {args.init_from} is a {init.hparams.objective} model with backbone "
                f"{init.hparams.backbone}; Medusa needs an ntp model with backbone {settings.backbone}"
            )
    best = train_model(data, args.objective, settings, run_dir, resume=args.resume, init_from=init)
    print(f"best checkpoint: {best}")


def ablation_specs(k: int) -> list[str]:
    return [
        "beam",
        "nezha",
        "nezha:verifier=last",
        "nezha:verifier=off",
        f"nezha:head_beam={2 * k}",
        "nezha:placeholders=off",
        "nezha:transition=gru",
        "nezha:transition=none",
    ]


def with_constraint(spec: str) -> str:
    """--constrained: add ':constrained' to every decoder that takes the option and lacks it."""
    from decoders import REGISTRY

    name, *parts = spec.split(":")
    takes = name in REGISTRY and "constrained" in REGISTRY[name].options
    has = any(part.partition("=")[0] == "constrained" for part in parts)
    return spec + ":constrained" if takes and not has else spec


def cmd_run(args) -> None:
    from bench.data import load_dataset
    from bench.records import append_records, read_records
    from bench.run import format_table, run

    out = Path(args.out)
    read_records(out)  # a broken results file fails before any work
    if args.command == "ablate":
        specs = ablation_specs(args.k)
    else:
        specs = [s.strip() for s in args.decoder.split(",") if s.strip()]
    if not specs:
        raise BenchError("--decoder names no decoder; give e.g. --decoder greedy,beam,nezha")
    if args.constrained:
        specs = [with_constraint(s) for s in specs]
    settings = train_settings(args)
    data = load_dataset(args.dataset, args.data_dir, args.collisions, args.seed)
    records = run(
        data,
        specs,
        k=args.k,
        batch_size=args.batch_size,
        split=args.split,
        checkpoints=args.ckpt or [],
        settings=settings,
        device_arg=args.device,
        limit_users=args.limit_users,
        warmup=args.warmup,
        untrained=args.untrained,
    )
    print(
        f"\n{data.name} / {args.split} / {records[0]['users']} users / K={args.k} / batch {args.batch_size} / "
        f"{records[0]['device']}"
    )
    print(format_table(records))
    append_records(out, records)
    print(f"\n{len(records)} record(s) appended to {out}")


def cmd_tokenize(args) -> None:
    import shutil

    from bench.data import letter, load_dataset, tokenizer

    if args.levels < 1 or args.codes < 2:
        raise BenchError("--levels must be at least 1 and --codes at least 2")
    if args.inter:  # a catalogue with no SIDs yet: interactions only
        inter = Path(args.inter)
        raw = letter._read_json(inter)
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise BenchError(f"{inter}: expected an object mapping user id -> list of item ids")
        item_ids = sorted(
            {str(i) for items in raw.values() for i in items},
            key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i),
        )
        position = {item: n for n, item in enumerate(item_ids)}
        sequences = [[position[str(i)] for i in items] for items in raw.values()]
        stem, name = inter.name.removesuffix(".inter.json"), args.dataset
    else:
        data = load_dataset(args.dataset, args.data_dir, seed=args.seed)
        item_ids, sequences, name = data.catalog.item_ids, data.sequences, data.name
        inter = next(Path(data.source).glob("*.inter.json"), None) if Path(data.source).is_dir() else None
        stem = inter.name.removesuffix(".inter.json") if inter else name.capitalize()
    if args.vectors:
        vectors, origin = tokenizer.load_vectors(Path(args.vectors), len(item_ids)), args.vectors
    else:
        vectors = tokenizer.cooccurrence_vectors(sequences, len(item_ids), dim=args.dim, seed=args.seed)
        origin = f"PPMI co-occurrence SVD ({args.dim} dims) of the training parts"
    sizes = [args.codes] * args.levels
    codes = tokenizer.rq_kmeans(vectors, sizes, seed=args.seed, balanced=args.balanced)
    out = Path(
        args.out_dir
        or Path("runs") / "tokenized" / f"{name}-rq{args.levels}x{args.codes}{'-balanced' if args.balanced else ''}"
    )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.write_letter_index(out / f"{stem}.index.json", item_ids, codes)
    if inter:
        shutil.copyfile(inter, out / f"{stem}.inter.json")
    else:
        users = {u: [item_ids[i] for i in seq] for u, seq in zip(data.user_ids, sequences)}
        (out / f"{stem}.inter.json").write_text(json.dumps(users))
    report = {
        "vectors": origin,
        "balanced": args.balanced,
        **tokenizer.codebook_report(codes, sizes),
        "written_to": str(out),
    }
    print(json.dumps(report, indent=1))
    print(f"use it with: python -m bench run --dataset {name}-rq --data-dir {out}")


def cmd_leaderboard(args) -> None:
    from bench.leaderboard import leaderboard

    table = leaderboard([Path(p) for p in args.files])
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"written to {args.out}")
    else:
        print(table)


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments get the same one error line as every other bad input, not a usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    for command, text in (
        ("run", "evaluate decoders: quality and latency on the same batches"),
        ("ablate", "NEZHA ablations beside beam, on the same batches"),
    ):
        p = sub.add_parser(command, help=text)
        if command == "run":
            p.add_argument(
                "--decoder",
                default="nezha",
                help="comma-separated decoder specs, e.g. greedy,beam,nezha "
                "or beam:constrained,nezha:verifier=off (see README for every decoder and option)",
            )
        p.add_argument(
            "--constrained", action="store_true", help="beam, hf_beam, medusa and speculative mask invalid prefixes"
        )
        p.add_argument("--k", type=int, default=20, help="recommendations per user (beam width)")
        p.add_argument("--batch-size", type=int, default=32, help="users per decoding batch")
        p.add_argument("--split", default="test", choices=["test", "valid"])
        p.add_argument(
            "--ckpt",
            action="append",
            help="checkpoint from bench train (repeat for ntp, nezha, medusa); "
            "models without one are trained first and cached under runs/",
        )
        p.add_argument("--limit-users", type=int, help="evaluate the first N users of the split")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--warmup", type=int, default=2, help="untimed passes over the first batch")
        p.add_argument(
            "--untrained",
            action="store_true",
            help="random weights, no training: latency only "
            "(e.g. --backbone qwen3-0.6b on a GPU); metrics are meaningless and the record says so",
        )
        p.add_argument("--out", default=str(DEFAULT_OUT), help="results file (JSON list; records are appended)")
        add_data_args(p)
        add_train_args(p)
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a model (Lightning: progress bar, checkpoints, early stopping)")
    p.add_argument("--objective", required=True, choices=["ntp", "nezha", "medusa", "next_item"])
    p.add_argument("--init-from", help="medusa: the trained NTP checkpoint whose backbone the heads sit on")
    p.add_argument("--resume", help="checkpoint to resume from (e.g. runs/.../last.ckpt)")
    p.add_argument("--run-dir", help="where checkpoints go (default: runs/<dataset>/<objective>-<backbone>-<hash>)")
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tokenize", help="SIDs by residual k-means (RQ-KMeans), written as a LETTER index")
    p.add_argument("--inter", help="a <Name>.inter.json with no SIDs yet (else the items of --dataset are used)")
    p.add_argument(
        "--vectors",
        help=".npy with one row per item (row i = item id i); default: vectors from "
        "item co-occurrence in the training parts",
    )
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--codes", type=int, default=256, help="codes per level")
    p.add_argument("--balanced", action="store_true", help="cap every cluster at ceil(items / codes)")
    p.add_argument("--dim", type=int, default=64, help="size of co-occurrence vectors")
    p.add_argument("--out-dir", help="default: runs/tokenized/<dataset>-rq<levels>x<codes>[-balanced]")
    add_data_args(p, collisions=False)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("data", help="load a dataset and describe it")
    add_data_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("leaderboard", help="Markdown tables from result files")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", help="write the tables to this file")
    p.set_defaults(func=cmd_leaderboard)

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported in one line
        return exc.code
    try:
        if getattr(args, "limit_users", None) is not None and args.limit_users < 1:
            raise BenchError(f"--limit-users {args.limit_users}: must be at least 1")
        args.func(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
