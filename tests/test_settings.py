"""Settings exist once: flags and config files come from the dataclasses, decoders
declare their own options and models, a new decoder is one file, SDPA is pinned, and a
decode builds no tensor from Python lists."""

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_batch, random_catalog, random_model

import bench.settings
import bench.train
import models.module
from bench.__main__ import main
from bench.errors import BenchError
from bench.settings import ModelSettings, from_dict
from decoders import REGISTRY, DecodeResult, ModelRequest, build_decoder, plan, register
from decoders.base import NtpDecoder, level_log_probs
from models import objectives
from models.backbones import build_backbone


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(bench.train.RUNS_ENV, str(tmp_path / "runs"))

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


# ---------------------------------------------------------------- a new decoder is one file


@dataclass
class FirstLevelOptions:
    codes: int = 2


class FirstLevelOnly(NtpDecoder):
    """Defined here, in the test file: the top `codes` first-level codes, each completed
    with code 0 at every later level. It uses an existing model role (ntp)."""

    name = "first_level_only"
    Options = FirstLevelOptions

    @torch.no_grad()
    def decode(self, prompt) -> DecodeResult:
        logits, _ = self.lm.prefill(prompt.history, prompt.mask)
        top = level_log_probs(logits, self.catalog, 0).topk(self.options.codes, dim=-1)  # [B, codes]
        rest = top.indices.new_zeros(*top.indices.shape, self.catalog.levels - 1)
        return DecodeResult(sids=torch.cat([top.indices.unsqueeze(-1), rest], -1), scores=top.values)


@pytest.fixture
def first_level_only(monkeypatch):
    """Registered for one test, as `@register` on the class would do for good."""
    monkeypatch.setitem(REGISTRY, "first_level_only", FirstLevelOnly)
    assert register(FirstLevelOnly) is FirstLevelOnly and REGISTRY["first_level_only"] is FirstLevelOnly


def test_a_decoder_defined_in_a_test_runs_through_bench_run(cli, tmp_path, first_level_only):
    out = tmp_path / "results.json"
    code, stdout, err = cli(
        "run",
        "--decoder",
        "first_level_only:codes=3,beam",
        "--untrained",
        "--backbone",
        "qwen-micro",
        "--limit-users",
        "8",
        "--k",
        "5",
        "--out",
        str(out),
    )
    assert code == 0, err
    records = json.loads(out.read_text())
    assert [r["decoder"] for r in records] == ["first_level_only:codes=3", "beam"]
    assert records[0]["decoder_options"] == {"codes": 3}
    assert records[0]["candidates_per_user"] == 3
    assert records[0]["backbone_calls_per_batch"] == 1
    assert records[0]["models"]["ntp"]["name"] == "qwen-micro"
    # both decoders asked for the same ntp model: it was built once and shared
    assert records[0]["models"]["ntp"]["source"] == records[1]["models"]["ntp"]["source"]
    code, _, err = cli("run", "--decoder", "first_level_only:codes=x", "--untrained", "--out", str(out))
    assert code == 2 and err.strip() == ("error: option 'codes' in 'first_level_only:codes=x': 'x' is not an integer")


def test_run_names_no_decoder():
    import inspect

    import bench.run

    source = inspect.getsource(bench.run)
    for name in ("popularity", "medusa", "speculative", "nezha", "draft"):
        assert name not in source


