"""Distributed training through Lightning's strategies (DDP on 2 CPU processes, gloo):
the validation users are split across the processes without repeats, so the gathered
val/recall@10 is the one-process value; `bench train --devices 2` runs end to end."""

import functools
import os
import pickle
import warnings

import lightning as L
import pytest
import torch

from bench.__main__ import main
from bench.errors import BenchError
from bench.data import eval_examples, load_dataset
from bench.data.batches import collate_eval
from bench.settings import DataSettings, ModelSettings
from bench.train import LengthBucketSampler, ShardSampler, build_model, validation_loader
from models.module import VALIDATION_DECODER

VAL_USERS = 101  # odd: the two shards differ in size, and a padding sampler would repeat a user


@pytest.fixture(autouse=True)
def no_master_port(monkeypatch):
    """Lightning's launcher puts the free port it found into this process's MASTER_PORT and
    leaves it there: every later launch, here or in another module, would bind that port
    again seconds or minutes later, free or not, and every later test and subprocess would
    see it. Each test starts without one and leaves none (monkeypatch restores the value
    from before the test)."""
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.delenv("MASTER_PORT")


@functools.lru_cache(maxsize=1)
def synthetic():
    return load_dataset("synthetic")


def fixed_model():
    """A random-init qwen-micro NTP model, the same weights every call (seeded)."""
    data = synthetic()
    settings = ModelSettings(backbone="qwen-micro").resolved(DataSettings())
    model = build_model(data, "ntp", settings, DataSettings(seed=7))
    with torch.no_grad():  # peaked scores: no near-ties that batch shapes could flip
        model.lm.core.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()


def validation_users(model) -> list[dict]:
    """The first VAL_USERS valid users; every third one's target is replaced by the model's
    own top item, so the recall is well away from 0 and a repeated user would move it."""
    from decoders import build_decoder

    data = synthetic()
    valid = eval_examples(data, "valid", model.settings.max_history, VAL_USERS)
    decoder = build_decoder(VALIDATION_DECODER["ntp"], data.catalog, 10, {"ntp": model})
    with torch.no_grad():
        top = data.catalog.items_of(decoder.decode(collate_eval(valid, data.catalog).prompt).sids)[:, 0]
    return [dict(ex, target=int(top[n])) if n % 3 == 0 else ex for n, ex in enumerate(valid)]


def validated_recall(valid: list[dict], devices: int, distributed_sampler: bool = False) -> float:
    """val/recall@10 of fixed_model() as Trainer.validate logs it (gathered over the processes)."""
    model = fixed_model()
    strategy = "ddp_fork" if devices > 1 else "auto"
    os.environ.pop("MASTER_PORT", None)  # a port found free now, not the one an earlier launch found
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=distributed_sampler,
    )
    # batches of 25: the shards of 51 and 50 users take 3 and 2 steps, and nothing waits
    loader = validation_loader(valid, synthetic().catalog, batch_size=25)
    if distributed_sampler:  # Lightning's own sharding (DistributedSampler, pads by repeating users)
        loader = torch.utils.data.DataLoader(
            valid, batch_size=25, collate_fn=functools.partial(collate_eval, catalog=synthetic().catalog)
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|sync_dist).*")
        (logged,) = trainer.validate(model, loader, verbose=False)
    return logged["val/recall@10"]


def test_validation_shards_cover_each_user_once():
    shards = [list(ShardSampler(VAL_USERS, shard=(rank, 2))) for rank in range(2)]
    assert [len(s) for s in shards] == [51, 50]
    assert sorted(shards[0] + shards[1]) == list(range(VAL_USERS))
    assert len(ShardSampler(VAL_USERS)) == VAL_USERS  # no process group: everything


def test_training_shards_are_disjoint_and_even():
    lengths = [(7 * i) % 21 + 1 for i in range(1000)]
    whole = [sorted(b) for b in LengthBucketSampler(lengths, 64, seed=3)]
    shards = [[sorted(b) for b in LengthBucketSampler(lengths, 64, seed=3, shard=(r, 3))] for r in range(3)]
    assert len(whole) == 16 and [len(s) for s in shards] == [5, 5, 5]  # 16 // 3 each, the last one dropped
    flat = [tuple(b) for s in shards for b in s]
    assert len(set(flat)) == 15 and set(flat) <= {tuple(b) for b in whole}
    assert all(len(LengthBucketSampler(lengths, 64, seed=3, shard=(r, 3))) == 5 for r in range(3))
    tiny = [list(LengthBucketSampler([1, 2, 3], 64, seed=0, shard=(r, 2))) for r in range(2)]
    assert [len(s) for s in tiny] == [1, 1]  # fewer batches than processes: reused, nobody idles


def test_two_process_validation_equals_one_process():
    model = fixed_model()
    valid = validation_users(model)
    one = validated_recall(valid, devices=1)
    two = validated_recall(valid, devices=2)
    assert 0.3 < one < 1
    assert two == pytest.approx(one, abs=1e-7)
    # the same users through Lightning's padding DistributedSampler count user 0 twice
    padded = validated_recall(valid, devices=2, distributed_sampler=True)
    print(f"val/recall@10: 1 process {one:.6f}, 2 processes {two:.6f}, 2 with DistributedSampler {padded:.6f}")
    assert padded != pytest.approx(one, abs=1e-7)


def test_loaders_pickle_for_ddp_spawn():
    """ddp_spawn pickles the model and its loaders into the new processes (no lambdas)."""
    model = fixed_model()
    loader = validation_loader(eval_examples(synthetic(), "valid", 20, 5), synthetic().catalog)
    assert len(pickle.loads(pickle.dumps(loader)).collate_fn(loader.dataset)) == 5
    pickle.dumps(LengthBucketSampler([1, 2, 3], 2, seed=0))
    pickle.dumps(model.collate)


def test_bench_train_on_two_cpu_processes(tmp_path, capsys):
    """End to end on 2 forked CPU processes (ddp_fork: the same DDPStrategy as ddp and ddp_spawn,
    started in a second instead of re-importing torch in each process; spawn and ddp take ~30 s
    here, and were checked by hand)."""
    run_dir = tmp_path / "ddp"
    args = ["train", "--objective", "ntp", "--backbone", "qwen-micro", "--max-epochs", "1", "--val-users"]
    args += [str(VAL_USERS), "--devices", "2", "--strategy", "ddp_fork", "--run-dir", str(run_dir), "--seed", "1"]
    assert main(args) == 0
    assert (run_dir / "best.ckpt").is_file() and (run_dir / "settings.json").is_file()
    assert capsys.readouterr().out.count("best checkpoint:") == 1
    saved = torch.load(run_dir / "best.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and "val/recall@10" in str(saved["callbacks"])


def test_several_machines_without_a_meeting_place_are_one_line(tmp_path, monkeypatch, capsys):
    """Lightning's launcher would wait 30 minutes for machines never told where to meet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_RUNS_DIR", str(tmp_path / "runs"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    args = ["train", "--objective", "ntp", "--backbone", "qwen-micro", "--users", "100", "--num-nodes", "2"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: --num-nodes 2 needs MASTER_PORT, NODE_RANK set on every machine")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_group_rank_stands_for_the_node_rank(monkeypatch):
    """Lightning's own environment reads GROUP_RANK where NODE_RANK is unset."""
    from bench.train import check_cluster

    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("GROUP_RANK", "1")
    check_cluster(2)
    monkeypatch.delenv("GROUP_RANK")
    with pytest.raises(BenchError, match="^--num-nodes 2 needs NODE_RANK set on every machine"):
        check_cluster(2)
