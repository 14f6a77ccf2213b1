"""`bench tune` on the synthetic data with tiny trials: a study runs and exports a config
that trains, workers share one journal study, a killed study resumes, two workers share
a real PostgreSQL study, and bad input is one line."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from bench.__main__ import main
from bench.errors import BenchError

ROOT = Path(__file__).resolve().parents[1]
# tiny trials: the smallest backbone, one epoch, few valid users; a two-parameter space
SPACE = {"tune": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "dropout": {"choices": [0.0, 0.1]}}}}
FAST = ["--backbone", "qwen-micro", "--max-epochs", "1", "--val-users", "30", "--limit-users", "30"]
FAST += ["--train-batch-size", "512", "--objective", "ntp", "--warmup", "0"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return tmp_path


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_RUNS_DIR": str(cwd / "runs")}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def states(storage, study: str) -> list[str]:
    from bench.tune import storage_of

    return [t.state.name for t in optuna.load_study(study_name=study, storage=storage_of(storage)).trials]


@pytest.mark.parametrize("objective,backbone", [("next_item", "sasrec-tiny"), ("ntp", "qwen-micro")])
def test_the_search_tries_the_repeat_bias_starting_from_the_run_own_settings(objective, backbone):
    """Trial 0 is the run's own point, per_objective entries (a preset's) included."""
    from bench.settings import ModelSettings, TuneSettings
    from bench.tune import default_params, search_space

    space = search_space(TuneSettings(objective=objective))
    assert space["repeat_bias"] == {"choices": [False, True]}
    for own in (False, True):
        flag = ModelSettings(backbone=backbone, repeat_bias=own)
        assert default_params(space, flag, objective)["repeat_bias"] is own
        preset = ModelSettings(backbone=backbone, per_objective={objective: {"repeat_bias": own, "lr": 0.002}})
        assert default_params(space, preset, objective) == {**default_params(space, flag, objective), "lr": 0.002}


def test_an_ntp_search_on_t5_keeps_the_repeat_bias_off():
    from bench.settings import ModelSettings, TuneSettings
    from bench.tune import fixed_settings, search_space

    for backbone, searched in (("t5-micro", False), ("qwen-micro", True), (None, True)):
        fixed = fixed_settings("ntp", ModelSettings(backbone=backbone), {"lr"})
        space = search_space(TuneSettings(objective="ntp"), fixed)
        assert ("repeat_bias" in space) is searched and "lr" not in space
    item = fixed_settings("next_item", ModelSettings(backbone="sasrec-tiny"), set())
    assert "repeat_bias" in search_space(TuneSettings(objective="next_item"), item)


def test_a_study_runs_and_its_exported_config_trains(workdir, capsys):
    code = main(["tune", "--config", "space.yaml", "--trials", "3", "--study", "s", *FAST])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pruner: median" in out and "searching dropout, lr" in out, out.splitlines()[0]
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 3
    folder = workdir / "runs" / "tune" / "s"
    assert {"best.yaml", "trials.csv", "history.png", "journal.log"} <= {p.name for p in folder.iterdir()}
    rows = (folder / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,recall@10,pruned_after_epoch,seconds") and len(rows) == 4
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["model"]["backbone"] == "qwen-micro" and best["model"]["max_epochs"] == 1
    assert best["run"]["decoder"] == "beam" and best["train"]["objective"] == "ntp"
    assert main(["train", "--config", str(folder / "best.yaml")]) == 0
    assert "best checkpoint:" in capsys.readouterr().out
    code = main(["run", "--config", str(folder / "best.yaml"), "--out", "r.json"])
    assert code == 0
    assert json.loads((workdir / "r.json").read_text())[0]["settings"]["model"]["lr"] == best["model"]["lr"]


def test_a_setting_in_the_configs_per_objective_entry_is_fixed_not_searched(workdir, capsys):
    config = {**SPACE, "model": {"per_objective": {"ntp": {"dropout": 0.3}, "nezha": {"lr": 0.005}}}}
    (workdir / "fixed.yaml").write_text(yaml.safe_dump(config))
    assert main(["tune", "--config", "fixed.yaml", "--trials", "1", "--study", "f", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("searching lr"), out.splitlines()[0]  # nezha's lr: not this search's
    assert yaml.safe_load((workdir / "runs/tune/f/best.yaml").read_text())["model"]["dropout"] == 0.3


def test_a_home_folder_in_tune_out_and_storage_is_where_the_files_go(workdir, capsys, monkeypatch):
    """Lightning writes a trial's checkpoints under ~ expanded; the search looked under ./~."""
    monkeypatch.setenv("HOME", str(workdir / "home"))
    args = ["tune", "--config", "space.yaml", "--trials", "1", "--out", "~/t", "--storage", "~/j.log", *FAST]
    assert main(args) == 0, capsys.readouterr().err
    assert (workdir / "home" / "t" / "best.yaml").exists() and (workdir / "home" / "j.log").exists()
    assert not (workdir / "~").exists()


