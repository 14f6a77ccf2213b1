"""The training objectives, each in one place: how a window of items becomes a batch,
and the loss on it.

ntp:   the SID tokens of the window's items in one causal sequence; cross-entropy on
       every token of every item after the first (all training prefixes in one pass).
       With item_teacher = W > 0 each token's target mixes the true code (1 - W) with
       the frozen item model's distribution over the next item, summed per code under
       the target's true prefix (W): see ItemTeacherTargets. With repeat_bias each
       target's logits carry the learned offsets of models/repeat.py against the items
       before it in the window. With seen_unlikelihood = W > 0 it adds W x
       -log(1 - p(s | history)) for an item s drawn from the window before each target,
       over s's whole SID: seen_item_groups lays the s out after the window as NEZHA
       lays out its placeholders, so one pass scores the window and them.
medusa: the ntp layout; at the last token of every item but the last, Medusa head j is
       trained to guess level j+1 of the next item (cross-entropy per head). Medusa-1
       freezes the backbone (loss = heads only); Medusa-2 trains both (heads + ntp).
nezha: the window is laid out as  SID(i_1) .. SID(i_{w-1}) P_1 .. P_{w-1}  where each
       P_j = <sp_1> .. <sp_L> predicts item j+1. P_j reads the history up to SID(i_j) and
       itself (causally), no other P reads it, the history reads no P, and its position
       ids continue SID(i_j)'s, so each P sees exactly the prompt [history, <sp_1..sp_L>]
       it sees at inference (a 4D mask spells it out; the pass attends it by
       models/decoder_only.py's nezha_split_attention, at a fraction of SDPA's cost
       under the mask); the draft head is
       teacher-forced with cross-entropy per level on the next item's codes. With
       history_loss > 0 the history tokens also predict the next history token (the ntp
       loss on the same pass, weighted): denser supervision for the backbone, at the
       price of one lm-head product over the history positions.
aligned (an NTP draft with a teacher): the draft is distilled on its backbone, AtSpeed's
       alignment: the teacher beam-searches K beams from a training window's history; the
       prefixes it keeps at levels 1..L-1 form a token tree; teacher and draft read history +
       tree in one pass each, and the loss is KL(teacher || draft) at the root and at every
       kept prefix, over the next level's codes and one outcome for every other token
       (what beam search reads: each code's log-probability under the full softmax). The
       draft learns the backbone's top-K where speculative decoding checks it, not the
       data's next item. The teacher is frozen, so its tree and targets for a history are
       computed once (first epoch) and read back afterwards: later epochs cost the draft's
       pass only (TEACHER_CACHE_BYTES bounds what is kept).
next_item: the SASRec reference: item ids in one causal pass, cross-entropy over all
       items at every position after the first.
popularity: no network: item counts of the training split (fitted, not trained).

Encoder-decoder backbones (T5) decode each target after a start token: ntp decodes
[start, t_1 .. t_{L-1}] against t_1 .. t_L, nezha reads [start, <sp_1..sp_L>]. With
TIGER's bidirectional encoder a history's states depend on what follows, so the windows
hold one target each (history + target). With a causal encoder (--encoder causal) one
encoder pass over a window serves all its targets: their decoder groups are packed in
one row, each reading itself causally and, across, the encoder states of its own
history prefix (a decoder mask and a cross-attention mask), which is what it reads at
inference (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.data.batches import pad_rows
from bench.data.catalog import PAD, Catalog
from bench.data.splits import item_popularity
from models.backbones import ENCODER_DECODER

OBJECTIVES = ("ntp", "nezha", "medusa", "next_item")
FITTED = {"popularity": item_popularity}  # objectives with no network: a function of the data
IGNORE = -100
ALIGNED_BEAMS = 20  # the teacher's beams an aligned draft learns along: bench run's default K
TEACHER_CACHE_BYTES = 8 * 2**30  # the teacher's trees and targets kept between epochs (Beauty: 1.5 GiB)
# the model settings only one objective reads; every other model setting shapes every model,
# except those that pick another model's backbone
OWN_SETTINGS = {
    "ntp": ("item_teacher", "repeat_bias", "seen_unlikelihood"),
    "nezha": ("transition", "placeholders", "history_loss", "nezha_init"),
    "medusa": ("medusa_mode",),
    "next_item": ("item_scores", "repeat_bias"),
}
OTHER_MODELS = ("draft_backbone", "item_backbone")


def shaping_settings(objective: str, settings: dict) -> dict:
    """The settings that shape a model of this objective (what names its cache and what a
    resumed checkpoint must agree on)."""
    others = {name for owner, names in OWN_SETTINGS.items() if owner != objective for name in names}
    others -= set(OWN_SETTINGS.get(objective, ()))  # a setting several objectives read (repeat_bias)
    return {k: v for k, v in settings.items() if k not in others and k not in OTHER_MODELS}


def collate_seq2seq(windows: list[list[int]], catalog: Catalog, objective: str, placeholders: bool) -> dict:
    """One target per window: encoder = history tokens, decoder = start + (SID or placeholders)."""
    history, mask = pad_rows([catalog.item_tokens(torch.tensor(w[:-1])).flatten() for w in windows])
    items = torch.tensor([w[-1] for w in windows])
    target = catalog.sids[items]  # [B, L]
    start = torch.full((len(windows), 1), PAD, dtype=torch.long)
    if objective == "ntp":
        tokens = catalog.item_tokens(items)
        decoder = torch.cat([start, tokens[:, :-1]], 1)
        return {"history": history, "mask": mask, "decoder": decoder, "labels": tokens}
    if placeholders:
        start = torch.cat([start, torch.tensor(catalog.placeholder_tokens).expand(len(windows), -1)], 1)
    return {"history": history, "mask": mask, "decoder": start, "target_codes": target}


def collate_packed_seq2seq(windows: list[list[int]], catalog: Catalog, objective: str, placeholders: bool) -> dict:
    """Every target of a window in one row (causal encoder): encoder = the window's items
    but the last; decoder = one group per target j (item j + 1), ntp's [start, t_1 ..
    t_{L-1}] or nezha's [start (, <sp_1..sp_L>)], reading its own group causally and the
    history up to item j."""
    L = catalog.levels
    group = L if objective == "ntp" else 1 + (L if placeholders else 0)
    history, mask = pad_rows([catalog.item_tokens(torch.tensor(w[:-1])).flatten() for w in windows])  # [B, T]
    width = max(len(w) - 1 for w in windows) * group
    n = len(windows)
    decoder = torch.full((n, width), PAD, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    owner = torch.full((n, width), -1, dtype=torch.long)  # which target a decoder token belongs to, -1: padding
    sp = torch.tensor(catalog.placeholder_tokens)
    rows, starts, target_items = [], [], []
    for b, items in enumerate(windows):
        for j, item in enumerate(items[1:]):
            start = j * group
            owner[b, start : start + group] = j
            tokens = catalog.item_tokens(torch.tensor([item]))[0]  # [L]
            if objective == "ntp":
                decoder[b, start + 1 : start + group] = tokens[:-1]
                labels[b, start : start + group] = tokens
            elif placeholders:
                decoder[b, start + 1 : start + group] = sp
            rows.append(b)
            starts.append(start)
            target_items.append(item)
    index = torch.arange(width)
    same_group = (owner[:, :, None] == owner[:, None, :]) & (index[None, :] <= index[:, None])  # [B, m, m]
    # [B, m]: history tokens a decoder token reads (the history is right-padded, so a prefix)
    history_read = torch.where(owner < 0, L, (owner + 1) * L)
    cross_mask = (torch.arange(history.shape[1]) < history_read[:, :, None]) & mask.bool()[:, None, :]  # [B, m, T]
    batch = {
        "history": history,
        "mask": mask,
        "decoder": decoder,
        "layout": (same_group.unsqueeze(1), cross_mask.unsqueeze(1)),
    }
    if objective == "ntp":
        return {**batch, "labels": labels}
    starts = torch.tensor(starts)
    batch.update(rows=torch.tensor(rows), h0_index=starts, target_codes=catalog.sids[torch.tensor(target_items)])
    if placeholders:
        batch["placeholder_index"] = starts[:, None] + torch.arange(1, L + 1)  # [N_targets, L]
    return batch


def collate_ntp(windows: list[list[int]], catalog: Catalog, item_ids: bool = False, seen: bool = False) -> dict:
    """item_ids: the window's items too, as the item model reads them (an item teacher);
    seen: the groups of the seen-item unlikelihood after the window's tokens (seen_item_groups)."""
    input_ids, attention_mask = pad_rows([catalog.item_tokens(torch.tensor(items)).flatten() for items in windows])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, : catalog.levels] = IGNORE  # the first item is context only
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if item_ids:
        items = collate_next_item(windows)  # [B, w] item index + 1 (0 = PAD), right-padded as input_ids
        batch.update(items=items["items"], items_mask=items["mask"])
    if seen:
        batch.update(seen_item_groups(windows, catalog, input_ids))
    return batch


