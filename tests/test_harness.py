"""The latency harness with fake decoders: the turn order is balanced, backbone calls are
counted by the hook (floor passes excluded), every decoder gets the same floor (a pass
over the history alone), NEZHA-like decoders add their own prompt floor, and memory is
measured above what was in use before the call."""

from collections import Counter

import pytest
import torch
from torch import nn

import bench.latency
import bench.run
from bench.__main__ import main
from bench.data.batches import Prompt
from bench.latency import benchmark
from decoders.base import Decoder, DecodeResult


class Core(nn.Module):
    """Stands for a backbone: one forward call is one backbone call; it remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, tokens):
        self.inputs.append(tokens)
        return tokens


class FakeLM:
    def __init__(self):
        self.core = Core()

    def bare_forward(self, history, mask):
        self.core(history)


class FakeDecoder(Decoder):
    name = "fake"

    def __init__(self, label: str, log: list, calls: int, own_prompt: bool = False):
        self.label, self.log, self.calls, self.own_prompt = label, log, calls, own_prompt
        self.lm, self.k = FakeLM(), 1

    def decode(self, prompt) -> DecodeResult:
        self.log.append(self.label)
        for _ in range(self.calls):
            self.lm.core(prompt.history)
        size = len(prompt)
        return DecodeResult(sids=torch.zeros(size, 1, 2, dtype=torch.long), scores=torch.zeros(size, 1))

    def prompt_forward(self, prompt) -> bool:
        if self.own_prompt:
            self.lm.core(torch.cat([prompt.history, torch.full_like(prompt.history[:, :2], 99)], 1))
        return self.own_prompt


def prompts(count: int) -> list[Prompt]:
    return [
        Prompt(
            history=torch.full((2, 3), i + 1),
            mask=torch.ones(2, 3, dtype=torch.long),
            items=torch.ones(2, 1, dtype=torch.long),
            items_mask=torch.ones(2, 1, dtype=torch.long),
        )
        for i in range(count)
    ]


def test_turn_order_changes_with_the_batch():
    log = []
    decoders = {label: FakeDecoder(label, log, calls=1) for label in "abc"}
    measured = benchmark(decoders, prompts(4), torch.device("cpu"), warmup=0, progress=False)
    assert log == list("abcbcacabcba")
    assert measured["a"].order == [0, 2, 1, 2]


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6, 7])
def test_over_a_cycle_each_decoder_takes_every_place_and_follows_every_other_equally_often(count):
    orders = bench.latency.turn_orders(count)
    assert all(sorted(order) == list(range(count)) for order in orders)
    places = Counter((label, place) for order in orders for place, label in enumerate(order))
    assert set(places.values()) == {len(orders) // count} and len(places) == count * count
    follows = Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert len(follows) == count * (count - 1) and len(set(follows.values())) == 1


def test_backbone_calls_are_counted_by_the_hook_without_the_floor_passes():
    decoders = {"one": FakeDecoder("one", [], calls=1), "four": FakeDecoder("four", [], calls=4, own_prompt=True)}
    measured = benchmark(decoders, prompts(3), torch.device("cpu"), warmup=1, progress=False)
    assert measured["one"].backbone_calls == [1, 1, 1]
    assert measured["four"].backbone_calls == [4, 4, 4]
    # warm-up: decode + floor + own prompt; then per batch the same three
    assert len(decoders["four"].lm.core.inputs) == (4 + 1 + 1) * (1 + 3)


def test_every_decoder_gets_the_same_floor_and_nezha_like_ones_their_own_prompt_floor():
    plain, own = FakeDecoder("plain", [], calls=2), FakeDecoder("own", [], calls=1, own_prompt=True)
    batches = prompts(3)
    measured = benchmark({"plain": plain, "own": own}, batches, torch.device("cpu"), warmup=0, progress=False)
    assert len(measured["plain"].floor_ms) == len(measured["own"].floor_ms) == 3
    assert measured["plain"].prompt_floor_ms == [] and len(measured["own"].prompt_floor_ms) == 3
    # per batch: decode calls, then the floor over the history alone (same tensor), then the own prompt
    floors = plain.lm.core.inputs[2::3]
    assert all(torch.equal(f, b.history) for f, b in zip(floors, batches))
    own_inputs = own.lm.core.inputs
    assert [x.shape[1] for x in own_inputs[:3]] == [3, 3, 5]


def test_the_run_floor_pools_the_floors_of_every_turn_on_the_same_backbone():
    shared = FakeLM()
    first, second, alone = (FakeDecoder(label, [], calls=1) for label in ("first", "second", "alone"))
    first.lm = second.lm = shared
    measured = benchmark(
        {"first": first, "second": second, "alone": alone}, prompts(3), torch.device("cpu"), warmup=0, progress=False
    )
    pooled = measured["first"].floor_ms + measured["second"].floor_ms
    assert len(pooled) == 6 and measured["first"].run_floor_ms == measured["second"].run_floor_ms == pooled
    assert measured["alone"].run_floor_ms == measured["alone"].floor_ms


def test_repeated_passes_time_every_batch_again_in_the_same_turn_order_and_keep_one_result_per_batch():
    log = []
    decoders = {label: FakeDecoder(label, log, calls=1) for label in "ab"}
    measured = benchmark(decoders, prompts(3), torch.device("cpu"), warmup=0, progress=False, repeats=3)
    assert log == list("abbaab") * 3
    a = measured["a"]
    assert len(a.latency_ms) == len(a.floor_ms) == 9
    assert len(a.results) == len(a.backbone_calls) == len(a.order) == 3
    assert bench.latency.pass_medians([1.0, 5.0, 2.0, 7.0, 8.0, 9.0, 4.0, 4.0, 6.0], 3) == [2.0, 8.0, 4.0]


def test_memory_is_the_growth_above_what_was_in_use_before_the_call(monkeypatch):
    readings = iter([1000.0, 1030.0, 1030.0, 1032.0])  # before/after for two batches, in MiB
    monkeypatch.setattr(bench.latency, "peak_rss_mb", lambda: next(readings))
    measured = benchmark({"a": FakeDecoder("a", [], calls=1)}, prompts(2), torch.device("cpu"), 0, False)
    assert measured["a"].peak_memory_mb == 30.0  # not 1032: the resident weights and batches are excluded


def test_profile_tables_show_where_each_decoders_time_goes(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))
    # every operator: which ones make the top rows by measured time depends on the machine and its load
    monkeypatch.setattr(bench.run, "PROFILE_ROWS", -1)
    args = ["run", "--decoder", "beam,nezha", "--untrained", "--backbone", "qwen-micro", "--limit-users", "8"]
    assert main(args + ["--profile", str(tmp_path / "profiles"), "--out", str(tmp_path / "r.json")]) == 0
    assert "profiler_start" not in capfd.readouterr().err  # kineto's own lines stay quiet
    tables = {path.name: path.read_text() for path in (tmp_path / "profiles").iterdir()}
    assert sorted(tables) == ["beam-batch8.txt", "nezha-batch8.txt"]
    assert all("Self CPU" in text and "aten::" in text for text in tables.values())
    assert "aten::topk" in tables["nezha-batch8.txt"]  # the head's beam search


def test_the_pareto_plot_names_every_decoder_once_in_a_legend_with_its_own_marker(monkeypatch):
    """Decoders at about one point (beam and its variants) stay readable: names in a
    legend, each point a distinct (marker, colour), not labels printed over each other."""
    import matplotlib.figure

    import bench.leaderboard as board

    shown = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *_, **__: shown.update(figure=figure))
    names = [f"decoder{i}" for i in range(14)]
    rows = [{"decoder": name, "p50_ms": 10.0, "recall@10": 0.05, "batch_size": 32} for name in names]
    board.pareto_plot(rows, {"dataset": "d", "split": "test", "device": "cpu"})
    (axes,) = shown["figure"].axes
    legend = axes.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == names
    styles = {(line.get_marker(), line.get_color()) for line, *_ in (c.lines for c in axes.containers)}
    assert len(styles) == len(names) and not axes.texts


def test_a_log_gets_a_progress_line_at_every_tenth_not_a_bar(capsys):
    assert list(bench.latency.progress_steps(list(range(25)), progress=True)) == list(range(25))  # stderr: no tty
    lines = capsys.readouterr().err.splitlines()
    done = [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]
    assert [line.split(" (")[0] for line in lines] == [f"decoding: {n}/25 batches" for n in done]
