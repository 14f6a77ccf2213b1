"""`bench leaderboard`: result files -> one Markdown table per run (dataset, split,
device, command). Speedups are against the beam search of the same run only: speeds
measured in different runs are not compared. Input files it cannot read are refused,
never skipped, and an empty table never replaces a written one."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from bench.errors import BenchError
from bench.metrics import Bootstrap, per_user, ranks_from_hits
from bench.records import cell, read_records, write_atomically

# the fields a table row reads
REQUIRED = (
    "dataset split device timestamp command decoder users k batch_size metrics invalid_rate "
    "backbone_calls_per_batch git_sha"
).split()
METRICS = ("recall@1", "recall@10", "ndcg@10", "recall@20", "ndcg@20")
TEXT = ("dataset", "split", "device", "timestamp", "command", "decoder", "git_sha")  # grouped, sorted, sliced


def is_number(value, optional: bool = False) -> bool:
    return (optional and value is None) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def malformed(record: dict) -> list[str]:
    """The fields of a record (with every REQUIRED key) a table row could not read."""
    wrong = [key for key in TEXT if not isinstance(record[key], str)]
    wrong += [] if type(record["users"]) is int and record["users"] > 0 else ["users"]
    wrong += [key for key in ("invalid_rate", "backbone_calls_per_batch") if not is_number(record[key])]
    wrong += [f"metrics {key}" for key in METRICS if not is_number(record["metrics"][key], optional=True)]
    latency = record.get("latency_ms")
    if latency and not (
        isinstance(latency, dict) and is_number(latency.get("mean")) and is_number(latency.get("p99"), optional=True)
    ):
        wrong.append("latency_ms")
    for key in ("latency_over_floor", "latency_over_prefill"):
        if not is_number(record.get(key), optional=True):
            wrong.append(key)
    hits = record.get("hits")
    if hits is not None and not (
        isinstance(hits, dict)
        and isinstance(hits.get("users"), list)
        and isinstance(hits.get("ranks"), list)
        and len(hits["users"]) == len(hits["ranks"])
        and all(type(u) is int and 0 <= u < record["users"] for u in hits["users"])
        and all(type(k) is int and 1 <= k for k in hits["ranks"])
    ):
        wrong.append("hits")
    backbone = record.get("backbone")
    if backbone and not (isinstance(backbone, dict) and isinstance(backbone.get("name"), str)):
        wrong.append("backbone")
    return wrong


def leaderboard(paths: list[Path]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in paths:
        for record in board_records(path):
            run = (record["dataset"], record["split"], record["device"], record["timestamp"], record["command"])
            groups[run].append(record)
    out = []
    for (dataset, split, device, timestamp, command), records in sorted(groups.items()):
        beam = [r for r in records if r["decoder"] == "beam" and r.get("latency_ms")]
        base = beam[-1]["latency_ms"]["mean"] if beam else None
        intervals = Intervals(records)
        out.append(f"### {dataset} / {split} / {device} / {timestamp}\n")
        out.append(
            "| decoder | backbone | users | K | batch | R@1 | R@10 [95% CI] | N@10 [95% CI] | R@10 - beam [95% CI] | "
            "R@20 | N@20 | invalid | mean ms/batch | p99 ms | x floor | speedup vs beam | backbone calls | commit |"
        )
        out.append("|" + "---|" * 18)
        older = False
        for r in records:
            over_floor = cell(r.get("latency_over_floor"), ".2f")
            if "latency_over_floor" not in r and r.get("latency_over_prefill") is not None:
                over_floor, older = f"{r['latency_over_prefill']:.2f}†", True
            m, lat = r["metrics"], r.get("latency_ms") or {}
            speedup = base / lat["mean"] if base and lat and lat["mean"] and r.get("backbone") else None
            backbone = r["backbone"]["name"] if r.get("backbone") else "-"
            out.append(
                f"| {r['decoder']} | {backbone} | {r['users']} | {r['k']} | {r['batch_size']} | "
                f"{cell(m['recall@1'], '.4f')} | {intervals.value(r, 'recall@10')} | {intervals.value(r, 'ndcg@10')} | "
                f"{intervals.against_beam(r, 'recall@10')} | "
                f"{cell(m['recall@20'], '.4f')} | {cell(m['ndcg@20'], '.4f')} | {r['invalid_rate']:.3f} | "
                f"{cell(lat.get('mean'), '.1f')} | {cell(lat.get('p99'), '.1f')} | "
                f"{over_floor} | {cell(speedup, '.2f')} | "
                f"{r['backbone_calls_per_batch']:.1f} | {r['git_sha'][:10]} |"
            )
        if intervals.boot is not None:
            out.append(
                "\nIntervals: percentile bootstrap over the users (1000 resamples, seed 0); the difference to beam is "
                "paired (both resampled on the same users), ** where its interval excludes 0, else the two are not "
                "called different."
            )
        if older:
            out.append(
                "\n† an older record: mean over the mean of a bare pass over the decoder's own prompt "
                "(NEZHA's with its placeholders); newer records give p50 over the p50 of a pass over the history alone"
            )
        out.append(f"\nCommand: `{command}`\n")
    return "\n".join(out)


class Intervals:
    """Bootstrap intervals of one run's records (those with per-user hits; older
    records show the mean alone)."""

    def __init__(self, records: list[dict]):
        with_hits = [r for r in records if isinstance(r.get("hits"), dict)]
        self.boot = Bootstrap(with_hits[0]["users"]) if with_hits else None
        beams = [r for r in with_hits if r["decoder"] == "beam"]
        self.beam = beams[-1] if beams else None

    def per_user(self, record: dict, metric: str):
        return per_user(ranks_from_hits(record["hits"], record["users"]), metric).numpy()

    def value(self, record: dict, metric: str) -> str:
        mean = record["metrics"][metric]
        if self.boot is None or "hits" not in record or mean is None:
            return cell(mean, ".4f")
        low, high = self.boot.interval(self.per_user(record, metric))
        return f"{mean:.4f} [{low:.4f}, {high:.4f}]"

    def against_beam(self, record: dict, metric: str) -> str:
        if self.boot is None or self.beam is None or record is self.beam or "hits" not in record:
            return "-"
        difference = self.per_user(record, metric) - self.per_user(self.beam, metric)
        low, high = self.boot.interval(difference)
        mark = " **" if low > 0 or high < 0 else ""
        return f"{difference.mean():+.4f} [{low:+.4f}, {high:+.4f}]{mark}"


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


def write_leaderboard(paths: list[Path], out: Path | None = None) -> str:
    """The tables of `paths` -> the Markdown text, also written atomically to `out` when
    given. An empty table never replaces a non-empty file: a wrong glob must not wipe a
    leaderboard."""
    table = leaderboard(paths)
    if out is None:
        return table
    out = Path(os.path.realpath(out))  # a symlink is written through to its target
    if out.is_dir():
        raise BenchError(f"{out} is a folder; --out takes a file such as {out / 'LEADERBOARD.md'}")
    if not table and out.exists() and out.stat().st_size:
        raise BenchError(f"the input files hold no records; {out} was left as it is")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, table + "\n")
    except OSError as exc:
        raise BenchError(f"could not write {out} ({exc.strerror or exc})") from None
    return table
