"""`bench leaderboard`: result files -> one Markdown table per run (dataset, split,
device, command). Speedups are against the beam search of the same run only: speeds
measured in different runs are not compared."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bench.records import cell, read_records


def leaderboard(paths: list[Path]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in paths:
        for record in read_records(path):
            run = (record["dataset"], record["split"], record["device"], record["timestamp"], record["command"])
            groups[run].append(record)
    out = []
    for (dataset, split, device, timestamp, command), records in sorted(groups.items()):
        beam = [r for r in records if r["decoder"] == "beam" and r.get("latency_ms")]
        base = beam[-1]["latency_ms"]["mean"] if beam else None
        out.append(f"### {dataset} / {split} / {device} / {timestamp}\n")
        out.append(
            "| decoder | backbone | users | K | batch | R@1 | R@10 | N@10 | R@20 | N@20 | invalid | "
            "mean ms/batch | p99 ms | x bare forward | speedup vs beam | backbone calls | commit |"
        )
        out.append("|" + "---|" * 17)
        for r in records:
            m, lat = r["metrics"], r.get("latency_ms") or {}
            speedup = base / lat["mean"] if base and lat and r.get("backbone") else None
            backbone = r["backbone"]["name"] if r.get("backbone") else "-"
            out.append(
                f"| {r['decoder']} | {backbone} | {r['users']} | {r['k']} | {r['batch_size']} | "
                f"{cell(m['recall@1'], '.4f')} | {cell(m['recall@10'], '.4f')} | {cell(m['ndcg@10'], '.4f')} | "
                f"{cell(m['recall@20'], '.4f')} | {cell(m['ndcg@20'], '.4f')} | {r['invalid_rate']:.3f} | "
                f"{cell(lat.get('mean'), '.1f')} | {cell(lat.get('p99'), '.1f')} | "
                f"{cell(r.get('latency_over_prefill'), '.2f')} | {cell(speedup, '.2f')} | "
                f"{r['backbone_calls_per_batch']:.1f} | {r['git_sha'][:10]} |"
            )
        out.append(f"\nCommand: `{command}`\n")
    return "\n".join(out)
