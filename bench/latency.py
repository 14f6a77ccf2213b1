"""The latency harness: every decoder takes its turn on the same batches.

Per batch, the decoders run one after another in an order that changes with the batch
index (turn_orders, a Williams design), so drift of a shared machine, and what one
decoder leaves behind for the next, hit them alike. Each decoder's turn is timed
(CUDA events on a GPU, perf_counter on the CPU), its backbone calls are counted by a
forward hook on the backbone, and right after it one bare backbone forward pass over
the history alone is timed: the floor, the same definition for every decoder on a
backbone. A decoder whose single pass reads more (NEZHA's placeholders) also times that
pass as its prompt floor.

Memory: on CUDA, the peak allocated during the decode above what was allocated just
before it (weights and batch excluded). On the CPU torch tracks no allocations; the
record gives the growth of the process's peak resident set (ru_maxrss) during the
decoder's turns, a high-water mark: a decoder that stays below an earlier peak shows 0.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from decoders.base import Decoder, DecodeResult


@dataclass
class Measurement:
    results: list[DecodeResult] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)  # per batch
    floor_ms: list[float] = field(default_factory=list)  # per batch, bare forward pass over the history
    # every floor of the run on the same backbone, whichever decoder's turn it followed
    run_floor_ms: list[float] = field(default_factory=list)
    prompt_floor_ms: list[float] = field(default_factory=list)  # per batch, the decoder's own one-pass prompt
    backbone_calls: list[int] = field(default_factory=list)  # per batch
    draft_calls: list[int] = field(default_factory=list)  # per batch, separate draft model
    peak_memory_mb: float | None = None  # see the module docstring
    order: list[int] = field(default_factory=list)  # position in the turn order of each batch


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
    }


@contextmanager
def count_calls(module: torch.nn.Module | None):
    """Counts forward calls of `module` inside the block: calls[0]."""
    calls = [0]
    if module is None:
        yield calls
        return

    def hook(*_):
        calls[0] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def peak_rss_mb() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def progress_steps(steps: list, progress: bool):
    """The decoding loop's steps, with a bar on a terminal; in a log (no terminal) a plain
    line at every tenth instead of a bar's carriage-return updates."""
    if not progress:
        return steps
    if sys.stderr.isatty():
        return tqdm(steps, desc="decoding", unit="batch")
    return logged_steps(steps)


def logged_steps(steps: list):
    begin, total = time.perf_counter(), len(steps)
    for done, step in enumerate(steps, 1):
        yield step
        if done * 10 // total > (done - 1) * 10 // total:
            print(f"decoding: {done}/{total} batches ({time.perf_counter() - begin:.0f} s)", file=sys.stderr)


def timed(fn, device: torch.device):
    """Run fn() and return (its result, wall time in ms)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return out, start.elapsed_time(end)
    begin = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - begin) * 1000.0


def turn_orders(count: int) -> list[list[int]]:
    """The orders in which `count` decoders take their turns on successive batches, a
    Williams design: over one cycle each decoder takes every place, and follows every
    other decoder, equally often. A drifting machine then hits them alike, and so does
    what one decoder leaves behind for the next (allocator, caches, clock). Each order
    is 0, 1, n-1, 2, n-2, ... shifted by its row; an odd count adds the reversed rows."""
    first = [0] + [(step + 1) // 2 if step % 2 else count - step // 2 for step in range(1, count)]
    rows = [[(place + shift) % count for place in first] for shift in range(count)]
    return rows + [row[::-1] for row in rows] if count % 2 else rows


@torch.no_grad()
def benchmark(
    decoders: dict[str, Decoder],
    prompts: list,
    device: torch.device,
    warmup: int = 2,
    progress: bool = True,
    repeats: int = 1,
) -> dict[str, Measurement]:
    """Every decoder on every prompt (batch), taking turns; decoders see prompts only.
    repeats: passes over all batches; the first also keeps the results, calls and memory,
    each further one only times (per-pass medians show how much a run's speed drifts)."""
    labels = list(decoders)
    for _ in range(warmup):
        for label in labels:
            decoders[label].decode(prompts[0])
            if decoders[label].backbone_core is not None:
                decoders[label].bare_forward(prompts[0])
                decoders[label].prompt_forward(prompts[0])
    measured = {label: Measurement() for label in labels}
    orders = turn_orders(len(labels))
    steps = [(rep, index) for rep in range(repeats) for index in range(len(prompts))]
    for rep, index in progress_steps(steps, progress):
        batch = prompts[index]
        for position, label in enumerate(labels[i] for i in orders[index % len(orders)]):
            decoder, record = decoders[label], measured[label]
            if rep > 0:
                record.latency_ms.append(timed(partial(decoder.decode, batch), device)[1])
                if decoder.backbone_core is not None:
                    record.floor_ms.append(timed(partial(decoder.bare_forward, batch), device)[1])
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                before = peak_rss_mb()
            with count_calls(decoder.backbone_core) as calls, count_calls(decoder.draft_core) as draft_calls:
                result, ms = timed(partial(decoder.decode, batch), device)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:
                peak = peak_rss_mb() - before
            record.peak_memory_mb = max(record.peak_memory_mb or 0.0, peak)
            record.results.append(DecodeResult(result.sids.cpu(), result.scores.cpu(), result.stats))
            record.latency_ms.append(ms)
            record.backbone_calls.append(calls[0])
            record.draft_calls.append(draft_calls[0])
            record.order.append(position)
            if decoder.backbone_core is not None:
                record.floor_ms.append(timed(partial(decoder.bare_forward, batch), device)[1])
                own, own_ms = timed(partial(decoder.prompt_forward, batch), device)
                if own:
                    record.prompt_floor_ms.append(own_ms)
    for label in labels:  # a floor follows its decoder's turn; pooled, no decoder's after-effects weigh more
        core = decoders[label].backbone_core
        if core is not None:
            same = [other for other in labels if decoders[other].backbone_core is core]
            measured[label].run_floor_ms = [ms for other in same for ms in measured[other].floor_ms]
    return measured


def pass_medians(values: list[float], batches: int) -> list[float]:
    """Per-batch times of consecutive passes -> the median of each pass."""
    return [float(np.median(values[start : start + batches])) for start in range(0, len(values), batches)]
