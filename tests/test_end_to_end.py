"""`python -m bench run` from data to records on the synthetic default: trains small
models once (cached), evaluates several decoders on the same batches."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench.__main__ import main

DECODERS = "greedy,beam,nezha,popularity"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_RUNS_DIR", str(root / "runs"))
    out = root / "results.json"
    args = [
        "run",
        "--decoder",
        DECODERS,
        "--k",
        "10",
        "--limit-users",
        "400",
        "--batch-size",
        "50",
        "--max-epochs",
        "4",
        "--val-users",
        "300",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    shutil.copy(out, root / "first-run.json")  # what the first run wrote, whatever later tests append to `out`
    yield root, out, args
    mp.undo()


def test_run_writes_one_record_per_decoder(first_run):
    root, _, _ = first_run
    records = json.loads((root / "first-run.json").read_text())
    assert [r["decoder"] for r in records] == DECODERS.split(",")
    for r in records:
        assert r["dataset"] == "synthetic" and r["split"] == "test" and r["users"] == 400 and r["k"] == 10
        assert set(r["metrics"]) == {"recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"}
        assert r["metrics"]["recall@20"] is None  # above K
        for key in ("latency_ms", "throughput_users_per_s", "git_sha", "torch", "seed", "command", "device"):
            assert key in r
    by_name = {r["decoder"]: r for r in records}
    assert by_name["nezha"]["backbone_calls_per_batch"] == 1
    assert by_name["beam"]["backbone_calls_per_batch"] == 3  # one per SID level
    # beam and greedy decode with the same NTP model: one run floor, pooled over both turns
    assert by_name["beam"]["run_floor_ms"] == by_name["greedy"]["run_floor_ms"]
    assert by_name["nezha"]["run_floor_ms"] != by_name["beam"]["run_floor_ms"]  # another model
    assert by_name["greedy"]["candidates_per_user"] == 1
    assert by_name["nezha"]["invalid_rate"] == 0
    assert by_name["beam"]["backbone"]["params"] > 0
    training = by_name["beam"]["backbone"]["training"]  # up to the best epoch, and of the whole run
    assert 1 <= training["epochs"] <= training["epochs_run"] == 4
    assert 0 < training["seconds"] <= training["seconds_run"] and training["device"].startswith("cpu")


def test_models_learn_the_synthetic_dynamics(first_run):
    root, _, _ = first_run
    recall = {r["decoder"]: r["metrics"]["recall@10"] for r in json.loads((root / "first-run.json").read_text())}
    assert recall["beam"] > 2 * recall["popularity"]
    assert recall["nezha"] > 2 * recall["popularity"]


def test_second_run_reuses_the_cached_models_and_appends(first_run, capsys):
    root, out, args = first_run
    capsys.readouterr()
    before = json.loads(out.read_text())
    assert main(args[:2] + ["nezha"] + args[3:]) == 0
    assert "training a" not in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert records[: len(before)] == before and [r["decoder"] for r in records[len(before) :]] == ["nezha"]


def test_checkpoint_of_the_wrong_objective_is_refused(first_run, capsys):
    root, out, _ = first_run
    ntp_ckpt = next((root / "runs" / "synthetic").glob("ntp-*/best.ckpt"))
    before = out.read_text()
    code = main(["run", "--decoder", "nezha", "--ckpt", str(ntp_ckpt), "--limit-users", "10", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "objective 'ntp'" in err and "need: nezha" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == before


def test_a_nezha_model_starts_from_the_cached_ntp_model(first_run, tmp_path, capsys):
    """--nezha-init ntp: bench train takes the NTP model that bench run cached (no new one);
    at learning rate 0 the NEZHA backbone is exactly that model's; the checkpoint carries the
    NTP's training record; bench run then finds the same NEZHA model in the cache."""
    root, _, _ = first_run
    config = tmp_path / "warm.yaml"
    config.write_text(
        "model:\n  max_epochs: 4\n  val_users: 300\n  nezha_init: ntp\n"
        "  per_objective:\n    nezha: {lr: 0, max_epochs: 1}\n"
    )
    common = ["--config", str(config)]
    capsys.readouterr()
    assert main(["train", "--objective", "nezha", *common]) == 0
    printed = capsys.readouterr().out
    assert "training a ntp model" not in printed
    best = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("best checkpoint: "))
    nezha = torch.load(best, weights_only=True)
    [ntp_dir] = (root / "runs" / "synthetic").glob("ntp-*")
    ntp = torch.load(ntp_dir / "best.ckpt", weights_only=True)
    backbone = {name: value for name, value in nezha["state_dict"].items() if name.startswith("lm.")}
    assert backbone.keys() == {name for name in ntp["state_dict"] if name.startswith("lm.")}
    assert all(torch.equal(value, ntp["state_dict"][name]) for name, value in backbone.items())
    started = nezha["training"]["started_from"]
    assert started["objective"] == "ntp" and started["epochs_run"] == 4
    assert started["seconds_run"] == ntp["training"]["seconds_run"]
    out = tmp_path / "warm.json"
    assert main(["run", "--decoder", "nezha", "--limit-users", "50", "--out", str(out), *common]) == 0
    assert "training a" not in capsys.readouterr().out
    [record] = json.loads(out.read_text())
    assert record["backbone"]["training"]["started_from"] == started


