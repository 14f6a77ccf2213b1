"""The CLI (in process): bad input is one 'error: ...' line and exit code 2, found before
any training; `data` and `leaderboard`; appending result records."""

import json
import os
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import random_catalog, rescued, result_record

import bench.leaderboard
import bench.run
import bench.sweep
import bench.train
from bench.__main__ import ablation_specs, main
from bench.errors import BenchError
from bench.records import append_records, read_records, save_figure_atomically
from bench.settings import ModelSettings
from decoders import REGISTRY


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Runs `python -m bench ARGS` in process inside tmp_path -> (exit code, stdout, stderr).
    Training fails the test: every input error must be found before it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(bench.train.RUNS_ENV, str(tmp_path / "runs"))

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was validated")

    monkeypatch.setattr(bench.train, "ensure_model", no_training)
    monkeypatch.setattr(bench.train, "train_model", no_training)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["bench", *args])  # what records and tables quote as the command
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def bench_run_error(cli, tmp_path):
    """`bench run ARGS` on 3 synthetic users that must fail -> its one stderr line; no results written."""
    out = tmp_path / "results.json"

    def run(*args: str) -> str:
        code, _, err = cli("run", "--limit-users", "3", "--out", str(out), *args)
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not out.exists()
        return lines[0]

    return run


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--k", "x"), "error: argument --k: 'x' is not an integer; see python -m bench run --help"),
        (("--split", "train"), "error: argument --split: 'train' is not one of test, valid"),
        (("--limit-users", "0"), "error: --limit-users 0: must be at least 1"),
    ],
)
def test_bad_arguments_are_one_error_line(cli, args, expected):
    code, _, err = cli("run", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err


def test_unknown_decoder(bench_run_error):
    line = bench_run_error("--decoder", "greedy,nosuch")
    assert "unknown decoder 'nosuch'" in line
    assert {"beam", "greedy", "hf_beam", "nezha", "popularity"} <= set(REGISTRY)
    assert f"choose from {', '.join(sorted(REGISTRY))}" in line


def test_unknown_decoder_option(bench_run_error):
    line = bench_run_error("--decoder", "beam:foo")
    assert "unknown option 'foo' in decoder spec 'beam:foo'" in line
    assert "options of beam: " in line and "constrained" in line


def test_empty_decoder_list(bench_run_error):
    line = bench_run_error("--decoder", ",")
    assert "decoder" in line


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--k", "0"], "--k 0: must be at least 1"),
        (["--k", "601"], "--k 601 is above the 600 items of the 'synthetic' catalogue; choose K <= 600"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--device", "nosuch"], "unknown device 'nosuch'"),
        (["--max-epochs", "0"], "--max-epochs 0: must be at least 1"),
    ],
    ids=["k=0", "k>items", "batch-size=0", "device", "max-epochs=0"],
)
def test_bad_numbers_and_device(bench_run_error, args, fragment):
    assert fragment in bench_run_error("--decoder", "greedy,beam,nezha", *args)