def group_attention_mask(group: torch.Tensor, levels: int) -> torch.Tensor:
    """group [B, T]: 0 history, g >= 1 a group of `levels` tokens after history item g - 1,
    -1 padding -> [B, 1, T, T]: history tokens see the history causally, group g sees the
    history tokens of items 0 .. g - 1 and its own tokens causally (what
    models/decoder_only.py's nezha_split_attention attends without building this)."""
    index = torch.arange(group.shape[1], device=group.device)
    history_read = torch.where(group >= 1, levels * group, index + 1)  # [B, T]: history tokens before it are read
    reads_history = (group[:, None, :] == 0) & (index < history_read[:, :, None])  # [B, q, k]
    reads_own_group = (group[:, None, :] == group[:, :, None]) & (group[:, :, None] >= 1) & (index <= index[:, None])
    return (reads_history | reads_own_group).unsqueeze(1)


def seen_item_groups(windows: list[list[int]], catalog: Catalog, tokens: torch.Tensor) -> dict:
    """For every target j >= 1 of a window, an item s drawn uniformly from items 0 .. j-1
    other than the target (none where all of them are the target), laid out as NEZHA lays
    out its placeholders: a group of s's L codes after the window's tokens [B, w L],
    reading the history up to item j - 1 and itself causally, with the positions item j
    has in the window. The group's first L - 1 states and the window's token before item j
    give log p(s | items 0 .. j-1) over s's whole SID.
    -> the layout (ids, 4D mask, positions; the window's part is `tokens` unchanged) and per
    drawn s its row, the window index predicting its first code and its tokens [N, L]."""
    L, (size, history) = catalog.levels, tokens.shape
    input_ids = torch.cat([tokens, torch.full((size, history - L), PAD, dtype=torch.long)], 1)
    positions = torch.zeros(input_ids.shape, dtype=torch.long)
    positions[:, :history] = torch.arange(history)
    group = torch.full(input_ids.shape, -1, dtype=torch.long)
    rows, targets, drawn = [], [], []
    for b, items in enumerate(windows):
        group[b, : len(items) * L] = 0
        items = torch.tensor(items)
        earlier = torch.ones(len(items), len(items), dtype=torch.bool).tril(-1)  # [j, i]: i before j
        allowed = earlier & (items[None, :] != items[:, None])
        has = allowed.any(1).nonzero().flatten()  # the targets with an item to draw
        if len(has):
            rows += [b] * len(has)
            targets.append(has)
            drawn.append(items[torch.multinomial(allowed[has].float(), 1).flatten()])
    targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)  # [N]: j of each drawn s
    rows = torch.tensor(rows, dtype=torch.long)
    seen_tokens = catalog.item_tokens(torch.cat(drawn)) if drawn else torch.zeros(0, L, dtype=torch.long)  # [N, L]
    places = history + (targets - 1)[:, None] * L + torch.arange(L)  # [N, L]: group j's place in the layout
    input_ids[rows[:, None], places] = seen_tokens
    positions[rows[:, None], places] = targets[:, None] * L + torch.arange(L)
    group[rows[:, None], places] = targets[:, None].expand(-1, L)
    return {
        "seen_input_ids": input_ids,
        "seen_attention_mask": group_attention_mask(group, L),
        "seen_position_ids": positions,
        "seen_rows": rows,
        "seen_first_index": targets * L - 1,
        "seen_tokens": seen_tokens,
    }


