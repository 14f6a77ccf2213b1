"""`bench run`: data -> the models each decoder requests (given, cached, trained or
random) -> decoders on the same batches -> metrics and latency -> one record per
decoder. Nothing here knows any decoder by name."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.data import RecData, eval_examples
from bench.data.batches import eval_batches, pad_rows
from bench.errors import BenchError, writable_folder
from bench.latency import benchmark
from bench.records import build_record, calls_text, cell, git_sha, write_atomically
from bench.settings import DataSettings, ModelSettings, RunSettings, comma_list
from bench.train import SHAPE, resolve_models
from decoders import REGISTRY, parse_spec, plan, with_constraint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name}: decoding runs on cpu or cuda, not on {device.type}")
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_dtype(name: str, device: torch.device) -> None:
    if name == "fp16" and device.type != "cuda":
        raise BenchError("--dtype fp16 runs on CUDA only (CPU kernels lack half precision); use bf16 on the CPU")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The models' precision; fp32 on CUDA runs its matmuls in TF32, as served models do."""
    check_dtype(name, device)
    if device.type == "cuda" and name == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return DTYPES[name]


def check_k(k: int, data: RecData) -> None:
    if k < 1:
        raise BenchError(f"--k {k}: K must be at least 1")
    if k > data.catalog.num_items:
        raise BenchError(
            f"--k {k} is above the {data.catalog.num_items} items of the '{data.name}' catalogue; "
            f"choose K <= {data.catalog.num_items}"
        )


def decoder_specs(settings: RunSettings) -> list[str]:
    specs = comma_list(settings.decoder)
    if not specs:
        raise BenchError(f"--decoder names no decoder; give comma-separated specs of: {', '.join(sorted(REGISTRY))}")
    specs = [with_constraint(s) for s in specs] if settings.constrained else specs
    parsed = [parse_spec(spec) for spec in specs]  # beam:width=30 and beam:width=+30 are one decoder
    twice = next((spec for n, spec in enumerate(specs) if parsed[n] in parsed[:n]), None)
    if twice:  # one decoder, timed once, would give two identical records
        raise BenchError(
            f"--decoder names {twice} twice{' (with --constrained)' if settings.constrained else ''}; name each once"
        )
    return specs


def check_run(data: RecData | None, model_settings: ModelSettings, settings: RunSettings, specs: list[str]) -> list:
    """What a run can refuse before any work: unknown decoders and backbones, refusals, the
    device and dtype, and (given the data) K and options that cannot work with the
    catalogue -> the plans."""
    if settings.untrained and settings.ckpt:
        raise BenchError(
            "--ckpt gives trained weights and --untrained asks for random ones; drop one of them "
            "(--untrained times random weights, its record says so)"
        )
    check_dtype(settings.dtype, resolve_device(settings.device))
    plans = [plan(spec, model_settings) for spec in specs]
    if data is not None:
        check_k(settings.k, data)
        for name, options, _ in plans:
            REGISTRY[name].check_options(options, data.catalog, settings.k)
    return plans