def test_a_study_of_the_same_name_in_another_storage_keeps_off_the_first_ones_checkpoints(workdir, capsys):
    assert main(["tune", "--config", "space.yaml", "--trials", "1", "--study", "s", *FAST]) == 0
    first = workdir / "runs" / "tune" / "s" / "trials" / "trial-0"
    before = {path: path.read_bytes() for path in first.rglob("*.ckpt")}
    assert before and refused(["--study", "s", "--storage", "sqlite:///other.db"], capsys) == (
        f"{first.parent} holds trial-0, which study 's' in sqlite:///other.db has not made (a study of that name "
        "in another storage?); its checkpoints would be written over: pass another --out"
    )
    assert {path: path.read_bytes() for path in first.rglob("*.ckpt")} == before
    assert not (workdir / "other.db").exists()  # the refused command leaves no empty study behind


def test_a_refused_study_in_an_existing_storage_is_deleted_and_the_storage_kept(workdir, capsys):
    """The other storage already holds a study of another name: only the new, empty one goes."""
    assert main(["tune", "--config", "space.yaml", "--trials", "1", "--study", "s", *FAST]) == 0
    optuna.create_study(study_name="t", storage="sqlite:///other.db")
    assert refused(["--study", "s", "--storage", "sqlite:///other.db"], capsys).endswith("pass another --out")
    assert optuna.get_all_study_names("sqlite:///other.db") == ["t"]


