"""Datasets: the LETTER loader and its error messages, Beauty's published figures, the
download path (against a local HTTP server), the synthetic generator, the leave-one-out
splits and evaluation batches."""

import contextlib
import functools
import http.server
import json
import shutil
import socket
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_letter_files

from bench.data import RecData, eval_examples, letter, load_dataset, synthetic, train_windows
from bench.data.batches import collate_eval
from bench.data.catalog import build_catalog
from bench.errors import BenchError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BEAUTY_DIR = SHARED_DATA / "beauty"
BEAUTY_SHA256 = {  # from ../shared/data/README.md
    "Beauty.inter.json": "8809584b8b78fa6561771c88911ed65bd716fc9926fca1e581e6a1ab578ccfd5",
    "Beauty.index.json": "be3fb890e59b5443824cdebc560ef349191b97f20d3aecad4727de2d6b212c82",
}

# A tiny LETTER dataset: 4 items with 2-level SIDs, 3 users (u3 has only 2 items).
TOY_INDEX = {
    "i1": ["<a_0>", "<b_1>"],
    "i2": ["<a_1>", "<b_0>"],
    "i3": ["<a_1>", "<b_2>"],
    "i4": ["<a_2>", "<b_0>"],
}
TOY_INTER = {"u1": ["i1", "i2", "i3"], "u2": ["i3", "i4", "i1", "i2"], "u3": ["i4", "i1"]}


def write_letter(folder: Path, inter=TOY_INTER, index=TOY_INDEX, stem: str = "Toy") -> Path:
    return write_letter_files(folder, inter, index, stem)


def load_error(folder: Path) -> str:
    with pytest.raises(BenchError) as info:
        load_dataset("toy", data_dir=folder)
    return str(info.value)


# ---------------------------------------------------------------- LETTER loader


def test_letter_loader_reads_users_sequences_and_codes(tmp_path):
    data = load_dataset("toy", data_dir=write_letter(tmp_path))
    assert data.user_ids == ["u1", "u2"]
    assert data.sequences == [[0, 1, 2], [2, 3, 0, 1]]
    assert data.dropped_users == 1
    assert data.catalog.item_ids == ["i1", "i2", "i3", "i4"]
    assert data.catalog.sids.tolist() == [[0, 1], [1, 0], [1, 2], [2, 0]]
    assert data.catalog.codebook_sizes == (3, 3)
    assert data.catalog.collisions == 0
    assert data.source == str(tmp_path)
    assert set(data.checksums) == {"Toy.inter.json", "Toy.index.json"}


def test_letter_loader_matches_numeric_item_ids_to_string_keys(tmp_path):
    index = {"10": ["<a_0>", "<b_0>"], "11": ["<a_0>", "<b_1>"], "12": ["<a_1>", "<b_0>"]}
    data = load_dataset("toy", data_dir=write_letter(tmp_path, inter={"7": [12, 10, 11]}, index=index))
    assert data.user_ids == ["7"]
    assert data.sequences == [[2, 0, 1]]


def test_parse_index_reads_multi_digit_codes(tmp_path):
    write_letter(tmp_path, index={"x": ["<a_183>", "<b_70>", "<c_232>", "<d_6>"]})
    items, codes = letter.parse_index(tmp_path / "Toy.index.json")
    assert items == ["x"]
    assert codes == [[183, 70, 232, 6]]


def test_users_under_three_items_are_dropped_and_counted(tmp_path):
    inter = {"a": ["i1"], "b": ["i1", "i2"], "c": ["i1", "i2", "i3"], "d": ["i2", "i3"]}
    data = load_dataset("toy", data_dir=write_letter(tmp_path, inter=inter))
    assert data.user_ids == ["c"]
    assert data.dropped_users == 3
    assert data.describe()["dropped_users_under_3_items"] == 3


def test_dataset_without_any_user_of_three_items_is_refused(tmp_path):
    message = load_error(write_letter(tmp_path, inter={"a": ["i1", "i2"]}))
    assert "no user with 3 or more items" in message


# ---------------------------------------------------------------- bad files


