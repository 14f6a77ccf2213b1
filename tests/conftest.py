import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from bench.data.batches import collate_eval
from bench.data.catalog import build_catalog
from bench.settings import ModelSettings
from models.module import SidRecommender


def random_catalog(seed: int = 0, items: int = 60, sizes=(6, 5, 8)):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (items,), generator=gen) for s in sizes], dim=1).tolist()
    return build_catalog("toy", [str(i) for i in range(items)], codes, codebook_sizes=tuple(sizes))


def random_model(objective: str, catalog, seed: int = 0, backbone: str = "qwen-tiny", **settings):
    """A random-init model whose output distributions are peaked (few near-ties)."""
    torch.manual_seed(seed)
    model = SidRecommender.for_catalog(objective, ModelSettings(backbone=backbone, **settings), catalog)
    with torch.no_grad():
        model.lm.core.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()


def random_batch(catalog, users: int = 6, seed: int = 0, max_items: int = 5):
    """A prompt of histories of different lengths (so left-padded), as decoders get it."""
    return random_eval_batch(catalog, users, seed, max_items).prompt


def random_eval_batch(catalog, users: int = 6, seed: int = 0, max_items: int = 5):
    """The prompt of random_batch with random targets, as validation gets it."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for u in range(users):
        length = int(torch.randint(1, max_items + 1, (1,), generator=gen))
        history = torch.randint(0, catalog.num_items, (length,), generator=gen).tolist()
        rows.append(
            {"user": u, "history": history, "target": int(torch.randint(0, catalog.num_items, (1,), generator=gen))}
        )
    return collate_eval(rows, catalog)


def training_losses(model, objective: str, steps: int = 25, seed: int = 0) -> list[float]:
    """Adam steps on one fixed batch of random windows (one target per window for
    encoder-decoders) -> the loss at every step."""
    from models import objectives

    gen = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, model.catalog.num_items, (4,), generator=gen).tolist() for _ in range(16)]
    if model.lm.kind == "encoder-decoder":
        windows = [w[:end] for w in windows for end in range(2, 5)]
    batch = model.collate(windows)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = objectives.loss(objective, model.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def catalog():
    return random_catalog()


def act_as_owner(monkeypatch) -> None:
    """Permissions as an ordinary owner has them: root may write anything, so under root
    os.access is made to read the owner's permission bits."""
    if os.geteuid() != 0:
        return

    def access(path, mode, **_):
        try:
            bits = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return False
        needed = ((os.R_OK, stat.S_IRUSR), (os.W_OK, stat.S_IWUSR), (os.X_OK, stat.S_IXUSR))
        return all(bits & bit for flag, bit in needed if mode & flag)

    monkeypatch.setattr(os, "access", access)


def result_record(decoder: str, mean_ms: float, recall10: float = 0.4, **extra) -> dict:
    """A result record with the fields bench/leaderboard.py reads."""
    return {
        "dataset": "synthetic",
        "split": "test",
        "device": "cpu (test)",
        "decoder": decoder,
        "backbone": {"name": "qwen-tiny"},
        "users": 100,
        "k": 20,
        "batch_size": 32,
        "metrics": {"recall@1": 0.1, "recall@10": recall10, "ndcg@10": 0.25, "recall@20": None, "ndcg@20": None},
        "invalid_rate": 0.0,
        "latency_ms": {"mean": mean_ms, "p99": 2 * mean_ms},
        "latency_over_floor": 1.5,
        "backbone_calls_per_batch": 4.0,
        "git_sha": "0123456789abcdef",
        "command": "python -m bench run --decoder beam,nezha,greedy",
        "timestamp": "2026-11-22T20:00:00+0000",
        **extra,
    }


def write_letter_files(folder: Path, inter, index, stem: str = "Toy") -> Path:
    """<stem>.inter.json and <stem>.index.json in `folder` (dicts as JSON, strings verbatim)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, content in (("inter", inter), ("index", index)):
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / f"{stem}.{kind}.json").write_text(text)
    return folder


@pytest.fixture
def rescue(tmp_path, monkeypatch) -> Path:
    """The system temporary folder, where records that could not be appended are saved."""
    folder = tmp_path / "rescue"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def rescued(folder: Path) -> list[dict]:
    (saved,) = folder.iterdir()
    return json.loads(saved.read_text())
