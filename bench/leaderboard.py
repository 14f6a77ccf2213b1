"""`bench leaderboard`: result files -> one Markdown table per run (dataset, split,
device, command). Speedups are against the beam search of the same run only: speeds
measured in different runs are not compared. Input files it cannot read are refused,
never skipped, and an empty table never replaces a written one."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path

from bench.data import NAME
from bench.errors import BenchError, writable_folder
from bench.metrics import Bootstrap, per_user, ranks_from_hits
from bench.records import (
    SPREAD_NOTE,
    calls_text,
    cell,
    command_line,
    decoder_style,
    latency_cell,
    p50_per_pass,
    png_bytes,
    read_records,
    replace_files,
    write_atomically,
)

# the fields a table row reads
REQUIRED = (
    "dataset split device timestamp command decoder users k batch_size metrics invalid_rate "
    "backbone_calls_per_batch git_sha"
).split()
METRICS = ("recall@1", "recall@10", "ndcg@10", "recall@20", "ndcg@20")
TEXT = ("dataset", "split", "device", "timestamp", "command", "decoder", "git_sha")  # grouped, sorted, sliced
HEADER = ("protocol", "users_chosen", "torch", "transformers")  # text said above a run's table, where given
# the most users (and K) a record may claim: the synthetic data's most users; a run's intervals
# draw 1000 resamples of every user
MOST = 10_000_000
# what `bench leaderboard --out-dir` runs when no --decoder is given
EVERY_DECODER = "greedy,beam,beam:constrained,hf_beam,hf_beam:constrained,medusa,speculative,nezha,popularity,full_rank"


def is_number(value, optional: bool = False, low: float = -math.inf, high: float = math.inf) -> bool:
    """A finite number in [low, high] (nan and inf in a record are no figures to table)."""
    if optional and value is None:
        return True
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return (isinstance(value, int) or math.isfinite(value)) and low <= value <= high


def is_count(value, optional: bool = False, high: float = math.inf) -> bool:
    """An integer from 1 to `high`."""
    return (optional and value is None) or (type(value) is int and 1 <= value <= high)


def malformed(record: dict) -> list[str]:
    """The fields of a record (with every REQUIRED key) a table row could not read, or
    whose figures are out of their range (a Recall of -3, a negative latency)."""
    wrong = [key for key in TEXT if not isinstance(record[key], str)]
    wrong += [key for key in HEADER if not (record.get(key) is None or isinstance(record[key], str))]
    wrong += [] if record.get("seed") is None or type(record["seed"]) is int else ["seed"]
    wrong += [] if "dataset" in wrong or NAME.fullmatch(record["dataset"]) else ["dataset"]  # it names board files
    wrong += [key for key in ("users", "k") if not is_count(record[key], high=MOST)]
    wrong += [] if is_count(record["batch_size"]) else ["batch_size"]
    users, k = (math.inf if key in wrong else record[key] for key in ("users", "k"))
    wrong += [] if is_count(record.get("candidates_per_user"), True, k) else ["candidates_per_user"]
    wrong += [] if is_number(record["invalid_rate"], low=0, high=1) else ["invalid_rate"]
    wrong += [] if is_number(record["backbone_calls_per_batch"], low=0) else ["backbone_calls_per_batch"]
    wrong += [f"metrics {key}" for key in METRICS if not is_number(record["metrics"][key], True, 0, 1)]
    latency = record.get("latency_ms")
    if latency and not (
        isinstance(latency, dict)
        and is_number(latency.get("mean"), low=0)
        and all(is_number(latency.get(key), optional=True, low=0) for key in ("p50", "p99"))
    ):
        wrong.append("latency_ms")
    for key in ("latency_over_floor", "latency_over_prefill", "latency_over_run_floor", "draft_calls_per_batch"):
        if not is_number(record.get(key), optional=True, low=0):
            wrong.append(key)
    wrong += [] if is_count(record.get("latency_repeats"), optional=True) else ["latency_repeats"]
    passes = record.get("latency_p50_per_pass")
    if passes is not None and not (isinstance(passes, list) and all(is_number(p, low=0) for p in passes)):
        wrong.append("latency_p50_per_pass")
    hits = record.get("hits")
    if hits is not None and not (
        isinstance(hits, dict)
        and isinstance(hits.get("users"), list)
        and isinstance(hits.get("ranks"), list)
        and len(hits["users"]) == len(hits["ranks"])
        and all(type(u) is int and 0 <= u < users for u in hits["users"])
        and all(is_count(rank, high=k) for rank in hits["ranks"])
    ):
        wrong.append("hits")
    elif hits is not None and not wrong and not recall_of_hits(record):
        wrong.append("hits (not those of its metrics recall@10)")
    backbone = record.get("backbone")
    if backbone and not (isinstance(backbone, dict) and isinstance(backbone.get("name"), str)):
        wrong.append("backbone")
    return wrong


def recall_of_hits(record: dict) -> bool:
    """Whether a record's Recall@10 is the mean over its per-user hits: the interval drawn
    about it in the Pareto plot is the hits' (a negative error bar stops the plot)."""
    recall = record["metrics"]["recall@10"]
    ranks = ranks_from_hits(record["hits"], record["users"])
    return recall is None or abs(float(per_user(ranks, "recall@10").mean()) - recall) <= 1e-6