def test_an_ntp_model_continues_from_a_trained_one_with_the_seen_item_term(first_run, tmp_path, capsys):
    """bench train --objective ntp --init-from: the new model starts from the given NTP
    model's weights (at learning rate 0 it keeps them), trains with the term, and its
    checkpoint carries the starting model's training record."""
    root, _, _ = first_run
    [ntp_dir] = (root / "runs" / "synthetic").glob("ntp-*")
    ntp = torch.load(ntp_dir / "best.ckpt", weights_only=True)
    args = ["train", "--objective", "ntp", "--init-from", str(ntp_dir / "best.ckpt"), "--seen-unlikelihood", "0.5"]
    args += ["--max-epochs", "1", "--lr", "0", "--val-users", "300", "--run-dir", str(tmp_path / "continued")]
    capsys.readouterr()
    assert main(args) == 0
    continued = torch.load(tmp_path / "continued" / "best.ckpt", weights_only=True)
    assert continued["hyper_parameters"]["settings"]["seen_unlikelihood"] == 0.5
    assert continued["state_dict"].keys() == ntp["state_dict"].keys()
    assert all(torch.equal(value, ntp["state_dict"][name]) for name, value in continued["state_dict"].items())
    started = continued["training"]["started_from"]
    assert started["objective"] == "ntp" and started["seconds_run"] == ntp["training"]["seconds_run"]


def test_a_start_model_is_cached_by_its_contents_not_its_path(first_run, tmp_path, capsys, monkeypatch):
    """--init-from names its start in the runs cache by the file's sha256: the same
    checkpoint under another path finds the run trained from it, another checkpoint
    written over the first one's path trains anew."""
    root, _, _ = first_run
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))  # the module's runs stay as they are
    [ntp_dir] = (root / "runs" / "synthetic").glob("ntp-*")
    here, there = tmp_path / "here.ckpt", tmp_path / "elsewhere" / "start.ckpt"
    there.parent.mkdir()
    shutil.copy(ntp_dir / "best.ckpt", here)
    shutil.copy(ntp_dir / "best.ckpt", there)
    args = ["train", "--objective", "ntp", "--max-epochs", "1", "--lr", "0", "--val-users", "300"]

    def train_from(start: Path) -> str:
        capsys.readouterr()
        assert main([*args, "--init-from", str(start)]) == 0
        return capsys.readouterr().out

    first = train_from(here)
    assert "best checkpoint: " in first
    assert "already trained with these settings" in train_from(there)
    continued = next(line.split(": ", 1)[1] for line in first.splitlines() if line.startswith("best checkpoint: "))
    shutil.copy(continued, here)  # another NTP model at the same path
    assert "best checkpoint: " in train_from(here)
    assert len(list((tmp_path / "runs" / "synthetic").glob("ntp-*"))) == 2


