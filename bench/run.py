"""`bench run`: data -> models (trained or loaded) -> decoders on the same batches ->
metrics and latency -> one record per decoder."""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch
import transformers

from bench.data import RecData, eval_examples, item_popularity
from bench.data.batches import eval_batches
from bench.errors import BenchError
from bench.latency import benchmark, summarize
from bench.metrics import ranking_metrics, target_ranks
from bench.records import PROTOCOL, cell, device_name, git_sha
from bench.train import TrainSettings, build_model, ensure_model
from decoders import REGISTRY, build_decoder, parse_spec
from models.backbones import ITEM, backbone_kind, parameter_count
from models.module import load_checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device '{name}'; use auto, cpu or cuda") from None


def check_k(k: int, data: RecData) -> None:
    if k < 1:
        raise BenchError(f"--k {k}: K must be at least 1")
    if k > data.catalog.num_items:
        raise BenchError(
            f"--k {k} is above the {data.catalog.num_items} items of the '{data.name}' catalogue; "
            f"choose K <= {data.catalog.num_items}"
        )


def model_requests(name: str, options: dict, settings: TrainSettings) -> dict[str, tuple[str, str, TrainSettings]]:
    """role -> (model key, objective, settings) for one decoder spec. Options that pick a
    model (e.g. nezha's transition) change the settings of the decoder's own model."""
    cls = REGISTRY[name]
    picked = {cls.model_options[o]: options[o] for o in cls.model_options if o in options}
    requests = {}
    for role in cls.needs:
        if role == "draft":
            requests[role] = ("draft", "ntp", replace(settings, backbone=settings.draft_backbone))
        elif role == "next_item":
            item_backbone = settings.backbone if backbone_kind(settings.backbone) == ITEM else settings.item_backbone
            requests[role] = ("next_item", "next_item", replace(settings, backbone=item_backbone))
        elif role == cls.needs[0] and picked:
            tag = ",".join(f"{k}={v}" for k, v in sorted(picked.items()))
            requests[role] = (f"{role}[{tag}]", role, replace(settings, **picked))
        else:
            requests[role] = (role, role, settings)
    for role, (_, objective, wanted) in requests.items():
        if objective == "popularity":
            continue
        kind = backbone_kind(wanted.backbone)
        if kind not in cls.backbone_kinds:
            needed = " or ".join(cls.backbone_kinds)
            raise BenchError(
                f"decoder '{name}' cannot run on {wanted.backbone} ({kind}): it needs a {needed} backbone; "
                f"{cls.kind_reason or 'it decodes SID tokens with a generative backbone'}"
            )
    return requests


def load_models(
    requests: dict[str, tuple[str, TrainSettings]],
    data: RecData,
    checkpoints: list[str],
    settings: TrainSettings,
    device: torch.device,
    progress: bool,
    untrained: bool = False,
) -> tuple[dict, dict]:
    """model key -> model (or popularity counts), and where each came from. A checkpoint
    given with --ckpt serves the plain role of its objective; the rest are trained (or
    taken from the runs cache); Medusa models are built on the NTP model."""
    models, sources = {}, {}
    for path in checkpoints:
        model = load_checkpoint(path, data.catalog)
        objective = model.hparams.objective
        served = [key for key, (wanted, _) in requests.items() if wanted == objective and key != "draft"]
        if not served:
            wanted = ", ".join(sorted({o for o, _ in requests.values() if o != "popularity"})) or "none"
            raise BenchError(
                f"checkpoint {path} was trained with objective '{objective}', but the chosen decoders "
                f"need: {wanted}; train one with: python -m bench train --objective "
                f"{wanted.split(', ')[0]}"
            )
        for key in served:  # the decoder checks that the model's options match its spec
            models[key], sources[key] = model, str(path)
    missing = set(requests) - set(models)
    if any(requests[key][0] == "medusa" for key in missing) and "ntp" not in models:
        requests = {**requests, "ntp": ("ntp", settings)}  # Medusa heads sit on the NTP backbone
        missing.add("ntp")
    for key in sorted(missing, key=lambda k: requests[k][0] == "medusa"):
        objective, wanted = requests[key]
        if objective == "popularity":
            models[key], sources[key] = item_popularity(data), "training split counts"
            continue
        if untrained:
            models[key], sources[key] = build_model(data, objective, wanted), "random weights (--untrained)"
            continue
        init = (getattr(models["ntp"], "cache_key", sources["ntp"]), models["ntp"]) if objective == "medusa" else None
        models[key] = ensure_model(data, objective, wanted, progress, init_from=init)
        sources[key] = f"trained by bench run ({wanted.backbone}, runs cache {models[key].cache_key})"
    for key, model in models.items():
        if isinstance(model, torch.nn.Module):
            models[key] = model.to(device).eval()
    return models, sources


