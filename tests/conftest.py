import pytest
import torch

from bench.data.catalog import build_catalog
from bench.data.batches import collate_eval
from models.module import SidRecommender


def random_catalog(seed: int = 0, items: int = 60, sizes=(6, 5, 8)):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (items,), generator=gen) for s in sizes], dim=1).tolist()
    return build_catalog("toy", [str(i) for i in range(items)], codes, codebook_sizes=tuple(sizes))


def random_model(objective: str, catalog, seed: int = 0, backbone: str = "qwen-tiny", **settings):
    """A random-init model whose output distributions are peaked (few near-ties)."""
    torch.manual_seed(seed)
    model = SidRecommender.for_catalog(objective, backbone, catalog, **settings)
    with torch.no_grad():
        model.lm.core.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()


def random_batch(catalog, users: int = 6, seed: int = 0, max_items: int = 5):
    """Histories of different lengths, so prompts are left-padded."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for u in range(users):
        length = int(torch.randint(1, max_items + 1, (1,), generator=gen))
        history = torch.randint(0, catalog.num_items, (length,), generator=gen).tolist()
        rows.append({"user": u, "history": history, "target": int(torch.randint(0, catalog.num_items, (1,), generator=gen))})
    return collate_eval(rows, catalog)


@pytest.fixture(scope="module")
def catalog():
    return random_catalog()
