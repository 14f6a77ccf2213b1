"""Issue 8: results files survive concurrent writers and failed writes, the leaderboard
refuses what it cannot read, and bad data, names, settings and folders each give one
error line instead of a traceback, lost records or a silently wrong result."""

import errno
import functools
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import act_as_owner, rescued, result_record, write_letter_files

from bench.data import letter, load_dataset, tokenizer
from bench.data.catalog import build_catalog
from bench.errors import BenchError, writable_folder
from bench.leaderboard import leaderboard, write_leaderboard
from bench.records import append_records, check_writable, read_records

TOY_INDEX = {"i1": ["<a_0>", "<b_1>"], "i2": ["<a_1>", "<b_0>"], "i3": ["<a_1>", "<b_2>"]}
TOY_INTER = {"u1": ["i1", "i2", "i3"], "u2": ["i3", "i1", "i2"]}


def write_letter(folder: Path, inter=TOY_INTER, index=TOY_INDEX, stem: str = "Toy") -> Path:
    return write_letter_files(folder, inter, index, stem)


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(BenchError) as info:
        call(*args, **kwargs)
    return str(info.value)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def as_owner(monkeypatch):
    act_as_owner(monkeypatch)


# ---------------------------------------------------------------- results files


def append_one_at_a_time(path: Path, writer: int, count: int, start) -> None:
    start.wait()
    for n in range(count):
        append_records(path, [{"decoder": "beam", "writer": writer, "n": n}])


def test_concurrent_writers_keep_every_record(tmp_path):
    path = tmp_path / "results.json"
    context = multiprocessing.get_context("fork")
    start = context.Event()
    writers = [context.Process(target=append_one_at_a_time, args=(path, w, 50, start)) for w in range(4)]
    for process in writers:
        process.start()
    start.set()
    for process in writers:
        process.join(timeout=120)
    assert [process.exitcode for process in writers] == [0] * 4
    kept = sorted((r["writer"], r["n"]) for r in read_records(path))
    assert kept == [(w, n) for w in range(4) for n in range(50)]


def test_check_writable_accepts_a_new_file_in_a_new_folder_and_creates_nothing(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "results.json")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_read_only_file(tmp_path, as_owner):
    path = tmp_path / "results.json"
    path.write_text("[]")
    path.chmod(0o444)
    message = error_of(check_writable, path)
    assert str(path) in message and "read-only" in message


def test_check_writable_refuses_a_read_only_folder(tmp_path, as_owner):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        message = error_of(check_writable, folder / "sub" / "results.json")
    finally:
        folder.chmod(0o755)
    assert f"cannot write in {folder}" in message


def test_check_writable_refuses_a_folder_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    message = error_of(check_writable, tmp_path / "file" / "results.json")
    assert f"{tmp_path / 'file'} is a file" in message


def test_read_only_results_file_is_not_replaced_and_the_records_are_saved_elsewhere(tmp_path, as_owner, rescue):
    path = tmp_path / "results.json"
    path.write_text('[{"decoder": "beam"}]')
    path.chmod(0o444)
    message = error_of(append_records, path, [{"decoder": "nezha"}])
    assert "read-only" in message and str(rescue) in message
    assert read_records(path) == [{"decoder": "beam"}]
    assert rescued(rescue) == [{"decoder": "nezha"}]


def test_failed_write_saves_the_records_elsewhere_and_leaves_no_temp_file(tmp_path, rescue, monkeypatch):
    path = tmp_path / "results.json"
    append_records(path, [{"decoder": "beam"}])
    monkeypatch.setattr(os, "replace", disk_full)
    message = error_of(append_records, path, [{"decoder": "nezha"}])
    monkeypatch.undo()
    assert f"could not write {path}" in message and "No space left on device" in message
    assert f"saved to {rescue}" in message
    assert read_records(path) == [{"decoder": "beam"}]
    assert rescued(rescue) == [{"decoder": "nezha"}]
    assert not list(tmp_path.glob("*.tmp"))


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path):
    path = tmp_path / "results.json"
    stale = tmp_path / "results.json.k1ll3d_x.tmp"
    other = tmp_path / "other.json.abcd1234.tmp"
    for left in (stale, other):
        left.write_text('[{"decoder": "half')
        os.utime(left, (time.time() - 3600,) * 2)
    append_records(path, [{"decoder": "beam"}])
    assert not stale.exists()
    assert other.exists()  # another file's temporary file is not ours to remove
    assert read_records(path) == [{"decoder": "beam"}]