def run(
    data: RecData,
    specs: list[str],
    k: int,
    batch_size: int,
    split: str,
    checkpoints: list[str],
    settings: TrainSettings,
    device_arg: str = "auto",
    limit_users: int | None = None,
    warmup: int = 2,
    progress: bool = True,
    untrained: bool = False,
) -> list[dict]:
    """Evaluate the decoders on the same batches and return their records."""
    commit = git_sha()  # the code that runs, before anything can change it
    parsed = [parse_spec(s) for s in specs]  # unknown decoders fail before any training
    check_k(k, data)
    if batch_size < 1:
        raise BenchError(f"--batch-size {batch_size}: must be at least 1")
    device = resolve_device(device_arg)
    per_decoder = [model_requests(name, options, settings) for name, options in parsed]  # refusals before training
    requests = {key: (objective, wanted) for request in per_decoder for key, objective, wanted in request.values()}
    models, sources = load_models(requests, data, checkpoints, settings, device, progress, untrained)
    decoders = {
        spec: build_decoder(spec, data.catalog, k, {role: models[key] for role, (key, _, _) in request.items()})
        for spec, request in zip(specs, per_decoder)
    }

    examples = eval_examples(data, split, settings.max_history, limit_users)
    batches = [b.to(device) for b in eval_batches(examples, data.catalog, batch_size)]
    measured = benchmark(decoders, batches, device, warmup=warmup, progress=progress)

    targets = torch.cat([b.targets.cpu() for b in batches])
    common = {
        "dataset": data.name,
        "split": split,
        "users": len(targets),
        "k": k,
        "batch_size": batch_size,
        "device": device_name(device),
        "git_sha": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": settings.seed,
        "command": " ".join(["python -m bench"] + sys.argv[1:]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_source": data.source,
        "data_sha256": data.checksums,
        "catalog": data.catalog.describe(),
        "protocol": PROTOCOL.format(max_history=settings.max_history, warmup=warmup),
    }
    records = []
    for (name, options), spec, request in zip(parsed, specs, per_decoder):
        m, decoder = measured[spec], decoders[spec]
        sids = torch.cat([r.sids for r in m.results])  # [N, K', L]
        items = data.catalog.items_of(sids)
        present = (sids >= 0).all(-1)
        stats: dict[str, float] = {}
        for r in m.results:
            for key, value in r.stats.items():
                stats[key] = stats.get(key, 0.0) + float(value)
        main_key = next((key for key, objective, _ in request.values() if objective != "popularity"), None)
        main_model = models[main_key] if main_key else None
        latency, prefill = summarize(m.latency_ms), summarize(m.prefill_ms)
        total_s = sum(m.latency_ms) / 1000.0
        records.append(
            {
                "decoder": spec,
                "decoder_name": name,
                "decoder_options": decoder.settings,
                "description": REGISTRY[name].description,
                **common,
                "backbone": (
                    {
                        "name": main_model.hparams.backbone,
                        "params": parameter_count(main_model),
                        "objective": main_model.hparams.objective,
                        "source": sources[main_key],
                        "settings": {k: v for k, v in dict(main_model.hparams).items() if k != "catalog_fingerprint"},
                    }
                    if main_model is not None
                    else None
                ),
                "draft": (
                    {
                        "name": models[request["draft"][0]].hparams.backbone,
                        "params": parameter_count(models[request["draft"][0]]),
                        "training": "NTP on the same training split (not distilled)",
                        "source": sources[request["draft"][0]],
                    }
                    if "draft" in request
                    else None
                ),
                "weights": "random: latency only, metrics meaningless" if untrained else "trained",
                "candidates_per_user": int(sids.shape[1]),
                "metrics": ranking_metrics(target_ranks(items, targets), k_max=k),
                "invalid_rate": float((present & (items < 0)).float().mean()),
                "empty_rate": float((~present).float().mean()),
                "latency_ms": latency,
                "latency_ms_per_user": total_s * 1000.0 / len(targets),  # a smaller last batch counts right
                "prefill_latency_ms": prefill,
                "latency_over_prefill": latency["mean"] / prefill["mean"] if prefill else None,
                "throughput_users_per_s": len(targets) / total_s if total_s > 0 else None,
                "backbone_calls_per_batch": sum(m.backbone_calls) / len(m.backbone_calls),
                "draft_calls_per_batch": sum(m.draft_calls) / len(m.draft_calls),
                "decoder_stats_per_request": {key: value / len(targets) for key, value in stats.items()},
                "peak_memory_mb": m.peak_memory_mb,
            }
        )
    return records


def format_table(records: list[dict]) -> str:
    head = (
        f"{'decoder':<26} {'R@10':>6} {'N@10':>6} {'R@20':>6} {'invalid':>7} {'p50 ms':>8} {'mean ms':>8} "
        f"{'x prefill':>9} {'calls':>5} {'users/s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lat = r["latency_ms"] or {}
        lines.append(
            f"{r['decoder']:<26} {cell(r['metrics']['recall@10'], '6.4f')} {cell(r['metrics']['ndcg@10'], '6.4f')} "
            f"{cell(r['metrics']['recall@20'], '6.4f')} {r['invalid_rate']:7.3f} {cell(lat.get('p50'), '8.1f')} "
            f"{cell(lat.get('mean'), '8.1f')} {cell(r['latency_over_prefill'], '9.2f')} "
            f"{r['backbone_calls_per_batch']:5.1f} {cell(r['throughput_users_per_s'], '8.0f')}"
        )
    return "\n".join(lines)