def run_groups(paths: list[Path], only: list[str] | None = None) -> list[tuple[tuple, list[dict]]]:
    """The records of every input file (of the decoders in `only`, when given), grouped by
    run (dataset, split, device, timestamp, command)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    found = set()
    for path in paths:
        for record in board_records(path):
            found.add(record["decoder"])
            if only and record["decoder"] not in only:
                continue
            run = (record["dataset"], record["split"], record["device"], record["timestamp"], record["command"])
            groups[run].append(record)
    absent = [decoder for decoder in only or () if decoder not in found]
    if absent:
        raise BenchError(
            f"--only {','.join(absent)}: no record of that decoder in the input files (they hold "
            f"{', '.join(sorted(found)) or 'none'}); nothing was written"
        )
    for run, records in groups.items():
        check_one_protocol(run, records)
        check_each_decoder_once(run, records)
    return sorted(groups.items())


# what every record of one table shares: the same users, batches, protocol, data and settings
SHARED = ("users", "k", "batch_size", "protocol", "data_source", "data_sha256", "git_sha", "weights", "settings")


def check_one_protocol(run: tuple, records: list[dict]) -> None:
    """Records that claim one run (same dataset, split, device, timestamp and command) but
    differ in what makes their figures comparable are refused, never tabled together."""
    for name in SHARED:
        values = {json.dumps(r.get(name), sort_keys=True) for r in records}
        if len(values) > 1:
            raise BenchError(
                f"records of the run at {run[3]} ({run[0]}, {run[2]}) differ in '{name}': they come from different "
                "runs or models and are not compared in one table; keep each run's records in its own file"
            )


def check_each_decoder_once(run: tuple, records: list[dict]) -> None:
    """A run measures each decoder once (bench run refuses a decoder named twice): two
    records of one decoder in one run are a results file given twice, or with a copy."""
    seen = set()
    for record in records:
        if record["decoder"] in seen:
            raise BenchError(
                f"the run at {run[3]} ({run[0]}, {run[2]}) holds decoder {record['decoder']} twice: is a results file "
                "given twice, or beside a copy of it? give each run's records once (nothing was written)"
            )
        seen.add(record["decoder"])


def run_rows(records: list[dict]) -> list[dict]:
    """One row per decoder of a run: quality with intervals, validity, latency and the
    ratios of the same run (speedups over beam and hf_beam, latency over the floor)."""
    intervals = Intervals(records)

    def reference(name: str):
        found = [r for r in records if r["decoder"] == name and r.get("latency_ms")]
        return found[-1]["latency_ms"] if found else None

    beam, hf_beam = reference("beam"), reference("hf_beam")
    rows = []
    for r in records:
        m, lat = r["metrics"], r.get("latency_ms") or {}
        over_floor = r.get("latency_over_floor")
        older = over_floor is None and r.get("latency_over_prefill") is not None
        row = {
            "decoder": r["decoder"],
            "backbone": r["backbone"]["name"] if r.get("backbone") else None,
            "users": r["users"],
            "k": r["k"],
            "candidates": r.get("candidates_per_user"),  # None in older records
            "batch_size": r["batch_size"],
            **{name: m[name] for name in METRICS},
            **intervals.bounds(r),
            "invalid_rate": r["invalid_rate"],
            "p50_ms": lat.get("p50"),
            "p50_per_pass_ms": p50_per_pass(r),
            "p99_ms": lat.get("p99"),
            "mean_ms": lat.get("mean"),
            "latency_over_floor": r.get("latency_over_prefill") if older else over_floor,
            "latency_over_run_floor": r.get("latency_over_run_floor"),
            "older_floor": older,
            "backbone_calls_per_batch": r["backbone_calls_per_batch"],
            "draft_calls_per_batch": r.get("draft_calls_per_batch"),  # None in older records: not counted
            "commit": r["git_sha"][:10],
        }
        for name, ref in (("beam", beam), ("hf_beam", hf_beam)):
            stat = "p50" if ref and ref.get("p50") and lat.get("p50") else "mean"  # older records: means
            row[f"speedup_vs_{name}"] = ref[stat] / lat[stat] if ref and lat.get(stat) and r.get("backbone") else None
        rows.append(row)
    return rows


def run_table(run: tuple, rows: list[dict]) -> str:
    """The Markdown table of one run (its run_rows), with its notes."""
    dataset, split, device, timestamp, command = run
    out = [f"### {dataset} / {split} / {device} / {timestamp}\n"]
    out.append(
        "| decoder | backbone | users | K | batch | R@1 | R@10 [95% CI] | N@10 [95% CI] | R@10 - beam [95% CI] | "
        "R@20 | N@20 | invalid | p50 ms/batch | p99 ms | x floor | speedup vs beam | speedup vs hf_beam | "
        "backbone calls | commit |"
    )
    out.append("|" + "---|" * 19)
    for row in rows:
        floor = cell(row["latency_over_floor"], ".2f") + ("†" if row["older_floor"] else "")
        out.append(
            f"| {row['decoder']} | {row['backbone'] or '-'} | {row['users']} | {row['k']} | {row['batch_size']} | "
            f"{cell(row['recall@1'], '.4f')} | {with_interval(row, 'recall@10')} | {with_interval(row, 'ndcg@10')} | "
            f"{difference(row)} | {cell(row['recall@20'], '.4f')} | {cell(row['ndcg@20'], '.4f')} | "
            f"{row['invalid_rate']:.3f} | {latency_cell(row)} | "
            f"{cell(row['p99_ms'], '.1f')} | {floor} | {cell(row['speedup_vs_beam'], '.2f')} | "
            f"{cell(row['speedup_vs_hf_beam'], '.2f')} | "
            f"{calls_text(row)} | {row['commit']} |"
        )
    if any(row.get("recall@10_low") is not None for row in rows):
        out.append(
            "\nIntervals: percentile bootstrap over the users (1000 resamples, seed 0); the difference to beam is "
            "paired (both resampled on the same users), ** where its interval excludes 0, else the two are not "
            "called different."
        )
    short = [row for row in rows if row["candidates"] is not None and row["candidates"] < row["k"]]
    for row in short:
        out.append(
            f"\n{row['decoder']} returns {row['candidates']} candidate(s) per user, fewer than K = {row['k']}: its "
            f"Recall and NDCG at k above {row['candidates']} are those at {row['candidates']}."
        )
    if any(row["p50_per_pass_ms"] for row in rows):
        out.append("\n" + SPREAD_NOTE)
    if any(row["older_floor"] for row in rows):
        out.append(
            "\n† an older record: mean over the mean of a bare pass over the decoder's own prompt "
            "(NEZHA's with its placeholders); newer records give p50 over the p50 of a pass over the history alone"
        )
    out.append(f"\nCommand: `{command}`\n")
    return "\n".join(out)


def with_interval(row: dict, metric: str) -> str:
    if row.get(f"{metric}_low") is None:
        return cell(row[metric], ".4f")
    return f"{row[metric]:.4f} [{row[f'{metric}_low']:.4f}, {row[f'{metric}_high']:.4f}]"


def difference(row: dict) -> str:
    if row.get("recall@10_minus_beam") is None:
        return "-"
    low, high = row["recall@10_minus_beam_low"], row["recall@10_minus_beam_high"]
    mark = " **" if low > 0 or high < 0 else ""
    return f"{row['recall@10_minus_beam']:+.4f} [{low:+.4f}, {high:+.4f}]{mark}"


def run_header(run: tuple, records: list[dict]) -> dict:
    """What a run's tables say of how they were made."""
    first = records[0]
    return {
        "dataset": run[0],
        "split": run[1],
        "device": run[2],
        "timestamp": run[3],
        "command": run[4],
        "protocol": first.get("protocol"),
        "users_chosen": first.get("users_chosen"),
        "torch": first.get("torch"),
        "transformers": first.get("transformers"),
        "commit": first["git_sha"],
        "seed": first.get("seed"),
    }