def test_missing_folder(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert "does not exist" in message and "nowhere" in message


def test_folder_without_inter_file(tmp_path):
    (tmp_path / "Toy.index.json").write_text(json.dumps(TOY_INDEX))
    assert "no *.inter.json" in load_error(tmp_path)


def test_missing_index_file(tmp_path):
    (tmp_path / "Toy.inter.json").write_text(json.dumps(TOY_INTER))
    message = load_error(tmp_path)
    assert "missing Toy.index.json" in message


def test_two_inter_files_in_one_folder(tmp_path):
    write_letter(tmp_path, stem="Toy")
    write_letter(tmp_path, stem="Other")
    message = load_error(tmp_path)
    assert "several *.inter.json" in message
    assert "Other.inter.json" in message and "Toy.inter.json" in message


def test_invalid_json_names_file_line_and_column(tmp_path):
    write_letter(tmp_path, inter='{\n  "u1": ["i1", "i2",, "i3"]\n}')
    message = load_error(tmp_path)
    assert "Toy.inter.json" in message and "not valid JSON" in message
    assert "line 2, column 21" in message


BAD_FILES = {
    "inter top level is a list": (
        ["i1", "i2", "i3"],
        TOY_INDEX,
        ["Toy.inter.json", "expected a non-empty object mapping user id"],
    ),
    "inter is empty": ({}, TOY_INDEX, ["Toy.inter.json", "expected a non-empty object"]),
    "index top level is a list": (
        TOY_INTER,
        [["<a_0>", "<b_1>"]],
        ["Toy.index.json", "expected a non-empty object mapping item id"],
    ),
    "user maps to a string": ({"u1": "i1"}, TOY_INDEX, ["user 'u1' maps to str", "expected a list"]),
    "user maps to an object": ({"u1": {"i1": 1}}, TOY_INDEX, ["user 'u1' maps to dict"]),
    "empty user": ({"u1": ["i1", "i2", "i3"], "u2": []}, TOY_INDEX, ["user 'u2' has no interactions"]),
    "item without SID": (
        {"u1": ["i1", "i9", "i2"]},
        TOY_INDEX,
        ["user 'u1' has item 'i9'", "no SID in Toy.index.json"],
    ),
    "SIDs of unequal length": (
        TOY_INTER,
        {"i1": ["<a_0>", "<b_1>"], "i2": ["<a_1>"]},
        ["item 'i2' has 1 SID tokens but item 'i1' has 2", "same number of levels"],
    ),
    "code is not a number": (
        TOY_INTER,
        {"i1": ["<a_x>", "<b_1>"]},
        ["item 'i1'", "token '<a_x>' at level 1", "expected '<a_N>'"],
    ),
    "token without brackets": (TOY_INTER, {"i1": ["a_1", "<b_1>"]}, ["token 'a_1' at level 1", "expected '<a_N>'"]),
    "wrong level letter": (TOY_INTER, {"i1": ["<b_1>", "<b_1>"]}, ["token '<b_1>' at level 1", "expected '<a_N>'"]),
    "wrong letter at level 2": (
        TOY_INTER,
        {"i1": ["<a_1>", "<a_1>"]},
        ["token '<a_1>' at level 2", "expected '<b_N>'"],
    ),
    "token is a number": (TOY_INTER, {"i1": [5, "<b_1>"]}, ["token 5 at level 1"]),
    "empty SID list": (TOY_INTER, {"i1": [], "i2": ["<a_1>"]}, ["item 'i1' has no SID tokens"]),
    "SID is a string": (TOY_INTER, {"i1": "<a_1>"}, ["item 'i1' has no SID tokens"]),
}


@pytest.mark.parametrize("inter,index,fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_raises_bench_error_naming_the_problem(tmp_path, inter, index, fragments):
    message = load_error(write_letter(tmp_path, inter=inter, index=index))
    for fragment in fragments:
        assert fragment in message


# ---------------------------------------------------------------- Beauty (shared data)


@pytest.fixture(scope="module")
def beauty():
    return load_dataset("beauty", data_dir=BEAUTY_DIR)


def test_beauty_matches_the_published_figures(beauty):
    info = beauty.describe()
    assert info["users"] == 22363
    assert info["items"] == 12101
    assert info["interactions"] == 198502
    assert info["history_length"] == {"min": 5, "median": 6.0, "max": 204}
    assert info["levels"] == 4
    assert info["codes_used_per_level"][0] == 197
    assert info["training_prefixes"] == 131413
    assert beauty.dropped_users == 0


def test_beauty_checksums_are_recorded(beauty):
    assert beauty.checksums == BEAUTY_SHA256


def test_beauty_training_windows_cover_every_prefix_once(beauty):
    for max_history in (20, 5):
        windows = train_windows(beauty, max_history=max_history)
        assert sum(len(w) - 1 for w in windows) == 131413


def test_beauty_collisions_relabel_13_items_in_the_last_level(beauty):
    _, raw = letter.parse_index(BEAUTY_DIR / "Beauty.index.json")
    raw = torch.tensor(raw)
    shared = Counter(map(tuple, raw.tolist()))
    assert sorted(n for n in shared.values() if n > 1) == [2] * 9 + [3] * 2  # 11 shared SIDs
    changed = (beauty.catalog.sids != raw).any(dim=1)
    assert int(changed.sum()) == 13 == beauty.catalog.collisions
    assert torch.equal(beauty.catalog.sids[:, :-1], raw[:, :-1])


@pytest.mark.parametrize("rule,levels", [("last_code", 4), ("extra_level", 5)])
def test_beauty_sids_are_unique_after_resolution(beauty, rule, levels):
    catalog = (
        beauty.catalog if rule == "last_code" else load_dataset("beauty", data_dir=BEAUTY_DIR, collisions=rule).catalog
    )
    assert catalog.collision_rule == rule
    assert catalog.sids.shape == (12101, levels)
    assert torch.unique(catalog.sids, dim=0).shape[0] == 12101
    assert catalog.collisions == 13


# ---------------------------------------------------------------- download


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """An HTTP server on 127.0.0.1 serving `directory`; yields its port."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def closed_port():
    """A port on 127.0.0.1 that refuses connections; yields it. It stays bound, never
    listened on: no other process can take it (and answer) while the test connects."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """Downloads go to tmp_path/cache; returns a function pointing the URL at a port."""
    home = tmp_path / "cache"
    monkeypatch.setenv(letter.CACHE_ENV, str(home))
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)

    def point_to(port: int) -> None:
        monkeypatch.setenv(letter.URL_ENV, f"http://127.0.0.1:{port}/{{name}}/{{file}}")

    point_to.home = home
    return point_to


def test_download_fetches_checks_and_caches_beauty(cache_home):
    with serve(SHARED_DATA) as port:
        cache_home(port)
        folder = letter.download("beauty")
    assert folder == cache_home.home / "beauty"
    assert sorted(p.name for p in folder.iterdir()) == ["Beauty.index.json", "Beauty.inter.json"]
    assert {name: letter.sha256_of(folder / name) for name in BEAUTY_SHA256} == BEAUTY_SHA256
    assert letter.download("beauty") == folder  # server gone: the cache is used
    data = load_dataset("beauty", data_dir=folder)
    assert (len(data.user_ids), data.catalog.num_items) == (22363, 12101)
    assert data.checksums == BEAUTY_SHA256


@pytest.mark.parametrize("bad", ["inter", "index"])
def test_download_with_checksum_mismatch_removes_the_file(tmp_path, cache_home, bad):
    served = tmp_path / "served" / "beauty"
    served.mkdir(parents=True)
    for name in BEAUTY_SHA256:
        shutil.copyfile(BEAUTY_DIR / name, served / name)
    with open(served / f"Beauty.{bad}.json", "ab") as f:
        f.write(b" ")
    with serve(served.parent) as port:
        cache_home(port)
        with pytest.raises(BenchError) as info:
            letter.download("beauty")
    message = str(info.value)
    assert f"Beauty.{bad}.json" in message and "sha256" in message
    assert BEAUTY_SHA256[f"Beauty.{bad}.json"] in message
    assert not (cache_home.home / "beauty" / f"Beauty.{bad}.json").exists()
    assert not list((cache_home.home / "beauty").glob("*.part"))


def test_download_records_and_then_checks_sums_of_unpinned_datasets(tmp_path, cache_home):
    write_letter(tmp_path / "served" / "instruments", stem="Instruments")
    with serve(tmp_path / "served") as port:
        cache_home(port)
        folder = letter.download("instruments")
    assert load_dataset("instruments", data_dir=folder).user_ids == ["u1", "u2"]
    sums = json.loads((folder / "sha256.json").read_text())
    assert sums == {
        "inter": letter.sha256_of(folder / "Instruments.inter.json"),
        "index": letter.sha256_of(folder / "Instruments.index.json"),
    }
    changed = json.dumps({"u1": ["i1", "i2", "i3"]})
    (folder / "Instruments.inter.json").write_text(changed)
    with pytest.raises(BenchError, match="sha256 .* delete it to download it again"):
        letter.download("instruments")
    assert (folder / "Instruments.inter.json").read_text() == changed  # a file not downloaded now is not removed


@pytest.mark.parametrize("sums", ["{bad", "[1]", '{"inter": 5}'])
def test_a_broken_sums_file_is_refused_and_the_files_kept(tmp_path, cache_home, sums):
    write_letter(tmp_path / "served" / "instruments", stem="Instruments")
    with serve(tmp_path / "served") as port:
        cache_home(port)
        folder = letter.download("instruments")
    (folder / "sha256.json").write_text(sums)
    with pytest.raises(BenchError, match="sha256.json is not the sha256 sums of the downloaded files; delete it"):
        letter.download("instruments")
    assert (folder / "Instruments.inter.json").exists() and (folder / "Instruments.index.json").exists()


@pytest.mark.parametrize("template", ["http://x/{file:x}", "http://x/{file!z}", "nothing{file}", "http://[::1/{file}"])
def test_a_url_template_that_gives_no_url_is_refused(monkeypatch, template):
    monkeypatch.setenv(letter.URL_ENV, template)
    with pytest.raises(BenchError, match="is not a URL template"):
        letter.url_template()


def test_download_from_unreachable_server_says_where_to_put_the_files(cache_home):
    with closed_port() as port:
        cache_home(port)
        with pytest.raises(BenchError) as info:
            letter.download("beauty")
    message = str(info.value)
    assert f"could not download http://127.0.0.1:{port}/beauty/Beauty.inter.json" in message
    assert f"put Beauty.inter.json and Beauty.index.json in {cache_home.home / 'beauty'}" in message
    assert "--data-dir" in message
    assert list((cache_home.home / "beauty").iterdir()) == []


@pytest.mark.parametrize("load", [letter.download, load_dataset], ids=["download", "load_dataset"])
def test_unknown_dataset_lists_choices(cache_home, load):
    with pytest.raises(BenchError) as info:
        load("nosuch")
    message = str(info.value)
    assert "unknown dataset 'nosuch'" in message
    assert "synthetic, beauty, instruments, yelp" in message
    assert not cache_home.home.exists()


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def small_synthetic():
    return {seed: synthetic.generate(seed=seed, users=200) for seed in (0, 1)}


def test_synthetic_is_reproducible_from_its_seed(small_synthetic):
    assert synthetic.generate(seed=0, users=200) == small_synthetic[0]


def test_synthetic_seed_changes_sequences_and_sids(small_synthetic):
    (_, codes0, _, seqs0), (_, codes1, _, seqs1) = small_synthetic[0], small_synthetic[1]
    assert codes0 != codes1
    assert seqs0 != seqs1


def test_synthetic_dataset_describe():
    info = load_dataset("synthetic").describe()
    assert info["dataset"] == "synthetic"
    assert info["source"] == "synthetic generator (seed=0)"
    assert (info["users"], info["items"], info["levels"]) == (3000, 600, 3)
    assert info["codebook_sizes"] == [16, 16, 32]
    assert 5 <= info["history_length"]["min"] and info["history_length"]["max"] <= 20
    assert info["training_prefixes"] == info["interactions"] - 3 * info["users"]


@pytest.mark.parametrize("items", [100, 5_000, 40_000])
def test_a_synthetic_catalogue_of_any_size_has_unique_hierarchy_sids_from_its_seed(items):
    data = load_dataset("synthetic", items=items, users=300, seed=4)
    again = load_dataset("synthetic", items=items, users=300, seed=4)
    catalog = data.catalog
    assert catalog.num_items == items and catalog.collisions == 0
    assert torch.equal(catalog.sids, again.catalog.sids) and data.sequences == again.sequences
    assert len({tuple(sid) for sid in catalog.sids.tolist()}) == items
    assert catalog.levels == 3 and all((catalog.sids < torch.tensor(catalog.codebook_sizes)).all(0))
    assert len(data.sequences) == 300 and all(5 <= len(s) <= 20 for s in data.sequences)
    assert all(0 <= i < items for s in data.sequences for i in s)
    other = load_dataset("synthetic", items=items, users=300, seed=5)
    assert not torch.equal(other.catalog.sids, catalog.sids)


def test_the_verifier_of_a_large_catalogue_accepts_exactly_its_sids():
    catalog = load_dataset("synthetic", items=40_000, users=10).catalog
    verifier = catalog.verifier
    assert all(verifier.is_valid(sid) for sid in catalog.sids[::97].tolist())
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor(catalog.codebook_sizes)
    random_sids = (torch.rand(20_000, 3, generator=generator) * sizes).long()
    real = set(map(tuple, catalog.sids.tolist()))
    expected = torch.tensor([tuple(sid) in real for sid in random_sids.tolist()])
    assert 0 < expected.sum() < len(expected)
    assert torch.equal(catalog.items_of(random_sids) >= 0, expected)
    assert torch.equal(verifier.nodes_of(random_sids) >= 0, expected)
    info = catalog.describe()["verifier"]
    assert info["trie_bytes"] == verifier.table_bytes > 0 and info["bytes_per_item"] > 0


def test_synthetic_shape_settings_set_users_and_sequence_length_of_the_default_catalogue():
    data = load_dataset("synthetic", users=50, sequence_length=30)
    assert len(data.sequences) == 50 and {len(s) for s in data.sequences} == {30}
    assert data.catalog.num_items == 600 and data.generator == {"users": 50, "sequence_length": 30}
    assert data.source == "synthetic generator (seed=0, users=50, sequence_length=30)"


def test_models_of_differently_shaped_synthetic_data_are_cached_apart():
    """Same catalogue, other users: a model trained on one must not be reused for the other."""
    from bench.settings import ModelSettings
    from bench.train import cache_key

    settings = ModelSettings(backbone="qwen-micro")
    default, fewer = load_dataset("synthetic"), load_dataset("synthetic", users=500)
    assert default.catalog.fingerprint == fewer.catalog.fingerprint
    assert cache_key("ntp", settings, default, 0) != cache_key("ntp", settings, fewer, 0)


def test_models_of_a_dataset_from_files_are_cached_apart_when_its_interactions_change(tmp_path):
    """The same items and SIDs with other interactions (a user's data, --data-dir) must
    not find the model trained on the first ones; a pinned dataset's name fixes its files."""
    from bench.settings import ModelSettings
    from bench.train import cache_key

    settings = ModelSettings(backbone="qwen-micro")
    first = load_dataset("toy", data_dir=write_letter(tmp_path / "first"))
    again = load_dataset("toy", data_dir=write_letter(tmp_path / "again"))
    more_users = {**TOY_INTER, "u4": ["i2", "i4", "i3"]}
    changed = load_dataset("toy", data_dir=write_letter(tmp_path / "changed", inter=more_users))
    assert first.catalog.fingerprint == changed.catalog.fingerprint
    assert cache_key("ntp", settings, first, 0) == cache_key("ntp", settings, again, 0)
    assert cache_key("ntp", settings, first, 0) != cache_key("ntp", settings, changed, 0)
    pinned = replace(first, name="beauty")  # loading checks a pinned dataset's files against its sha256
    assert cache_key("ntp", settings, pinned, 0) == cache_key("ntp", settings, replace(changed, name="beauty"), 0)


def test_a_draft_distilled_from_a_backbone_is_cached_apart_from_one_trained_on_the_data():
    from bench.settings import ModelSettings
    from bench.train import cache_key

    settings, data = ModelSettings(backbone="qwen-micro"), load_dataset("synthetic")
    plain = cache_key("ntp", settings, data, 0)
    assert cache_key("ntp", settings, data, 0, teacher_key="ntp-qwen-tiny-0123456789") != plain


def test_an_ntp_model_taught_by_the_item_model_is_cached_apart_and_names_its_teacher():
    """Without a teacher an NTP model keeps the key it had before the setting existed."""
    import hashlib
    import json
    from dataclasses import asdict

    from bench.settings import ModelSettings
    from bench.train import cache_key
    from models import objectives

    settings, data = ModelSettings(backbone="qwen-micro"), load_dataset("synthetic")
    before = objectives.shaping_settings("ntp", asdict(settings))
    later = ("attention_dropout", "encoder", "item_teacher", "repeat_bias", "label_smoothing", "seen_unlikelihood")
    for name in later:  # none then
        del before[name]
    blob = json.dumps(
        {"objective": "ntp", "catalog": data.catalog.fingerprint, "seed": 0, "init": "", **before}, sort_keys=True
    )
    plain = cache_key("ntp", settings, data, 0)
    assert plain == f"ntp-qwen-micro-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    taught = replace(settings, item_teacher=0.5)
    first = cache_key("ntp", taught, data, 0, teacher_key="next_item-sasrec-tiny-0123456789")
    other_teacher = cache_key("ntp", taught, data, 0, teacher_key="next_item-sasrec-small-0123456789")
    assert len({plain, first, other_teacher}) == 3
    assert cache_key("nezha", taught, data, 0) == cache_key("nezha", settings, data, 0)  # an NTP setting only
    smoothed = replace(settings, label_smoothing=0.1)
    assert cache_key("ntp", smoothed, data, 0) != plain
    unlikely = replace(settings, seen_unlikelihood=0.5)
    assert len({cache_key("ntp", unlikely, data, 0), cache_key("ntp", smoothed, data, 0), plain}) == 3
    assert cache_key("nezha", unlikely, data, 0) == cache_key("nezha", settings, data, 0)  # an NTP setting only


def test_a_nezha_model_without_history_loss_keeps_the_key_it_had_before_the_setting_existed():
    """Runs cached before --history-loss (which then meant 0) must still be found; any
    other weight trains another model."""
    import hashlib
    import json
    from dataclasses import asdict

    from bench.settings import ModelSettings
    from bench.train import cache_key
    from models import objectives

    data = load_dataset("synthetic")
    settings = ModelSettings(backbone="qwen-micro")
    before = objectives.shaping_settings("nezha", asdict(settings))
    for later in ("history_loss", "attention_dropout", "nezha_init", "encoder", "label_smoothing"):  # none then
        del before[later]
    blob = json.dumps({"objective": "nezha", "catalog": data.catalog.fingerprint, "seed": 0, "init": "", **before}, sort_keys=True)
    assert cache_key("nezha", settings, data, 0) == f"nezha-qwen-micro-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    weighted = ModelSettings(backbone="qwen-micro", history_loss=0.5)
    assert cache_key("nezha", weighted, data, 0) != cache_key("nezha", settings, data, 0)
    no_attention_dropout = ModelSettings(backbone="qwen-micro", attention_dropout=0.0)
    assert cache_key("nezha", no_attention_dropout, data, 0) != cache_key("nezha", settings, data, 0)
    t5 = ModelSettings(backbone="t5-micro")
    assert cache_key("nezha", replace(t5, encoder="causal"), data, 0) != cache_key("nezha", t5, data, 0)
    item = ModelSettings(backbone="sasrec-micro")
    separate = replace(item, item_scores="separate")
    assert cache_key("next_item", separate, data, 0) != cache_key("next_item", item, data, 0)
    unread = replace(settings, item_scores="separate")  # nezha does not read it
    assert cache_key("nezha", unread, data, 0) == cache_key("nezha", settings, data, 0)
    assert cache_key("next_item", item, data, 0) == "next_item-sasrec-micro-02ff140bce"  # at 135947d, before the bias
    repeat = replace(item, repeat_bias=True)
    assert cache_key("next_item", repeat, data, 0) != cache_key("next_item", item, data, 0)
    assert cache_key("nezha", replace(settings, repeat_bias=True), data, 0) == cache_key("nezha", settings, data, 0)


# ---------------------------------------------------------------- splits


def make_data(sequences: list[list[int]]) -> RecData:
    """A RecData over items 0..max with distinct 2-level SIDs (4 codes per level)."""
    n = max(max(s) for s in sequences) + 1
    catalog = build_catalog("toy", [str(i) for i in range(n)], [[i // 4, i % 4] for i in range(n)])
    return RecData(
        name="toy",
        catalog=catalog,
        user_ids=[str(u) for u in range(len(sequences))],
        sequences=sequences,
        source="test",
    )


def examples(data, split, **kwargs):
    rows = eval_examples(data, split, **kwargs)
    return [(r["user"], r["history"], r["target"]) for r in rows]


SPLIT_DATA = [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]


def test_eval_examples_hold_out_the_last_item_for_test():
    assert examples(make_data(SPLIT_DATA), "test", max_history=3) == [(0, [3, 4, 5], 6), (1, [7, 8], 9)]


def test_eval_examples_hold_out_the_second_to_last_item_for_valid():
    assert examples(make_data(SPLIT_DATA), "valid", max_history=3) == [(0, [2, 3, 4], 5), (1, [7], 8)]


def test_eval_examples_full_history_and_user_limit():
    assert examples(make_data(SPLIT_DATA), "test", max_history=20, limit_users=1) == [(0, [0, 1, 2, 3, 4, 5], 6)]


def test_sampled_users_are_distinct_in_split_order_and_follow_the_seed():
    data = make_data([[u, u + 1, u + 2] for u in range(0, 300, 3)])  # 100 users, targets u + 2
    drawn = examples(data, "test", sample_users=10, seed=3)
    users = [user for user, _, _ in drawn]
    assert len(set(users)) == 10 and users == sorted(users)
    assert all(target == 3 * user + 2 for user, _, target in drawn)
    assert examples(data, "test", sample_users=10, seed=3) == drawn
    assert [u for u, _, _ in examples(data, "test", sample_users=10, seed=4)] != users
    assert len(examples(data, "test", sample_users=500)) == 100  # more than there are: every user


def test_limit_and_sample_users_together_are_refused():
    from bench.settings import RunSettings

    with pytest.raises(BenchError, match="--limit-users and --sample-users both choose the users; give one"):
        RunSettings(limit_users=1, sample_users=1)


def test_unknown_split_is_refused():
    with pytest.raises(BenchError, match="unknown split 'train'; choose one of valid, test"):
        eval_examples(make_data(SPLIT_DATA), "train")


@pytest.mark.parametrize(
    "length,expected",
    [
        (12, [[6, 7, 8, 9], [3, 4, 5, 6], [0, 1, 2, 3]]),  # train part 0..9
        (10, [[4, 5, 6, 7], [1, 2, 3, 4], [0, 1]]),  # train part 0..7: a short last window
        (6, [[0, 1, 2, 3]]),  # exactly max_history + 1
        (4, [[0, 1]]),
        (3, []),  # one training item: no target
    ],
)
def test_train_windows_exact(length, expected):
    windows = train_windows(make_data([list(range(length))]), max_history=3)
    assert windows == expected


@pytest.mark.parametrize("max_history", [1, 2, 3, 7, 20])
def test_train_windows_cover_each_training_prefix_once(max_history):
    gen = torch.Generator().manual_seed(max_history)
    lengths = torch.randint(3, 30, (25,), generator=gen).tolist()
    starts = [sum(lengths[:u]) for u in range(len(lengths))]
    sequences = [list(range(start, start + n)) for start, n in zip(starts, lengths)]  # items unique per user
    owner = {item: u for u, seq in enumerate(sequences) for item in seq}
    windows = train_windows(make_data(sequences), max_history=max_history)
    by_user: dict[int, list[list[int]]] = {}
    for window in windows:
        assert 2 <= len(window) <= max_history + 1
        by_user.setdefault(owner[window[0]], []).append(window)
    for u, seq in enumerate(sequences):
        mine = sorted(by_user.get(u, []), key=lambda w: seq.index(w[0]))
        for earlier, later in zip(mine, mine[1:]):
            assert set(earlier) & set(later) == {earlier[-1]} and later[0] == earlier[-1]
        targets = [item for window in mine for item in window[1:]]
        assert targets == seq[1:-2]
    assert sum(len(w) - 1 for w in windows) == make_data(sequences).describe()["training_prefixes"]


# ---------------------------------------------------------------- evaluation batches


def test_collate_eval_left_pads_sid_tokens():
    data = make_data([[0, 5, 6, 1]])  # SIDs: 0 -> (0,0), 5 -> (1,1), 6 -> (1,2), 1 -> (0,1)
    assert data.catalog.codebook_sizes == (2, 4)
    assert data.catalog.offsets == (1, 3)  # PAD = 0, level-1 codes at 1..2, level-2 codes at 3..6
    batch = collate_eval(
        [{"user": 0, "history": [0, 5], "target": 6}, {"user": 4, "history": [1], "target": 0}], data.catalog
    )
    assert batch.prompt.history.tolist() == [[1, 3, 2, 4], [0, 0, 1, 4]]
    assert batch.prompt.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch.targets.tolist() == [6, 0]
    assert len(batch) == 2


def test_a_download_cache_below_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(letter.CACHE_ENV, str(tmp_path / "file"))
    with pytest.raises(BenchError, match=f"cannot make the download folder {tmp_path}/file/instruments .*; set"):
        letter.download("instruments")
