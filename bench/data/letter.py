"""LETTER-format datasets: ``<Name>.inter.json`` (user -> item ids in time order) and
``<Name>.index.json`` (item -> SID tokens like ``<a_183>``), from a folder or downloaded
by name with a sha256 check."""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import urllib.error
import urllib.request
from pathlib import Path

from bench.errors import BenchError

LETTER_COMMIT = "8d0154e28de37dbb6e24871c508ad8ddb1921cda"
DEFAULT_URL = f"https://raw.githubusercontent.com/HonghuiBao2000/LETTER/{LETTER_COMMIT}/data/{{Name}}/{{file}}"
URL_ENV = "BENCH_DATA_URL"  # template with {name}, {Name} and {file}
URL_PLACEHOLDERS = ("name", "Name", "file")
CACHE_ENV = "BENCH_DATA_HOME"  # where downloads go; default ~/.cache/nezha-bench/data

# name -> (file stem, sha256 of each file or None where the suite has not pinned it)
REMOTE_DATASETS = {
    "beauty": (
        "Beauty",
        {
            "inter": "8809584b8b78fa6561771c88911ed65bd716fc9926fca1e581e6a1ab578ccfd5",
            "index": "be3fb890e59b5443824cdebc560ef349191b97f20d3aecad4727de2d6b212c82",
        },
    ),
    "instruments": ("Instruments", None),
    "yelp": ("Yelp", None),
}
TOKEN = re.compile(r"<([a-z])_([0-9]+)>")
MAX_CODES = 2**20  # per level: more would not fit a vocabulary (nor memory)


def cache_dir(name: str) -> Path:
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "nezha-bench" / "data"))
    return root / name


def shared_dir(name: str) -> Path | None:
    """The project's shared data folder (../shared/data/<name>), looked up from the
    working directory and from the checkout, when it exists."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data" / name
        if candidate.is_dir():
            return candidate
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_files(folder: Path) -> tuple[Path, Path]:
    """The one ``*.inter.json`` in a folder and its ``*.index.json``."""
    if not folder.is_dir():
        raise BenchError(f"data folder {folder} does not exist")
    inters = sorted(folder.glob("*.inter.json"))
    if not inters:
        raise BenchError(
            f"no *.inter.json file in {folder}; a LETTER dataset needs <Name>.inter.json and <Name>.index.json"
        )
    if len(inters) > 1:
        raise BenchError(
            f"several *.inter.json files in {folder} ({', '.join(p.name for p in inters)}); keep one dataset per folder"
        )
    index = inters[0].with_name(inters[0].name.replace(".inter.json", ".index.json"))
    if not index.exists():
        raise BenchError(f"missing {index.name} in {folder}: the SIDs of the items in {inters[0].name}")
    return inters[0], index


def download(name: str) -> Path:
    """Fetch a named LETTER dataset into the cache (once) and check its sha256."""
    if name not in REMOTE_DATASETS:
        raise BenchError(
            f"unknown dataset '{name}'; choose synthetic, {', '.join(REMOTE_DATASETS)} or pass --data-dir FOLDER"
        )
    stem, pinned = REMOTE_DATASETS[name]
    template = url_template()
    target = cache_dir(name)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot make the download folder {target} ({exc.strerror or exc}); set {CACHE_ENV}") from None
    sums_file = target / "sha256.json"
    known = pinned or read_sums(sums_file)
    downloaded = set()
    for kind in ("inter", "index"):
        path = target / f"{stem}.{kind}.json"
        if not path.exists():
            url = template.format(name=name, Name=stem, file=path.name)
            partial = path.with_suffix(".part")
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                    while block := response.read(1 << 20):
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                partial.unlink(missing_ok=True)
                reason = getattr(exc, "reason", exc)
                raise BenchError(
                    f"could not download {url} ({reason}); put {stem}.inter.json and {stem}.index.json "
                    f"in {target} or pass --data-dir FOLDER"
                ) from None
            partial.rename(path)
            downloaded.add(path)
        digest = sha256_of(path)
        if kind in known and known[kind] != digest and path not in downloaded:  # a file someone put there
            raise BenchError(
                f"{path} has sha256 {digest}, expected {known[kind]} (from {sums_file if not pinned else 'the pins'}); "
                "replace the file or delete it to download it again"
            )
        if kind in known and known[kind] != digest:
            path.unlink()
            raise BenchError(
                f"{path.name} from {template.format(name=name, Name=stem, file=path.name)} has sha256 "
                f"{digest}, expected {known[kind]}; the file was removed, try again or check {URL_ENV}"
            )
        known = {**known, kind: digest}
    if not pinned and not sums_file.exists():
        sums_file.write_text(json.dumps(known, indent=1))
    return target


def read_sums(sums_file: Path) -> dict:
    """The sha256 of an unpinned dataset's files, kept beside them at their first download."""
    if not sums_file.exists():
        return {}
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sums = None
    if not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise BenchError(
            f"{sums_file} is not the sha256 sums of the downloaded files; delete it (the files are checked against it)"
        )
    return sums