def test_missing_checkpoint(bench_run_error, tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    line = bench_run_error("--decoder", "nezha", "--ckpt", str(missing))
    assert f"checkpoint {missing} does not exist" in line


def test_text_file_as_checkpoint(bench_run_error, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    line = bench_run_error("--decoder", "nezha", "--ckpt", str(text))
    assert f"{text} is not a readable checkpoint" in line


def test_invalid_results_file_is_left_unchanged(cli, tmp_path):
    out = tmp_path / "results.json"
    out.write_text('[{"decoder": "beam"},')
    code, _, err = cli("run", "--decoder", "popularity", "--limit-users", "3", "--out", str(out))
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert f"error: {out} is not a results file (invalid JSON at line 1)" in err
    assert out.read_text() == '[{"decoder": "beam"},'


def test_an_item_checkpoint_is_the_item_draft_as_it_is_full_ranks_model(cli, tmp_path):
    """--ckpt of an item model plays the item draft of speculative:draft=items, as it plays
    full_rank's model (nothing is trained: the cli refuses to)."""
    import torch

    from bench.data import load_dataset
    from models.module import SidRecommender

    catalog = load_dataset("synthetic").catalog
    paths = []
    for objective, backbone in (("ntp", "qwen-micro"), ("next_item", "sasrec-micro")):
        model = SidRecommender.for_catalog(objective, ModelSettings(backbone=backbone), catalog)
        paths += ["--ckpt", str(tmp_path / f"{objective}.ckpt")]
        torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, paths[-1])
    out = tmp_path / "r.json"
    for decoders in ("speculative:draft=items", "speculative:draft=items,full_rank"):
        code, _, err = cli("run", "--decoder", decoders, "--limit-users", "3", "--out", str(out), *paths)
        assert code == 0, err
    sources = [{m["source"] for m in r["models"].values()} for r in read_records(out)]
    assert sources[0] == sources[1] == {paths[1], paths[3]} and sources[2] == {paths[3]}


def test_exclude_history_drops_each_users_earlier_items_before_the_metrics(cli, tmp_path):
    """Popularity recommends the same list to everyone, so the users who already have its
    items see the next ones: recall by hand from the data, with and without the filter."""
    from bench.data import load_dataset
    from bench.data.splits import item_popularity

    data = load_dataset("synthetic")
    order = np.argsort(-item_popularity(data), kind="stable").tolist()
    out = tmp_path / "r.json"
    for flag in ([], ["--exclude-history"]):
        args = ["run", "--decoder", "popularity", "--k", "10", "--limit-users", "300", "--out", str(out)]
        code, _, err = cli(*args, *flag)
        assert code == 0, err
    plain, excluded = read_records(out)
    hits = {False: 0, True: 0}
    dropped = 0
    for seq in data.sequences[:300]:
        seen, target = set(seq[:-1]), seq[-1]
        kept = [item for item in order[:10] if item not in seen]
        dropped += 10 - len(kept)
        hits[False] += target in order[:10]
        hits[True] += target in kept
    assert plain["metrics"]["recall@10"] == pytest.approx(hits[False] / 300)
    assert excluded["metrics"]["recall@10"] == pytest.approx(hits[True] / 300)
    assert excluded["seen_dropped_per_user"] == pytest.approx(dropped / 300) and dropped > 0
    assert plain["seen_dropped_per_user"] is None
    rule = "before the metrics (as RecBole's full-sort evaluation does for non-sequential models)"
    assert excluded["protocol"].endswith(rule)
    assert "RecBole" not in plain["protocol"]


def test_data_command_describes_the_synthetic_dataset(cli):
    code, out, err = cli("data", "--dataset", "synthetic")
    assert (code, err) == (0, "")
    info = json.loads(out)
    assert (info["dataset"], info["items"], info["users"], info["levels"]) == ("synthetic", 600, 3000, 3)


# ---------------------------------------------------------------- leaderboard


def record(decoder: str, mean_ms: float, recall10: float, **extra) -> dict:
    return result_record(decoder, mean_ms, recall10, **extra)


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Rows of the one Markdown table, by decoder, as {column header: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    return {row["decoder"]: row for row in rows}


def test_leaderboard_shows_speedup_against_beam(cli, tmp_path):
    results = tmp_path / "results.json"
    speculative = record("speculative", 40.0, 0.4, backbone_calls_per_batch=1.0, draft_calls_per_batch=4.0)
    results.write_text(json.dumps([record("beam", 50.0, 0.4), record("nezha", 10.0, 0.375), speculative]))
    code, out, _ = cli("leaderboard", str(results))
    assert code == 0
    assert "### synthetic / test / cpu (test) / 2026-11-22T20:00:00+0000" in out
    rows = table_rows(out)
    assert set(rows) == {"beam", "nezha", "speculative"}
    assert rows["beam"]["backbone calls"] == "4.0"
    assert rows["speculative"]["backbone calls"] == "1.0 + 4.0 draft"  # the draft model's calls beside
    assert rows["beam"]["speedup vs beam"] == "1.00"
    assert rows["nezha"]["speedup vs beam"] == "5.00"
    assert rows["nezha"]["R@10 [95% CI]"] == "0.3750"  # no per-user hits: no interval
    assert rows["nezha"]["R@20"] == "-"
    assert rows["nezha"]["p50 ms/batch"] == "10.0"  # the mean where an older record has no p50
    assert rows["nezha"]["p99 ms"] == "20.0"
    assert rows["nezha"]["commit"] == "0123456789"


def test_leaderboard_says_which_decoders_return_fewer_candidates_than_k(cli, tmp_path):
    results = tmp_path / "results.json"
    runs = [record("beam", 50.0, 0.4, candidates_per_user=20), record("greedy", 20.0, 0.1, candidates_per_user=1)]
    results.write_text(json.dumps(runs + [record("nezha", 10.0, 0.3)]))  # an older record: no count
    code, out, _ = cli("leaderboard", str(results))
    notes = [line for line in out.splitlines() if "candidate" in line]
    assert code == 0 and notes == [
        "greedy returns 1 candidate(s) per user, fewer than K = 20: its Recall and NDCG at k above 1 are those at 1."
    ]


def test_leaderboard_gives_intervals_and_marks_only_real_differences(cli, tmp_path):
    """100 users: beam finds users 0-39; nezha the same 40 and 10 more (a paired gain
    whose interval excludes 0); greedy users 5-44 (as many, others: not different)."""

    def hits(users):
        return {"users": list(users), "ranks": [1] * len(users)}

    runs = [
        record("beam", 50.0, 0.4, hits=hits(range(40))),
        record("nezha", 10.0, 0.5, hits=hits(range(50))),
        record("greedy", 20.0, 0.4, hits=hits(range(5, 45))),
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(runs))
    code, out, _ = cli("leaderboard", str(results))
    rows = table_rows(out)
    assert code == 0
    low, high = (float(x) for x in rows["beam"]["R@10 [95% CI]"].split("[")[1].rstrip("]").split(","))
    assert rows["beam"]["R@10 [95% CI]"].startswith("0.4000 [") and low < 0.4 < high
    assert rows["nezha"]["R@10 - beam [95% CI]"].startswith("+0.1000 [") and rows["nezha"][
        "R@10 - beam [95% CI]"
    ].endswith("**")
    assert (
        rows["greedy"]["R@10 - beam [95% CI]"].startswith("+0.0000 [")
        and "**" not in rows["greedy"]["R@10 - beam [95% CI]"]
    )
    assert rows["beam"]["R@10 - beam [95% CI]"] == "-"
    assert "paired" in out


def test_a_record_with_no_hits_beside_one_with_hits_gets_no_interval(cli, tmp_path):
    results = tmp_path / "results.json"
    hits = {"users": list(range(40)), "ranks": [1] * 40}
    results.write_text(json.dumps([record("beam", 50.0, 0.4, hits=hits), record("nezha", 10.0, 0.5, hits=None)]))
    code, out, err = cli("leaderboard", str(results))
    assert code == 0, err
    assert table_rows(out)["nezha"]["R@10 [95% CI]"] == "0.5000"


def test_leaderboard_writes_markdown_csv_json_and_a_plot_per_run(cli, tmp_path):
    later = {"timestamp": "2026-11-23T09:00:00+0000"}
    hits = {"hits": {"users": list(range(40)), "ranks": [2] * 40}}
    runs = [record("beam", 50.0, 0.4, **hits), record("hf_beam", 500.0, 0.4, **hits), record("nezha", 10.0, 0.5)]
    runs += [record("beam", 40.0, 0.4, **later)]
    results, out_dir = tmp_path / "results.json", tmp_path / "boards"
    results.write_text(json.dumps(runs))
    code, out, err = cli("leaderboard", str(results), "--out-dir", str(out_dir))
    assert code == 0, err
    names = sorted(path.name for path in out_dir.iterdir())
    stems = ("synthetic-cpu", "synthetic-cpu-2")  # two runs of the same dataset and device kind
    assert names == sorted(f"{stem}{suffix}" for stem in stems for suffix in (".md", ".csv", ".json", "-pareto.png"))
    board = json.loads((out_dir / "synthetic-cpu.json").read_text())
    assert board["run"]["command"] == runs[0]["command"] and board["run"]["commit"] == "0123456789abcdef"
    rows = {row["decoder"]: row for row in board["rows"]}
    assert rows["nezha"]["speedup_vs_beam"] == 5.0 and rows["nezha"]["speedup_vs_hf_beam"] == 50.0
    assert rows["hf_beam"]["recall@10_low"] <= 0.4 <= rows["hf_beam"]["recall@10_high"]
    assert rows["hf_beam"]["recall@10_minus_beam"] == 0.0 and rows["nezha"]["recall@10_low"] is None
    csv_lines = (out_dir / "synthetic-cpu.csv").read_text().splitlines()
    assert csv_lines[0].startswith("decoder,backbone,") and [line.split(",")[0] for line in csv_lines[1:]] == [
        "beam",
        "hf_beam",
        "nezha",
    ]
    markdown = (out_dir / "synthetic-cpu.md").read_text()
    assert "![Recall@10 against latency](synthetic-cpu-pareto.png)" in markdown and runs[0]["command"] in markdown
    assert (out_dir / "synthetic-cpu-pareto.png").read_bytes()[:4] == b"\x89PNG"
    before = {name: (out_dir / name).read_text() for name in names if not name.endswith(".png")}
    assert cli("leaderboard", str(results), "--out-dir", str(out_dir))[0] == 0  # the same input, the same tables
    assert before == {name: (out_dir / name).read_text() for name in before}
    (out_dir / "synthetic-cpu.json").write_text(json.dumps(runs))  # records named like a table: not overwritten
    code, _, err = cli("leaderboard", str(out_dir / "synthetic-cpu.json"), "--out-dir", str(out_dir))
    assert code == 2 and "would write over the input file" in err
    assert json.loads((out_dir / "synthetic-cpu.json").read_text()) == runs
    (tmp_path / "taken").write_text("x")
    code, _, err = cli("leaderboard", str(results), "--out-dir", str(tmp_path / "taken"))
    assert code == 2 and "is a file" in err and (tmp_path / "taken").read_text() == "x"


def test_a_board_stopped_half_way_leaves_every_earlier_board_whole(cli, tmp_path, monkeypatch):
    """Every file of every board is made before any replaces its earlier version: Ctrl-C (or
    a failure) while the second run's plot is drawn leaves the boards of both runs as they were."""
    later = {"timestamp": "2026-11-23T09:00:00+0000"}
    results, out_dir = tmp_path / "results.json", tmp_path / "boards"
    results.write_text(json.dumps([record("beam", 50.0, 0.4), record("beam", 40.0, 0.4, **later)]))
    assert cli("leaderboard", str(results), "--out-dir", str(out_dir))[0] == 0
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    results.write_text(json.dumps([record("beam", 30.0, 0.3), record("beam", 20.0, 0.3, **later)]))
    drawn, plot = [], bench.leaderboard.pareto_plot

    def stopped_at_the_second_plot(*args):
        drawn.append(args)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return plot(*args)

    monkeypatch.setattr(bench.leaderboard, "pareto_plot", stopped_at_the_second_plot)
    code, _, err = cli("leaderboard", str(results), "--out-dir", str(out_dir))
    assert code == 130 and "earlier results are intact" in err
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


def test_leaderboard_names_its_files_with_name(cli, tmp_path):
    results, out_dir = tmp_path / "results.json", tmp_path / "boards"
    results.write_text(json.dumps([record("beam", 40.0, 0.4), record("nezha", 10.0, 0.5)]))
    code, _, err = cli("leaderboard", str(results), "--out-dir", str(out_dir), "--name", "synthetic-cpu-ablation")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"synthetic-cpu-ablation{suffix}" for suffix in (".md", ".csv", ".json", "-pareto.png")
    )
    assert (
        "![Recall@10 against latency](synthetic-cpu-ablation-pareto.png)"
        in (out_dir / "synthetic-cpu-ablation.md").read_text()
    )
    for bad, fragment in (("../x", "without folders"), ("", "without folders")):
        code, _, err = cli("leaderboard", str(results), "--out-dir", str(out_dir), "--name", bad)
        assert code == 2 and fragment in err, err
    code, _, err = cli("leaderboard", str(results), "--name", "x")
    assert code == 2 and "give --out-dir FOLDER with it" in err


def test_leaderboard_only_cuts_the_rows_of_some_decoders_from_a_run(cli, tmp_path):
    results, out_dir = tmp_path / "results.json", tmp_path / "boards"
    runs = [record("beam", 40.0, 0.4), record("greedy", 20.0, 0.3), record("nezha", 10.0, 0.5)]
    results.write_text(json.dumps(runs))
    code, _, err = cli(
        "leaderboard", str(results), "--out-dir", str(out_dir), "--name", "ablation", "--only", "beam,nezha"
    )
    assert code == 0, err
    rows = table_rows((out_dir / "ablation.md").read_text())
    assert sorted(rows) == ["beam", "nezha"] and rows["nezha"]["speedup vs beam"] == "4.00"
    assert "Rows of that run chosen by `python -m bench leaderboard " in (out_dir / "ablation.md").read_text()
    assert "--only beam,nezha" in json.loads((out_dir / "ablation.json").read_text())["run"]["rows_cut_by"]
    code, out, _ = cli("leaderboard", str(results), "--only", "greedy")
    assert code == 0 and sorted(table_rows(out)) == ["greedy"]
    code, _, err = cli(
        "leaderboard", str(results), "--out-dir", str(out_dir), "--name", "ablation", "--only", "beam,medusa"
    )
    assert code == 2 and "--only medusa: no record of that decoder" in err and "beam, greedy, nezha" in err
    assert sorted(table_rows((out_dir / "ablation.md").read_text())) == ["beam", "nezha"]  # kept as it was
    code, _, err = cli("leaderboard", "--out-dir", str(out_dir), "--only", "beam")
    assert code == 2 and "pass --decoder" in err


def test_leaderboard_writes_its_out_file(cli, tmp_path):
    results, table = tmp_path / "results.json", tmp_path / "board.md"
    results.write_text(json.dumps([record("beam", 40.0, 0.4), record("greedy", 20.0, 0.3)]))
    code, out, _ = cli("leaderboard", str(results), "--out", str(table))
    assert code == 0 and out.strip() == f"written to {table}"
    assert table_rows(table.read_text())["greedy"]["speedup vs beam"] == "2.00"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_leaderboard_refuses_an_out_that_is_a_pipe_and_leaves_it_one(cli, tmp_path):
    """Read, the pipe blocked the command until someone wrote to it; written, it became a
    regular file (a device too: --out /dev/null, run as root, replaced /dev/null)."""
    results, pipe = tmp_path / "results.json", tmp_path / "board.md"
    results.write_text(json.dumps([record("beam", 40.0, 0.4)]))
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.open("w").close(), daemon=True)  # where the command reads it
    writer.start()
    try:
        code, _, err = cli("leaderboard", str(results), "--out", str(pipe))
    finally:
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go where nothing read the pipe
        writer.join(timeout=10)
        os.close(reader)
    assert code == 2 and err == (
        f"error: {pipe} is no regular file (a pipe or a device); pass a Markdown file, or leave --out out to print "
        "the tables\n"
    )
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_leaderboard_compares_speeds_only_within_a_run(cli, tmp_path):
    later = {"timestamp": "2026-11-23T09:00:00+0000"}
    results = tmp_path / "results.json"
    runs = [
        record("beam", 50.0, 0.4),
        record("nezha", 10.0, 0.4),
        record("beam", 100.0, 0.4, **later),
        record("nezha", 50.0, 0.4, **later),
    ]
    results.write_text(json.dumps(runs))
    code, out, _ = cli("leaderboard", str(results))
    first, second = out.split("### synthetic")[1:]
    assert table_rows(first)["nezha"]["speedup vs beam"] == "5.00"
    assert table_rows(second)["nezha"]["speedup vs beam"] == "2.00"