def test_decoders_request_their_models():
    settings = ModelSettings(backbone="llama-small", draft_backbone="llama-micro")
    requests = REGISTRY["speculative"].requests(REGISTRY["speculative"].Options(), settings)
    assert {role: (r.objective, r.settings.backbone) for role, r in requests.items()} == {
        "ntp": ("ntp", "llama-small"),
        "draft": ("ntp", "llama-micro"),
    }
    assert requests["draft"].teacher is None
    aligned = REGISTRY["speculative"].requests(REGISTRY["speculative"].Options(draft="aligned"), settings)
    assert aligned["draft"].teacher == requests["ntp"] and aligned["draft"].settings == requests["draft"].settings
    taught = replace(settings, per_objective={"ntp": {"item_teacher": 0.5}, "next_item": {"dropout": 0.44}})
    beam = REGISTRY["beam"].requests(REGISTRY["beam"].Options(), taught)["ntp"]
    item_model = REGISTRY["full_rank"].requests(REGISTRY["full_rank"].Options(), taught)["next_item"]
    assert beam.teacher == item_model and item_model.settings.dropout == 0.44  # full_rank's model, its own settings
    assert REGISTRY["medusa"].requests(REGISTRY["medusa"].Options(), taught)["medusa"].init_from == beam
    speculative = REGISTRY["speculative"].requests(REGISTRY["speculative"].Options(), taught)
    assert speculative["draft"].teacher == item_model  # a draft trained on the data learns from it too
    aligned = REGISTRY["speculative"].requests(REGISTRY["speculative"].Options(draft="aligned"), taught)["draft"]
    assert aligned.teacher == beam and aligned.settings.item_teacher == 0  # an aligned draft from its backbone only
    items = REGISTRY["speculative"].requests(REGISTRY["speculative"].Options(draft="items"), taught)["next_item"]
    assert items == item_model  # an item draft is full_rank's item model, the same cache entry and role
    _, _, planned = plan("speculative:draft=items", taught)  # the item model is no SID backbone to refuse
    assert planned["next_item"].objective == "next_item"
    with pytest.raises(BenchError, match="decoder 'speculative' cannot run on t5-small"):
        plan("speculative:draft=items", replace(taught, backbone="t5-small"))
    requests = REGISTRY["medusa"].requests(REGISTRY["medusa"].Options(mode="joint"), settings)
    assert requests["medusa"].settings.medusa_mode == "joint"
    assert requests["medusa"].init_from == ModelRequest("ntp", settings)
    requests = REGISTRY["nezha"].requests(REGISTRY["nezha"].Options(transition="gru"), settings)
    assert requests["nezha"].settings.transition == "gru"
    assert REGISTRY["popularity"].requests(REGISTRY["popularity"].Options(), settings)["popularity"].objective in (
        objectives.FITTED
    )


# ---------------------------------------------------------------- config files


def fake_training(calls):
    """train_model that records where it would train and leaves a finished run there."""

    def train(data, objective, settings, data_settings, run_dir, **kwargs):
        calls.append(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "best.ckpt").write_bytes(b"")
        (run_dir / "settings.json").write_text("{}")
        return run_dir / "best.ckpt"

    return train


def test_printed_config_trains_the_same_cached_model(cli, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench.train, "train_model", fake_training(calls))
    monkeypatch.setattr("bench.train.train_model", fake_training(calls))
    args = ("train", "--objective", "nezha", "--max-epochs", "2", "--transition", "gru", "--lr", "0.001")
    code, printed, _ = cli(*args, "--print-config")
    assert code == 0
    config = yaml.safe_load(printed)
    assert config["model"]["transition"] == "gru" and config["model"]["backbone"] == "qwen-tiny"  # resolved
    assert config["train"]["objective"] == "nezha"
    (tmp_path / "c.yaml").write_text(printed)
    code, out, err = cli("train", "--config", "c.yaml")
    assert code == 0, err
    assert len(calls) == 1
    code, out, _ = cli(*args)  # the same settings from flags: the same cached run
    assert code == 0 and out.startswith(f"already trained with these settings: {calls[0] / 'best.ckpt'}")
    code, out, _ = cli("train", "--config", "c.yaml", "--lr", "0.003")  # a flag overrides the config
    assert code == 0 and len(calls) == 2 and calls[1] != calls[0]


def test_training_the_item_model_takes_full_ranks_backbone_and_cache_entry(cli, monkeypatch):
    """`train --objective next_item` trains the model full_rank asks for (--item-backbone),
    in the cache entry `bench run` would look up; --backbone given picks another."""
    from bench.data import load_dataset
    from bench.settings import ModelSettings
    from bench.train import cache_key
    from decoders import plan

    calls, trained = [], []
    record = fake_training(calls)
    monkeypatch.setattr(bench.train, "train_model", lambda *a, **k: trained.append(a[2]) or record(*a, **k))
    assert cli("train", "--objective", "next_item", "--item-backbone", "sasrec-tiny")[0] == 0
    code, printed, _ = cli("run", "--decoder", "full_rank", "--item-backbone", "sasrec-tiny", "--print-config")
    _, _, requests = plan("full_rank", ModelSettings(**yaml.safe_load(printed)["model"]))
    (request,) = requests.values()
    assert calls[0].name == cache_key(request.objective, request.settings, load_dataset("synthetic"), 0)
    assert trained[0].backbone == "sasrec-tiny"
    assert cli("train", "--objective", "next_item", "--backbone", "sasrec-small")[0] == 0
    assert trained[1].backbone == "sasrec-small" and calls[1].name.startswith("next_item-sasrec-small-")