def run_files(paths: list[Path], out_dir: Path, name: str | None = None, only: list[str] | None = None) -> list[Path]:
    """Per run, <dataset>-<cpu|gpu>.md (or <name>.md), .csv, .json and -pareto.png in
    out_dir (a later run of the same stem gets -2, -3, ...), written together (write_boards);
    `only`: the rows of these decoders alone (an ablation table cut from a full run),
    the command that cut them named under the run's own."""
    out_dir = Path(os.path.realpath(out_dir))
    check_out_dir(out_dir)
    groups = run_groups(paths, only)
    if not groups:
        raise BenchError("the input files hold no records; nothing was written")
    names, taken = [], set()
    for run, _ in groups:
        stem = name or f"{run[0]}-{'cpu' if run[2].startswith('cpu') else 'gpu'}"
        unique, number = stem, 1
        while unique in taken:
            number += 1
            unique = f"{stem}-{number}"
        taken.add(unique)
        names.append(unique)
    inputs = {Path(os.path.realpath(path)) for path in paths}
    targets = [out_dir / f"{n}{suffix}" for n in names for suffix in BOARD_SUFFIXES]
    clashes = [target for target in targets if target in inputs]
    if clashes:  # records are never overwritten by a table made of them
        raise BenchError(f"--out-dir would write over the input file {clashes[0]}; give another folder")
    check_board_targets(out_dir, names)
    cut_by = command_line() if only else None
    return write_boards(list(zip(names, groups)), out_dir, cut_by)


