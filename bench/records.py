"""Result records: what one decoder scored on one dataset and device, how fast, and
how to reproduce it. Files hold a JSON list of records; new ones are appended under a
lock with an atomic write, a file that cannot be read is never overwritten, and records
that cannot be appended are saved elsewhere rather than lost."""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from filelock import FileLock

from bench.errors import BenchError
from bench.latency import pass_medians, summarize
from bench.metrics import drop_seen, ranking_metrics, target_ranks
from models.backbones import parameter_count

PROTOCOL = (
    "leave-one-out per user: test target = last item, valid target = second to last, history = up to "
    "{max_history} earlier items; candidates = every item of the catalogue (a generated SID that is no item "
    "counts as a miss); Recall@k = share of users whose target is in the top k; NDCG@k = mean of "
    "1/log2(rank+1) for ranks <= k; latency = wall time per batch after {warmup} warm-up passes over the "
    "first batch, decoders taking turns on the same batches; floor = one bare backbone pass over the history "
    "alone, timed after each decoder's turn"
)
EXCLUDED_HISTORY = (
    "; every item the user interacted with before the target is dropped from each list before the metrics "
    "(as RecBole's full-sort evaluation does for non-sequential models)"
)


def git_sha() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The command as the user typed it, quoted by records and tables."""
    return " ".join(["python -m bench"] + sys.argv[1:])


def cpuinfo_text() -> str:
    """/proc/cpuinfo's text; empty where the system has none (not Linux)."""
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def cpuinfo_field(cpuinfo: str, key: str) -> str | None:
    """The first non-empty value of `key` in /proc/cpuinfo's text; None where it has none."""
    values = (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(key))
    return next((value for value in values if value), None)


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), so records tell two x86
    machines apart; None where the text names none (ARM, not Linux)."""
    return cpuinfo_field(cpuinfo, "model name")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model(cpuinfo_text()) or platform.processor() or platform.machine()
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


RECORD_KEYS = {"decoder"}  # what every record holds, whatever its version


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    if path.is_dir():
        raise BenchError(f"{path} is a folder; --out takes a results file such as {path / 'results.json'}")
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte order mark, as some editors save
    except json.JSONDecodeError as exc:
        raise BenchError(
            f"{path} is not a results file (invalid JSON at line {exc.lineno}); "
            "pass another --out or move it away; it was left untouched"
        ) from None
    except UnicodeDecodeError:
        raise BenchError(
            f"{path} is not a results file (not UTF-8 text); pass another --out; it was left untouched"
        ) from None
    except RecursionError:
        raise BenchError(
            f"{path} is not a results file (JSON nested too deeply); pass another --out; it was left untouched"
        ) from None
    except ValueError as exc:  # a number json will not read (an integer of thousands of digits)
        reason = str(exc).split(";")[0]
        raise BenchError(
            f"{path} is not a results file ({reason}); pass another --out; it was left untouched"
        ) from None
    if not isinstance(records, list):
        raise BenchError(f"{path} is not a results file (expected a JSON list of records); it was left untouched")
    return records


def results_file(path: Path) -> list[dict]:
    """The records of a file new records are to be appended to: a JSON list of anything
    else is no results file, and is left as it is."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # a pipe would block the run until read
        raise BenchError(f"{path} is no regular file (a pipe or a device); pass another --out, a results file")
    records = read_records(path)
    strangers = [n for n, entry in enumerate(records, 1) if not isinstance(entry, dict) or RECORD_KEYS - entry.keys()]
    if strangers:
        raise BenchError(
            f"{path} is not a results file (entry {strangers[0]} of its list is no record); "
            "pass another --out or move it away; it was left untouched"
        )
    return records


def cell(value, spec: str) -> str:
    """A table cell: the formatted number, or '-' where a record has none."""
    return format(value, spec) if value is not None else "-"


def calls_text(record: dict) -> str:
    """Backbone calls per batch of a record (or a table row), and a separate draft
    model's beside them (speculative; older records did not count them)."""
    draft = record.get("draft_calls_per_batch")
    return f"{record['backbone_calls_per_batch']:.1f}" + (f" + {draft:.1f} draft" if draft else "")


