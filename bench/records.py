"""Result records: what one decoder scored on one dataset and device, how fast, and
how to reproduce it. Files hold a JSON list of records; new ones are appended with an
atomic write, and a file that cannot be read is never overwritten."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from bench.errors import BenchError

PROTOCOL = (
    "leave-one-out per user: test target = last item, valid target = second to last, history = up to "
    "{max_history} earlier items; candidates = every item of the catalogue (a generated SID that is no item "
    "counts as a miss); Recall@k = share of users whose target is in the top k; NDCG@k = mean of "
    "1/log2(rank+1) for ranks <= k; latency = wall time per batch after {warmup} warm-up passes over the "
    "first batch, decoders taking turns on the same batches"
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    if path.is_dir():
        raise BenchError(f"{path} is a folder; --out takes a results file such as {path / 'results.json'}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchError(
            f"{path} is not a results file (invalid JSON at line {exc.lineno}); "
            "pass another --out or move it away; it was left untouched"
        ) from None
    except UnicodeDecodeError:
        raise BenchError(
            f"{path} is not a results file (not UTF-8 text); pass another --out; it was left untouched"
        ) from None
    if not isinstance(records, list):
        raise BenchError(f"{path} is not a results file (expected a JSON list of records); it was left untouched")
    return records


def cell(value, spec: str) -> str:
    """A table cell: the formatted number, or '-' where a record has none."""
    return format(value, spec) if value is not None else "-"


def append_records(path: Path, new: list[dict]) -> None:
    """Write to a temporary file and rename it over the old one, so an interrupted
    write never leaves a half-written results file."""
    records = read_records(path) + new
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(records, f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a results file is to be shared
    os.replace(tmp, path)
