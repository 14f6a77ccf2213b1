"""Issue 8, as one table: every bad input the CLI can be given -- flags, data files,
config files, checkpoints, results files, tokenizer and download settings, Ctrl-C --
ends in exactly one `error: ...` line naming the problem and exit code 2 (130 for
Ctrl-C), with no traceback, before any model is trained, and leaves every file it was
given (an earlier results file above all) byte for byte as it was."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import act_as_owner, random_catalog

import bench.run
import bench.train
from bench.__main__ import main
from bench.data import letter, synthetic
from bench.settings import ModelSettings

RECORD = {  # one record, with every field the leaderboard reads
    "dataset": "synthetic",
    "split": "test",
    "device": "cpu (test)",
    "decoder": "beam",
    "backbone": {"name": "qwen-tiny"},
    "users": 3,
    "k": 20,
    "batch_size": 32,
    "metrics": {"recall@1": 0.1, "recall@10": 0.4, "ndcg@10": 0.25, "recall@20": None, "ndcg@20": None},
    "invalid_rate": 0.0,
    "latency_ms": {"mean": 5.0, "p99": 9.0},
    "backbone_calls_per_batch": 3.0,
    "git_sha": "0123456789abcdef",
    "command": "python -m bench run --decoder beam",
    "timestamp": "2026-11-22T20:00:00+0000",
}
TOY_INDEX = {"i1": ["<a_0>", "<b_1>"], "i2": ["<a_1>", "<b_0>"], "i3": ["<a_1>", "<b_2>"]}
TOY_INTER = {"u1": ["i1", "i2", "i3"], "u2": ["i3", "i1", "i2"]}
RUN = "run --limit-users 3 --out {out}"  # default decoder nezha: a case that got past validation would train
TOY = RUN + " --dataset toy --data-dir {tmp}/toy"
CKPT = RUN + " --decoder nezha --ckpt {tmp}/model.ckpt"


_generate = synthetic.generate


@functools.cache
def _generated(seed: int, users: int, sequence_length: int | None):
    return _generate(seed=seed, users=users, sequence_length=sequence_length)


def cached_generate(seed: int = 0, users: int = 3000, sequence_length: int | None = None):
    """The synthetic data, generated once per shape for the whole module (a copy each time)."""
    return copy.deepcopy(_generated(seed, users, sequence_length))


# ---------------------------------------------------------------- file builders (setups)


def write(name: str, content):
    """A setup writing tmp/<name> (bytes, text, or anything else as JSON)."""

    def setup(tmp: Path, monkeypatch, request):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))

    return setup


def both(*setups):
    def setup(tmp, monkeypatch, request):
        for one in setups:
            one(tmp, monkeypatch, request)

    return setup


def toy(inter=TOY_INTER, index=TOY_INDEX, stem: str = "Toy", folder: str = "toy"):
    """A LETTER folder tmp/<folder> with <stem>.inter.json and <stem>.index.json (None: left out)."""
    files = [
        write(f"{folder}/{stem}.{kind}.json", c) for kind, c in (("inter", inter), ("index", index)) if c is not None
    ]
    return both(*files)


def folder(name: str):
    def setup(tmp, monkeypatch, request):
        (tmp / name).mkdir(parents=True)

    return setup


def read_only(name: str):
    """tmp/<name> (a file, or a folder) read-only, as an ordinary owner sees it: root may
    write anything, so under root os.access reads the owner's permission bits (see
    test_hardening's as_owner)."""

    def setup(tmp, monkeypatch, request):
        (tmp / name).chmod(0o555 if (tmp / name).is_dir() else 0o444)
        act_as_owner(monkeypatch)

    return setup


def symlink_loop(name: str):
    """tmp/<name> -> tmp/<name>.2 -> tmp/<name>: a link that leads nowhere."""

    def setup(tmp, monkeypatch, request):
        (tmp / name).symlink_to(tmp / f"{name}.2")
        (tmp / f"{name}.2").symlink_to(tmp / name)

    return setup


def bad_download_url(tmp, monkeypatch, request):
    (tmp / "cache").mkdir()
    monkeypatch.setenv(letter.CACHE_ENV, str(tmp / "cache"))
    monkeypatch.setenv(letter.URL_ENV, "http://host/{nam}/{file}")
    monkeypatch.setattr(letter, "shared_dir", lambda name: None)  # it must be downloaded


def broken_download(tmp, monkeypatch, request):
    """The download cache holds a truncated copy of the instruments files, as downloaded
    (their sha256 kept beside them)."""
    folder = tmp / "cache" / "instruments"
    toy(inter='{"u1": ["i1",', stem="Instruments", folder="cache/instruments")(tmp, monkeypatch, request)
    sums = {kind: letter.sha256_of(folder / f"Instruments.{kind}.json") for kind in ("inter", "index")}
    (folder / "sha256.json").write_text(json.dumps(sums))
    monkeypatch.setenv(letter.CACHE_ENV, str(tmp / "cache"))
    monkeypatch.setattr(letter, "shared_dir", lambda name: None)  # it must come from the cache


def ctrl_c(tmp, monkeypatch, request):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.run, "benchmark", interrupted)