def one_hot_loss(model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of every objective's one-hot targets: logits [N, C], labels [N]
    (IGNORE: no target), with the model's --label-smoothing (torch's: that share of the
    target spread evenly over all C classes)."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=model.settings.label_smoothing)


def ntp_loss(model, batch: dict) -> torch.Tensor:
    if "decoder" in batch:
        logits = model.lm.logits(batch["history"], batch["mask"], batch["decoder"], batch.get("layout"))  # [B, m, V]
        return one_hot_loss(model, logits.flatten(0, 1), batch["labels"].flatten())
    if "seen_input_ids" in batch:
        logits, group_hidden = seen_layout_pass(model, batch)
    else:
        logits = model.lm.logits(batch["input_ids"], batch["attention_mask"])  # [B, T, V]
    if model.repeat_bias is not None:
        model.repeat_bias.add_to_window(logits, batch["input_ids"], batch["attention_mask"])
    loss = one_hot_loss(model, logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    if "items" in batch:
        weight = model.settings.item_teacher
        loss = (1 - weight) * loss + weight * item_teacher_loss(model, logits, batch)
    if "seen_input_ids" in batch:
        loss = loss + model.settings.seen_unlikelihood * seen_unlikelihood(model, logits, group_hidden, batch)
    return loss


def seen_layout_pass(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the window and the seen items' groups (seen_item_groups) -> the
    window's logits [B, T, V] and the groups' states [B, G L, d]."""
    window = batch["input_ids"].shape[1]
    ids, mask, positions = batch["seen_input_ids"], batch["seen_attention_mask"], batch["seen_position_ids"]
    hidden = model.lm.hidden(ids, mask, positions, (window, model.catalog.levels))
    return model.lm.lm.lm_head(hidden[:, :window]), hidden[:, window:]


def seen_log_probs(model, window_logits: torch.Tensor, group_hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """log p(s | history) of each target's drawn seen item s over its whole SID [N], each
    code's probability under the full softmax as beam search reads it: the first from the
    window's logits [B, T, V], the others from the group's states [B, G L, d]."""
    levels, rows, tokens = model.catalog.levels, batch["seen_rows"], batch["seen_tokens"]  # [N], [N, L]
    first = window_logits[rows, batch["seen_first_index"]]  # [N, V]
    group_start = (batch["seen_first_index"] + 1 - levels)[:, None] + torch.arange(levels - 1, device=rows.device)
    later = model.lm.lm.lm_head(group_hidden[rows[:, None], group_start])  # [N, L-1, V]: read s's codes 1 .. L-1
    step_logits = torch.cat([first[:, None], later], 1)  # [N, L, V]
    return F.log_softmax(step_logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)


def seen_unlikelihood(model, window_logits: torch.Tensor, group_hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """Unlikelihood (Welleck et al., 2019) of the items a user took: -log(1 - p(s | history)),
    mean over targets. Its gradient on log p(s) is p / (1 - p), so it pushes down the seen
    items the model would generate and leaves the others; where a user takes an item
    again, the one-hot term pulls the other way."""
    log_p = seen_log_probs(model, window_logits, group_hidden, batch)
    if not len(log_p):
        return window_logits.new_zeros(())
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).mean()


class ItemTeacherTargets:
    """Soft targets for NTP training from an item model: its distribution over the next
    item, summed per code of each SID level over the items that share the target's codes
    of the earlier levels (teacher-forced on the true prefix, as the NTP model is). The
    items are sorted by SID, the first level most significant, so the items under any
    prefix are one run of that order."""

    def __init__(self, catalog: Catalog):
        sids = catalog.sids.long()  # [N, L]
        key = torch.zeros(len(sids), dtype=torch.long)
        prefix_keys = []  # per prefix length l = 1 .. L: [N] the item's first l codes as one integer
        for level, size in enumerate(catalog.codebook_sizes):
            key = key * size + sids[:, level]
            prefix_keys.append(key)
        self.order = torch.argsort(key)  # [N]: sorted place -> item
        self.sorted_sids = sids[self.order]  # [N, L]
        # per level l >= 1: where the run of the items sharing an item's first l codes starts and ends
        self.run_start, self.run_end, self.run_width = [], [], []
        for prefix in prefix_keys[:-1]:
            ordered = prefix[self.order]
            self.run_start.append(torch.searchsorted(ordered, prefix))  # [N], by item
            self.run_end.append(torch.searchsorted(ordered, prefix, right=True))
            self.run_width.append(int((self.run_end[-1] - self.run_start[-1]).max()))
        self.codebook_sizes = catalog.codebook_sizes

    def to(self, device) -> ItemTeacherTargets:
        for name in ("order", "sorted_sids"):
            setattr(self, name, getattr(self, name).to(device))
        self.run_start = [t.to(device) for t in self.run_start]
        self.run_end = [t.to(device) for t in self.run_end]
        return self

    def __call__(self, log_probs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """log_probs [P, N] the teacher's over all items, targets [P] the true next items ->
        per level l (from 0) the distribution over its codes given the target's codes of
        levels 0 .. l-1 [P, C_l]."""
        ranked = log_probs[:, self.order]  # [P, N] in SID order
        first = torch.zeros(len(targets), self.codebook_sizes[0], device=ranked.device)
        out = [first.index_add_(1, self.sorted_sids[:, 0], ranked.exp())]
        for level in range(1, len(self.codebook_sizes)):
            start, end = self.run_start[level - 1][targets], self.run_end[level - 1][targets]  # [P]
            places = start[:, None] + torch.arange(self.run_width[level - 1], device=ranked.device)  # [P, R]
            inside = places < end[:, None]
            places = places.clamp(max=ranked.shape[1] - 1)
            scores = ranked.gather(1, places).masked_fill(~inside, float("-inf"))  # the target is inside: finite max
            mass = (scores - scores.max(-1, keepdim=True).values).exp()
            codes = self.sorted_sids[places, level]  # [P, R]
            summed = torch.zeros(len(targets), self.codebook_sizes[level], device=ranked.device)
            out.append(summed.scatter_add_(1, codes, mass))
        return [q / q.sum(-1, keepdim=True) for q in out]


def item_teacher_loss(model, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy of the NTP model's code distributions against the item teacher's
    soft targets, averaged over the same tokens as the one-hot loss. logits [B, T, V] of
    the ntp layout (w items of L tokens, right-padded)."""
    catalog, levels = model.catalog, model.catalog.levels
    items, mask = batch["items"], batch["items_mask"]  # [B, w] (index + 1, 0 = PAD)
    with torch.no_grad():
        scores = model.teacher.lm.item_scores(items, mask)[:, :-1]  # [B, w-1, N]: item j+1 from items <= j
        predicted = mask[:, 1:].bool()  # [B, w-1]
        targets = model.item_teacher_targets(F.log_softmax(scores[predicted].float(), -1), items[:, 1:][predicted] - 1)
    width = items.shape[1] - 1
    # the token predicting level l of item j (j >= 1) sits at j * L + l - 1
    per_item = logits[:, levels - 1 : levels - 1 + width * levels].unflatten(1, (width, levels))  # [B, w-1, L, V]
    log_probs = F.log_softmax(per_item[predicted].float(), -1)  # [P, L, V]
    terms = [
        -(target * log_probs[:, level, catalog.offsets[level] : catalog.offsets[level] + target.shape[1]]).sum(-1)
        for level, target in enumerate(targets)
    ]
    return torch.stack(terms).mean()


def collate_nezha(windows: list[list[int]], catalog: Catalog, placeholders: bool = True) -> dict:
    """The history tokens of each window first, then one placeholder group per history
    item; see the module docstring. Without placeholders the layout is the plain history
    and the head reads h_0 only.

    The 4D mask spells out what each token sees; nezha_loss attends the same layout by
    nezha_split_attention (history_length says where the groups begin)."""
    L = catalog.levels
    history = max(len(items) - 1 for items in windows) * L
    width = 2 * history if placeholders else history
    n = len(windows)
    input_ids = torch.full((n, width), PAD, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    group = torch.full((n, width), -1, dtype=torch.long)  # group_attention_mask's: placeholder group g after item g - 1
    history_labels = torch.full((n, width), IGNORE, dtype=torch.long)  # the next history token, where known
    rows, h0_index, placeholder_index, target_items = [], [], [], []
    sp = torch.tensor(catalog.placeholder_tokens)
    for b, items in enumerate(windows):
        tokens = catalog.item_tokens(torch.tensor(items[:-1])).flatten()  # [(w - 1) L]
        input_ids[b, : len(tokens)] = tokens
        positions[b, : len(tokens)] = torch.arange(len(tokens))
        group[b, : len(tokens)] = 0
        history_labels[b, L - 1 : len(tokens) - 1] = tokens[L:]  # the first item is context only, as in ntp
        for j in range(len(items) - 1):
            if placeholders:  # the prompt after item j: its placeholders continue item j's positions
                start = history + j * L
                input_ids[b, start : start + L] = sp
                positions[b, start : start + L] = torch.arange((j + 1) * L, (j + 2) * L)
                group[b, start : start + L] = j + 1
                placeholder_index.append(torch.arange(start, start + L))
            rows.append(b)
            h0_index.append((j + 1) * L - 1)
            target_items.append(items[j + 1])
    batch = {
        "input_ids": input_ids,
        "attention_mask": group_attention_mask(group, L),  # [B, 1, T, T]
        "position_ids": positions,
        "history_length": history,
        "rows": torch.tensor(rows),
        "h0_index": torch.tensor(h0_index),
        "target_codes": catalog.sids[torch.tensor(target_items)],
        "history_labels": history_labels,
    }
    if placeholders:
        batch["placeholder_index"] = torch.stack(placeholder_index)  # [N_targets, L]
    return batch


def nezha_loss(model, batch: dict) -> torch.Tensor:
    if "decoder" in batch:  # encoder-decoder: one target per row, or (layout) a window's targets packed
        hidden = model.lm.decoder_hidden(batch["history"], batch["mask"], batch["decoder"], batch.get("layout"))
    else:
        layout = (batch["history_length"], len(model.head.classifiers))
        # [B, T, d]
        hidden = model.lm.hidden(batch["input_ids"], batch["attention_mask"], batch["position_ids"], layout)
    if "rows" in batch:  # targets packed in rows: each gathered at its start token
        rows = batch["rows"]
        h0 = hidden[rows, batch["h0_index"]]  # [N, d]
        placeholders = hidden[rows[:, None], batch["placeholder_index"]] if "placeholder_index" in batch else None
    else:  # [B, 1 (+L), d]
        h0 = hidden[:, 0]
        placeholders = hidden[:, 1:] if hidden.shape[1] > 1 else None
    if placeholders is None:
        placeholders = h0.new_zeros(h0.shape[0], len(model.head.classifiers), h0.shape[1])
    codes = batch["target_codes"]
    logits = model.head.teacher_forced_logits(h0, placeholders, codes)
    head = torch.stack([one_hot_loss(model, lg, codes[:, level]) for level, lg in enumerate(logits)]).mean()
    if not model.settings.history_loss:
        return head
    labeled = batch["history_labels"] != IGNORE  # [B, T]
    history = one_hot_loss(model, model.lm.lm.lm_head(hidden[labeled]), batch["history_labels"][labeled])
    return head + model.settings.history_loss * history


def collate_aligned(windows: list[list[int]], catalog: Catalog) -> dict:
    """A window's items but the last as a left-padded history, as a decoder's prompt reads it;
    the histories themselves name the rows in the teacher's cache."""
    history, mask = pad_rows([catalog.item_tokens(torch.tensor(w[:-1])).flatten() for w in windows], left=True)
    return {"history": history, "mask": mask, "keys": [tuple(w[:-1]) for w in windows]}


def level_outcomes(logits: torch.Tensor, catalog: Catalog, level: int) -> torch.Tensor:
    """[..., V] -> [..., C + 1] log-probabilities of the level's C codes and of 'any other token'."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    codes = log_probs[..., catalog.offsets[level] : catalog.offsets[level] + catalog.codebook_sizes[level]]
    elsewhere = torch.log1p(-codes.logsumexp(-1, keepdim=True).exp().clamp(max=1 - 1e-6))
    return torch.cat([codes, elsewhere], -1)


def teacher_trees(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The teacher's tree along its beams and its outcomes at the root and every node, per row.

    -> node tokens [B, N], tree mask [B, N, N], node codes [B, N] (-1: no candidate), and
    per level l the teacher's outcomes: [B, C_0 + 1] at the root, [B, W, C_l + 1] below.
    Rows whose history is in model.teacher_cache are read from it; the others are
    searched and scored by the teacher and stored while the cache has room."""
    from decoders.speculative import beam_tree  # decoders build on models: imported when used

    teacher, catalog, cache = model.teacher, model.catalog, model.teacher_cache
    keys, found = batch["keys"], {}
    missing = [row for row, key in enumerate(keys) if key not in cache]
    if missing:
        rows = torch.tensor(missing, device=batch["history"].device)
        history, mask = batch["history"][rows], batch["mask"][rows]
        with torch.no_grad():
            tokens, tree_mask, codes = beam_tree(teacher.lm, catalog, history, mask, ALIGNED_BEAMS, constrained=False)
            root, nodes, _ = teacher.lm.tree_forward(history, mask, tokens, tree_mask)  # [b, V], [b, N, V]
            width = ALIGNED_BEAMS
            outcomes = [level_outcomes(root, catalog, 0)] + [
                level_outcomes(nodes[:, (depth - 1) * width : depth * width], catalog, depth)
                for depth in range(1, catalog.levels)
            ]
        found = {row: (tokens[i], tree_mask[i], codes[i], [o[i] for o in outcomes]) for i, row in enumerate(missing)}
        row_bytes = sum(t.nbytes for t in (tokens[0], tree_mask[0], codes[0], *(o[0] for o in outcomes)))
        room = TEACHER_CACHE_BYTES // row_bytes - len(cache)  # every row has the same shapes
        for row, entry in list(found.items())[: max(room, 0)]:
            cache[keys[row]] = tuple(t.clone() for t in entry[:3]) + ([o.clone() for o in entry[3]],)
    entries = [found[row] if row in found else cache[key] for row, key in enumerate(keys)]
    tokens, tree_mask, codes = (torch.stack([e[part] for e in entries]) for part in range(3))
    outcomes = [torch.stack([e[3][level] for e in entries]) for level in range(catalog.levels)]
    return tokens, tree_mask, codes, outcomes


def aligned_loss(model, batch: dict) -> torch.Tensor:
    catalog, history, mask = model.catalog, batch["history"], batch["mask"]  # [B, T]
    tokens, tree_mask, codes, teacher_outcomes = teacher_trees(model, batch)
    root, nodes, _ = model.lm.tree_forward(history, mask, tokens, tree_mask)

    def divergence(logits, level):  # [..., V] -> [...]
        outcomes = level_outcomes(logits, catalog, level)
        return F.kl_div(outcomes, teacher_outcomes[level], log_target=True, reduction="none").sum(-1)

    terms = [divergence(root, 0).mean()]
    width = ALIGNED_BEAMS
    for depth in range(1, catalog.levels):
        block = slice((depth - 1) * width, depth * width)
        kept = codes[:, block] >= 0  # [B, W]; a level with fewer codes than beams keeps fewer
        kl = divergence(nodes[:, block], depth)  # [B, W]
        terms.append((kl * kept).sum() / kept.sum().clamp(min=1))
    return torch.stack(terms).mean()


def collate_medusa(windows: list[list[int]], catalog: Catalog) -> dict:
    batch = collate_ntp(windows, catalog)
    rows, ends, targets = [], [], []
    for b, items in enumerate(windows):
        for j in range(len(items) - 1):
            rows.append(b)
            ends.append((j + 1) * catalog.levels - 1)
            targets.append(items[j + 1])
    return {
        **batch,
        "rows": torch.tensor(rows),
        "item_end": torch.tensor(ends),
        "target_codes": catalog.sids[torch.tensor(targets)],
    }


def medusa_loss(model, batch: dict) -> torch.Tensor:
    joint = model.settings.medusa_mode == "joint"
    with torch.set_grad_enabled(joint and torch.is_grad_enabled()):
        hidden = model.lm.hidden(batch["input_ids"], batch["attention_mask"])  # [B, T, d]
    at_item_end = hidden[batch["rows"], batch["item_end"]]  # [N, d]
    codes = batch["target_codes"]
    heads = torch.stack([one_hot_loss(model, lg, codes[:, j + 1]) for j, lg in enumerate(model.medusa(at_item_end))])
    heads = heads.mean()
    if not joint:
        return heads
    logits = model.lm.lm.lm_head(hidden)
    lm = one_hot_loss(model, logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    return lm + heads


def collate_next_item(windows: list[list[int]]) -> dict:
    items, mask = pad_rows([torch.tensor(w) + 1 for w in windows])  # item i -> token i + 1
    labels = (items - 1).masked_fill(mask == 0, IGNORE)
    labels[:, 0] = IGNORE  # the first item is context only
    return {"items": items, "mask": mask, "labels": labels}


def next_item_loss(model, batch: dict) -> torch.Tensor:
    scores = model.lm.item_scores(batch["items"], batch["mask"])  # [B, T, N]
    return one_hot_loss(model, scores[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def collate(
    objective: str,
    windows: list[list[int]],
    catalog: Catalog,
    kind: str,
    placeholders: bool = True,
    aligned: bool = False,
    causal_encoder: bool = False,
    item_ids: bool = False,
    seen: bool = False,
) -> dict:
    if aligned:
        return collate_aligned(windows, catalog)
    if objective == "next_item":
        return collate_next_item(windows)
    if kind == ENCODER_DECODER and causal_encoder:
        return collate_packed_seq2seq(windows, catalog, objective, placeholders)
    if kind == ENCODER_DECODER:
        return collate_seq2seq(windows, catalog, objective, placeholders)
    if objective == "ntp":
        return collate_ntp(windows, catalog, item_ids, seen)
    if objective == "medusa":
        return collate_medusa(windows, catalog)
    return collate_nezha(windows, catalog, placeholders)


def loss(objective: str, model, batch: dict) -> torch.Tensor:
    if model.aligned:
        return aligned_loss(model, batch)
    losses = {"ntp": ntp_loss, "nezha": nezha_loss, "medusa": medusa_loss, "next_item": next_item_loss}
    return losses[objective](model, batch)