def measure_board(data, settings: dict, out_dir: Path, name: str | None = None) -> list[Path]:
    """Every decoder (or the --decoder given) on the same models and batches: its records
    appended to out_dir/records/<stem>.json (earlier runs kept), this run's tables written
    as out_dir/<stem>.md, .csv, .json and -pareto.png; stem: `name`, else <dataset>-<cpu|gpu>."""
    from bench.records import append_records, check_writable, results_file
    from bench.run import resolve_device, run
    from bench.settings import comma_list
    from decoders import with_constraint

    check_out_dir(Path(out_dir))
    kind = "cpu" if resolve_device(settings["run"].device).type == "cpu" else "gpu"
    stem = name or f"{data.name}-{kind}"
    check_board_targets(Path(out_dir), [stem])
    records_path = Path(out_dir) / "records" / f"{stem}.json"
    results_file(records_path)  # a broken records file fails before any work
    check_writable(records_path)
    run_settings = dataclasses.replace(settings["run"], out=str(records_path))
    if "decoder" not in settings.get("given", ()):
        every = comma_list(EVERY_DECODER)
        if run_settings.constrained:  # beam and beam:constrained become one decoder
            every = list(dict.fromkeys(with_constraint(spec) for spec in every))
        run_settings = dataclasses.replace(run_settings, decoder=",".join(every))
    records = run(data, settings["data"], settings["model"], run_settings)
    append_records(records_path, records)
    first = records[0]
    group = ((first["dataset"], first["split"], first["device"], first["timestamp"], first["command"]), records)
    return [records_path] + write_boards([(stem, group)], Path(out_dir))