def url_template() -> str:
    """BENCH_DATA_URL (else LETTER's own), checked before any download: a URL with a
    placeholder that is not one of ours cannot be filled in."""
    template = os.environ.get(URL_ENV, DEFAULT_URL)
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:  # an unmatched '{' or '}'
        fields = None
    if fields is not None and fields <= set(URL_PLACEHOLDERS) and "file" in fields:
        try:  # a format spec or conversion ({file:x}, {file!z}), or no URL once filled in
            urllib.request.Request(template.format(name="x", Name="X", file="X.inter.json"))
        except (ValueError, IndexError, KeyError):
            fields = None
    if fields is None or not fields <= set(URL_PLACEHOLDERS) or "file" not in fields:
        raise BenchError(
            f"{URL_ENV}={template!r} is not a URL template; use the placeholders {{name}}, {{Name}} and {{file}} "
            "({file} is required), e.g. http://host/data/{Name}/{file}"
        )
    return template


def pinned_sums(name: str) -> dict | None:
    """The sha256 of a dataset's files that every load checks (None: not pinned)."""
    return REMOTE_DATASETS.get(name, (None, None))[1]


def check_pinned(name: str, sums: dict[Path, str]) -> None:
    """Files loaded under a pinned dataset's name must be that dataset, wherever they come
    from (--data-dir, the shared folder, the cache): results carry the name, not the files."""
    pinned = pinned_sums(name)
    if not pinned:
        return
    for path, digest in sums.items():
        kind = "inter" if path.name.endswith(".inter.json") else "index"
        if digest != pinned[kind]:
            raise BenchError(
                f"{path} has sha256 {digest}, expected {pinned[kind]} for dataset '{name}'; "
                f"restore the published file, or load a changed copy with --data-dir under another --dataset name"
            )


class DuplicateKey(Exception):
    """A key that appears twice in one JSON object: json would keep only the last."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook that refuses a key given twice (json keeps the last)."""
    found = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(key)
        found[key] = value
    return found


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise BenchError(f"{path}: key '{exc.args[0]}' appears more than once; each user and item once") from None
    except RecursionError:
        raise BenchError(f"{path}: JSON nested too deeply to read; a LETTER file is one object of lists") from None
    except FileNotFoundError:
        raise BenchError(f"missing file {path}") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise BenchError(f"{path}: not a UTF-8 text file") from None
    except ValueError as exc:  # a number json will not read (an integer of thousands of digits)
        raise BenchError(f"{path}: not a LETTER file ({str(exc).split(';')[0]})") from None


def parse_index(path: Path) -> tuple[list[str], list[list[int]]]:
    """-> item ids and their SID codes, checked: same length, tokens <x_N> with x the level's letter."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise BenchError(f"{path}: expected a non-empty object mapping item id -> list of SID tokens")
    items, codes = [], []
    first_item, levels = None, None
    for item, tokens in raw.items():
        if not isinstance(tokens, list) or not tokens:
            raise BenchError(f'{path}: item \'{item}\' has no SID tokens (expected a list like ["<a_1>", "<b_2>"])')
        if levels is None:
            first_item, levels = item, len(tokens)
        elif len(tokens) != levels:
            raise BenchError(
                f"{path}: item '{item}' has {len(tokens)} SID tokens but item '{first_item}' has "
                f"{levels}; all SIDs must have the same number of levels"
            )
        sid = []
        for level, token in enumerate(tokens):
            match = TOKEN.fullmatch(token) if isinstance(token, str) else None
            letter = chr(ord("a") + level)
            if not match or match.group(1) != letter:
                raise BenchError(
                    f"{path}: item '{item}' has token {token!r} at level {level + 1}; "
                    f"expected '<{letter}_N>' with N a code number"
                )
            digits = match.group(2).lstrip("0") or "0"
            # the length first: int() refuses strings of over 4300 digits
            if len(digits) > len(str(MAX_CODES)) or int(digits) >= MAX_CODES:
                raise BenchError(
                    f"{path}: item '{item}' has token {token[:20]!r}{'...' if len(token) > 20 else ''} at level "
                    f"{level + 1}; codes go up to {MAX_CODES - 1}"
                )
            sid.append(int(digits))
        items.append(str(item))
        codes.append(sid)
    return items, codes


def parse_interactions(
    path: Path, known_items: set[str] | None = None, index_path: Path | None = None
) -> tuple[list[str], list[list[str]]]:
    """-> user ids and their item ids in time order, checked against the index's items
    when given (a catalogue still without SIDs has none)."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise BenchError(f"{path}: expected a non-empty object mapping user id -> list of item ids in time order")
    users, sequences = [], []
    for user, items in raw.items():
        if not isinstance(items, list):
            raise BenchError(f"{path}: user '{user}' maps to {type(items).__name__}, expected a list of item ids")
        if not items:
            raise BenchError(f"{path}: user '{user}' has no interactions; remove empty users from the file")
        sequence = [str(i) for i in items]
        for item in sequence if known_items is not None else ():
            if item not in known_items:
                raise BenchError(f"{path}: user '{user}' has item '{item}', which has no SID in {index_path.name}")
        users.append(str(user))
        sequences.append(sequence)
    return users, sequences