def test_symlinked_results_file_is_written_through_to_its_target(tmp_path):
    target = tmp_path / "shared" / "results.json"
    target.parent.mkdir()
    target.write_text('[{"decoder": "beam"}]')
    link = tmp_path / "results.json"
    link.symlink_to(target)
    append_records(link, [{"decoder": "nezha"}])
    assert link.is_symlink()
    assert read_records(target) == [{"decoder": "beam"}, {"decoder": "nezha"}]


# ---------------------------------------------------------------- leaderboard


def record(decoder: str, mean_ms: float) -> dict:
    return result_record(decoder, mean_ms)


def results_file(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_leaderboard_refuses_a_missing_input_file(tmp_path):
    present = results_file(tmp_path / "a.json", [record("beam", 50.0)])
    message = error_of(leaderboard, [present, tmp_path / "typo.json"])
    assert f"{tmp_path / 'typo.json'}" in message and "no such results file" in message


@pytest.mark.parametrize(
    "content,fragment",
    [
        ({"decoder": "beam"}, "expected a JSON list of records"),
        (["beam"], "record 1 is not a JSON object"),
        ([{"decoder": "beam"}], "record 1 lacks"),
        ([record("beam", 50.0), {**record("nezha", 10.0), "metrics": {}}], "record 2 lacks metrics recall@1"),
        ([{**record("beam", 50.0), "metrics": 0.4}], "record 1 lacks metrics recall@1"),
    ],
    ids=["object", "list of strings", "record without fields", "metrics without values", "metrics a number"],
)
def test_leaderboard_refuses_files_that_are_no_lists_of_records(tmp_path, content, fragment):
    path = results_file(tmp_path / "odd.json", content)
    message = error_of(leaderboard, [path])
    assert str(path) in message and fragment in message


def test_write_leaderboard_writes_and_returns_the_table(tmp_path):
    results = results_file(tmp_path / "results.json", [record("beam", 50.0), record("nezha", 10.0)])
    board = tmp_path / "board" / "LEADERBOARD.md"
    table = write_leaderboard([results], board)
    assert "| nezha |" in table
    assert board.read_text() == table + "\n"
    assert write_leaderboard([results], None) == table


def test_empty_table_never_replaces_a_leaderboard(tmp_path):
    board = tmp_path / "LEADERBOARD.md"
    board.write_text("| beam | ... |\n")
    empty = results_file(tmp_path / "empty.json", [])
    message = error_of(write_leaderboard, [empty], board)
    assert "no records" in message and str(board) in message
    assert board.read_text() == "| beam | ... |\n"


def test_failed_leaderboard_write_keeps_the_old_one_and_no_temp_file(tmp_path, monkeypatch):
    board = tmp_path / "LEADERBOARD.md"
    board.write_text("old\n")
    results = results_file(tmp_path / "results.json", [record("beam", 50.0)])
    monkeypatch.setattr(os, "replace", disk_full)
    message = error_of(write_leaderboard, [results], board)
    monkeypatch.undo()
    assert f"could not write {board}" in message and "No space left on device" in message
    assert board.read_text() == "old\n"
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize("where", ["--data-dir", "shared folder"])
def test_pinned_dataset_is_checked_wherever_its_files_come_from(tmp_path, monkeypatch, where):
    folder = write_letter(tmp_path / "beauty", stem="Beauty")
    if where == "--data-dir":
        message = error_of(load_dataset, "beauty", data_dir=folder)
    else:
        monkeypatch.setattr(letter, "shared_dir", lambda name: folder)
        message = error_of(load_dataset, "beauty")
    inter = folder / "Beauty.inter.json"
    assert f"{inter} has sha256 {letter.sha256_of(inter)}" in message
    assert f"expected {letter.REMOTE_DATASETS['beauty'][1]['inter']}" in message


def test_another_name_for_a_changed_copy_is_not_checked(tmp_path):
    folder = write_letter(tmp_path / "beauty-rq", stem="Beauty")
    assert load_dataset("beauty-rq", data_dir=folder).user_ids == ["u1", "u2"]


@pytest.mark.parametrize(
    "inter,index,key",
    [
        ('{"u1": ["i1", "i2", "i3"], "u1": ["i3", "i2", "i1"]}', TOY_INDEX, "u1"),
        (TOY_INTER, '{"i1": ["<a_0>", "<b_1>"], "i2": ["<a_1>", "<b_0>"], "i3": [], "i3": ["<a_1>", "<b_2>"]}', "i3"),
    ],
    ids=["user twice", "item twice"],
)
def test_duplicate_keys_are_refused_naming_the_key(tmp_path, inter, index, key):
    message = error_of(load_dataset, "toy", data_dir=write_letter(tmp_path, inter=inter, index=index))
    assert f"key '{key}' appears more than once" in message


def test_deeply_nested_json_is_one_error_line(tmp_path):
    message = error_of(load_dataset, "toy", data_dir=write_letter(tmp_path, inter="[" * 100_000))
    assert "Toy.inter.json" in message and "nested too deeply" in message


@pytest.mark.parametrize("token", ["<a_99999999999>", "<a_1048576>", "<a_" + "9" * 5000 + ">"])
def test_huge_sid_code_is_refused_naming_item_and_token(tmp_path, token):
    index = {**TOY_INDEX, "i2": [token, "<b_0>"]}
    message = error_of(load_dataset, "toy", data_dir=write_letter(tmp_path, index=index))
    assert "item 'i2'" in message and token[:12] in message and "1048575" in message


def test_code_space_beyond_64_bits_is_a_bench_error():
    message = error_of(build_catalog, "toy", ["x", "y"], [[2**20 - 1] * 4, [0] * 4])
    assert "SID code space" in message and "1048576 x 1048576 x 1048576 x 1048576" in message


@pytest.mark.parametrize("template", ["http://host/{nam}/{file}", "http://host/{", "http://host/{0}", "http://host/x"])
def test_bad_url_template_names_the_variable_and_the_placeholders(tmp_path, monkeypatch, template):
    monkeypatch.setenv(letter.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(letter.URL_ENV, template)
    message = error_of(letter.download, "beauty")
    assert letter.URL_ENV in message and "{name}, {Name} and {file}" in message
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["../../x", "/etc", "a/b", ".hidden", "", "beauty\n"])
def test_dataset_names_are_names_not_paths(tmp_path, name):
    message = error_of(load_dataset, name, data_dir=write_letter(tmp_path))
    assert f"dataset name {name!r}" in message and "--data-dir" in message


# ---------------------------------------------------------------- tokenizer


def test_rq_kmeans_refuses_more_codes_than_items():
    vectors = np.random.default_rng(0).normal(size=(5, 4))
    message = error_of(tokenizer.rq_kmeans, vectors, [4, 6])
    assert "6 codes per level for 5 items" in message and "--codes at most 5" in message


def test_check_out_dir_refuses_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        message = error_of(tokenizer.check_out_dir, out, None, "Toy")
        assert f"{tmp_path / 'taken'} is a file" in message
    tokenizer.check_out_dir(tmp_path / "new" / "folder", None, "Toy")


def test_writable_folder_names_what_blocks_it_and_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    check = functools.partial(error_of, writable_folder, what="--out", instead="folder")
    assert check(tmp_path / "file" / "sub") == f"--out: {tmp_path}/file is a file, not a folder; choose another folder"
    dangling = check(tmp_path / "dangling" / "x")
    assert dangling == f"--out: {tmp_path}/dangling is a link to nothing; choose another folder"
    writable_folder(tmp_path / "new" / "deeper", "--out", "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]