def test_a_model_trained_from_a_checkpoint_is_found_again_from_the_same_checkpoint(
    first_run, tmp_path, capsys, monkeypatch
):
    """bench train --objective medusa --init-from P, then bench run --ckpt P: the run finds
    the Medusa heads trained on P (both name P by its contents) instead of training more."""
    root, _, _ = first_run
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))  # the module's runs stay as they are
    [ntp_dir] = (root / "runs" / "synthetic").glob("ntp-*")
    start = tmp_path / "start.ckpt"
    shutil.copy(ntp_dir / "best.ckpt", start)
    args = ["--max-epochs", "1", "--val-users", "100"]
    assert main(["train", "--objective", "medusa", "--init-from", str(start), *args]) == 0
    capsys.readouterr()
    out = tmp_path / "medusa.json"
    run = ["run", "--decoder", "medusa", "--ckpt", str(start), "--limit-users", "20", "--out", str(out)]
    assert main([*run, *args]) == 0
    assert "training a" not in capsys.readouterr().out


def test_training_resumes_from_its_last_checkpoint(first_run, tmp_path):
    root, _, _ = first_run
    last = next((root / "runs" / "synthetic").glob("ntp-*/last.ckpt"))
    first = torch.load(last, weights_only=True)
    assert first["epoch"] == 3 and first["training"]["epochs"] == 4  # --max-epochs 4 in the first run
    run_dir = tmp_path / "resumed"
    args = ["train", "--objective", "ntp", "--resume", str(last), "--val-users", "300", "--run-dir", str(run_dir)]
    assert main(args + ["--max-epochs", "5"]) == 0
    resumed = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 4  # one more epoch, not five
    assert resumed["training"]["epochs"] == 5 and resumed["training"]["seconds"] > first["training"]["seconds"]