def test_json_config_and_flags_take_precedence_over_it(cli, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"run": {"k": 7, "decoder": "beam"}, "model": {"max_history": 5}}))
    code, printed, _ = cli("run", "--config", "c.json", "--k", "9", "--print-config")
    config = yaml.safe_load(printed)
    assert code == 0
    assert (config["run"]["k"], config["run"]["decoder"], config["model"]["max_history"]) == (9, "beam", 5)


def test_a_yaml_config_reads_1e_3_as_a_number_as_the_command_line_does(cli, tmp_path):
    """PyYAML's YAML 1.1 reads 1e-3 as text; YAML 1.2 and --lr 1e-3 read a number."""
    (tmp_path / "c.yaml").write_text("model:\n  lr: 1e-3\n  weight_decay: 2E-2\n")
    code, printed, err = cli("tune", "--config", "c.yaml", "--print-config")
    config = yaml.safe_load(printed)
    assert code == 0, err
    assert (config["model"]["lr"], config["model"]["weight_decay"]) == (0.001, 0.02)
    (tmp_path / "c.yaml").write_text("model:\n  lr: '1e-3'\n")  # quoted: text, refused as before
    assert "lr = '1e-3' is not a number" in cli("run", "--config", "c.yaml", "--print-config")[2]


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("model:\n  max_epoch: 3\n", "section model: unknown setting 'max_epoch'"),
        ("model:\n  max_epochs: many\n", "section model: max_epochs = 'many' is not an integer"),
        ("model:\n  dropout: 1.5\n", "section model: dropout 1.5: must be below 1.0"),
        ("run:\n  split: train\n", "section run: split = 'train' is not one of test, valid"),
        ("modle:\n  lr: 0.1\n", "unknown section 'modle'"),
        ("model: [1, 2]\n", "section model: expected a mapping of settings, got list"),
        ("model: {lr: [\n", "is not valid YAML"),
    ],
    ids=["unknown key", "wrong type", "out of range", "bad choice", "unknown section", "not a mapping", "bad YAML"],
)
def test_bad_config_is_one_error_line_naming_the_key(cli, tmp_path, content, fragment):
    (tmp_path / "bad.yaml").write_text(content)
    code, _, err = cli("run", "--config", "bad.yaml", "--print-config")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: config file bad.yaml"), err
    assert fragment in err


def test_checkpoint_settings_are_checked_like_a_config():
    with pytest.raises(BenchError, match="unknown setting 'colour'"):
        from_dict(ModelSettings, {"colour": 3}, "model settings")
    with pytest.raises(BenchError, match="lr = 'fast' is not a number"):
        from_dict(ModelSettings, {"lr": "fast"}, "model settings")
    assert from_dict(ModelSettings, {"lr": 1}, "model settings").lr == 1.0


# ---------------------------------------------------------------- attention backend


def test_only_sdpa_attention_is_accepted(cli):
    code, _, err = cli("run", "--attention", "eager", "--print-config")
    assert code == 2 and "only sdpa is supported" in err and len(err.strip().splitlines()) == 1


def test_sdpa_keeps_the_nezha_training_layout_equal_to_inference_and_eager_would_not():
    """What the pin protects: the training window's placeholder states under its 4D mask equal
    those of the inference prompt under SDPA; under the eager backend the boolean mask
    is added to the scores, so the placeholders see tokens they must not."""
    catalog = random_catalog()
    window = [3, 17, 42, 8]
    batch = objectives.collate_nezha([window], catalog)
    prompt = torch.cat(
        [catalog.item_tokens(torch.tensor(window[:2])).flatten(), torch.tensor(catalog.placeholder_tokens)]
    ).unsqueeze(0)
    gaps = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        lm = build_backbone("qwen-tiny", catalog.vocab_size, 64, attention=attention).eval()
        with torch.no_grad():
            hidden = lm.hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            alone = lm.hidden(prompt, torch.ones_like(prompt))[0]
        gaps[attention] = float((hidden[0, batch["placeholder_index"][1]] - alone[-catalog.levels :]).abs().max())
    assert gaps["sdpa"] < 1e-4
    assert gaps["eager"] > 1e-2


def test_models_are_built_with_sdpa(catalog):
    for objective, backbone in (("ntp", "qwen-tiny"), ("ntp", "t5-tiny"), ("next_item", "sasrec-tiny")):
        model = random_model(objective, catalog, backbone=backbone)
        assert model.lm.core.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- no host lists inside a decode