def check_writable(path: Path) -> None:
    """Refuse, before any work, a results file that could not be written: records are
    written only when a run has finished. Creates nothing."""
    try:
        os.path.realpath(path, strict=True)
    except OSError as exc:  # a new file, or a link to one, is written through; a loop leads nowhere
        if exc.errno == errno.ELOOP:
            raise BenchError(f"{path} cannot be followed ({exc.strerror}); pass another --out") from None
    path = Path(os.path.realpath(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise BenchError(f"{path} is read-only; make it writable (chmod u+w) or pass another --out")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BenchError(f"cannot create the folder of {path}: {folder} is a file; pass another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BenchError(f"cannot write in {folder} (permission denied); pass another --out")


def share_like_a_new_file(path: str) -> None:
    """mkstemp makes a file private (0600); a results file or plot is to be shared, so it
    gets the mode open() would have given it under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside `path` and rename it over `path`: readers see the old
    file or the new one, never half of one. The temporary file does not outlive a failure."""
    replace_files({path: text.encode("utf-8")})


def replace_files(contents: dict[Path, bytes]) -> None:
    """write_atomically for files that belong together: every one is written in full
    beside its path first, then all are renamed into place, so a failure while writing
    leaves every earlier file as it was."""
    written = {}
    try:
        for path, data in contents.items():
            handle, written[path] = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(handle, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            share_like_a_new_file(written[path])
        for path, tmp in written.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in written.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(figure, **options) -> bytes:
    """A matplotlib figure as PNG bytes (options go to savefig), then closed."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    try:
        figure.savefig(image, format="png", **{"dpi": 110, **options})
    finally:
        plt.close(figure)
    return image.getvalue()


def p50_per_pass(record: dict) -> list[float] | None:
    """The p50 latency of each timed pass over all batches, where there were several."""
    return record.get("latency_p50_per_pass") if (record.get("latency_repeats") or 1) > 1 else None


SPREAD_NOTE = (
    "p50 over every timed pass, [the lowest, the highest] p50 of a single pass over all batches: how much the "
    "same decoder's speed moved within the run."
)


def latency_cell(row: dict) -> str:
    """p50 ms per batch, then [the lowest, the highest] p50 of a single pass where the
    batches were timed in several passes."""
    passes = row.get("p50_per_pass_ms")
    spread = f" [{min(passes):.1f}, {max(passes):.1f}]" if passes else ""
    return cell(row["p50_ms"] or row.get("mean_ms"), ".1f") + spread


MARKERS = "osD^v<>ph*P"


def decoder_style(index: int) -> dict:
    """The marker and colour of the index-th decoder of a plot (boards and sweeps alike):
    matplotlib's default cycle repeats after 10 colours, which drew two decoders of a
    bigger sweep in one style; 10 markers against tab20's 20 colours keep 20 apart."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    return {"marker": MARKERS[index % len(MARKERS)], "color": colours[index % len(colours)]}


def save_figure_atomically(figure, path: Path, **options) -> None:
    """A matplotlib figure saved as PNG the way write_atomically writes text, then closed."""
    replace_files({path: png_bytes(figure, **options)})


def append_records(path: Path, new: list[dict]) -> None:
    """Read, append and replace under a lock file beside the results file, so runs
    writing the same file keep each other's records. A symlink is written through to its
    target. If the write fails, the new records are saved elsewhere: a run is never lost."""
    path = Path(os.path.realpath(path))
    try:
        check_writable(path)
        results_file(path)  # a file that is no results file gets no lock file beside it
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock")):
            remove_stale_temp_files(path)
            write_atomically(path, json.dumps(results_file(path) + new, indent=1))
    except (BenchError, OSError) as exc:
        problem = str(exc) if isinstance(exc, BenchError) else f"could not write {path} ({exc.strerror or exc})"
        raise BenchError(f"{problem}; {save_elsewhere(new)}") from None


def remove_stale_temp_files(path: Path) -> None:
    """Temporary files of `path` left by a killed writer: called under the lock, when no
    writer is half-way through. The pattern is write_atomically's, 8 random characters."""
    for stale in path.parent.glob(glob.escape(path.name) + ".????????.tmp"):
        stale.unlink(missing_ok=True)


def save_elsewhere(records: list[dict]) -> str:
    """Save records that could not be appended in the system's temporary folder, else in
    the working folder -> where they went, in words."""
    for folder in (tempfile.gettempdir(), os.getcwd()):
        try:
            handle, saved = tempfile.mkstemp(dir=folder, prefix="nezha-bench-records-", suffix=".json")
        except OSError:
            continue
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
            return f"the {len(records)} new record(s) were saved to {saved}; add them to a results file from there"
        except OSError:
            Path(saved).unlink(missing_ok=True)
    return f"the {len(records)} new record(s) could not be saved anywhere else either and are lost"


def model_entry(resolved) -> dict | None:
    """What a record says of one model: its backbone, size, objective, origin and settings."""
    model = resolved.model
    if not isinstance(model, torch.nn.Module):
        return {"objective": "fitted on the training split", "source": resolved.source}
    return {
        "name": model.settings.backbone,
        "params": parameter_count(model),
        "objective": model.objective,
        "source": resolved.source,
        "attention": model.lm.core.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compiled": model.compiled,
        "settings": asdict(model.settings),
        # epochs/seconds up to the kept (best) checkpoint; epochs_run/seconds_run until training stopped
        "training": model.training_record,
    }


def users_chosen(run, users: int, seed: int) -> str:
    """Which users of the split a record's figures are over, in words for its tables."""
    if run.sample_users is not None and run.sample_users == users:
        return f"{users} users of the {run.split} split drawn at random (seed {seed})"
    if run.limit_users is not None and run.limit_users == users:
        return f"the first {users} users of the {run.split} split"
    return f"all {users} users of the {run.split} split"


def build_record(
    spec,
    decoder,
    measured,
    models: dict,
    targets,
    data,
    settings: dict,
    device,
    commit: str,
    timestamp: str,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """One decoder's record: quality, latency, calls, the models it used (by role) and the
    full effective settings, with what it takes to reproduce it. With `seen` (each user's
    earlier items and their mask, padded once per run: --exclude-history) those items are
    dropped from the lists first."""
    sids = torch.cat([r.sids for r in measured.results])  # [N, K', L]
    items = data.catalog.items_of(sids)
    present = (sids >= 0).all(-1)
    stats: dict[str, float] = {}
    for result in measured.results:
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0.0) + float(value)
    entries = {role: model_entry(resolved) for role, resolved in models.items()}
    ranked = items if seen is None else drop_seen(items, *seen)  # [N, K']
    ranks = target_ranks(ranked, targets)  # [N], 0 = missed
    found = ranks.nonzero().flatten()
    main = next((entry for entry in entries.values() if "params" in entry), None)
    latency, floor = summarize(measured.latency_ms), summarize(measured.floor_ms)
    run_floor = summarize(measured.run_floor_ms)
    run = settings["run"]
    total_s = sum(measured.latency_ms) / 1000.0 / run.repeats  # one pass over the users
    k, users = run.k, len(targets)
    return {
        "decoder": spec,
        "decoder_name": decoder.name,
        "decoder_options": asdict(decoder.options),
        "description": decoder.description,
        "dataset": data.name,
        "split": run.split,
        "users": users,
        "users_chosen": users_chosen(run, users, settings["data"].seed),
        "k": k,
        "batch_size": run.batch_size,
        "device": device_name(device),
        "git_sha": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": settings["data"].seed,
        "command": command_line(),
        "timestamp": timestamp,  # one per run: the leaderboard groups a run's records by it
        "settings": {section: asdict(value) for section, value in settings.items()},
        "data_source": data.source,
        "data_sha256": data.checksums,
        "catalog": data.catalog.describe(),
        "protocol": PROTOCOL.format(max_history=settings["model"].max_history, warmup=run.warmup)
        + (EXCLUDED_HISTORY if seen is not None else ""),
        "backbone": main,
        "models": entries,
        "weights": "random: latency only, metrics meaningless" if run.untrained else "trained",
        "candidates_per_user": int(sids.shape[1]),
        "metrics": ranking_metrics(ranks, k_max=k),
        # per user (in the order of the split's users), for intervals and paired tests: the
        # 1-based rank of the held-out item where it was found, every other user missed it
        "hits": {"users": found.tolist(), "ranks": ranks[found].tolist()},
        "invalid_rate": float((present & (items < 0)).float().mean()),
        "empty_rate": float((~present).float().mean()),
        # --exclude-history: how many entries of a list were items the user already had
        "seen_dropped_per_user": (
            float(((items >= 0).sum() - (ranked >= 0).sum()) / users) if seen is not None else None
        ),
        "latency_ms": latency,  # over every batch of every pass
        "latency_repeats": run.repeats,
        "latency_p50_per_pass": pass_medians(measured.latency_ms, len(measured.results)),
        "latency_ms_per_user": total_s * 1000.0 / users,  # a smaller last batch counts right
        "floor_ms": floor,  # a bare backbone pass over the history alone, the same for every decoder
        "latency_over_floor": latency["p50"] / floor["p50"] if floor else None,
        # the floors of every decoder's turn on this backbone: one denominator for all of them
        "run_floor_ms": run_floor,
        "latency_over_run_floor": latency["p50"] / run_floor["p50"] if run_floor else None,
        "prompt_floor_ms": summarize(measured.prompt_floor_ms),  # the decoder's own one-pass prompt (NEZHA)
        "throughput_users_per_s": users / total_s if total_s > 0 else None,
        "backbone_calls_per_batch": sum(measured.backbone_calls) / len(measured.backbone_calls),
        "draft_calls_per_batch": sum(measured.draft_calls) / len(measured.draft_calls),
        "decoder_stats_per_request": {key: value / users for key, value in stats.items()},
        "peak_memory_mb": measured.peak_memory_mb,
        "peak_memory": (
            "CUDA: peak allocated during the decode above what was allocated just before it"
            if device.type == "cuda"
            else "CPU: growth of the process's peak resident set during the decoder's turns (a high-water mark; "
            "torch tracks no CPU allocations)"
        ),
    }