BOARD_SUFFIXES = (".md", ".csv", ".json", "-pareto.png")


def check_board_targets(out_dir: Path, names: list[str]) -> None:
    """A board replaces an earlier board of its name, never another file: where any of
    its four files exists, its .json must be a board's ({"run": ..., "rows": ...})."""
    for name in names:
        targets = [out_dir / f"{name}{suffix}" for suffix in BOARD_SUFFIXES]
        if not any(target.exists() for target in targets):
            continue
        board = out_dir / f"{name}.json"
        try:
            held = json.loads(board.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = None
        if not (isinstance(held, dict) and {"run", "rows"} <= held.keys()):
            existing = next(target for target in targets if target.exists())
            raise BenchError(
                f"{existing} exists and is no leaderboard of this suite; give another --name or --out-dir "
                "(nothing was written)"
            )


def check_out_dir(out_dir: Path) -> None:
    """A folder the tables can be written in (or made in), found before any work."""
    writable_folder(out_dir, "--out-dir", "folder for the tables and plots")


def write_boards(named_groups: list[tuple[str, tuple]], out_dir: Path, cut_by: str | None = None) -> list[Path]:
    """Per run: <name>.md, .csv, .json and -pareto.png in out_dir. Every file of every board
    is made before any is written, then all replace their earlier versions together
    (replace_files): a board that cannot be made leaves the earlier ones whole. cut_by: the
    command that chose some of the run's rows, said under the run's own."""
    files, written = {}, []
    for name, (run, records) in named_groups:
        header, rows = run_header(run, records), run_rows(records)
        if cut_by:
            header["rows_cut_by"] = cut_by
        # the .json first: it is what marks these files as a board (check_board_targets)
        files[out_dir / f"{name}.json"] = (json.dumps({"run": header, "rows": rows}, indent=1) + "\n").encode()
        files[out_dir / f"{name}-pareto.png"] = pareto_plot(rows, header)
        lines = [
            f"# {header['dataset']} / {header['split']} / {header['device']}\n",
            f"Made by `{header['command']}` at commit {header['commit'][:10]} ({header['timestamp']}), seed "
            f"{header['seed']}, torch {header['torch']}, transformers {header['transformers']}.\n",
            *([f"Rows of that run chosen by `{cut_by}`.\n"] if cut_by else []),
            *([f"Users: {header['users_chosen']}.\n"] if header["users_chosen"] else []),
            f"Protocol: {header['protocol']}\n",
            run_table(run, rows),
            f"![Recall@10 against latency]({name}-pareto.png)\n",
        ]
        files[out_dir / f"{name}.md"] = "\n".join(lines).encode()
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files[out_dir / f"{name}.csv"] = table.getvalue().encode()
        written += [out_dir / f"{name}{suffix}" for suffix in BOARD_SUFFIXES]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        replace_files(files)
    except OSError as exc:
        raise BenchError(f"could not write the tables in {out_dir} ({exc.strerror or exc})") from None
    return written


def pareto_plot(rows: list[dict], header: dict) -> bytes:
    """Recall@10 (with its interval) against p50 latency per batch, one point per decoder:
    the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [row for row in rows if row["p50_ms"] and row["recall@10"] is not None]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for index, row in enumerate(timed):
        low, high = row.get("recall@10_low"), row.get("recall@10_high")
        error = [[row["recall@10"] - low], [high - row["recall@10"]]] if low is not None else None
        axes.errorbar(
            row["p50_ms"],
            row["recall@10"],
            yerr=error,
            linestyle="none",
            capsize=3,
            label=row["decoder"],
            **decoder_style(index),
        )
    # a legend, not labels at the points: decoders of about one speed and Recall (beam and
    # its variants, NEZHA's ablations) would print their names over each other
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes.set_xscale("log")
    axes.set_xlabel(f"p50 ms per batch of {rows[0]['batch_size']} (log)")
    axes.set_ylabel("Recall@10 (95% interval)")
    axes.set_title(f"{header['dataset']} / {header['split']} / {header['device']}", fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return png_bytes(figure)


def leaderboard(paths: list[Path], only: list[str] | None = None) -> str:
    return "\n".join(run_table(run, run_rows(records)) for run, records in run_groups(paths, only))


class Intervals:
    """Bootstrap intervals of one run's records (those with per-user hits; older
    records show the mean alone)."""

    def __init__(self, records: list[dict]):
        with_hits = [r for r in records if isinstance(r.get("hits"), dict)]
        self.boot = Bootstrap(with_hits[0]["users"]) if with_hits else None
        beams = [r for r in with_hits if r["decoder"] == "beam"]
        self.beam = beams[-1] if beams else None
        self.beam_recall = self.per_user(self.beam, "recall@10") if self.beam else None

    def per_user(self, record: dict, metric: str):
        return per_user(ranks_from_hits(record["hits"], record["users"]), metric).numpy()

    def bounds(self, record: dict) -> dict:
        """The interval bounds of R@10 and N@10, and the paired difference of R@10 to beam
        (None where the record holds no per-user hits)."""
        usable = self.boot is not None and record.get("hits") is not None
        values = {metric: self.per_user(record, metric) for metric in ("recall@10", "ndcg@10")} if usable else {}
        out = {}
        for metric in ("recall@10", "ndcg@10"):
            low, high = (
                self.boot.interval(values[metric]) if usable and record["metrics"][metric] is not None else (None, None)
            )
            out[f"{metric}_low"], out[f"{metric}_high"] = low, high
        keys = ("recall@10_minus_beam", "recall@10_minus_beam_low", "recall@10_minus_beam_high")
        out.update(dict.fromkeys(keys))
        if usable and self.beam is not None and record is not self.beam:
            difference = values["recall@10"] - self.beam_recall
            out.update(zip(keys, (float(difference.mean()), *self.boot.interval(difference))))
        return out


def board_records(path: Path) -> list[dict]:
    """The records of one input file, each with every field a table row reads."""
    if not path.exists():
        raise BenchError(f"{path}: no such results file; pass files that `bench run` wrote (--out)")
    if path.is_dir():
        raise BenchError(f"{path} is a folder; pass results files such as {path / 'results.json'}")
    records = read_records(path)
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise BenchError(f"{path}: record {number} is not a JSON object; is it a results file of `bench run`?")
        missing = [key for key in REQUIRED if key not in record]
        if not missing:
            metrics = record["metrics"]
            missing = [f"metrics {key}" for key in METRICS if not isinstance(metrics, dict) or key not in metrics]
        if missing:
            raise BenchError(
                f"{path}: record {number} lacks {', '.join(missing)}; is it a results file of `bench run`?"
            )
        wrong = malformed(record)
        if wrong:
            raise BenchError(
                f"{path}: record {number} has malformed {', '.join(wrong)}; is it a results file of `bench run`?"
            )
    return records


def holds_json(path: Path) -> bool:
    """Whether a file exists and parses as JSON, which a Markdown table never does."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def write_leaderboard(paths: list[Path], out: Path | None = None, only: list[str] | None = None) -> str:
    """The tables of `paths` -> the Markdown text, also written atomically to `out` when
    given. An empty table never replaces a non-empty file: a wrong glob must not wipe a
    leaderboard."""
    if out is not None:
        out = Path(os.path.realpath(out))  # a symlink is written through to its target
        if out.is_dir():
            raise BenchError(f"{out} is a folder; --out takes a file such as {out / 'LEADERBOARD.md'}")
        if out.exists() and not out.is_file():  # a pipe would block its reading; a device would be replaced
            raise BenchError(
                f"{out} is no regular file (a pipe or a device); pass a Markdown file, or leave --out out to print "
                "the tables"
            )
    table = leaderboard(paths, only)
    if out is None:
        return table
    if out in {Path(os.path.realpath(path)) for path in paths} or holds_json(out):
        raise BenchError(f"--out {out} holds JSON (records are never overwritten by a table); pass a .md path")
    if not table and out.exists() and out.stat().st_size:
        raise BenchError(f"the input files hold no records; {out} was left as it is")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, table + "\n")
    except OSError as exc:
        raise BenchError(f"could not write {out} ({exc.strerror or exc})") from None
    return table