def run(
    data: RecData,
    data_settings: DataSettings,
    model_settings: ModelSettings,
    settings: RunSettings,
    specs: list[str] | None = None,
    progress: bool = True,
    asked: frozenset[str] = frozenset(),
) -> list[dict]:
    """Evaluate the decoders (settings.decoder, or `specs`) on the same batches and
    return their records; asked: the model settings given by flag or config (a --ckpt of
    another shape is refused)."""
    commit = git_sha()  # the code that runs, before anything can change it
    specs = specs or decoder_specs(settings)
    plans = check_run(data, model_settings, settings, specs)
    if settings.profile:
        writable_folder(Path(settings.profile), f"--profile {settings.profile}", "folder for the profiler tables")
    examples = eval_examples(
        data, settings.split, model_settings.max_history, settings.limit_users, settings.sample_users, data_settings.seed
    )
    device = resolve_device(settings.device)
    models = resolve_models(
        [requests for _, _, requests in plans],
        data,
        data_settings,
        settings.ckpt,
        settings.untrained,
        progress,
        {name: getattr(model_settings, name) for name in SHAPE if name in asked},
    )
    dtype = resolve_dtype(settings.dtype, device)
    for resolved in models:
        for entry in resolved.values():
            if isinstance(entry.model, torch.nn.Module):
                entry.model = entry.model.to(device=device, dtype=dtype).eval()
                if settings.compile and not entry.model.compiled:
                    entry.model.compile_modules()
    decoders = {
        spec: REGISTRY[name](data.catalog, settings.k, {role: m.model for role, m in resolved.items()}, options)
        for spec, (name, options, _), resolved in zip(specs, plans, models)
    }
    batches = [b.to(device) for b in eval_batches(examples, data.catalog, settings.batch_size)]
    measured = benchmark(
        decoders, [b.prompt for b in batches], device, settings.warmup, progress, repeats=settings.repeats
    )
    if settings.profile:
        write_profiles(decoders, batches[0].prompt, Path(settings.profile))
    targets = torch.cat([b.targets.cpu() for b in batches])
    seen = None  # --exclude-history: every user's earlier items [N, S] and their mask, padded once for all decoders
    if settings.exclude_history:
        seen = pad_rows([torch.tensor(ex["seen"], dtype=torch.long) for ex in examples])
    now = time.time()  # to the millisecond: the runs of a fast sweep can end within one second
    local = time.localtime(now)
    timestamp = f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{int(now * 1000) % 1000:03d}{time.strftime('%z', local)}"
    return [
        build_record(
            spec,
            decoders[spec],
            measured[spec],
            resolved,
            targets,
            data,
            {"data": data_settings, "model": model_settings, "run": settings},
            device,
            commit,
            timestamp,
            seen,
        )
        for spec, resolved in zip(specs, models)
    ]


PROFILE_ROWS = 20  # operators per --profile table, those of the most time first


def write_profiles(decoders: dict, prompt, folder: Path) -> None:
    """Where each decoder's time goes: torch.profiler over 3 decodes of one batch, the
    operators by their own time; what the operators leave of the wall time is Python."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto's own start/stop lines are not for our users
    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompt.history.is_cuda else [])
    for spec, decoder in decoders.items():
        with profile(activities=activities) as prof:
            for _ in range(3):
                decoder.decode(prompt)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
        name = "".join(c if c.isalnum() or c in "-_=" else "_" for c in spec)
        write_atomically(folder / f"{name}-batch{len(prompt)}.txt", f"{spec}, batch of {len(prompt)}\n{table}\n")


def format_table(records: list[dict]) -> str:
    """The terminal table of a run, one row per record, columns aligned ('-' where a
    record has no value, e.g. R@20 above K)."""
    rows = []
    for r in records:
        lat = r["latency_ms"] or {}
        rows.append(
            [
                cell(r["metrics"]["recall@10"], ".4f"),
                cell(r["metrics"]["ndcg@10"], ".4f"),
                cell(r["metrics"]["recall@20"], ".4f"),
                f"{r['invalid_rate']:.3f}",
                cell(lat.get("p50"), ".1f"),
                cell(lat.get("mean"), ".1f"),
                cell(r["latency_over_floor"], ".2f"),
                calls_text(r),
                cell(r["throughput_users_per_s"], ".0f"),
            ]
        )
    names = ["R@10", "N@10", "R@20", "invalid", "p50 ms", "mean ms", "x floor", "calls", "users/s"]
    widths = [max([len(name) + 1] + [len(row[i]) for row in rows]) for i, name in enumerate(names)]
    first = max([26] + [len(r["decoder"]) for r in records])
    head = f"{'decoder':<{first}} " + " ".join(f"{name:>{w}}" for name, w in zip(names, widths))
    lines = [head, "-" * len(head)]
    for r, row in zip(records, rows):
        lines.append(f"{r['decoder']:<{first}} " + " ".join(f"{value:>{w}}" for value, w in zip(row, widths)))
    return "\n".join(lines)