@pytest.mark.parametrize(
    "spec",
    ["greedy", "beam", "beam:constrained", "nezha", "medusa:constrained", "speculative:constrained"]
    + ["speculative:draft=items", "full_rank"],
)
def test_a_decode_builds_no_tensor_from_python_lists(catalog, monkeypatch, spec):
    models = {
        "ntp": random_model("ntp", catalog),
        "nezha": random_model("nezha", catalog),
        "medusa": random_model("medusa", catalog),
        "draft": random_model("ntp", catalog, backbone="qwen-micro"),
        "next_item": random_model("next_item", catalog, backbone="sasrec-tiny"),
    }
    decoder = build_decoder(spec, catalog, 4, models)
    prompt = random_batch(catalog, users=3)
    decoder.decode(prompt)  # the first call may fill the per-device caches
    built = []
    ours = [str(Path(__file__).parents[1] / package) for package in ("bench", "models", "decoders")]

    def counting(make):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(caller.startswith(folder) for folder in ours):
                built.append(f"{caller}:{sys._getframe(1).f_lineno}")
            return make(*args, **kwargs)

        return counted

    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counting(getattr(torch, name)))
    decoder.decode(prompt)
    assert built == []


# ---------------------------------------------------------------- precision


def test_bf16_runs_every_model_in_bf16_on_the_cpu(cli, tmp_path):
    out = tmp_path / "results.json"
    args = ["run", "--decoder", "beam,nezha", "--untrained", "--backbone", "qwen-micro", "--limit-users", "16"]
    code, _, err = cli(*args, "--dtype", "bf16", "--out", str(out))
    assert code == 0, err
    records = json.loads(out.read_text())
    assert [r["settings"]["run"]["dtype"] for r in records] == ["bf16", "bf16"]
    assert {m["dtype"] for r in records for m in r["models"].values()} == {"bfloat16"}
    assert records[1]["invalid_rate"] == 0.0  # NEZHA's verifier holds in any precision


def test_compiled_models_decode_exactly_as_eager_ones(catalog, monkeypatch):
    """torch.compile (dynamo traces backbone and heads; the eager backend keeps the test
    short, inductor's code generation is what users get) changes no output."""
    monkeypatch.setattr(models.module, "COMPILE_BACKEND", "eager")
    nezha = random_model("nezha", catalog, seed=1)
    batch = random_batch(catalog, users=4, seed=1)
    expected = build_decoder("nezha", catalog, 5, {"nezha": nezha}).decode(batch)
    nezha.compile_modules()
    got = build_decoder("nezha", catalog, 5, {"nezha": nezha}).decode(batch)
    assert torch.equal(got.sids, expected.sids)
    torch.testing.assert_close(got.scores, expected.scores)