def test_two_workers_share_one_journal_study_with_two_objectives(workdir):
    args = ["tune", "--config", "space.yaml", "--trials", "2", "--workers", "2", "--study", "w", "--latency"]
    result = bench(*args, *FAST, cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    finished = [s for s in states(str(workdir / "runs/tune/w/journal.log"), "w") if s in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 2
    assert "2 worker(s)" in result.stdout and "pruner: none" in result.stdout
    assert "Pareto front:" in result.stdout and (workdir / "runs/tune/w/pareto.png").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_trials_the_harness_refuses_fail_one_by_one_and_the_search_ends(workdir, workers):
    """A beam narrower than K is refused by the run after training: each such trial fails
    with its line and the search stops after --trials failures, also with two workers."""
    (workdir / "narrow.yaml").write_text("tune:\n  space:\n    decoder:width: {choices: [2]}\n")
    args = ["tune", "--config", "narrow.yaml", "--trials", "2", "--workers", workers, "--study", "n", *FAST]
    result = bench(*args, cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.count("fail (beam: width=2 is below K=20; it must be at least K)") >= 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trial of study 'n' completed; see ")
    assert 2 <= states(str(workdir / "runs/tune/n/journal.log"), "n").count("FAIL") <= 3


def test_a_worker_that_starts_after_its_siblings_failed_enough_trials_runs_none(workdir):
    """The failures since the command began are counted from the command's start, not from
    each worker's: a worker that starts late, after --trials failures, starts no trial."""
    from optuna.trial import TrialState

    from bench.settings import DataSettings, TuneSettings
    from bench.tune import open_study, worker

    journal = str(workdir / "journal.log")
    tune = TuneSettings(objective="ntp", trials=2, workers=2)
    study = open_study(tune, "late", journal, DataSettings(), create=True)
    for _ in range(2):
        study.tell(study.ask(), state=TrialState.FAIL)
    threads = torch.get_num_threads()  # as tune() passes in process: the worker sets them for the whole process
    worker({"tune": tune, "data": DataSettings()}, "late", journal, str(workdir), threads, failed_before=0)
    assert states(journal, "late") == ["FAIL", "FAIL"]


def test_a_killed_study_resumes_keeping_finished_trials(workdir):
    journal = workdir / "runs" / "tune" / "k" / "journal.log"
    args = [sys.executable, "-m", "bench", "tune", "--config", "space.yaml", "--trials", "3", "--study", "k", *FAST]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_RUNS_DIR": str(workdir / "runs")}
    process = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it while its second trial runs
        # optuna creates the journal empty and writes the study's record after: no study to load before it
        if journal.exists() and journal.stat().st_size > 0 and states(str(journal), "k") == ["COMPLETE", "RUNNING"]:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert states(str(journal), "k")[:2] == ["COMPLETE", "RUNNING"]
    result = bench("tune", "--config", "space.yaml", "--trials", "3", "--study", "k", *FAST, cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 of 3 trials finished, 1 interrupted trial(s) marked failed" in result.stdout
    final = states(str(journal), "k")
    assert final[:2] == ["COMPLETE", "FAIL"] and sum(s in ("COMPLETE", "PRUNED") for s in final) == 3


def journal_with_a_finished_trial(workdir) -> Path:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from bench.settings import DataSettings, TuneSettings
    from bench.tune import open_study

    journal = workdir / "j.log"
    study = open_study(TuneSettings(objective="ntp"), "x", str(journal), DataSettings(), create=True)
    kinds = {"dropout": CategoricalDistribution([0.0, 0.1]), "lr": FloatDistribution(1e-3, 1e-2, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"dropout": 0.1, "lr": 2e-3}, distributions=kinds, value=0.5))
    return journal


def test_a_journal_whose_last_record_a_kill_cut_off_resumes_whole(workdir, capsys):
    journal = journal_with_a_finished_trial(workdir)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "ab')  # a write killed half way
    code = main(["tune", "--config", "space.yaml", "--trials", "2", "--study", "x", "--storage", str(journal), *FAST])
    out = capsys.readouterr().out
    assert code == 0 and f"{journal}: removed its last record, 31 bytes cut off by a killed write" in out
    assert journal.read_bytes().startswith(whole) and journal.read_bytes().endswith(b"\n")
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())
    assert states(str(journal), "x") == ["COMPLETE", "COMPLETE"]


def test_the_journal_repair_waits_for_a_record_being_written(workdir):
    """A worker holding optuna's journal lock mid-write finishes its record before the repair reads."""
    import threading

    from optuna.storages.journal import JournalFileSymlinkLock

    from bench.tune import repair_journal

    journal = journal_with_a_finished_trial(workdir)
    whole, record = journal.read_bytes(), b'{"op_code": 5, "worker_id": "live"}\n'
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    journal.write_bytes(whole + record[:20])

    def finish_the_record():
        time.sleep(0.3)
        with open(journal, "ab") as f:
            f.write(record[20:])
        lock.release()

    writer = threading.Thread(target=finish_the_record)
    writer.start()
    repair_journal(journal)
    writer.join()
    assert journal.read_bytes() == whole + record and not list(workdir.glob("j.log.lock*"))


@pytest.mark.parametrize("damage", [b"not json\n", b"\x00\x00\x00\n"])
def test_a_journal_damaged_inside_is_refused_untouched(workdir, capsys, damage):
    journal = journal_with_a_finished_trial(workdir)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + damage + b"".join(lines[1:]))
    before = journal.read_bytes()
    assert refused(["--study", "x", "--storage", str(journal)], capsys) == (
        f"--storage {journal}: line 2 is no journal record (the file is damaged); it was left untouched: "
        "restore it from a copy, or give a new file"
    )
    assert journal.read_bytes() == before


def test_a_storage_that_is_no_file_is_refused(workdir, capsys):
    (workdir / "gone").symlink_to(workdir / "nowhere")
    assert refused(["--storage", "gone"], capsys) == (
        f"--storage gone is a link to nothing ({workdir / 'nowhere'}); give a journal file"
    )
    assert refused(["--storage", "/dev/null"], capsys) == (
        "--storage /dev/null is no regular file; give a journal file or an RDB URL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres(as_user: list[str], pg_ctl: str, data: Path, folder: Path) -> int:
    """Starts the server of `data` on a free port of 127.0.0.1 -> the port. A port found free
    can be taken by another process before the server binds it: the server then exits at
    once, and it is started again on another port."""
    log = folder / "log"
    for _ in range(3):
        port, logged = free_port(), log.stat().st_size if log.exists() else 0
        options = f"-p {port} -k {folder} -h 127.0.0.1"
        start = [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]
        if subprocess.run(start, capture_output=True).returncode == 0:
            return port
    failure = log.read_bytes()[logged:].decode(errors="replace") if log.exists() else "no log"
    pytest.fail(f"the PostgreSQL server did not start:\n{failure}")


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (as the postgres user when we are root)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    folder = Path(tempfile.mkdtemp(prefix="bench-pg-"))  # in /tmp: the postgres user must reach it
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    try:
        initialize = [*as_user, initdb, "-D", str(data), "-U", "bench", "--auth=trust"]
        subprocess.run(initialize, check=True, capture_output=True)
        port = start_postgres(as_user, pg_ctl, data, folder)
        yield f"postgresql+psycopg://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(workdir, postgres):
    result = bench(
        "tune", "--config", "space.yaml", "--trials", "2", "--workers", "2", "--study", "pg", "--storage", postgres,
        *FAST, cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="pg", storage=postgres)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 2
    assert study.user_attrs["objective"] == "ntp"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--workers", "0"], "--workers 0: must be at least 1"),
        (["--workers", str(os.cpu_count() + 1)], f"--workers {os.cpu_count() + 1}: this machine has"),
        (["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/x"], "cannot open the study storage"),
        (["--config", "badspace.yaml"], "unknown parameter 'colour' in the search space"),
        (["--objective", "medusa"], "'medusa' is not one of ntp, nezha, next_item"),
        (["--objective", "nezha", "--nezha-init", "ntp"], "from random weights (a warm start would need"),
    ],
    ids=[
        "workers 0",
        "workers beyond the cores",
        "unreachable storage",
        "unknown parameter",
        "objective",
        "warm-started nezha",
    ],
)
def test_bad_tune_input_is_one_line(workdir, capsys, args, fragment):
    (workdir / "badspace.yaml").write_text("tune:\n  space:\n    colour: {choices: [red]}\n")
    code = main(["tune", "--trials", "1", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (workdir / "runs").exists()  # no empty study folder left behind


def test_a_study_of_another_objective_is_refused(workdir, capsys):
    from bench.settings import DataSettings, TuneSettings
    from bench.tune import open_study

    storage = str(workdir / "j.log")
    open_study(TuneSettings(objective="ntp"), "x", storage, DataSettings(), create=True)
    code = main(["tune", "--objective", "nezha", "--study", "x", "--storage", storage, "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "study 'x'" in err and "objective=ntp" in err and "choose another --study" in err


def test_a_study_of_other_generated_data_is_refused(workdir, capsys):
    from bench.settings import DataSettings, TuneSettings
    from bench.tune import open_study

    storage = str(workdir / "j.log")
    open_study(TuneSettings(objective="ntp"), "x", storage, DataSettings(users=100), create=True)
    err = refused(["--study", "x", "--storage", storage, "--users", "150", "--items", "200"], capsys)
    assert err.startswith(f"study 'x' in {storage} was made for ")
    assert "data=collisions last_code, seed 0, users 100" in err


def test_a_study_resumed_on_the_same_generated_data_given_another_way_is_kept():
    from bench.settings import DataSettings
    from bench.tune import data_description

    assert data_description(DataSettings()) == data_description(DataSettings(users=3000))


@pytest.mark.parametrize(
    "entry,now",
    [
        ("dropout: {low: 0, high: 0.1}", "floats 0.0..0.1"),
        ("dropout: {choices: [0.0, 0.2]}", "choices [0.0, 0.2]"),
        ("lr: {low: 0.001, high: 0.01}", "floats 0.001..0.01"),
    ],
)
def test_a_study_resumed_with_another_kind_of_range_is_refused_untouched(workdir, capsys, entry, now):
    """Optuna would fail every new trial of such a parameter."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from bench.settings import DataSettings, TuneSettings
    from bench.tune import open_study, storage_of

    storage = str(workdir / "j.log")
    study = open_study(TuneSettings(objective="ntp"), "x", storage, DataSettings(), create=True)
    kinds = {"dropout": CategoricalDistribution([0.0, 0.1]), "lr": FloatDistribution(1e-3, 1e-2, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"dropout": 0.1, "lr": 2e-3}, distributions=kinds, value=0.5))
    (workdir / "space.yaml").write_text(f"tune:\n  space:\n    {entry}\n")
    name = entry.partition(":")[0]
    was = "choices [0.0, 0.1]" if name == "dropout" else "floats 0.001..0.01 (log)"
    assert refused(["--config", "space.yaml", "--study", "x", "--storage", storage], capsys) == (
        f"study 'x' in {storage} sampled {name} from {was} (trial 0), this search space from {now}; "
        f"choose another --study name, or search {name} as before"
    )
    trials = optuna.load_study(study_name="x", storage=storage_of(storage)).trials
    assert [(t.state.name, t.params, t.values) for t in trials] == [("COMPLETE", {"dropout": 0.1, "lr": 2e-3}, [0.5])]


@pytest.fixture
def unwritable(tmp_path):
    """A folder we may not write in: read-only to a user; sysfs for root, who writes anywhere else."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    return folder


def refused(args: list[str], capsys) -> str:
    code = main(["tune", "--trials", "1", *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize("content", [b"just some notes\n", b"\xff\xfe\x00binary", b'{"op": 1}\n', b"[1, 2]\n"])
def test_a_storage_file_that_is_no_journal_is_refused_untouched(workdir, capsys, content):
    (workdir / "notes.txt").write_bytes(content)
    assert refused(["--storage", "notes.txt"], capsys) == (
        "--storage notes.txt is not an optuna journal (its first line is no journal record); "
        "it was left untouched: give a new file or an RDB URL"
    )
    assert (workdir / "notes.txt").read_bytes() == content


def test_bad_storage_and_out_paths_are_one_line_before_any_trial(workdir, capsys, unwritable):
    (workdir / "folder").mkdir()
    (workdir / "file").write_bytes(b"keep me")
    assert refused(["--storage", "folder"], capsys) == (
        "--storage folder is a folder; give a journal file (folder/journal.log) or an RDB URL"
    )
    assert refused(["--storage", f"{unwritable}/j.log"], capsys).startswith(
        f"--storage {unwritable}/j.log: cannot write in {unwritable} ("
    )
    assert refused(["--out", "file"], capsys) == "--out: file is a file, not a folder; choose another folder"
    assert refused(["--out", str(unwritable)], capsys).startswith(f"--out: cannot write in {unwritable} (")
    assert (workdir / "file").read_bytes() == b"keep me" and list(workdir.glob("folder/*")) == []
    assert not (workdir / "runs" / "tune" / "ntp-synthetic" / "journal.log").exists()


@pytest.mark.parametrize(
    "entry,message",
    [
        ("lr: {low: 0.1, high: 0.01}", "search space entry 'lr': low 0.1 is above high 0.01; swap them"),
        ("lr: {low: -1, high: 0.01, log: true}", "search space entry 'lr': log: true needs low above 0, not -1"),
        ("dropout: {low: 1.1, high: 1.2}", "search space entry 'dropout': dropout 1.1: must be below 1.0"),
        ("dropout: {choices: [0.1, 1.0]}", "search space entry 'dropout': dropout 1.0: must be below 1.0"),
        ("lr: {low: -0.1, high: 0.01}", "search space entry 'lr': lr -0.1: must be at least 0.0"),
        ("width: {choices: [64.5]}", "search space entry 'width': width = 64.5 is not an integer or null"),
        ("transition: {choices: [lstm]}",
         "search space entry 'transition': transition = 'lstm' is not one of rnn, gru, none"),
        ("heads: {choices: []}", "search space entry 'heads': choices must be a non-empty list"),
        ("lr: {low: 0.0001, high: 0.01, lgo: true}",
         "search space entry 'lr': unknown key(s) lgo; an entry is {choices: [...]} or {low: x, high: y[, log: true]}"),
        ("dropout: {choices: [0.1], log: true}",
         "search space entry 'dropout': unknown key(s) log; an entry is {choices: [...]} or "
         "{low: x, high: y[, log: true]}"),
        ("per_objective: {choices: [{}]}",
         "search space entry 'per_objective': choices must be numbers, text, true/false or null"),
        ("placeholders: {low: false, high: true}",
         "search space entry 'placeholders': low and high must be numbers; list other values as choices"),
        ("lr_schedule: {low: constant, high: cosine}",
         "search space entry 'lr_schedule': low and high must be numbers; list other values as choices"),
    ],
)  # fmt: skip
def test_a_search_space_outside_its_settings_is_refused_before_any_trial(workdir, capsys, entry, message):
    (workdir / "space.yaml").write_text(f"tune:\n  space:\n    {entry}\n")
    assert refused(["--config", "space.yaml"], capsys) == message
    assert not (workdir / "runs" / "tune" / "ntp-synthetic" / "journal.log").exists()


def test_a_range_with_whole_number_ends_is_sampled_in_the_settings_type():
    import optuna

    from bench.settings import TuneSettings
    from bench.tune import search_space, suggest

    space = search_space(TuneSettings(space={"lr": {"low": 0, "high": 1}, "layers": {"low": 1, "high": 4},
                                             "dropout": {"choices": [0, 0.5]}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = [suggest(study.ask(), space) for _ in range(20)]
    assert all(type(p["lr"]) is float and type(p["layers"]) is int for p in params)
    assert any(0 < p["lr"] < 1 for p in params) and {p["dropout"] for p in params} <= {0.0, 0.5}
    assert {type(p["dropout"]) for p in params} == {float}


@pytest.mark.parametrize("name", ["best.yaml", "trials.csv", "history.png"])
def test_an_out_folder_holding_files_of_those_names_not_ours_is_refused_untouched(workdir, capsys, name):
    (workdir / "mine").mkdir()
    (workdir / "mine" / name).write_text("my own notes\n")
    expected = f"mine/{name} exists and is no output of bench tune; pass another --out"
    assert refused(["--out", "mine"], capsys) == expected
    assert (workdir / "mine" / name).read_text() == "my own notes\n"
    assert not (workdir / "runs" / "tune" / "ntp-synthetic" / "journal.log").exists()


def test_a_decoder_option_outside_its_bounds_is_refused():
    from bench.settings import TuneSettings
    from bench.tune import search_space

    with pytest.raises(BenchError, match=r"^search space entry 'decoder:head_beam': head_beam -1: must be at least 0$"):
        search_space(TuneSettings(objective="nezha", space={"decoder:head_beam": {"choices": [0, -1]}}))


@pytest.mark.parametrize(
    "args,hint",
    [
        (["--study", "../../x"], "choose another --study, or give both --out and --storage"),
        (["--study", ".hidden"], "choose another --study, or give both --out and --storage"),
        (["--dataset", "../x"], "a dataset folder comes with --data-dir FOLDER beside --dataset NAME"),
    ],
)
def test_a_study_name_that_is_a_path_is_refused(workdir, capsys, args, hint):
    name = args[1] if args[0] == "--study" else "ntp-../x"
    assert refused(args, capsys) == (
        f"study name {name!r} is not a name (letters, digits, '-', '_' and '.', not starting with '.'); {hint}"
    )
    assert not any(workdir.glob("**/journal.log"))


def test_a_sqlite_storage_in_memory_or_of_another_program_is_refused_untouched(workdir, capsys):
    import sqlite3

    for url in ("sqlite://", "sqlite:///:memory:"):
        assert refused(["--storage", url], capsys) == (
            f"--storage {url} keeps the study in memory, lost when the command ends; give a file (sqlite:///study.db)"
        )
    with contextlib.closing(sqlite3.connect(workdir / "shop.db")) as db, db:
        db.execute("CREATE TABLE users (id INTEGER)")
    before = (workdir / "shop.db").read_bytes()
    assert refused(["--storage", "sqlite:///shop.db"], capsys) == (
        "--storage sqlite:///shop.db: shop.db is another program's database (tables users); it was left untouched: "
        "give a new file"
    )
    (workdir / "notes.db").write_text("some notes")
    assert refused(["--storage", "sqlite:///notes.db"], capsys).startswith(
        "--storage sqlite:///notes.db: notes.db is no SQLite database (file is not a database); give a new file"
    )
    assert (workdir / "shop.db").read_bytes() == before and (workdir / "notes.db").read_text() == "some notes"


@pytest.mark.parametrize("user,password", [("user", "s3cret"), ("postgres", "postgres")])
def test_a_storage_error_hides_the_url_password(workdir, capsys, user, password):
    err = refused(["--storage", f"postgresql+psycopg://{user}:{password}@127.0.0.1:1/x"], capsys)
    assert err.startswith(f"cannot open the study storage postgresql+psycopg://{user}:***@127.0.0.1:1/x: ")
    assert f":{password}@" not in err


def test_a_search_in_a_log_shows_our_lines_without_optuna_bar_or_warnings(workdir, capfd, monkeypatch):
    """Not on a terminal: no tqdm bar, no `[W ...] Trial 0 failed`; our trial line names the error."""
    import bench.tune

    def run_trial(trial, settings, data, out):
        bench.tune.suggest(trial, bench.tune.search_space(settings["tune"], settings["fixed"]))
        if trial.number == 0:
            raise RuntimeError("CUDA out of memory\nmore detail")
        return (0.25,)

    monkeypatch.setattr(bench.tune, "run_trial", run_trial)
    assert main(["tune", "--config", "space.yaml", "--trials", "2", "--study", "log", *FAST]) == 0
    out, err = capfd.readouterr()
    # the seconds are the trial's wall time (its journal writes): 0 on an idle machine, not on a loaded one
    assert re.search(r"^trial 0 fail \(CUDA out of memory\) in \d+ s: ", out, re.M), out
    assert "trial 1 complete 0.2500" in out, out
    assert "[W " not in err and "Trial 0 failed" not in err and "%|" not in err and "\r" not in err, err
