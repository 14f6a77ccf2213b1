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