class RunsCode:
    """Pickled, it asks the unpickler to call os.system: loading it would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_payload(tmp, monkeypatch, request):
    torch.save({"hyper_parameters": RunsCode(tmp / "pwned"), "state_dict": {}}, tmp / "model.ckpt")


@pytest.fixture(scope="module")
def real_checkpoints():
    """The parts of real checkpoints: a NEZHA and an NTP model on the synthetic catalogue
    and a NEZHA model on a tiny catalogue of another shape."""
    from bench.data import load_dataset
    from models.module import SidRecommender

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "generate", cached_generate)
        data = load_dataset("synthetic")
    settings = ModelSettings(backbone="qwen-micro")
    torch.manual_seed(0)
    made = {}
    for name, objective, catalog in (
        ("nezha", "nezha", data.catalog),
        ("ntp", "ntp", data.catalog),
        ("other", "nezha", random_catalog()),
    ):
        model = SidRecommender.for_catalog(objective, settings, catalog)
        made[name] = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    return made


def checkpoint(kind: str = "nezha", hparams=None, settings=None, drop=()):
    """A setup saving tmp/model.ckpt: a real checkpoint of `kind`, its hyper_parameters
    updated by `hparams` and its model settings by `settings`, keys in `drop` left out."""

    def setup(tmp, monkeypatch, request):
        real = request.getfixturevalue("real_checkpoints")[kind]
        saved = {"hyper_parameters": copy.deepcopy(real["hyper_parameters"]), "state_dict": real["state_dict"]}
        saved["hyper_parameters"].update(hparams or {})
        saved["hyper_parameters"]["settings"].update(settings or {})
        for key in drop:
            saved.pop(key)
        torch.save(saved, tmp / "model.ckpt")

    return setup


# ---------------------------------------------------------------- the table

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid on this machine")


def case(id: str, argv: str, fragment: str, setup=None, code: int = 2, marks=()):
    """argv: the command line; {tmp} is the test's folder, {out} a results file already
    holding one record."""
    return pytest.param(argv, fragment, setup, code, id=id, marks=marks)


CASES = [
    # ---- the command line: values, bounds, names
    case("no command", "", "the following arguments are required: command"),
    case("unknown command", "nosuch", "invalid choice: 'nosuch'"),
    case("unknown flag", RUN + " --nosuch", "unrecognized arguments: --nosuch"),
    case("k not an integer", RUN + " --k x", "argument --k: 'x' is not an integer"),
    case("k a fraction", RUN + " --k 2.5", "argument --k: '2.5' is not an integer"),
    case("lr not a number", RUN + " --lr fast", "argument --lr: 'fast' is not a number"),
    case("split not a choice", RUN + " --split train", "argument --split: 'train' is not one of test, valid"),
    case("collisions not a choice", RUN + " --collisions middle", "'middle' is not one of last_code, extra_level"),
    case("flag given a value", RUN + " --constrained=yes", "--constrained"),
    case("k 0", RUN + " --k 0", "--k 0: must be at least 1"),
    case("k above the items", RUN + " --k 601", "--k 601 is above the 600 items of the 'synthetic' catalogue"),
    case("batch-size 0", RUN + " --batch-size 0", "--batch-size 0: must be at least 1"),
    case("train-batch-size 0", RUN + " --train-batch-size 0", "--train-batch-size 0: must be at least 1"),
    case("train-batch-size -5", RUN + " --train-batch-size -5", "--train-batch-size -5: must be at least 1"),
    case("dropout 1", RUN + " --dropout 1", "--dropout 1.0: must be below 1.0"),
    case("dropout -0.1", RUN + " --dropout -0.1", "--dropout -0.1: must be at least 0.0"),
    case("max-epochs 0", RUN + " --max-epochs 0", "--max-epochs 0: must be at least 1"),
    case("warmup -1", RUN + " --warmup -1", "--warmup -1: must be at least 0"),
    case("limit-users 0", RUN.replace("3", "0"), "--limit-users 0: must be at least 1"),
    case("sample-users 0", RUN + " --sample-users 0", "--sample-users 0: must be at least 1"),
    case("limit and sample users", RUN + " --sample-users 5", "--limit-users and --sample-users both choose the users"),
    case("device meta", RUN + " --device meta", "--device meta: decoding runs on cpu or cuda"),
    case("device nosuch", RUN + " --device nosuch", "unknown device 'nosuch'"),
    case("device cuda without a GPU", RUN + " --device cuda", "torch sees no CUDA device", marks=no_gpu),
    case("attention eager", RUN + " --attention eager", "--attention eager: only sdpa is supported"),
    case("dropout nan", RUN + " --dropout nan", "--dropout nan: must be a finite number"),
    case("lr inf", RUN + " --lr inf", "--lr inf: must be a finite number"),
    case("lr negative", RUN + " --lr -1", "--lr -1.0: must be at least 0.0"),
    case("width over heads", RUN + " --width 30 --heads 4", "qwen-tiny: width 30 is not divisible by 4 heads"),
    case(
        "odd rotary head size",
        RUN + " --width 30 --heads 2",
        "qwen-tiny: width 30 over 2 heads gives heads of 15 dimensions; rotary position embeddings need an even",
    ),
    case("max-history 0", RUN + " --max-history 0", "--max-history 0: must be at least 1"),
    case("patience -1", RUN + " --patience -1", "--patience -1: must be at least 0"),
    case("val-users -1", RUN + " --val-users -1", "--val-users -1: must be at least 0"),
    case("seed -1", RUN + " --seed -1", "--seed -1: must be at least 0"),
    case("seed above 32 bits", RUN + " --seed 4294967296", "--seed 4294967296: must be at most 4294967295"),
    case("ablate k above the items", "ablate --limit-users 3 --out {out} --k 601", "--k 601 is above the 600 items"),
    # ---- decoder specs
    case("unknown decoder", RUN + " --decoder greedy,nosuch", "unknown decoder 'nosuch'"),
    case("unknown decoder option", RUN + " --decoder beam:foo", "unknown option 'foo' in decoder spec 'beam:foo'"),
    case("option of a decoder without options", RUN + " --decoder popularity:x", "popularity takes no options"),
    case(
        "option without a value",
        RUN + " --decoder nezha:head_beam",
        "option 'head_beam' in 'nezha:head_beam' needs a value",
    ),
    case("nezha verifier not a choice", RUN + " --decoder nezha:verifier=x", "'x' is not one of every, last, off"),
    case("nezha head_beam not a number", RUN + " --decoder nezha:head_beam=wide", "'wide' is not an integer"),
    case("nezha head_beam negative", RUN + " --decoder nezha:head_beam=-1", "head_beam -1: must be at least 0"),
    case("nezha head_beam above the prefixes", RUN + " --decoder nezha:head_beam=100000", "above the 256 prefixes"),
    case("beam width below K", RUN + " --decoder beam:width=5", "beam: width=5 is below K=20"),
    case("hf_beam width above the prefixes", RUN + " --decoder hf_beam:width=300", "above the 256 prefixes"),
    case("nezha head_beam below K", RUN + " --decoder nezha:head_beam=5", "head_beam=5 is below K=20"),
    case("speculative draft_beam below K", RUN + " --decoder speculative:draft_beam=5", "draft_beam=5 is below K=20"),
    case(
        "speculative draft_beam above the code space",
        RUN + " --decoder speculative:draft_beam=9000",
        "above the 8192 SIDs",
    ),
    case(
        "speculative item draft above the catalogue",
        RUN + " --decoder speculative:draft=items:draft_beam=700",
        "draft_beam=700 is above the catalogue's 600 items",
    ),
    case(
        "medusa tree of wrong depth",
        RUN + " --decoder medusa:tree=20x3",
        "tree '20x3' has 2 widths; the SIDs have 3 levels",
    ),
    case("medusa tree not numbers", RUN + " --decoder medusa:tree=axb", "tree 'axb' must be 3 numbers joined by x"),
    case(
        "medusa tree too wide",
        RUN + " --decoder medusa:tree=16x3x99",
        "tree width 99 at level 3 must be between 0 and 32",
    ),
    case(
        "medusa tree wider than level 1",
        RUN + " --decoder medusa:tree=20x3x0",
        "tree width 20 at level 1 must be between 1 and 16",
    ),
    case(
        "medusa tree width 0 inside",
        RUN + " --decoder medusa:tree=16x0x0",
        "tree width 0 at level 2 must be between 1 and 16",
    ),
    case("empty decoder list", RUN + " --decoder ,", "--decoder names no decoder"),
    case(
        "decoder option given twice",
        RUN + " --decoder nezha:verifier=last:verifier=off",
        "option 'verifier' is given twice in decoder spec 'nezha:verifier=last:verifier=off'",
    ),
    case("decoder flag option not a flag", RUN + " --decoder beam:constrained=maybe", "'maybe' is not a flag value"),
    case("medusa on t5", RUN + " --decoder medusa --backbone t5-tiny", "decoder 'medusa' cannot run on t5-tiny"),
    case(
        "speculative on t5",
        RUN + " --decoder speculative --backbone t5-tiny",
        "decoder 'speculative' cannot run on t5-tiny",
    ),
    case(
        "beam on sasrec", RUN + " --decoder beam --backbone sasrec-small", "decoder 'beam' cannot run on sasrec-small"
    ),
    case(
        "full_rank on a SID model",
        RUN + " --decoder full_rank --item-backbone qwen-tiny",
        "decoder 'full_rank' cannot run on qwen-tiny",
    ),
    case("unknown backbone", RUN + " --backbone gpt-huge", "unknown backbone 'gpt-huge'"),
    case("unknown draft backbone", RUN + " --decoder speculative --draft-backbone nosuch", "unknown backbone 'nosuch'"),
    # ---- datasets by name and folder
    case("dataset name a path", RUN + " --dataset ../../x", "dataset name '../../x' is not a name"),
    case("unknown dataset", RUN + " --dataset nosuch", "unknown dataset 'nosuch'"),
    case(
        "data-dir missing", RUN + " --dataset toy --data-dir {tmp}/nowhere", "data folder {tmp}/nowhere does not exist"
    ),
    case("data-dir without a name", RUN + " --data-dir {tmp}/toy", "--data-dir {tmp}/toy needs the dataset's name", toy()),
    case(
        "download URL with a bad placeholder",
        RUN + " --dataset instruments",
        "BENCH_DATA_URL='http://host/{{nam}}/{{file}}' is not a URL template",
        bad_download_url,
    ),
    case(
        "download broken in the cache",
        RUN + " --dataset instruments",
        "it is a download: delete {tmp}/cache/instruments to download it again",
        broken_download,
    ),
    # ---- data files
    case("data invalid JSON", TOY, "Toy.inter.json: not valid JSON", toy(inter='{"u1": ["i1",')),
    case(
        "data duplicate user",
        TOY,
        "key 'u1' appears more than once",
        toy(inter='{"u1": ["i1", "i2", "i3"], "u1": ["i3", "i2", "i1"]}'),
    ),
    case("data deeply nested", TOY, "nested too deeply", toy(inter="[" * 100_000)),
    case("data binary", TOY, "Toy.index.json: not a UTF-8 text file", toy(index=b"\x80\x81PK\x03\x04\xff")),
    case("data index not an object", TOY, "expected a non-empty object mapping item id", toy(index=["<a_1>"])),
    case(
        "data SIDs of unequal length",
        TOY,
        "item 'i2' has 3 SID tokens but item 'i1' has 2",
        toy(index={**TOY_INDEX, "i2": ["<a_1>", "<b_0>", "<c_0>"]}),
    ),
    case(
        "data malformed token",
        TOY,
        "item 'i2' has token 'a_1' at level 1",
        toy(index={**TOY_INDEX, "i2": ["a_1", "<b_0>"]}),
    ),
    case(
        "data token of another level",
        TOY,
        "item 'i2' has token '<b_1>' at level 1",
        toy(index={**TOY_INDEX, "i2": ["<b_1>", "<b_0>"]}),
    ),
    case(
        "data huge SID code",
        TOY,
        "item 'i2' has token '<a_99999999999>' at level 1; codes go up to 1048575",
        toy(index={**TOY_INDEX, "i2": ["<a_99999999999>", "<b_0>"]}),
    ),
    case(
        "data code space beyond 64 bits",
        TOY,
        "SID code space",
        toy(
            index={
                i: ["<a_1048575>", "<b_1048575>", "<c_1048575>", f"<d_{n}>"]
                for i, n in (("i1", 0), ("i2", 1), ("i3", 1048575))
            }
        ),
    ),
    case(
        "data item without a SID",
        TOY,
        "user 'u1' has item 'i9', which has no SID in Toy.index.json",
        toy(inter={"u1": ["i1", "i9", "i3"]}),
    ),
    case("data empty user", TOY, "user 'u2' has no interactions", toy(inter={**TOY_INTER, "u2": []})),
    case("data user not a list", TOY, "user 'u2' maps to str", toy(inter={**TOY_INTER, "u2": "i1"})),
    case("data no user long enough", TOY, "no user with 3 or more items", toy(inter={"u1": ["i1", "i2"]})),
    case("data missing index file", TOY, "missing Toy.index.json", toy(index=None)),
    case("data no inter file", TOY, "no *.inter.json file in {tmp}/toy", toy(inter=None)),
    case("data two inter files", TOY, "several *.inter.json files", both(toy(), toy(stem="Other"))),
    case(
        "data changed copy under a pinned name",
        RUN + " --dataset beauty --data-dir {tmp}/toy",
        "expected 8809584b",
        toy(stem="Beauty"),
    ),
    # ---- config files
    case("config missing", RUN + " --config {tmp}/nowhere.yaml", "config file {tmp}/nowhere.yaml does not exist"),
    case(
        "config a folder",
        RUN + " --config {tmp}/configs",
        "config file {tmp}/configs is no regular file; pass a YAML or JSON file of settings",
        folder("configs"),
    ),
    case("config invalid YAML", RUN + " --config {tmp}/c.yaml", "is not valid YAML", write("c.yaml", "model: [1, 2\n")),
    case("config invalid JSON", RUN + " --config {tmp}/c.json", "is not valid JSON", write("c.json", '{"model": ')),
    case(
        "config YAML key twice",
        RUN + " --config {tmp}/c.yaml",
        "is not valid YAML (key 'lr' is given twice (line 3); give it once)",
        write("c.yaml", "model:\n  lr: 0.1\n  lr: 0.2\n"),
    ),
    case(
        "config JSON key twice",
        RUN + " --config {tmp}/c.json",
        "is not valid JSON (key 'model' is given twice; give it once)",
        write("c.json", '{"model": {"lr": 0.1}, "model": {"lr": 0.2}}'),
    ),
    case(
        "config binary",
        RUN + " --config {tmp}/c.yaml",
        "is not a readable text config",
        write("c.yaml", b"\xff\xfe\x00\x80"),
    ),
    case(
        "config not sections",
        RUN + " --config {tmp}/c.yaml",
        "expected sections such as data:",
        write("c.yaml", "- 1\n- 2\n"),
    ),
    case(
        "config unknown section",
        RUN + " --config {tmp}/c.yaml",
        "unknown section 'modle'",
        write("c.yaml", "modle: {dropout: 0.2}\n"),
    ),
    case(
        "config unknown key",
        RUN + " --config {tmp}/c.yaml",
        "section model: unknown setting 'dropuot'",
        write("c.yaml", "model: {dropuot: 0.2}\n"),
    ),
    case(
        "config wrong type",
        RUN + " --config {tmp}/c.yaml",
        "max_epochs = 'many' is not an integer",
        write("c.yaml", "model: {max_epochs: many}\n"),
    ),
    case(
        "config bool not a bool",
        RUN + " --config {tmp}/c.json",
        "constrained = 'yes' is not a flag",
        write("c.json", '{"run": {"constrained": "yes"}}'),
    ),
    case(
        "config out of range",
        RUN + " --config {tmp}/c.yaml",
        "section model: dropout 2.0: must be below 1.0",
        write("c.yaml", "model: {dropout: 2.0}\n"),
    ),
    case(
        "config section not a mapping",
        RUN + " --config {tmp}/c.yaml",
        "section run: expected a mapping of settings, got int",
        write("c.yaml", "run: 3\n"),
    ),
    case(
        "config attention eager",
        RUN + " --config {tmp}/c.yaml",
        "only sdpa is supported",
        write("c.yaml", "model: {attention: eager}\n"),
    ),
    case(
        "config NaN",
        RUN + " --config {tmp}/c.json",
        "section model: lr nan: must be a finite number",
        write("c.json", '{"model": {"lr": NaN}}'),
    ),
    case(
        "config seed not a number",
        "data --config {tmp}/c.yaml",
        "section data: seed = '7' is not an integer",
        write("c.yaml", "data: {seed: '7'}\n"),
    ),
    # ---- checkpoints
    case("ckpt missing", CKPT, "checkpoint {tmp}/model.ckpt does not exist"),
    case(
        "ckpt a text file",
        CKPT,
        "{tmp}/model.ckpt is not a readable checkpoint",
        write("model.ckpt", "not a checkpoint\n"),
    ),
    case(
        "ckpt with a code payload",
        CKPT,
        "holds more than tensors and plain data (loading it could run code)",
        code_payload,
    ),
    case(
        "ckpt a bare tensor",
        CKPT,
        "is not a checkpoint of this suite",
        lambda tmp, mp, rq: torch.save(torch.zeros(3), tmp / "model.ckpt"),
    ),
    case(
        "ckpt without hyper_parameters",
        CKPT,
        "is not a checkpoint of this suite",
        checkpoint(drop=["hyper_parameters"]),
    ),
    case("ckpt without state_dict", CKPT, "does not match its recorded model", checkpoint(drop=["state_dict"])),
    case(
        "ckpt unknown hyper-parameter",
        CKPT,
        "records unknown settings (temperature)",
        checkpoint(hparams={"temperature": 0.5}),
    ),
    case(
        "ckpt setting of a wrong type",
        CKPT,
        "model settings: max_epochs = 'many' is not an integer",
        checkpoint(settings={"max_epochs": "many"}),
    ),
    case(
        "ckpt unknown setting", CKPT, "model settings: unknown setting 'colour'", checkpoint(settings={"colour": "red"})
    ),
    case("ckpt of another catalogue", CKPT, "was trained on dataset 'toy'", checkpoint("other")),
    case(
        "ckpt of another NEZHA variant",
        CKPT.replace("nezha", "nezha:transition=gru"),
        "nezha: transition=gru asked for, but the model was trained with transition=rnn",
        checkpoint("nezha"),
    ),
    case(
        "ckpt of another backbone than asked for",
        RUN + " --decoder beam --backbone llama-tiny --ckpt {tmp}/model.ckpt",
        "checkpoint {tmp}/model.ckpt holds a qwen-micro model of another shape than backbone=llama-tiny asks for; "
        "drop --backbone (the checkpoint's model decodes)",
        checkpoint("ntp"),
    ),
    case(
        "ckpt of another width than asked for",
        RUN + " --decoder beam --width 64 --ckpt {tmp}/model.ckpt",
        "holds a qwen-micro model of another shape than width=64 asks for; drop --width",
        checkpoint("ntp"),
    ),
    case(
        "medusa heads on a ckpt of another shape than they would train on",
        RUN + " --decoder medusa --ckpt {tmp}/model.ckpt",
        "checkpoint {tmp}/model.ckpt holds a qwen-micro (width 32, layers 1, heads 2) model, but the medusa model "
        "that starts from it would be qwen-tiny (width 64, layers 2, heads 4); pass --backbone qwen-micro --width 32 "
        "--layers 1 --heads 2, or a checkpoint of that shape",
        checkpoint("ntp"),
    ),
    case(
        "train medusa from a ckpt of another width",
        "train --objective medusa --backbone qwen-micro --width 64 --init-from {tmp}/model.ckpt",
        "holds a qwen-micro (width 32, layers 1, heads 2) model, but the medusa model that starts from it would be "
        "qwen-micro (width 64, layers 1, heads 2)",
        checkpoint("ntp"),
    ),
    case(
        "ckpt a folder",
        RUN + " --decoder nezha --ckpt {tmp}/run",
        "checkpoint {tmp}/run is a folder; pass the .ckpt file in it (best.ckpt of a run folder)",
        folder("run"),
    ),
    case(
        "ckpt of another objective",
        CKPT,
        "was trained with objective 'ntp', but the chosen decoders need: nezha",
        checkpoint("ntp"),
    ),
    case(
        "ckpt of another objective beside a draft",  # a draft is an NTP model: no objective 'draft' to train
        CKPT.replace("nezha", "speculative"),
        "was trained with objective 'nezha', but the chosen decoders need: ntp; "
        "train one with: python -m bench train --objective ntp",
        checkpoint("nezha"),
    ),
    case(
        "ckpt for a decoder without a model",
        CKPT.replace("nezha", "popularity"),
        "checkpoint {tmp}/model.ckpt: the chosen decoders use no trained model; drop --ckpt {tmp}/model.ckpt",
        checkpoint("ntp"),
    ),
    # ---- results files
    case(
        "results invalid JSON",
        RUN.replace("{out}", "{tmp}/bad.json"),
        "bad.json is not a results file (invalid JSON at line 1)",
        write("bad.json", '[{"decoder": "beam"},'),
    ),
    case(
        "results not a list",
        RUN.replace("{out}", "{tmp}/bad.json"),
        "expected a JSON list of records",
        write("bad.json", {"decoder": "beam"}),
    ),
    case(
        "results binary",
        RUN.replace("{out}", "{tmp}/bad.json"),
        "bad.json is not a results file (not UTF-8 text)",
        write("bad.json", b"\x80\x81PK\x03\x04\xff"),
    ),
    case(
        "results a list of something else",
        RUN.replace("{out}", "{tmp}/bad.json"),
        "bad.json is not a results file (entry 1 of its list is no record)",
        write("bad.json", [1, 2, 3]),
    ),
    case("results a folder", RUN.replace("{out}", "{tmp}/runs-out"), "runs-out is a folder", folder("runs-out")),
    case("decoder twice", RUN + " --decoder beam,nezha,beam", "--decoder names beam twice"),
    case(
        "decoder twice in two spellings",
        RUN + " --decoder beam:width=30,nezha,beam:width=+30",
        "--decoder names beam:width=+30 twice; name each once",
    ),
    case(
        "decoder option without a value",
        RUN + " --decoder medusa:tree=",
        "option 'tree' in 'medusa:tree=' needs a value",
    ),
    case(
        "decoder twice with constrained",
        RUN + " --decoder beam,beam:constrained --constrained",
        "--decoder names beam:constrained twice (with --constrained)",
    ),
    case(
        "profile a file",
        RUN + " --profile {out}",
        "results.json is a file, not a folder; choose another folder for the profiler tables",
    ),
    case("ckpt and untrained", RUN + " --untrained --ckpt {out}", "--ckpt gives trained weights and --untrained"),
    case(
        "sweep with a later value that cannot run",
        "sweep --untrained --limit-users 3 --decoder beam --out {out} --vary k=1,700",
        "--k 700 is above the 600 items",
    ),
    case(
        "sweep over a file that is no sweep table",
        "sweep --untrained --limit-users 3 --decoder beam --out {out} --vary k=5,10",
        "results-k.md exists and is no sweep table of this suite; pass another --out or --out-dir",
        write("results-k.md", "my notes\n"),
    ),
    case(
        "sweep with a value twice",
        "sweep --untrained --limit-users 3 --decoder beam --out {out} --vary repeats=1,2,01",
        "--vary repeats: the value 1 is given twice; give each value once",
    ),
    case(
        "sweep with a later device that cannot run",
        "sweep --untrained --limit-users 3 --decoder beam --out {out} --vary device=cpu,mps",
        "--device mps: decoding runs on cpu or cuda, not on mps",
    ),
    case(
        "sweep with a later dataset that does not exist",
        "sweep --untrained --limit-users 3 --decoder beam --out {out} --vary dataset=synthetic,nosuch",
        "unknown dataset 'nosuch'",
    ),
    case(
        "sweep with a later data folder that does not exist",
        "sweep --untrained --limit-users 3 --decoder beam --k 2 --dataset toy --out {out} "
        "--vary data_dir={tmp}/toy,{tmp}/gone",
        "data folder {tmp}/gone does not exist",
        toy(),
    ),
    case(
        "sweep with a later value random beside a ckpt",
        "sweep --limit-users 3 --decoder beam --ckpt {tmp}/model.ckpt --out {out} --vary untrained=false,true",
        "--ckpt gives trained weights and --untrained asks for random ones",
    ),
    case(
        "sweep with a later dtype that cannot run",
        "sweep --untrained --limit-users 3 --decoder beam --device cpu --out {out} --vary dtype=fp32,fp16",
        "--dtype fp16 runs on CUDA only",
    ),
    case("leaderboard over its own input", "leaderboard {out} --out {out}", "holds JSON (records are never"),
    case(
        "leaderboard over another results file",
        "leaderboard {out} --out {tmp}/other.json",
        "other.json holds JSON",
        write("other.json", [RECORD]),
    ),
    case(
        "leaderboard board over an unrelated file",
        "leaderboard {out} --out-dir {tmp} --name notes",
        "notes.json exists and is no leaderboard of this suite",
        write("notes.json", {"unrelated": True}),
    ),
    case("results below a file", RUN.replace("{out}", "{out}/more.json"), "results.json is a file", None),
    case("results read-only", RUN, "results.json is read-only", read_only("results.json")),
    case(
        "leaderboard out-dir below a file",
        "leaderboard {out} --out-dir {tmp}/taken/boards",
        "--out-dir: {tmp}/taken is a file, not a folder; choose another folder for the tables and plots",
        write("taken", ""),
    ),
    case(
        "leaderboard out-dir that cannot be made",
        "leaderboard {out} --out-dir /proc/boards",
        "--out-dir: cannot write in /proc (",
        marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system"),
    ),
    case(
        "leaderboard runner out-dir below a file",
        "leaderboard --decoder greedy --untrained --limit-users 3 --out-dir {tmp}/taken/boards",
        "--out-dir: {tmp}/taken is a file, not a folder; choose another folder for the tables and plots",
        write("taken", ""),
    ),
    case(
        "sweep out-dir below a file",
        "sweep --vary batch_size=1,2 --decoder greedy --untrained --limit-users 3 --out {out} --out-dir {tmp}/taken/t",
        "--out-dir: {tmp}/taken is a file, not a folder; choose another folder for the table and plot",
        write("taken", ""),
    ),
    case(
        "leaderboard file given twice",
        "leaderboard {out} {out} --out-dir {tmp}/boards",
        "the run at 2026-11-22T20:00:00+0000 (synthetic, cpu (test)) holds decoder beam twice: is a results file "
        "given twice, or beside a copy of it? give each run's records once (nothing was written)",
    ),
    case(
        "leaderboard file beside its copy",
        "leaderboard {out} {tmp}/copy.json",
        "the run at 2026-11-22T20:00:00+0000 (synthetic, cpu (test)) holds decoder beam twice",
        write("copy.json", [RECORD]),
    ),
    case("leaderboard without files", "leaderboard --out {out}", "leaderboard needs result files"),
    case("leaderboard missing file", "leaderboard {tmp}/typo.json --out {out}", "typo.json: no such results file"),
    case(
        "leaderboard not records",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 is not a JSON object",
        write("odd.json", ["beam"]),
    ),
    case(
        "leaderboard records without fields",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 lacks",
        write("odd.json", [{"decoder": "beam"}]),
    ),
    case(
        "leaderboard input a folder",
        "leaderboard {tmp}/runs-out --out {out}",
        "runs-out is a folder",
        folder("runs-out"),
    ),
    case("leaderboard out a folder", "leaderboard {out} --out {tmp}/board", "board is a folder", folder("board")),
    case(
        "results a symlink loop",
        RUN.replace("{out}", "{tmp}/loop"),
        "loop cannot be followed (Too many levels of symbolic links); pass another --out",
        symlink_loop("loop"),
    ),
    case(
        "results deeply nested",
        RUN.replace("{out}", "{tmp}/bad.json"),
        "bad.json is not a results file (JSON nested too deeply)",
        write("bad.json", "[" * 100_000),
    ),
    case(
        "results in a read-only folder",
        RUN.replace("{out}", "{tmp}/locked/results.json"),
        "cannot write in {tmp}/locked (permission denied)",
        both(folder("locked"), read_only("locked")),
    ),
    case(
        "leaderboard metric not a number",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 has malformed metrics recall@1",
        write("odd.json", [{**RECORD, "metrics": {**RECORD["metrics"], "recall@1": "high"}}]),
    ),
    case(
        "leaderboard hits of users beyond the run",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 has malformed hits",
        write("odd.json", [{**RECORD, "hits": {"users": [0, 10**6], "ranks": [1, 2]}}]),
    ),
    case(
        "leaderboard latency not a mapping",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 has malformed latency_ms",
        write("odd.json", [{**RECORD, "latency_ms": 5.0}]),
    ),
    case(
        "leaderboard fields of wrong types",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 has malformed dataset, git_sha, invalid_rate, backbone",
        write("odd.json", [{**RECORD, "dataset": ["x"], "git_sha": 5, "invalid_rate": "x", "backbone": "qwen"}]),
    ),
    case(
        "leaderboard dataset that is a path",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed dataset;",
        write("odd.json", [{**RECORD, "dataset": "../elsewhere/x"}]),
    ),
    case(
        "leaderboard numbers that are no figures",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json: record 1 has malformed k, batch_size, metrics recall@10, latency_ms",
        write(
            "odd.json",
            '[{"dataset": "synthetic", "split": "test", "device": "cpu", "decoder": "beam", "users": 3, "k": "20", '
            '"batch_size": 0, "metrics": {"recall@1": 0.1, "recall@10": 1e309, "ndcg@10": 0.2, "recall@20": null, '
            '"ndcg@20": null}, "invalid_rate": 0, "latency_ms": {"mean": NaN, "p99": Infinity}, '
            '"backbone_calls_per_batch": 3, "git_sha": "0", "command": "c", "timestamp": "t"}]',
        ),
    ),
    case(
        "leaderboard figures out of their range",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed invalid_rate, backbone_calls_per_batch, metrics recall@10, metrics ndcg@10, "
        "latency_ms, latency_over_floor;",
        write(
            "odd.json",
            [
                {
                    **RECORD,
                    "metrics": {**RECORD["metrics"], "recall@10": -3.0, "ndcg@10": 1.5},
                    "invalid_rate": 2,
                    "backbone_calls_per_batch": -1.0,
                    "latency_ms": {"mean": -5.0, "p99": 9.0},
                    "latency_over_floor": -2.0,
                }
            ],
        ),
    ),
    case(
        "leaderboard metrics that are not those of the hits",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed hits (not those of its metrics recall@10);",
        write("odd.json", [{**RECORD, "hits": {"users": [0], "ranks": [1]}}]),
    ),
    case(
        "leaderboard fields a row reads of wrong types",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed torch, seed, candidates_per_user, latency_ms, draft_calls_per_batch, "
        "latency_repeats;",
        write(
            "odd.json",
            [
                {
                    **RECORD,
                    "torch": 2,
                    "seed": "0",
                    "candidates_per_user": 21,
                    "latency_ms": {"mean": 5.0, "p50": "fast"},
                    "draft_calls_per_batch": "x",
                    "latency_repeats": "3",
                }
            ],
        ),
    ),
    case(
        "leaderboard pass latencies that are no list",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed latency_p50_per_pass;",
        write("odd.json", [{**RECORD, "latency_repeats": 3, "latency_p50_per_pass": 5.0}]),
    ),
    case(
        "leaderboard hits ranked beyond k",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed hits;",
        write("odd.json", [{**RECORD, "hits": {"users": [0], "ranks": [10**30]}}]),
    ),
    case(
        "leaderboard more users than any run",
        "leaderboard {tmp}/odd.json --out-dir {tmp}/boards",
        "odd.json: record 1 has malformed users;",
        write("odd.json", [{**RECORD, "users": 10**12, "hits": {"users": [0], "ranks": [1]}}]),
    ),
    case(
        "results with an integer of 5000 digits",
        RUN.replace("{out}", "{tmp}/big.json"),
        "big.json is not a results file (Exceeds the limit (4300 digits) for integer string conversion",
        write("big.json", '[{"decoder": "beam", "k": 1' + "0" * 4999 + "}]"),
    ),
    case(
        "data with an integer of 5000 digits",
        TOY,
        "Toy.inter.json: not a LETTER file (Exceeds the limit (4300 digits)",
        toy(inter='{"u1": [1' + "0" * 4999 + "]}"),
    ),
    case("repeats huge", RUN + " --repeats 1000000000", "--repeats 1000000000: must be at most 1000"),
    case(
        "leaderboard deeply nested",
        "leaderboard {tmp}/odd.json --out {out}",
        "odd.json is not a results file (JSON nested too deeply)",
        write("odd.json", "[" * 100_000),
    ),
    # ---- tokenize and train
    case("tokenize out-dir a file", "tokenize --out-dir {tmp}/taken", "taken is a file", write("taken", "")),
    case(
        "tokenize more codes than items",
        "tokenize --codes 1000 --levels 1 --out-dir {tmp}/tok",
        "1000 codes per level for 600 items",
    ),
    case("tokenize levels 0", "tokenize --levels 0", "--levels 0: must be at least 1"),
    case("tokenize codes 1", "tokenize --codes 1", "--codes 1: must be at least 2"),
    case(
        "tokenize vectors missing",
        "tokenize --vectors {tmp}/nowhere.npy --out-dir {tmp}/tok",
        "nowhere.npy: not a readable .npy array",
    ),
    case(
        "train next_item on a SID backbone",
        "train --objective next_item --backbone qwen-tiny",
        "objective next_item needs an item-embedding backbone",
    ),
    case("train medusa without a backbone", "train --objective medusa", "pass --init-from NTP.ckpt"),
    case("train resume missing", "train --resume {tmp}/last.ckpt", "--resume {tmp}/last.ckpt: no such checkpoint"),
    case("tokenize levels above z", "tokenize --levels 27", "--levels 27: must be at most 26"),
    case("tokenize code space too large", "tokenize --codes 256 --levels 20", "too large for 64-bit SID codes"),
    case("train unknown backbone", "train --backbone nosuch", "unknown backbone 'nosuch'"),
    case("train fp16 on the CPU", "train --precision 16-mixed", "--precision 16-mixed trains on CUDA only"),
    case("run training fp16 on the CPU", RUN + " --precision 16-mixed", "--precision 16-mixed trains on CUDA only"),
    case("precision not a choice", "train --precision fp8", "argument --precision: 'fp8' is not one of"),
    case("history loss on t5", RUN + " --backbone t5-micro --history-loss 0.5", "only a decoder-only backbone has"),
    case(
        "train history loss on t5",
        "train --objective nezha --backbone t5-micro --history-loss 0.5",
        "only a decoder-only backbone has",
    ),
    case("history loss negative", RUN + " --history-loss -1", "--history-loss -1"),
    case(
        "item teacher on t5",
        RUN + " --decoder beam --backbone t5-micro --item-teacher 0.5",
        "--item-teacher trains on the NTP layout of a decoder-only backbone",
    ),
    case(
        "train item teacher on t5",
        "train --objective ntp --backbone t5-micro --item-teacher 0.5",
        "--item-teacher trains on the NTP layout of a decoder-only backbone",
    ),
    case("item teacher above 1", RUN + " --item-teacher 1.5", "--item-teacher 1.5"),
    case(
        "item teacher of a nezha model's starting ntp model on t5",
        RUN + " --decoder nezha --nezha-init ntp --backbone t5-micro --item-teacher 0.5",
        "--item-teacher trains on the NTP layout of a decoder-only backbone",
    ),
    case("tune with an item teacher", "tune --objective ntp --item-teacher 0.5", "bench tune trains every NTP trial"),
    case(
        "train run-dir a file",
        "train --run-dir {tmp}/taken",
        "--run-dir: {tmp}/taken is a file, not a folder; choose another folder for the checkpoints",
        write("taken", ""),
    ),
    case(
        "train init-from a text file",
        "train --objective medusa --init-from {tmp}/model.ckpt",
        "{tmp}/model.ckpt is not a readable checkpoint",
        write("model.ckpt", "not a checkpoint\n"),
    ),
    case(
        "train init-from a nezha model",
        "train --objective medusa --backbone qwen-micro --init-from {tmp}/model.ckpt",
        "is a nezha model with backbone qwen-micro; Medusa needs an ntp model",
        checkpoint("nezha"),
    ),
    case(
        "train ntp init-from a nezha model",
        "train --objective ntp --backbone qwen-micro --init-from {tmp}/model.ckpt",
        "is a nezha model with backbone qwen-micro; NTP training needs an ntp model",
        checkpoint("nezha"),
    ),
    case(
        "train the item model from a checkpoint",
        "train --objective next_item --init-from {tmp}/model.ckpt",
        "--init-from does not apply to --objective next_item",
        checkpoint("ntp"),
    ),
    case(
        "seen unlikelihood on t5",
        RUN + " --decoder beam --backbone t5-micro --seen-unlikelihood 0.5",
        "--seen-unlikelihood trains on the NTP layout of a decoder-only backbone",
    ),
    case(
        "seen unlikelihood with the repeat bias",
        "train --objective ntp --seen-unlikelihood 0.5 --repeat-bias",
        "drop one of --seen-unlikelihood and --repeat-bias",
    ),
    case("seen unlikelihood negative", RUN + " --seen-unlikelihood -1", "--seen-unlikelihood -1.0: must be at least 0.0"),
    case("data unknown dataset", "data --dataset nosuch", "unknown dataset 'nosuch'"),
    # ---- Ctrl-C
    case("ctrl-c", RUN + " --decoder popularity", "interrupted; no result was written", ctrl_c, code=130),
]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`python -m bench ARGV` in process inside tmp_path -> (exit code, stdout, stderr);
    training fails the test: every input error must be found before it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(bench.train.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setattr(synthetic, "generate", cached_generate)

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was validated")

    monkeypatch.setattr(bench.train, "ensure_model", no_training)
    monkeypatch.setattr(bench.train, "train_model", no_training)

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes), link (where it points) and folder (None) below root."""
    return {
        str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("argv, fragment, setup, code", CASES)
def test_bad_input_is_one_error_line_and_changes_nothing(
    cli, tmp_path, monkeypatch, request, argv, fragment, setup, code
):
    out = tmp_path / "results.json"
    out.write_text(json.dumps([RECORD], indent=1))
    if setup:
        setup(tmp_path, monkeypatch, request)
    before = snapshot(tmp_path)
    fill = {"tmp": str(tmp_path), "out": str(out)}
    status, stdout, stderr = cli([part.format(**fill) for part in argv.split()])
    lines = stderr.splitlines()
    assert status == code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment.format(**fill) in lines[0]
    assert "Traceback" not in stderr + stdout
    assert snapshot(tmp_path) == before  # the results file (and every other file) as it was
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "argv, runs, fragment",
    [
        (RUN, "taken/runs", "training the nezha model: {tmp}/taken is a file, not a folder; choose another --run-dir"),
        ("train --run-dir {tmp}/taken/run", "runs", "--run-dir: {tmp}/taken is a file, not a folder; choose another"),
    ],
    ids=["runs cache", "run-dir"],
)
def test_a_checkpoint_folder_that_cannot_be_made_is_one_line_before_training(
    tmp_path, monkeypatch, capsys, argv, runs, fragment
):
    """Below a file (which even root cannot write into): refused before an epoch, the
    runs cache's announcement included; the results file is untouched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(synthetic, "generate", cached_generate)
    monkeypatch.setenv(bench.train.RUNS_ENV, str(tmp_path / runs))
    monkeypatch.setattr(bench.train.L, "Trainer", None)  # a training that started would fail otherwise
    (tmp_path / "taken").write_text("")
    out = tmp_path / "results.json"
    out.write_text(json.dumps([RECORD]))
    fill = {"tmp": str(tmp_path), "out": str(out)}
    assert main([part.format(**fill) for part in argv.split()]) == 2
    stdout, stderr = capsys.readouterr()
    assert stderr.startswith("error: " + fragment.format(**fill)) and len(stderr.splitlines()) == 1, stderr
    assert "training" not in stdout and json.loads(out.read_text()) == [RECORD]