# ---------------------------------------------------------------- result records


def test_a_results_file_saved_with_a_byte_order_mark_is_read_and_appended_to(tmp_path):
    """Before, the BOM some editors write made it 'not a results file (invalid JSON at line 1)'."""
    path = tmp_path / "results.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"decoder": "beam"}]).encode())
    append_records(path, [{"decoder": "nezha"}])
    assert read_records(path) == [{"decoder": "beam"}, {"decoder": "nezha"}]


def test_append_records_appends_to_an_existing_list(tmp_path):
    path = tmp_path / "sub" / "results.json"
    append_records(path, [{"decoder": "beam"}])
    append_records(path, [{"decoder": "nezha"}, {"decoder": "greedy"}])
    assert read_records(path) == [{"decoder": "beam"}, {"decoder": "nezha"}, {"decoder": "greedy"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json", "results.json.lock"]


def test_results_file_and_plot_get_the_usual_permissions(tmp_path):
    import matplotlib.pyplot as plt

    old = os.umask(0o022)
    try:
        append_records(tmp_path / "results.json", [{"decoder": "beam"}])
        save_figure_atomically(plt.figure(), tmp_path / "plot.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "plot.png").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "content",
    [b'[{"decoder": "beam"}', b'{"decoder": "beam"}', b"\x80\x81PK\x03\x04\xff"],
    ids=["invalid JSON", "not a list", "binary"],
)
def test_append_records_leaves_an_unreadable_file_untouched(tmp_path, rescue, content):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with pytest.raises(BenchError, match="is not a results file.*left untouched") as refused:
        append_records(path, [{"decoder": "nezha"}])
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rescue", "results.json"]
    assert rescued(rescue) == [{"decoder": "nezha"}] and str(rescue) in str(refused.value)


def test_constrained_flag_reaches_every_decoder_that_takes_it():
    from decoders import with_constraint
    from decoders.base import option_names

    takes = sorted(name for name in REGISTRY if "constrained" in option_names(name))
    assert takes == ["beam", "hf_beam", "medusa", "speculative"]
    assert with_constraint("medusa:tree=20x3x3x0") == "medusa:tree=20x3x3x0:constrained"
    assert with_constraint("beam:constrained=off") == "beam:constrained=off"  # an explicit choice stays
    assert with_constraint("nezha") == "nezha"
    assert with_constraint("nosuch") == "nosuch"  # left for parse_spec's error line


# ---------------------------------------------------------------- sweep


@pytest.mark.parametrize(
    "vary, expected",
    [
        ("batch_size", "--vary 'batch_size': give NAME=V1,V2,..., e.g. --vary batch_size=1,16,256"),
        ("colour=1,2", "--vary colour: not a setting a sweep can vary"),
        ("out=a.json,b.json", "--vary out: not a setting a sweep can vary"),
        ("batch_size=1,0", "--vary batch_size: batch_size 0: must be at least 1"),
        ("batch_size=1,two", "--vary batch_size: batch_size = 'two' is not an integer"),
        ("items=1000,50", "--vary items: items 50: must be at least 100"),
        ("sample_users=none,3", "--limit-users and --sample-users both choose the users; give one of them"),
    ],
)
def test_a_bad_sweep_is_one_error_line_before_anything_runs(cli, tmp_path, vary, expected):
    args = ["--limit-users", "5"] if vary.startswith("sample_users") else []
    code, _, err = cli("sweep", "--vary", vary, "--untrained", "--out", str(tmp_path / "s.json"), *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    "vary, values",
    [("transition=rnn,none", ["rnn", "none"]), ("sample_users=none,3", [None, 3]), ("dropout=0,1e-1", [0.0, 0.1])],
)
def test_sweep_values_are_read_as_their_flags_read_them(vary, values):
    """none is the value where the setting lists it (transition=none), else unset."""
    from bench.settings import DataSettings, ModelSettings, RunSettings, SweepSettings
    from bench.sweep import sweep_points

    settings = {"data": DataSettings(), "model": ModelSettings(), "run": RunSettings(), "sweep": SweepSettings(vary)}
    assert [value for value, _ in sweep_points(settings)[1]] == values


def test_a_sweep_over_real_data_refuses_synthetic_shapes(cli, tmp_path):
    code, _, err = cli("sweep", "--dataset", "beauty", "--vary", "items=1000", "--untrained")
    assert code == 2 and "--items shapes the synthetic dataset only" in err


def test_a_sweep_runs_once_per_value_and_writes_records_table_and_plot(cli, tmp_path):
    out = tmp_path / "sweep.json"
    args = ("--decoder", "greedy,nezha", "--untrained", "--limit-users", "8", "--warmup", "0", "--out", str(out))
    args += ("--repeats", "2")
    code, printed, err = cli("sweep", "--vary", "batch_size=2,4", *args, "--out-dir", str(tmp_path / "tables"))
    assert code == 0, err
    records = read_records(out)
    assert [(r["decoder"], r["batch_size"]) for r in records] == [
        ("greedy", 2),
        ("nezha", 2),
        ("greedy", 4),
        ("nezha", 4),
    ]
    assert len({r["timestamp"] for r in records}) == 2  # one run per value
    table = (tmp_path / "tables" / "sweep-batch_size.md").read_text()
    assert "| 2 | greedy | 2 | 20 |" in table and "| 4 | nezha | 4 | 20 |" in table
    low, high = min(records[0]["latency_p50_per_pass"]), max(records[0]["latency_p50_per_pass"])
    assert f"| 2 | greedy | 2 | 20 | {records[0]['latency_ms']['p50']:.1f} [{low:.1f}, {high:.1f}] |" in table
    assert "[the lowest, the highest] p50 of a single pass" in table
    assert (tmp_path / "tables" / "sweep-batch_size.png").read_bytes()[:4] == b"\x89PNG"
    assert "written: " in printed


def test_a_sweep_of_a_dozen_decoders_draws_each_in_its_own_style(tmp_path, monkeypatch):
    """matplotlib's default cycle has 10 colours: the 11th decoder of a sweep was drawn as the first."""
    decoders = [f"decoder{i}" for i in range(12)]
    rows = [
        {"k": k, "decoder": d, "p50_ms": 10.0 * k + i, "users_per_s": 100.0 / k}
        for k in (1, 10)
        for i, d in enumerate(decoders)
    ]
    drawn = []
    monkeypatch.setattr(bench.sweep, "save_figure_atomically", lambda figure, path, **options: drawn.append(figure))
    bench.sweep.sweep_plot(rows, "k", "title", tmp_path / "plot.png")
    latency_axes, rate_axes = drawn[0].axes
    for axes in (latency_axes, rate_axes):
        styles = [(line.get_marker(), line.get_color()) for line in axes.get_lines()]
        assert len(styles) == len(set(styles)) == 12
    assert [text.get_text() for text in drawn[0].legends[0].get_texts()] == decoders


# ---------------------------------------------------------------- leaderboard as a runner


def test_the_leaderboard_runs_the_decoders_keeps_every_runs_records_and_tables_the_latest(cli, tmp_path):
    board = tmp_path / "board"
    args = ("leaderboard", "--decoder", "greedy,nezha", "--untrained", "--limit-users", "6", "--warmup", "0")
    args += ("--repeats", "2", "--batch-size", "2")
    for k in ("5", "3"):
        code, printed, err = cli(*args, "--k", k, "--out-dir", str(board))
        assert code == 0, err
    records = read_records(board / "records" / "synthetic-cpu.json")
    assert [(r["decoder"], r["k"]) for r in records] == [("greedy", 5), ("nezha", 5), ("greedy", 3), ("nezha", 3)]
    rows = json.loads((board / "synthetic-cpu.json").read_text())["rows"]
    assert [(row["decoder"], row["k"]) for row in rows] == [("greedy", 3), ("nezha", 3)]
    assert all(r["latency_repeats"] == 2 and len(r["latency_p50_per_pass"]) == 2 for r in records)
    for r in records:  # throughput counts one pass over the users, however many passes were timed
        assert r["users"] == 6 and r["throughput_users_per_s"] * r["latency_ms_per_user"] == pytest.approx(1000)
    assert "| nezha |" in (board / "synthetic-cpu.md").read_text()
    assert "Users: the first 6 users of the test split." in (board / "synthetic-cpu.md").read_text()
    assert "[the lowest, the highest] p50 of a single pass" in (board / "synthetic-cpu.md").read_text()
    assert (board / "synthetic-cpu-pareto.png").exists() and (board / "synthetic-cpu.csv").exists()


def test_the_board_of_every_decoder_under_constrained_runs_each_decoder_once(cli, tmp_path, monkeypatch):
    """With --constrained, beam and beam:constrained of the default list are one decoder."""
    import bench.run

    asked = []

    def run(data, data_settings, model_settings, settings, *args, **kwargs):
        asked.append(bench.run.decoder_specs(settings))
        raise KeyboardInterrupt  # stop before any model is trained

    monkeypatch.setattr(bench.run, "run", run)
    code, _, _ = cli("leaderboard", "--constrained", "--untrained", "--out-dir", str(tmp_path / "board"))
    assert code == 130
    [specs] = asked
    assert specs.count("beam:constrained") == 1 and specs.count("hf_beam:constrained") == 1 and "beam" not in specs


def test_a_board_over_users_drawn_at_random_says_so(cli, tmp_path):
    args = ("leaderboard", "--decoder", "greedy", "--untrained", "--sample-users", "7", "--warmup", "0")
    code, _, err = cli(*args, "--out-dir", str(tmp_path))
    assert code == 0, err
    (record,) = read_records(tmp_path / "records" / "synthetic-cpu.json")
    assert record["users"] == 7 and record["settings"]["run"]["sample_users"] == 7
    assert "Users: 7 users of the test split drawn at random (seed 0)." in (tmp_path / "synthetic-cpu.md").read_text()


def test_the_leaderboard_refuses_run_settings_beside_files_and_wants_files_or_a_folder(cli, tmp_path):
    append_records(tmp_path / "r.json", [result_record("beam", 40.0)])
    code, _, err = cli("leaderboard", str(tmp_path / "r.json"), "--batch-size", "8")
    assert code == 2 and "--batch-size applies when the leaderboard runs the decoders" in err
    code, _, err = cli("leaderboard")
    assert code == 2 and "leaderboard needs result files" in err and "--out-dir FOLDER" in err


@pytest.mark.parametrize("field, other", [("k", 10), ("batch_size", 1), ("weights", "trained"), ("git_sha", "f" * 16)])
def test_records_claiming_one_run_but_made_differently_are_never_tabled_together(cli, tmp_path, field, other):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([result_record("beam", 40.0), result_record("nezha", 20.0, **{field: other})]))
    code, out, err = cli("leaderboard", str(results), "--out-dir", str(tmp_path / "board"))
    assert code == 2 and f"differ in '{field}'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "board").exists()


def test_the_same_seed_on_the_same_machine_gives_identical_metrics(cli, tmp_path):
    runs = []
    for name in ("a.json", "b.json"):
        args = ("--decoder", "beam:constrained,nezha", "--untrained", "--limit-users", "100", "--k", "60")
        code, _, err = cli("run", *args, "--out", name)
        assert code == 0, err
        runs.append(read_records(tmp_path / name))
    for first, second in zip(*runs):
        assert len(first["hits"]["users"]) > 5  # enough users found that a different ranking would show
        assert first["metrics"] == second["metrics"] and first["hits"] == second["hits"]
        assert first["invalid_rate"] == second["invalid_rate"]


def test_the_run_table_shows_draft_calls_beside_backbone_calls_in_aligned_columns():
    from bench.run import format_table

    beam = result_record("beam", 50.0, throughput_users_per_s=640.0)
    speculative = result_record(
        "speculative:accept=relaxed:draft=aligned",  # longer than the decoder column's 26
        40.0,
        backbone_calls_per_batch=1.0,
        draft_calls_per_batch=4.0,
        throughput_users_per_s=800.0,
    )
    head, rule, *rows = format_table([beam, speculative]).splitlines()
    assert rows[0].split()[-2:] == ["4.0", "640"] and rows[1].endswith("1.0 + 4.0 draft      800")
    assert len(head) == len(rule) == len(rows[0]) == len(rows[1])


@pytest.mark.parametrize("k, head_beam", [(10, 20), (20, 30), (30, None)])
def test_the_ablations_wider_head_beam_is_what_the_prefixes_hold(k, head_beam):
    """2K beams in the head, at most the 30 prefixes before the last level of a 6 x 5 x 8
    catalogue; none where K holds them all (ablate --k 200 was refused over it)."""
    specs = ablation_specs(k, random_catalog(sizes=(6, 5, 8)))
    wider = [spec for spec in specs if spec.startswith("nezha:head_beam=")]
    assert wider == ([f"nezha:head_beam={head_beam}"] if head_beam else [])
    assert len(specs) == 8 - (head_beam is None)


def test_an_empty_runs_dir_variable_means_the_default(monkeypatch):
    """BENCH_RUNS_DIR= (set, empty) once cached models in the working folder itself."""
    monkeypatch.setenv(bench.train.RUNS_ENV, "")
    assert bench.train.runs_dir() == Path("runs")


@pytest.mark.parametrize("where", ["env", "run_dir"])
def test_a_home_folder_in_the_runs_cache_or_run_dir_is_where_the_checkpoints_go(tmp_path, monkeypatch, capsys, where):
    """Lightning writes to ~ expanded; the suite once looked for them under ./~ and failed."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(bench.train.RUNS_ENV, "~/cache" if where == "env" else str(tmp_path / "runs"))
    args = ["train", "--objective", "ntp", "--backbone", "qwen-micro", "--users", "100", "--items", "100"]
    args += ["--max-epochs", "1", "--val-users", "10"] + (["--run-dir", "~/mine"] if where == "run_dir" else [])
    for _ in range(2):
        assert main(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "home" / ("cache" if where == "env" else "mine")
    assert "already trained with these settings" in out and not (tmp_path / "~").exists()
    assert list(folder.rglob("last.ckpt"))


def test_ablate_records_say_the_decoders_it_ran_whatever_a_config_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("run:\n  constrained: true\n  decoder: greedy\n")
    args = ["ablate", "--config", "c.yaml", "--untrained", "--limit-users", "4", "--warmup", "0", "--out", "a.json"]
    assert main([*args, "--backbone", "qwen-micro"]) == 0
    records = read_records(tmp_path / "a.json")
    assert {r["settings"]["run"]["constrained"] for r in records} == {False}
    assert records[0]["settings"]["run"]["decoder"] == ",".join(r["decoder"] for r in records)


@pytest.mark.parametrize("flag", [["--constrained"], ["--decoder", "greedy"]])
def test_ablate_takes_no_decoder_flags_it_would_ignore(cli, flag):
    """ablate runs its own decoders; it once ran them unconstrained while the records said otherwise."""
    code, _, err = cli("ablate", "--untrained", *flag)
    assert code == 2 and f"unrecognized arguments: {' '.join(flag)}" in err


def test_a_results_file_that_is_a_pipe_is_refused_before_it_blocks(cli, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    code, _, err = cli("run", "--decoder", "greedy", "--untrained", "--limit-users", "3", "--out", "pipe")
    assert code == 2
    assert err == "error: pipe is no regular file (a pipe or a device); pass another --out, a results file\n"
