"""`bench sweep`: `bench run` once per value of one setting (batch size, K, catalogue
size, history length, backbone, ...), then a table and plots of latency and users per
second against that setting, one line per decoder.

Each value is its own run, on its own data and models when the setting shapes them; the
decoders of one value share its batches as in `bench run`, so ratios between decoders
hold within a value and the curves show how each one's cost grows."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

from bench.errors import BenchError
from bench.records import (
    SPREAD_NOTE,
    cell,
    decoder_style,
    latency_cell,
    p50_per_pass,
    save_figure_atomically,
    write_atomically,
)
from bench.settings import SECTIONS, check_value, value_of_text

SWEPT_SECTIONS = ("data", "model", "run")
NOT_SWEPT = ("out", "decoder", "ckpt", "profile", "per_objective")  # one results file; decoders go side by side


def sweep_points(settings: dict) -> tuple[str, list[tuple[object, dict]]]:
    """--vary NAME=V1,V2,... -> (NAME, [(value, the settings of that point)]), every value
    checked (type, bounds, and the section's own rules) before anything runs."""
    text = settings["sweep"].vary
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not raw.strip():
        raise BenchError(f"--vary {text!r}: give NAME=V1,V2,..., e.g. --vary batch_size=1,16,256")
    section = next((s for s in SWEPT_SECTIONS if name in {f.name for f in fields(SECTIONS[s])}), None)
    if section is None or name in NOT_SWEPT:
        raise BenchError(
            f"--vary {name}: not a setting a sweep can vary; vary a data, model or run setting "
            f"other than {', '.join(NOT_SWEPT)} (see python -m bench run --help)"
        )
    points, cls = [], SECTIONS[section]
    for item in raw.split(","):
        value = check_value(cls, name, value_of_text(cls, name, item.strip()), f"--vary {name}")
        if any(value == earlier and isinstance(value, bool) == isinstance(earlier, bool) for earlier, _ in points):
            raise BenchError(f"--vary {name}: the value {value} is given twice; give each value once")
        point = dict(settings)
        point[section] = dataclasses.replace(settings[section], **{name: value})
        if section in ("data", "model"):
            point["model"] = point["model"].resolved(point["data"])
        points.append((value, point))
    return name, points


def swept_value(record: dict, name: str):
    return next(record["settings"][s][name] for s in SWEPT_SECTIONS if name in record["settings"].get(s, {}))


def sweep_rows(records: list[dict], name: str) -> list[dict]:
    """One row per (value, decoder), in the order measured."""
    rows = []
    for r in records:
        latency = r.get("latency_ms") or {}
        rows.append(
            {
                name: swept_value(r, name),
                "decoder": r["decoder"],
                "backbone": r["backbone"]["name"] if r.get("backbone") else None,
                "batch_size": r["batch_size"],
                "k": r["k"],
                "users": r["users"],
                "p50_ms": latency.get("p50"),
                "p50_per_pass_ms": p50_per_pass(r),
                "p99_ms": latency.get("p99"),
                "users_per_s": r.get("throughput_users_per_s"),
                "latency_over_floor": r.get("latency_over_floor"),
                "peak_memory_mb": r.get("peak_memory_mb"),
                "items": r["catalog"]["items"],
                "verifier_mb": sum(r["catalog"].get("verifier", {}).get(k, 0) for k in ("trie_bytes", "hash_set_bytes"))
                / 2**20,
                "recall@10": r["metrics"]["recall@10"] if r.get("weights") == "trained" else None,
            }
        )
    return rows


def sweep_table(rows: list[dict], name: str, records: list[dict]) -> str:
    first = records[0]
    lines = [
        f"# {first['dataset']} / {first['device']}: latency against {name}\n",
        f"Made by `{first['command']}` at commit {first['git_sha'][:10]}, seed {first['seed']}, torch "
        f"{first['torch']}, weights {first['weights']}. One run per value of {name}: ratios between decoders "
        "hold within a value.\n",
        f"| {name} | decoder | batch | K | p50 ms/batch | p99 ms | users/s | x floor | peak MB | verifier MB | R@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row[name]} | {row['decoder']} | {row['batch_size']} | {row['k']} | {latency_cell(row)} | "
            f"{cell(row['p99_ms'], '.1f')} | {cell(row['users_per_s'], '.1f')} | "
            f"{cell(row['latency_over_floor'], '.2f')} | {cell(row['peak_memory_mb'], '.0f')} | "
            f"{cell(row['verifier_mb'], '.1f')} | {cell(row['recall@10'], '.4f')} |"
        )
    if any(row["p50_per_pass_ms"] for row in rows):
        lines.append("\n" + SPREAD_NOTE)
    return "\n".join(lines) + "\n"


def sweep_plot(rows: list[dict], name: str, title: str, path: Path) -> None:
    """p50 latency per batch and users per second against the swept setting, per decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(row[name] for row in rows))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {v: (v if numeric else i) for i, v in enumerate(values)}
    figure, (latency_axes, rate_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, decoder in enumerate(dict.fromkeys(row["decoder"] for row in rows)):
        mine = [row for row in rows if row["decoder"] == decoder and row["p50_ms"]]
        x = [position[row[name]] for row in mine]
        style = decoder_style(index)
        latency_axes.plot(x, [row["p50_ms"] for row in mine], "-", label=decoder, **style)
        rate_axes.plot(x, [row["users_per_s"] for row in mine], "-", **style)
    for axes, label in ((latency_axes, "p50 ms per batch"), (rate_axes, "users per second")):
        axes.set_yscale("log")
        if numeric and max(values) > 10 * max(min(values), 1e-9):
            axes.set_xscale("log")
        if not numeric:
            axes.set_xticks(range(len(values)), [str(v) for v in values], rotation=20)
        axes.set_xlabel(name)
        axes.set_ylabel(label + " (log)")
        axes.grid(alpha=0.3, which="both")
    # one legend right of both plots: inside, it hid the lines of a dozen decoders
    figure.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_figure_atomically(figure, path, bbox_inches="tight")


def sweep_targets(name: str, out: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """The table and plot a sweep writes: <out stem>-<name>.md and .png in out_dir
    (default: beside the records)."""
    stem = (Path(out_dir) if out_dir else out.parent) / f"{out.stem}-{name}"
    return stem.with_suffix(".md"), stem.with_suffix(".png")


def check_sweep_targets(name: str, out: Path, out_dir: Path | None = None) -> None:
    """A sweep replaces an earlier sweep's table and plot only, never another file of
    that name: where either exists, the table must be one of ours (its title line)."""
    table, plot = sweep_targets(name, out, out_dir)
    if not (table.exists() or plot.exists()):
        return
    try:
        title = table.read_text(encoding="utf-8").partition("\n")[0]
    except (OSError, ValueError):
        title = ""
    if not (title.startswith("# ") and title.endswith(f": latency against {name}")):
        taken = table if table.exists() else plot
        raise BenchError(f"{taken} exists and is no sweep table of this suite; pass another --out or --out-dir")


def write_sweep(records: list[dict], name: str, out: Path, out_dir: Path | None = None) -> list[Path]:
    """The sweep's table and plot (sweep_targets), written atomically."""
    if not records:
        raise BenchError("the sweep measured nothing; no table was written")
    rows = sweep_rows(records, name)
    table, plot = sweep_targets(name, out, out_dir)
    table.parent.mkdir(parents=True, exist_ok=True)
    first = records[0]
    sweep_plot(rows, name, f"{first['dataset']} / {first['device']} / weights {first['weights']}", plot)
    write_atomically(table, sweep_table(rows, name, records) + f"\n![latency against {name}]({plot.name})\n")
    return [table, plot]