def test_compile_flag_compiles_every_model_and_says_so(cli, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(models.module.SidRecommender, "compile_modules", lambda model: compiled.append(model.objective))
    out = tmp_path / "results.json"
    args = ["run", "--decoder", "beam", "--untrained", "--backbone", "qwen-micro", "--limit-users", "8", "--compile"]
    code, _, err = cli(*args, "--out", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())[0]
    assert compiled == ["ntp"] and record["settings"]["run"]["compile"]


def test_fp16_on_the_cpu_is_refused(cli):
    code, _, err = cli("run", "--decoder", "beam", "--untrained", "--dtype", "fp16", "--device", "cpu")
    assert code == 2 and "--dtype fp16 runs on CUDA only" in err and len(err.strip().splitlines()) == 1


def test_synthetic_shape_flags_make_the_dataset_and_are_refused_on_real_data(cli):
    code, out, err = cli("data", "--items", "2000", "--users", "20", "--sequence-length", "6")
    info = json.loads(out)
    assert code == 0, err
    assert (info["items"], info["users"], info["history_length"]["max"]) == (2000, 20, 6)
    assert set(info["verifier"]) == {"build_seconds", "trie_bytes", "hash_set_bytes", "bytes_per_item"}
    code, _, err = cli("data", "--dataset", "beauty", "--items", "2000")
    assert code == 2 and "--items shapes the synthetic dataset only; beauty comes from its files" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli("data", "--items", "5")
    assert code == 2 and "--items 5: must be at least 100" in err


# ---------------------------------------------------------------- presets


def test_a_dataset_with_a_preset_starts_from_it_and_preset_none_from_the_defaults(cli):
    code, printed, _ = cli("run", "--dataset", "beauty", "--print-config")
    preset = yaml.safe_load((Path(bench.settings.__file__).parent / "presets" / "beauty.yaml").read_text())
    model = yaml.safe_load(printed)["model"]
    assert code == 0 and model["per_objective"] == preset["model"]["per_objective"]
    assert model["item_backbone"] == preset["model"]["item_backbone"]
    code, printed, _ = cli("run", "--dataset", "beauty", "--preset", "none", "--print-config")
    assert code == 0 and yaml.safe_load(printed)["model"]["per_objective"] == {}
    code, printed, _ = cli("run", "--preset", "beauty", "--print-config")  # a preset by name, on another dataset
    assert code == 0 and yaml.safe_load(printed)["model"]["per_objective"] == preset["model"]["per_objective"]
    code, printed, _ = cli("run", "--print-config")  # the synthetic default has no preset
    assert code == 0 and yaml.safe_load(printed)["model"]["per_objective"] == {}


def test_config_and_flags_go_over_the_preset_and_per_objective_merges_per_objective(cli, tmp_path):
    config = {"model": {"lr": 0.005, "per_objective": {"ntp": {"dropout": 0.3}, "nezha": {"transition": "gru"}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, printed, err = cli("run", "--dataset", "beauty", "--config", "c.yaml", "--lr", "0.004", "--print-config")
    model = yaml.safe_load(printed)["model"]
    assert code == 0, err
    assert model["lr"] == 0.004
    assert model["per_objective"]["ntp"]["dropout"] == 0.3 and model["per_objective"]["ntp"]["lr_schedule"] == "cosine"
    assert model["per_objective"]["nezha"]["transition"] == "gru"
    preset = yaml.safe_load((Path(bench.settings.__file__).parent / "presets" / "beauty.yaml").read_text())
    assert model["per_objective"]["next_item"]["dropout"] == preset["model"]["per_objective"]["next_item"]["dropout"]


def test_a_setting_given_for_all_objectives_beats_the_presets_per_objective_value(cli, tmp_path):
    """--max-epochs 3 means 3 for every objective, not 3 except where the preset says otherwise."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"dropout": 0.2}}))
    code, printed, err = cli(
        "train", "--dataset", "beauty", "--config", "c.yaml", "--max-epochs", "3", "--print-config"
    )
    model = yaml.safe_load(printed)["model"]
    assert code == 0, err
    for objective in ("ntp", "nezha", "next_item"):
        settings = bench.settings.ModelSettings(**model).for_objective(objective)
        assert (settings.max_epochs, settings.dropout) == (3, 0.2)
        assert settings.lr_schedule == "cosine"  # what the flags and config leave alone still comes from the preset


def test_each_objective_trains_with_its_own_settings_and_no_per_objective_left():
    settings = ModelSettings(
        backbone="qwen-micro", dropout=0.1, per_objective={"next_item": {"dropout": 0.5}, "ntp": {"lr": 0.01}}
    )
    plain = ModelRequest("nezha", settings).settings
    assert (plain.dropout, plain.lr, plain.per_objective) == (0.1, 2e-3, {})
    assert ModelRequest("ntp", settings).settings.lr == 0.01
    item = REGISTRY["full_rank"].requests(REGISTRY["full_rank"].Options(), settings)["next_item"].settings
    assert (item.backbone, item.dropout, item.per_objective) == ("sasrec-small", 0.5, {})
    # a model is named by what it is trained with, not by where a setting came from
    direct = ModelSettings(backbone="qwen-micro", lr=0.01)
    assert ModelRequest("ntp", direct).settings == ModelRequest("ntp", settings).settings


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--preset", "imaginary"), "--preset imaginary: no such preset; choose one of beauty, none"),
        (("--config", "{tmp}/c.yaml"), "per_objective.ntp: 'backbone' cannot differ per objective"),
        (("--config", "{tmp}/o.yaml"), "per_objective.gan: unknown objective; known: ntp, nezha, medusa, next_item"),
        (("--config", "{tmp}/d.yaml"), "per_objective.nezha: dropout 2.0: must be below 1.0"),
        (("--config", "{tmp}/h.yaml"), "per_objective.ntp: 'max_history' cannot differ per objective"),
    ],
    ids=["unknown preset", "backbone per objective", "unknown objective", "out of range", "history per objective"],
)
def test_bad_presets_and_per_objective_settings_are_one_error_line(cli, tmp_path, args, fragment):
    files = {
        "c": {"ntp": {"backbone": "qwen-base"}},
        "o": {"gan": {"lr": 0.1}},
        "d": {"nezha": {"dropout": 2.0}},
        "h": {"ntp": {"max_history": 50}},
    }
    for name, per_objective in files.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"model": {"per_objective": per_objective}}))
    code, _, err = cli("run", *(a.format(tmp=tmp_path) for a in args), "--print-config")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err
