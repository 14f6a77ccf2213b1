"""Objectives and checkpoints: the one-pass NEZHA layout sees exactly what inference
sees, losses fall, checkpoints refuse the wrong catalogue."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import random_catalog, random_model, training_losses

from bench.errors import BenchError
from bench.settings import ModelSettings
from bench.train import check_asked_shape
from models import objectives
from models.backbones import generic_size
from models.module import load_checkpoint, lr_factor


@pytest.mark.parametrize("split", [True, False], ids=["split-attention", "4d-mask"])
def test_nezha_training_pass_matches_inference_prompts(catalog, split):
    """Hidden states of h_0 and the placeholders in the training window equal those of
    the separate inference prompt [history, <sp_1..sp_L>] for every target, whether the
    window is attended under its 4D mask or by the split attention training uses."""
    model = random_model("nezha", catalog, seed=1)
    windows = [[3, 17, 42, 8, 25], [11, 2], [5, 5, 40]]
    batch = objectives.collate_nezha(windows, catalog)
    layout = (batch["history_length"], catalog.levels) if split else None
    with torch.no_grad():
        hidden = model.lm.hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"], layout)
        sp = torch.tensor(catalog.placeholder_tokens)
        target = 0
        for window in windows:
            for j in range(1, len(window)):
                prompt = torch.cat([catalog.item_tokens(torch.tensor(window[:j])).flatten(), sp]).unsqueeze(0)
                alone = model.lm.hidden(prompt, torch.ones_like(prompt))[0]  # [T, d]
                row = batch["rows"][target]
                torch.testing.assert_close(
                    hidden[row, batch["h0_index"][target]], alone[-catalog.levels - 1], atol=1e-5, rtol=1e-4
                )
                torch.testing.assert_close(
                    hidden[row, batch["placeholder_index"][target]], alone[-catalog.levels :], atol=1e-5, rtol=1e-4
                )
                assert torch.equal(batch["target_codes"][target], catalog.sids[window[j]])
                target += 1
    assert target == len(batch["rows"]) == sum(len(w) - 1 for w in windows)


@pytest.mark.parametrize("backbone", ["qwen-tiny", "llama-tiny"])
def test_split_attention_equals_sdpa_under_the_mask_with_gradients(catalog, backbone):
    """The split attention of NEZHA's training pass gives the real tokens the hidden
    states and the weights the gradients that SDPA under the layout's 4D mask gives
    (grouped-query heads included); padding may differ, nothing reads it."""
    windows = [[3, 17, 42, 8, 25, 9], [11, 2], [5, 5, 40, 7]]
    batch = objectives.collate_nezha(windows, catalog)
    real = batch["input_ids"] != 0
    runs = []
    for layout in ((batch["history_length"], catalog.levels), None):
        model = random_model("nezha", catalog, seed=3, backbone=backbone)
        hidden = model.lm.hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"], layout)
        hidden[real].square().mean().backward()
        runs.append((hidden[real].detach(), {n: p.grad for n, p in model.lm.named_parameters() if p.grad is not None}))
    (split, split_grads), (masked, masked_grads) = runs
    assert model.lm.lm.config.num_key_value_heads < model.lm.lm.config.num_attention_heads  # grouped-query heads
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-4)
    assert split_grads.keys() == masked_grads.keys() and len(split_grads) > 10
    for name in split_grads:
        torch.testing.assert_close(split_grads[name], masked_grads[name], atol=1e-5, rtol=1e-3, msg=name)


def test_a_causal_encoder_gives_a_history_prefix_the_states_of_the_prefix_alone(catalog):
    """--encoder causal: whatever follows a prefix, and however much left padding precedes
    it, the prefix's encoder states stay those of the prefix encoded alone; TIGER's
    bidirectional encoder (the default) lets them depend on what follows."""
    history = torch.tensor([[4, 9, 13, 22, 5, 12, 19, 21, 6]])
    for encoder, independent in (("causal", True), ("bidirectional", False)):
        encode = random_model("ntp", catalog, seed=2, backbone="t5-tiny", encoder=encoder).lm.lm.get_encoder()
        with torch.no_grad():
            whole = encode(input_ids=history, attention_mask=torch.ones_like(history)).last_hidden_state
            prefix = encode(input_ids=history[:, :5], attention_mask=torch.ones(1, 5)).last_hidden_state
            padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), history[:, :5]], 1)
            left = encode(input_ids=padded, attention_mask=(padded != 0).long()).last_hidden_state
        assert torch.allclose(whole[:, :5], prefix, atol=1e-5) == independent, encoder
        torch.testing.assert_close(left[:, 3:], prefix, atol=1e-5, rtol=1e-4)


def test_a_one_layer_causal_encoder_state_is_the_bidirectional_state_of_its_prefix(catalog):
    """A reference independent of the causal mask: with one layer, the causal encoder's
    state at token t is the bidirectional encoder's state of the last token of tokens
    0..t (the same weights), so t reads itself and nothing after it."""
    history = torch.tensor([[4, 9, 13, 22, 5, 12, 19]])
    encoders = {
        encoder: random_model("ntp", catalog, seed=4, backbone="t5-tiny", layers=1, encoder=encoder).lm.lm.get_encoder()
        for encoder in ("causal", "bidirectional")
    }
    with torch.no_grad():
        causal = encoders["causal"](input_ids=history, attention_mask=torch.ones_like(history)).last_hidden_state
        for t in range(history.shape[1]):
            prefix = history[:, : t + 1]
            alone = encoders["bidirectional"](input_ids=prefix, attention_mask=torch.ones_like(prefix))
            torch.testing.assert_close(causal[:, t], alone.last_hidden_state[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective,placeholders", [("ntp", True), ("nezha", True), ("nezha", False)])
def test_causal_t5_trains_every_target_of_a_window_as_inference_reads_it(catalog, objective, placeholders):
    """The packed layout of --encoder causal (one encoder pass per window, one decoder
    group per target) gives every target the decoder states its inference prompt gives
    (the history before it, left-padded as decoders get it), and the loss and gradients
    of one example per target."""
    windows = [[3, 17, 42, 8, 25], [11, 2], [5, 5, 40, 7]]
    runs = []
    for packed in (True, False):
        model = random_model(
            objective, catalog, seed=3, backbone="t5-tiny", encoder="causal", placeholders=placeholders, dropout=0.0
        )
        per_target = [w[:end] for w in windows for end in range(2, len(w) + 1)]
        if packed:
            batch = model.collate(windows)
        else:
            batch = objectives.collate_seq2seq(per_target, catalog, objective, placeholders)
        loss = objectives.loss(objective, model.train(), batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, batch))
    (loss, grads, batch), (expected_loss, expected_grads, _) = runs
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-3, msg=name)
    if objective == "ntp":
        return
    model.eval()
    with torch.no_grad():
        hidden = model.lm.decoder_hidden(batch["history"], batch["mask"], batch["decoder"], batch["layout"])
        sp = torch.tensor(catalog.placeholder_tokens) if placeholders else None
        target = 0
        for window in windows:
            for j in range(1, len(window)):
                history = catalog.item_tokens(torch.tensor(window[:j])).flatten()
                padded = torch.cat([torch.zeros(2, dtype=torch.long), history])
                h0, states = model.lm.nezha_states(padded[None], (padded != 0).long()[None], sp)
                row = batch["rows"][target]
                torch.testing.assert_close(hidden[row, batch["h0_index"][target]], h0[0], atol=1e-5, rtol=1e-4)
                if placeholders:
                    torch.testing.assert_close(
                        hidden[row, batch["placeholder_index"][target]], states[0], atol=1e-5, rtol=1e-4
                    )
                target += 1
    assert target == len(batch["rows"])


def test_nezha_layout_puts_the_history_first_then_one_placeholder_group_per_item(catalog):
    L = catalog.levels
    batch = objectives.collate_nezha([[3, 17, 42], [11, 2]], catalog)
    sp = torch.tensor(catalog.placeholder_tokens)
    assert batch["history_length"] == 2 * L and batch["input_ids"].shape == (2, 4 * L)
    assert torch.equal(batch["input_ids"][0, : 2 * L], catalog.item_tokens(torch.tensor([3, 17])).flatten())
    assert torch.equal(batch["input_ids"][0, 2 * L :], torch.cat([sp, sp]))
    assert (batch["input_ids"][1, L : 2 * L] == 0).all() and (batch["input_ids"][1, 3 * L :] == 0).all()
    assert batch["position_ids"][0, 3 * L :].tolist() == list(range(2 * L, 3 * L))  # after item 17
    assert batch["placeholder_index"].tolist() == [list(range(2 * L + j * L, 3 * L + j * L)) for j in (0, 1)] + [
        list(range(2 * L, 3 * L))
    ]
    mask = batch["attention_mask"][0, 0]
    first_group = 2 * L  # the prompt after item 3: item 3's tokens and itself, causally
    assert mask[first_group + 1].tolist() == [True] * L + [False] * L + [True, True] + [False] * (2 * L - 2)


def test_ntp_batch_predicts_every_item_after_the_first(catalog):
    batch = objectives.collate_ntp([[3, 17, 42], [11, 2]], catalog)
    L = catalog.levels
    assert batch["input_ids"].shape == (2, 3 * L)
    assert torch.equal(batch["labels"][0, L:], catalog.item_tokens(torch.tensor([17, 42])).flatten())
    assert (batch["labels"][0, :L] == objectives.IGNORE).all()
    assert (batch["labels"][1, 2 * L :] == objectives.IGNORE).all()
    assert batch["attention_mask"][1].tolist() == [1] * (2 * L) + [0] * L


@pytest.mark.parametrize("placeholders", [True, False])
def test_nezha_history_loss_is_the_ntp_loss_of_the_history(catalog, placeholders):
    """The history tokens of NEZHA's layout see exactly the plain history (placeholders
    hidden, positions skipping them), so their next-token loss equals the ntp loss of
    the windows without their last item; the total adds it with its weight."""
    model = random_model("nezha", catalog, seed=2, history_loss=0.5, placeholders=placeholders)
    windows = [[3, 17, 42, 8, 25], [11, 2, 9], [5, 5, 40]]
    batch = objectives.collate_nezha(windows, catalog, placeholders)
    with torch.no_grad():
        ntp = objectives.ntp_loss(model, objectives.collate_ntp([w[:-1] for w in windows], catalog))
        total = objectives.nezha_loss(model, batch)
        model.settings.history_loss = 0.0
        head = objectives.nezha_loss(model, batch)
    torch.testing.assert_close(total, head + 0.5 * ntp, atol=1e-5, rtol=1e-5)
    assert (batch["history_labels"] != objectives.IGNORE).sum() == sum(len(w) - 2 for w in windows) * catalog.levels


def test_nezha_without_placeholders_reads_history_only(catalog):
    batch = objectives.collate_nezha([[3, 17, 42]], catalog, placeholders=False)
    assert "placeholder_index" not in batch
    assert batch["h0_index"].tolist() == [catalog.levels - 1, 2 * catalog.levels - 1]
    assert not torch.isin(batch["input_ids"], torch.tensor(catalog.placeholder_tokens)).any()


def save(model, path, **extra):
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), **extra}, path)


def test_checkpoint_round_trip_and_refusals(catalog, tmp_path):
    model = random_model("nezha", catalog, seed=3)
    path = tmp_path / "model.ckpt"
    save(model, path)
    loaded = load_checkpoint(path, catalog)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(BenchError, match="trained on dataset 'toy'.*not on 'toy'"):
        load_checkpoint(path, random_catalog(seed=9))
    with pytest.raises(BenchError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt", catalog)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(BenchError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "notes.ckpt", catalog)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(BenchError, match="not a checkpoint of this suite"):
        load_checkpoint(tmp_path / "foreign.ckpt", catalog)


def test_unknown_backbone_is_refused(catalog):
    with pytest.raises(BenchError, match="unknown backbone 'gpt-huge'"):
        random_model("ntp", catalog, backbone="gpt-huge")


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (2, 1), (3, 1), (5, 1), (8, 4), (9, 3), (12, 6)])
def test_kv_heads_are_half_the_heads_or_the_largest_divisor_below(catalog, heads, kv_heads):
    """Grouped attention needs kv heads that divide the heads: --heads 5 trains."""
    shape = generic_size("qwen-tiny", width=20 * heads, heads=heads)
    assert shape[2:4] == (heads, kv_heads)
    model = random_model("ntp", catalog, width=20 * heads, heads=heads)
    assert model.lm.core.config.num_key_value_heads == kv_heads


def test_attention_dropout_is_its_own_setting_and_defaults_to_dropout(catalog):
    """--attention-dropout replaces --dropout on the attention probabilities only, T5's
    included (its config has one rate; each attention module takes the other)."""
    default = random_model("nezha", catalog, dropout=0.3)
    assert default.lm.lm.config.attention_dropout == 0.3
    apart = random_model("nezha", catalog, dropout=0.3, attention_dropout=0.0)
    assert apart.lm.lm.config.attention_dropout == 0.0 and apart.lm.dropout.p == 0.3
    item = random_model("next_item", catalog, backbone="sasrec-tiny", dropout=0.3, attention_dropout=0.1)
    assert item.lm.model.config.attn_pdrop == 0.1 and item.lm.model.config.embd_pdrop == 0.3
    history, decoder = torch.tensor([[4, 9, 13, 22, 5, 12]]), torch.tensor([[0, 3, 8]])
    for attention_dropout, dropped in ((0.0, False), (0.5, True)):
        t5 = random_model("ntp", catalog, backbone="t5-tiny", dropout=0.0, attention_dropout=attention_dropout)
        with torch.no_grad():
            evaluated = t5.lm.logits(history, torch.ones_like(history), decoder)
            torch.manual_seed(0)
            trained = t5.train().lm.logits(history, torch.ones_like(history), decoder)
        assert t5.lm.lm.config.dropout_rate == 0.0
        assert (not torch.allclose(trained, evaluated)) == dropped, attention_dropout


def test_a_causal_encoder_is_refused_on_a_backbone_without_one(catalog):
    with pytest.raises(BenchError, match="^--encoder causal: qwen-tiny is decoder-only and has no encoder; the"):
        random_model("ntp", catalog, encoder="causal")


@pytest.mark.parametrize(
    "step, cosine, share",
    [
        (0, True, 0.1),
        (9, True, 1.0),
        (10, True, 1.0),
        (60, True, 0.5),
        (110, True, 0.0),
        (500, True, 0.0),
        (60, False, 1.0),
        (500, False, 1.0),
    ],
)
def test_learning_rate_warms_up_then_stays_or_decays_to_zero(step, cosine, share):
    assert lr_factor(step, warmup=10, total=110, cosine=cosine) == pytest.approx(share, abs=1e-12)


@pytest.mark.parametrize("transition", ["rnn", "gru", "none"])
def test_beam_step_of_the_head_equals_its_training_step(transition):
    """The head laid out for a beam search (transposed weights, parents gathered, the rnn
    cell's input side from a per-code table) gives the logits and states of the training
    step (teacher forcing)."""
    from models.heads import NezhaDraftHead

    torch.manual_seed(0)
    head = NezhaDraftHead(16, (6, 5, 8), transition)
    state, placeholder = torch.randn(3, 4, 16), torch.randn(3, 1, 16)  # [B, beams, d], [B, 1, d]
    parent, codes = torch.randint(0, 4, (3, 7)), torch.randint(0, 5, (3, 7))  # codes of levels 0 and 1
    kept = state.gather(1, parent.unsqueeze(-1).expand(-1, -1, 16))
    with torch.no_grad():
        layout = head.beam_levels()
        for level in range(2):
            expected = head.advance(level, kept.flatten(0, 1), codes.flatten()).view(3, 7, 16)
            torch.testing.assert_close(layout[level].advance(state, parent, codes), expected)
        for level in range(3):
            expected_logits = head.level_logits(level, state, placeholder)
            torch.testing.assert_close(layout[level].logits(state, placeholder), expected_logits)


def test_validation_rebuilds_the_head_layout_after_a_fused_optimizer_step(catalog):
    """A fused AdamW steps the weights without moving their version counters."""
    module = random_model("nezha", catalog, backbone="qwen-micro")
    head = module.head
    state, placeholder = torch.randn(2, 1, head.classifiers[0].in_features), torch.zeros(2, 1, 1)
    with torch.no_grad():
        before = head.beam_levels()[0].logits(state, placeholder)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, fused=True)
    head.level_logits(0, state, placeholder).sum().backward()
    optimizer.step()
    module.on_validation_epoch_start()
    with torch.no_grad():
        after = head.beam_levels()[0].logits(state, placeholder)
        torch.testing.assert_close(after, head.level_logits(0, state, placeholder))
    assert not torch.allclose(before, after)


def test_head_beam_layout_follows_the_weights():
    """The laid-out weights are rebuilt after a training step changes the weights they
    are made of, after a cast (in the weights' dtype, also under autocast) and after
    loading new parameter objects; unchanged weights keep the same layout."""
    from models.heads import NezhaDraftHead

    torch.manual_seed(0)
    head = NezhaDraftHead(16, (6, 5, 8), "rnn")
    state, parent, codes = torch.randn(2, 1, 16), torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 2]] * 2)

    def reference():
        return head.advance(0, state.gather(1, parent.unsqueeze(-1).expand(-1, -1, 16)).flatten(0, 1), codes.flatten())

    with torch.no_grad():
        before = head.beam_levels()[0].advance(state, parent, codes)
    assert head.beam_levels() is head.beam_levels()
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    reference().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = head.beam_levels()[0].advance(state, parent, codes)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, reference().view_as(after))
        head.double()
        assert head.beam_levels()[0].advance(state.double(), parent, codes).dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a layout built under autocast keeps the weights' dtype
            head.float().beam_levels()
        assert head.beam_levels()[0].inputs.dtype == torch.float32
        other = NezhaDraftHead(16, (6, 5, 8), "rnn")
        head.load_state_dict(other.state_dict(), assign=True)  # new parameter objects
        torch.testing.assert_close(
            head.beam_levels()[0].advance(state, parent, codes), other.beam_levels()[0].advance(state, parent, codes)
        )


def test_item_teacher_targets_sum_the_item_models_mass_under_the_true_prefix():
    """Hand-computed: five items on two levels; level 1's target is the mass of each
    first code, level 2's the mass of each code under the target's first code, normalised."""
    from bench.data.catalog import build_catalog

    codes = [[0, 0], [0, 2], [1, 0], [1, 1], [1, 2]]
    toy = build_catalog("toy", [str(i) for i in range(5)], codes, codebook_sizes=(2, 3))
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]] * 2)
    first, second = objectives.ItemTeacherTargets(toy)(probs.log(), torch.tensor([3, 1]))
    torch.testing.assert_close(first, torch.tensor([[0.3, 0.7], [0.3, 0.7]]))
    torch.testing.assert_close(second, torch.tensor([[3 / 7, 1.5 / 7, 2.5 / 7], [1 / 3, 0.0, 2 / 3]]))


def test_item_teacher_targets_equal_a_brute_force_sum_on_a_random_catalogue(catalog):
    gen = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(3 * torch.randn(9, catalog.num_items, generator=gen), -1)
    targets = torch.randint(0, catalog.num_items, (9,), generator=gen)
    sids, probs = catalog.sids.long(), log_probs.exp()
    for level, got in enumerate(objectives.ItemTeacherTargets(catalog)(log_probs, targets)):
        for row, target in enumerate(targets):
            under = (sids[:, :level] == sids[target, :level]).all(-1)  # items sharing the target's prefix
            want = torch.zeros(catalog.codebook_sizes[level]).index_add_(0, sids[under, level], probs[row, under])
            torch.testing.assert_close(got[row], want / want.sum())


def item_teacher_pair(catalog, weight: float, **settings):
    student = random_model("ntp", catalog, seed=5, backbone="qwen-micro", item_teacher=weight, **settings)
    teacher = random_model("next_item", catalog, seed=6, backbone="sasrec-tiny")
    student.distil_from(teacher)
    return student, teacher


@pytest.mark.parametrize("repeat_bias", [False, True])
def test_the_item_teacher_loss_reads_the_teachers_next_item_at_every_sid_token(catalog, repeat_bias):
    """Against a loop over windows, items and levels: the token predicting level l of item
    j is scored against the teacher's distribution after items 1..j-1, under item j's first
    l codes; the loss mixes it with the one-hot loss by the weight. With --repeat-bias both
    terms read the logits after the model's repeat offsets."""
    student, teacher = item_teacher_pair(catalog, 0.25, repeat_bias=repeat_bias)
    if repeat_bias:  # offsets large enough to move the loss (the window [5, 5, 40] repeats an item)
        with torch.no_grad():
            student.repeat_bias.per_level.copy_(torch.tensor([0.2, -0.1, -0.4]))
    windows = [[3, 17, 42, 8], [11, 2], [5, 5, 40]]
    batch = student.collate(windows)
    sids, levels = catalog.sids.long(), catalog.levels
    with torch.no_grad():
        total = objectives.ntp_loss(student, batch)
        terms, hard = [], []
        for window in windows:
            items = torch.tensor(window)
            tokens, mask = catalog.item_tokens(items).flatten()[None], torch.ones(1, len(window) * levels)
            logits = student.lm.logits(tokens, mask)
            if repeat_bias:
                logits = student.repeat_bias.add_to_window(logits, tokens, mask)
            lm_probs = torch.log_softmax(logits[0], -1)
            teacher_probs = torch.softmax(teacher.lm.item_scores(items[None] + 1, torch.ones(1, len(window))), -1)[0]
            for j in range(1, len(window)):
                target = sids[window[j]]
                for level in range(levels):
                    under = (sids[:, :level] == target[:level]).all(-1)
                    mass = torch.zeros(catalog.codebook_sizes[level])
                    mass.index_add_(0, sids[under, level], teacher_probs[j - 1, under])
                    offset = catalog.offsets[level]
                    row = lm_probs[j * levels + level - 1, offset : offset + len(mass)]
                    terms.append(-(mass / mass.sum() * row).sum())
                    hard.append(-lm_probs[j * levels + level - 1, tokens[0, j * levels + level]])
    expected = 0.75 * torch.stack(hard).mean() + 0.25 * torch.stack(terms).mean()
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


def test_an_item_teacher_sure_of_every_next_item_gives_the_one_hot_loss(catalog, monkeypatch):
    student, teacher = item_teacher_pair(catalog, 0.5)
    windows = [[3, 17, 42, 8], [11, 2], [5, 5, 40]]

    def sure(items, mask):  # [B, w] -> [B, w, N]: all mass on the item that follows
        scores = torch.full((*items.shape, catalog.num_items), -1e4)
        following = (items.roll(-1, 1) - 1).clamp(min=0)
        return scores.scatter(-1, following.unsqueeze(-1), 0.0)

    monkeypatch.setattr(teacher.lm, "item_scores", sure)
    batch = student.collate(windows)
    assert "items" in batch  # what the teacher reads
    with torch.no_grad():
        taught = objectives.ntp_loss(student, batch)
        plain = objectives.ntp_loss(student, objectives.collate_ntp(windows, catalog))
    torch.testing.assert_close(taught, plain, atol=1e-5, rtol=1e-5)


def test_an_ntp_model_learns_from_a_frozen_item_teacher_and_saves_only_itself(catalog):
    student, teacher = item_teacher_pair(catalog, 0.5)
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    losses = training_losses(student, "ntp", steps=30)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in teacher.named_parameters())
    assert not any(name.startswith("teacher") for name in student.state_dict())


def test_an_item_teacher_must_read_histories_as_long_as_the_students(catalog):
    teacher = random_model("next_item", catalog, seed=6, backbone="sasrec-tiny", max_history=5)
    with pytest.raises(BenchError, match="reads histories of up to 5 items, this model 20"):
        random_model("ntp", catalog, seed=5, backbone="qwen-micro", item_teacher=0.5).distil_from(teacher)


def test_only_an_ntp_model_with_item_teacher_learns_from_the_item_model(catalog):
    teacher = random_model("next_item", catalog, seed=6, backbone="sasrec-tiny")
    with pytest.raises(BenchError, match="item_teacher=0.0 does not go with a next_item teacher"):
        random_model("ntp", catalog, seed=5, backbone="qwen-micro").distil_from(teacher)
    with pytest.raises(BenchError, match="item_teacher=0.5 does not go with a ntp teacher"):
        random_model("ntp", catalog, seed=5, backbone="qwen-micro", item_teacher=0.5).distil_from(
            random_model("ntp", catalog, seed=7, backbone="qwen-micro")
        )


def smoothing_slopes(catalog, objective: str, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's changes from label smoothing 0 to 0.2 and to 0.4, on fixed windows."""
    backbone = "sasrec-tiny" if objective == "next_item" else "qwen-micro"
    model = random_model(objective, catalog, seed=7, backbone=backbone, **settings).eval()
    batch = model.collate([[3, 17, 42, 8], [11, 2], [5, 5, 40]])
    losses = []
    for smoothing in (0.0, 0.2, 0.4):
        model.settings = replace(model.settings, label_smoothing=smoothing)
        with torch.no_grad():
            losses.append(objectives.loss(objective, model, batch))
    return losses[1] - losses[0], losses[2] - losses[0]


@pytest.mark.parametrize(
    "objective,settings",
    [("ntp", {}), ("nezha", {"history_loss": 0.5}), ("next_item", {}), ("medusa", {"medusa_mode": "joint"})],
)
def test_label_smoothing_mixes_each_objectives_one_hot_loss_with_a_uniform_target(catalog, objective, settings):
    """Smoothing e gives (1 - e) x the one-hot loss + e x the loss against a uniform
    target, so the loss moves linearly in e."""
    first, second = smoothing_slopes(catalog, objective, **settings)
    assert abs(float(first)) > 0.01  # the smoothing moves the loss
    torch.testing.assert_close(second, 2 * first, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective,term", [("nezha", {"history_loss": 0.5}), ("medusa", {"medusa_mode": "joint"})])
def test_label_smoothing_reaches_every_term_of_a_loss(catalog, objective, term):
    """NEZHA's history term and Medusa-2's LM term are smoothed too: with them the loss
    moves by another amount than without them."""
    assert abs(float(smoothing_slopes(catalog, objective, **term)[0] - smoothing_slopes(catalog, objective)[0])) > 1e-3


def test_label_smoothing_of_the_ntp_loss_by_hand(catalog):
    model = random_model("ntp", catalog, seed=7, backbone="qwen-micro", label_smoothing=0.1).eval()
    window, levels = [3, 17, 42], catalog.levels
    tokens = catalog.item_tokens(torch.tensor(window)).flatten()
    with torch.no_grad():
        total = objectives.ntp_loss(model, model.collate([window]))
        log_probs = torch.log_softmax(model.lm.logits(tokens[None], torch.ones(1, len(tokens)))[0], -1)
    targets = range(levels, len(tokens))  # the first item is context only
    nll = torch.stack([-log_probs[t - 1, tokens[t]] for t in targets]).mean()
    uniform = torch.stack([-log_probs[t - 1].mean() for t in targets]).mean()
    torch.testing.assert_close(total, 0.9 * nll + 0.1 * uniform, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "objective, backbone, asked, refused",
    [
        ("ntp", "qwen-micro", {"width": 32}, None),  # qwen-micro is 32 wide: the same model
        ("ntp", "qwen-micro", {"width": 64}, "width=64"),
        ("ntp", "qwen-micro", {"backbone": "llama-micro"}, "backbone=llama-micro"),
        ("ntp", "qwen-micro", {"item_backbone": "sasrec-tiny"}, None),  # not this model's setting
        ("next_item", "sasrec-micro", {"backbone": "qwen-micro", "width": 64}, None),  # the SID backbone's
        ("next_item", "sasrec-micro", {"item_backbone": "sasrec-small"}, "item_backbone=sasrec-small"),
        ("next_item", "sasrec-micro", {"backbone": "sasrec-small"}, "backbone=sasrec-small"),
        ("ntp", "qwen3-0.6b", {"width": 64}, "width=64"),  # a real model's shape takes no sizes
    ],
)
def test_a_checkpoint_of_another_shape_than_asked_for_is_refused(objective, backbone, asked, refused):
    model = SimpleNamespace(objective=objective, settings=ModelSettings(backbone=backbone))  # what a checkpoint holds
    if refused is None:
        check_asked_shape("m.ckpt", model, asked)
    else:
        with pytest.raises(BenchError, match=f"m.ckpt holds a {backbone} model of another shape than {refused} asks"):
            check_asked_shape("m.ckpt", model, asked)
