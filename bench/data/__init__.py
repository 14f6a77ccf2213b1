"""Datasets: LETTER files or the synthetic default -> catalog, users, splits."""

from __future__ import annotations

import re
from pathlib import Path

from bench.data import letter, synthetic
from bench.data.catalog import Catalog, build_catalog
from bench.data.splits import RecData, eval_examples, item_popularity, train_windows
from bench.errors import BenchError

__all__ = ["Catalog", "RecData", "load", "load_dataset", "eval_examples", "train_windows", "item_popularity"]

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a dataset name also names folders (runs/<name>/): no paths


def load(settings) -> RecData:
    """The dataset of a command's data settings (bench.settings.DataSettings)."""
    shape = {name: getattr(settings, name) for name in ("items", "users", "sequence_length")}
    return load_dataset(settings.dataset, settings.data_dir, settings.collisions, settings.seed, **shape)


def load_dataset(
    name: str = "synthetic",
    data_dir: str | Path | None = None,
    collisions: str = "last_code",
    seed: int = 0,
    items: int | None = None,
    users: int | None = None,
    sequence_length: int | None = None,
) -> RecData:
    """Load by name: `synthetic` is generated (of `items`, `users`, `sequence_length` when
    given); a LETTER dataset comes from --data-dir, else ../shared/data/<name>, else the
    download cache (downloading it once)."""
    check_name(name)
    generated = name == "synthetic" and data_dir is None
    shape = {k: v for k, v in (("items", items), ("users", users), ("sequence_length", sequence_length)) if v}
    if generated and items:
        codes, sizes, sequences = synthetic.generate_scaled(seed, items, users or synthetic.USERS, sequence_length)
        catalog = build_catalog(name, [str(i) for i in range(items)], codes, rule=collisions, codebook_sizes=sizes)
        return RecData(
            name, catalog, [str(u) for u in range(len(sequences))], sequences, source_of(seed, shape), generator=shape
        )
    if generated:
        item_ids, codes, user_ids, sequences = synthetic.generate(
            seed=seed, users=users or synthetic.USERS, sequence_length=sequence_length
        )
        source, checksums = source_of(seed, shape), {}
    else:
        shared = None if data_dir else letter.shared_dir(name)
        folder = Path(data_dir) if data_dir else (shared or _cached_or_download(name))
        inter_path, index_path = letter.find_files(folder)
        sums = {path: letter.sha256_of(path) for path in (inter_path, index_path)}
        try:
            letter.check_pinned(name, sums)
            item_ids, codes = letter.parse_index(index_path)
            user_ids, sequences = letter.parse_interactions(inter_path, set(item_ids), index_path)
        except BenchError as exc:
            if data_dir or shared:
                raise
            raise BenchError(f"{exc}; it is a download: delete {folder} to download it again") from None
        source, checksums = str(folder), {path.name: digest for path, digest in sums.items()}
    catalog = build_catalog(
        name, item_ids, codes, rule=collisions, codebook_sizes=synthetic.CODEBOOK if generated else None
    )
    position = {item: i for i, item in enumerate(item_ids)}
    kept_users, kept = [], []
    for user, seq in zip(user_ids, sequences):
        if len(seq) >= 3:
            kept_users.append(user)
            kept.append([position[i] for i in seq])
    if not kept:
        raise BenchError(
            f"dataset '{name}' has no user with 3 or more items; leave-one-out needs train, valid and test items"
        )
    return RecData(
        name=name,
        catalog=catalog,
        user_ids=kept_users,
        sequences=kept,
        source=source,
        checksums=checksums,
        dropped_users=len(sequences) - len(kept),
        generator=shape,
    )


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise BenchError(
            f"dataset name {name!r} is not a name (letters, digits, '-', '_' and '.', not starting with '.'); "
            "a folder comes with --data-dir FOLDER beside --dataset NAME"
        )


def check_source(settings) -> None:
    """What load() would refuse before reading a file: a name that is no name, a folder
    without its two files, an unknown dataset (nothing is read or downloaded), so a sweep
    over datasets finds them all before its first run."""
    check_name(settings.dataset)
    if settings.dataset == "synthetic" and settings.data_dir is None:
        return
    folder = Path(settings.data_dir) if settings.data_dir else letter.shared_dir(settings.dataset)
    if folder:
        letter.find_files(folder)
    elif settings.dataset not in letter.REMOTE_DATASETS:
        raise unknown_dataset(settings.dataset)


def unknown_dataset(name: str) -> BenchError:
    return BenchError(
        f"unknown dataset '{name}'; choose synthetic, {', '.join(letter.REMOTE_DATASETS)} "
        "or pass --data-dir FOLDER with <Name>.inter.json and <Name>.index.json"
    )


def source_of(seed: int, shape: dict) -> str:
    return f"synthetic generator (seed={seed}{''.join(f', {k}={v}' for k, v in shape.items())})"


def _cached_or_download(name: str) -> Path:
    if name not in letter.REMOTE_DATASETS:
        raise unknown_dataset(name)
    return letter.download(name)