def test_last_checkpoint_and_run_totals_count_epochs_after_the_best(tmp_path, capsys):
    """With a learning rate of 0 no epoch after the first improves val/recall@10: the
    best checkpoint stays at epoch 1, while last.ckpt and the run totals reach epoch 3.
    Printed to no terminal, the progress is one line per epoch."""
    run_dir = tmp_path / "flat"
    args = ["train", "--objective", "ntp", "--lr", "0", "--max-epochs", "3", "--val-users", "50"]
    assert main(args + ["--run-dir", str(run_dir)]) == 0
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train/loss" in line and "val/recall@10" in line and line.endswith(" min)") for line in epochs)
    assert torch.load(run_dir / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 2
    training = json.loads((run_dir / "settings.json").read_text())["training"]
    assert training["epochs"] == 1 and training["epochs_run"] == 3
    assert training["seconds"] < training["seconds_run"]


def test_a_run_resumed_into_another_folder_keeps_its_best_so_far(tmp_path, recwarn):
    """Trained longer, a run's cache key (and folder) changes; at learning rate 0 no
    resumed epoch beats the first, so the best checkpoint in the new folder is still
    epoch 1's, copied there (Lightning alone would take epoch 3 for the best)."""
    first, longer = tmp_path / "two", tmp_path / "three"
    args = ["train", "--objective", "ntp", "--lr", "0", "--val-users", "50"]
    assert main([*args, "--max-epochs", "2", "--run-dir", str(first)]) == 0
    assert main([*args, "--max-epochs", "3", "--run-dir", str(longer), "--resume", str(first / "last.ckpt")]) == 0
    assert torch.load(longer / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(longer / "last.ckpt", weights_only=True)["epoch"] == 2
    assert torch.load(first / "best.ckpt", weights_only=True)["epoch"] == 0  # the earlier folder is as it was
    training = json.loads((longer / "settings.json").read_text())["training"]
    assert training["epochs"] == 1 and training["epochs_run"] == 3
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_a_resume_through_a_link_or_with_no_epoch_left_keeps_the_run(tmp_path):
    """--resume through a symlink reads the state of the folder the link points into; a
    run resumed into another folder with no epoch left there ends as it was."""
    first, links, longer, same = tmp_path / "first", tmp_path / "links", tmp_path / "longer", tmp_path / "same"
    args = ["train", "--objective", "ntp", "--val-users", "50", "--lr", "0"]
    assert main([*args, "--max-epochs", "1", "--run-dir", str(first)]) == 0
    links.mkdir()
    (links / "last.ckpt").symlink_to(first / "last.ckpt")
    assert main([*args, "--max-epochs", "2", "--run-dir", str(longer), "--resume", str(links / "last.ckpt")]) == 0
    assert torch.load(longer / "best.ckpt", weights_only=True)["epoch"] == 0
    assert main([*args, "--max-epochs", "1", "--run-dir", str(same), "--resume", str(first / "last.ckpt")]) == 0
    assert torch.load(same / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(same / "last.ckpt", weights_only=True)["epoch"] == 0


def test_a_copied_run_folder_resumes_with_its_own_best(tmp_path):
    """The state of a resumed checkpoint is that of the folder it is in: a copy of a run
    folder keeps the copy's best when resumed, whatever the original's folder (which its
    checkpoints still name) holds by then."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    args = ["train", "--objective", "ntp", "--val-users", "50", "--lr", "0"]
    assert main([*args, "--max-epochs", "1", "--run-dir", str(original)]) == 0
    shutil.copytree(original, copy)
    (original / "best.ckpt").write_bytes(b"whatever the original holds now")
    assert main([*args, "--max-epochs", "2", "--run-dir", str(copy), "--resume", str(copy / "last.ckpt")]) == 0
    assert torch.load(copy / "best.ckpt", weights_only=True)["epoch"] == 0


def test_resuming_with_other_settings_is_refused(first_run, tmp_path, capsys):
    root, _, _ = first_run
    last = next((root / "runs" / "synthetic").glob("ntp-*/last.ckpt"))
    code = main(
        [
            "train",
            "--objective",
            "ntp",
            "--backbone",
            "llama-tiny",
            "--resume",
            str(last),
            "--run-dir",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    assert "the checkpoint has backbone=qwen-tiny, these settings give llama-tiny" in capsys.readouterr().err


def test_untrained_runs_measure_latency_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))
    out = tmp_path / "latency.json"
    args = [
        "run",
        "--decoder",
        "beam,nezha",
        "--untrained",
        "--backbone",
        "llama-micro",
        "--limit-users",
        "64",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "training a" not in capsys.readouterr().out and not (tmp_path / "runs").exists()
    records = json.loads(out.read_text())
    assert [r["weights"] for r in records] == ["random: latency only, metrics meaningless"] * 2
    assert records[0]["backbone"]["name"] == "llama-micro"


def test_bf16_flags_are_read_from_cpuinfo():
    from bench.train import cpu_has_bf16

    assert cpu_has_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n") is False
    assert cpu_has_bf16("flags\t\t: fpu avx512f avx512_bf16\n") is True
    assert cpu_has_bf16("flags\t\t: fpu amx_tile amx_bf16\n") is True
    assert cpu_has_bf16("Processor\t: ARMv8\nFeatures\t: fp asimd\n") is None


def test_records_name_the_cpu_model_where_cpuinfo_gives_one(monkeypatch):
    import torch

    import bench.records
    from bench.records import cpu_model, device_name

    epyc = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
    assert cpu_model(epyc + epyc.replace("processor\t: 0", "processor\t: 1")) == "AMD EPYC"
    xeon = "model name\t: \nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
    assert cpu_model(xeon) == "Intel(R) Xeon(R) Platinum 8488C"
    assert cpu_model("Processor\t: ARMv8\nFeatures\t: fp asimd\n") is None
    monkeypatch.setattr(bench.records, "cpuinfo_text", lambda: epyc)
    assert device_name(torch.device("cpu")) == f"cpu (AMD EPYC, {torch.get_num_threads()} threads)"
    monkeypatch.setattr(bench.records, "cpuinfo_text", lambda: "")
    assert device_name(torch.device("cpu")).startswith("cpu (") and "None" not in device_name(torch.device("cpu"))


def test_bf16_mixed_on_a_cpu_without_bf16_warns_once(monkeypatch, capsys):
    """The preset trains in bf16-mixed, which a CPU without bf16 arithmetic emulates many
    times slower: one warning line names the fix; 32-true and bf16 hardware say nothing."""
    import bench.train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [(False, "bf16-mixed", True), (False, "32-true", False), (True, "bf16-mixed", False)]
    for has_bf16, precision, warned in cases:
        monkeypatch.setattr(bench.train, "cpu_has_bf16", lambda text, answer=has_bf16: answer)
        bench.train.warn_if_slow_precision.cache_clear()
        bench.train.warn_if_slow_precision(precision)
        bench.train.warn_if_slow_precision(precision)
        lines = capsys.readouterr().err.splitlines()
        expected = (
            "warning: --precision bf16-mixed on a CPU without bf16 arithmetic (no AVX-512 BF16 or AMX) is emulated "
            "(a t5-base step took 21-26x as long as in 32-true on an AVX2 EPYC); pass --precision 32-true"
        )
        assert lines == ([expected] if warned else [])


def test_bf16_mixed_training_runs_on_the_cpu(tmp_path):
    """--precision bf16-mixed trains under bf16 autocast (other numerics than 32-true from
    the same seed) and keeps fp32 weights; the checkpoint records the precision."""
    weights = {}
    for precision in ("32-true", "bf16-mixed"):
        run_dir = tmp_path / precision
        args = ["train", "--objective", "ntp", "--backbone", "qwen-micro", "--max-epochs", "1", "--val-users", "50"]
        assert main(args + ["--precision", precision, "--run-dir", str(run_dir)]) == 0
        checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
        assert checkpoint["hyper_parameters"]["settings"]["precision"] == precision
        weights[precision] = checkpoint["state_dict"]
    for name, fp32 in weights["32-true"].items():
        mixed = weights["bf16-mixed"][name]
        assert mixed.dtype == fp32.dtype and torch.isfinite(mixed).all()
    assert any(not torch.equal(fp32, weights["bf16-mixed"][n]) for n, fp32 in weights["32-true"].items())


def test_an_ntp_model_taught_by_the_item_model_finds_it_trains_it_and_records_its_time(tmp_path, capsys, monkeypatch):
    """--item-teacher: bench train trains full_rank's item model first (its own cache entry),
    the NTP checkpoint carries the item model's training record, and bench run finds both."""
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))
    config = tmp_path / "taught.yaml"
    config.write_text(
        "data:\n  users: 400\nmodel:\n  max_epochs: 1\n  val_users: 100\n"
        "  per_objective:\n    ntp: {item_teacher: 0.5}\n"
    )
    common = ["--config", str(config)]
    assert main(["train", "--objective", "ntp", *common]) == 0
    printed = capsys.readouterr().out
    assert "training a next_item model" in printed
    best = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("best checkpoint: "))
    [item_dir] = (tmp_path / "runs" / "synthetic").glob("next_item-*")
    item_model = torch.load(item_dir / "best.ckpt", weights_only=True)
    taught_by = torch.load(best, weights_only=True)["training"]["taught_by"]
    assert taught_by["objective"] == "next_item" and taught_by["seconds_run"] == item_model["training"]["seconds_run"]
    out = tmp_path / "taught.json"
    assert main(["run", "--decoder", "beam,full_rank", "--limit-users", "20", "--out", str(out), *common]) == 0
    assert "training a" not in capsys.readouterr().out
    beam, full_rank = json.loads(out.read_text())
    assert f"with soft targets from {item_dir.name}" in beam["backbone"]["source"]
    assert beam["backbone"]["training"]["taught_by"] == taught_by
    assert full_rank["backbone"]["source"].endswith(f"runs cache {item_dir.name})")
