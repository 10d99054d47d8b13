"""ulmfit.py: the AWD-LSTM's five dropouts, STLR, discriminative rates, gradual unfreezing, concat pooling, BPT3C,
variable BPTT and its carried state, resume, DDP, the ensemble, errors, and the rows of the cross-model suite."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import ulmfit
from ddp import run_two_ranks
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
V = 50
TINY = dataclasses.replace(ulmfit.PRESETS["tiny"], vocab_size=V)
FP32 = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32"]


def tiny_lm(seed, **kw):
    torch.manual_seed(seed)
    return ulmfit.build_model(dataclasses.replace(TINY, **kw)).eval()


def tiny_clf(seed, n_classes=3, **kw):
    torch.manual_seed(seed)
    model = ulmfit.Classifier(dataclasses.replace(TINY, **{"bptt": 3, "max_len": 5, **kw}), n_classes)
    for bn in (model.head[0], model.head[4]):  # non-trivial running statistics for eval mode
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def rand_ids(seed, B, T, vocab=V):
    return torch.randint(ulmfit.BOS, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, seed):
    ids = rand_ids(seed, 3, 7)
    return ulmfit.pretrain_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})


def frozen_clf(seed):
    model = tiny_clf(seed)
    ulmfit.set_trainable(model, 2)  # gradual unfreezing, second epoch: the head and the last LSTM
    return model


def clf_loss(model, seed):
    ids = rand_ids(seed, 4, 9)
    return ulmfit.classifier_loss(model, {"input_ids": ids, "lengths": torch.tensor([9, 4, 7, 1]),
                                          "labels": torch.tensor([0, 1, 2, 1])})


def fresh(model, ids):
    return model(ids)[0]


def dropout_rates(seed, stage):
    """One forward pass in train mode of a model of `stage` (its own dropout values, wide enough to count), read
    through forward hooks: how often each of the five dropouts struck, and its configured rate."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, emb_size=64, n_hid=96, vocab_size=1000, max_len=1000)
    rate = {k: p * cfg.drop_mult for k, p in ulmfit.DROPOUTS[stage].items()}
    model = (ulmfit.build_model(cfg) if stage == "lm" else ulmfit.Classifier(cfg, 2)).train()
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(seed)).view(8, 125)  # every word once
    counts = {}

    def add(what, hits, trials):
        counts[what] = [a + b for a, b in zip(counts.get(what, (0, 0)), (hits, trials))]

    def locked(what):  # a locked mask shows at the first step of each sequence; units already zero do not count
        return lambda m, args, out: add(what, ((out[:, 0] == 0) & (args[0][:, 0] != 0)).sum().item(),
                                        (args[0][:, 0] != 0).sum().item())

    enc, hooks = model.encoder, []
    hooks.append(enc.input_dp.register_forward_hook(  # its input: the embedded words, a dropped word's row all zero
        lambda m, args, out: add("embed_p", (args[0] == 0).all(-1).sum().item(), args[0][..., 0].numel())))
    hooks.append(enc.input_dp.register_forward_hook(locked("input_p")))
    hooks += [d.register_forward_hook(locked("hidden_p")) for d in enc.hidden_dps]
    hooks += [r.register_forward_hook(  # during the call the LSTM holds the dropped copy of its U
        lambda m, args, out: add("weight_p", (m.weight_hh_l0 == 0).sum().item(), m.weight_hh_l0.numel()))
        for r in enc.rnns]
    if stage == "lm":
        hooks.append(model.output_dp.register_forward_hook(locked("output_p")))
        model(ids)
    else:  # the classifier's output_p is the head's element-wise dropout on the pooled features
        hooks.append(model.head[1].register_forward_hook(
            lambda m, args, out: add("output_p", ((out == 0) & (args[0] != 0)).sum().item(),
                                     (args[0] != 0).sum().item())))
        model(ids, torch.full((8,), 125))
    for h in hooks:
        h.remove()
    return [(what, hits, trials, rate[what]) for what, (hits, trials) in counts.items()]


PROPERTY_ROWS = [
    Rows(name="ulmfit-lm", model=tiny_lm, ids=rand_ids, causal=fresh, loss=lm_loss,
         rates=lambda seed: dropout_rates(seed, "lm")),
    Rows(name="ulmfit-lm-backward", model=tiny_lm, ids=rand_ids, direction="backward",
         causal=lambda m, ids: fresh(m, ids.flip(1)).flip(1)),  # how --backwards reads text
    Rows(name="ulmfit-classifier", model=tiny_clf, ids=rand_ids,
         padded=lambda m, ids, lengths: m(ids, lengths)[:, None, :].expand(-1, ids.size(1), -1),
         rates=lambda seed: dropout_rates(seed, "classify")),
    Rows(name="ulmfit-classifier-frozen", model=frozen_clf, ids=rand_ids, loss=clf_loss),
]


def binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


# ---------------------------------------------------------------------------------------------------
# The five dropouts: geometry, rates, wiring


@given(V_=st.integers(50, 400), E=st.integers(1, 8), p=st.floats(0.05, 0.9), seed=st.integers(0, 999))
def test_embedding_dropout_drops_whole_rows_and_rescales(V_, E, p, seed):
    torch.manual_seed(seed)
    w = torch.randn(V_, E)
    d = ulmfit.embedding_dropout(w, p, training=True)
    zero = (d == 0).all(1)
    torch.testing.assert_close(d[~zero], w[~zero] / (1 - p))
    assert binomial_ok(zero.sum().item(), V_, p)
    assert torch.equal(ulmfit.embedding_dropout(w, p, training=False), w)


@given(B=st.integers(1, 6), T=st.integers(2, 10), C=st.integers(20, 60), p=st.floats(0.05, 0.9),
       seed=st.integers(0, 999))
def test_locked_dropout_mask_is_constant_over_time(B, T, C, p, seed):
    torch.manual_seed(seed)
    d = ulmfit.LockedDropout(p).train()
    y = d(torch.ones(B, T, C))
    assert torch.equal(y, y[:, :1].expand_as(y))  # one mask per sequence, shared by all time steps
    assert ((y == 0) | torch.isclose(y, torch.tensor(1 / (1 - p)))).all()
    assert binomial_ok((y[:, 0] == 0).sum().item(), B * C, p)
    assert torch.equal(d.eval()(torch.ones(B, T, C)), torch.ones(B, T, C))


@given(E=st.integers(4, 12), p=st.floats(0.1, 0.8), seed=st.integers(0, 999))
def test_weight_drop_touches_only_hidden_to_hidden_and_the_raw_weight_learns(E, p, seed):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, emb_size=E, n_layer=1)
    enc = ulmfit.AWDLSTM(cfg, {"embed_p": 0.0, "input_p": 0.0, "hidden_p": 0.0, "weight_p": p}).train()
    rnn, seen = enc.rnns[0], []
    hook = rnn.register_forward_hook(lambda m, args, out: seen.append((m.weight_hh_l0, m.weight_ih_l0, args, out)))
    ids = rand_ids(seed, 2, 5)
    y, _ = enc(ids)
    hook.remove()
    w_hh, w_ih, args, out = seen[0]
    assert w_ih is rnn.weight_ih_l0  # the input-to-hidden matrix is not dropped
    mask = w_hh.detach() / rnn.weight_hh_l0.detach()
    assert ((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - p)))).all()
    assert binomial_ok((mask == 0).sum().item(), mask.numel(), p)
    expect, _ = torch.func.functional_call(rnn, {"weight_hh_l0": w_hh.detach()}, args)  # the LSTM ran with it
    torch.testing.assert_close(y, expect)
    y.square().sum().backward()
    g = rnn.weight_hh_l0.grad
    assert g is not None and (g[mask == 0] == 0).all() and g[mask != 0].abs().sum() > 0  # the raw weight learns
    assert rnn.weight_ih_l0.grad.abs().sum() > 0


def test_dropout_values_per_stage_and_their_wiring():
    """The tables (fastai issue #1809 once permuted them silently) and where each rate lands."""
    assert ulmfit.DROPOUTS["classify"] == {"output_p": 0.4, "hidden_p": 0.3, "input_p": 0.4, "embed_p": 0.05,
                                           "weight_p": 0.5}
    assert ulmfit.DROPOUTS["lm"] == {"output_p": 0.1, "hidden_p": 0.15, "input_p": 0.25, "embed_p": 0.02,
                                     "weight_p": 0.2}
    for model, table in ((tiny_lm(0, drop_mult=0.5), "lm"), (tiny_clf(0, drop_mult=0.5), "classify")):
        want = {k: v * 0.5 for k, v in ulmfit.DROPOUTS[table].items()}
        enc = model.encoder
        assert enc.embed_p == want["embed_p"] and enc.input_dp.p == want["input_p"]
        assert [d.p for d in enc.hidden_dps] == [want["hidden_p"]] * (len(enc.rnns) - 1)
        assert enc.weight_p == want["weight_p"]
        assert (model.output_dp.p if table == "lm" else model.head[1].p) == want["output_p"]


@pytest.mark.parametrize("stage", ["lm", "classify"])
def test_the_five_dropouts_strike_at_their_rates(stage):
    """The rows' rate hook, checked here too: each dropout within binomial bounds of its stage's value."""
    for seed in range(3):
        observed = dropout_rates(seed, stage)
        assert {what for what, *_ in observed} == set(ulmfit.DROPOUTS[stage])
        for what, hits, trials, rate in observed:
            assert trials > 100 and binomial_ok(hits, trials, rate), (what, hits, trials, rate)


def test_eval_is_deterministic_and_training_is_not():
    model = tiny_lm(0, drop_mult=1.5)
    ids = rand_ids(0, 2, 12)
    assert torch.equal(fresh(model, ids), fresh(model, ids))
    model.train()
    assert not torch.equal(fresh(model, ids), fresh(model, ids))


def test_decoder_is_tied_to_the_embedding():
    model = tiny_lm(0)
    assert model.decoder.weight is model.encoder.embedding.weight
    assert model.decoder.bias is not None
    assert [r.hidden_size for r in model.encoder.rnns] == [TINY.n_hid, TINY.n_hid, TINY.emb_size]


def test_ar_and_tar_are_added():
    model = tiny_lm(0).train()
    ids = rand_ids(1, 2, 8)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    torch.manual_seed(0)
    full = ulmfit.pretrain_loss(model, batch)
    torch.manual_seed(0)
    logits, raw, dropped, _ = model(batch["input_ids"])
    ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    expect = ce + 2 * dropped.pow(2).mean() + 1 * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    torch.testing.assert_close(full, expect)


def test_hidden_state_is_carried_between_windows_and_detached():
    model = tiny_lm(3)
    ids = rand_ids(3, 2, 10)
    whole = fresh(model, ids)
    first, _, _, state = model(ids[:, :4])
    second = model(ids[:, 4:], state)[0]
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=1e-5)
    _, carried = ulmfit.lm_loss(model.train(), {"input_ids": ids[:, :4], "targets": ids[:, 1:5]})
    assert all(not h.requires_grad and not c.requires_grad for h, c in carried)  # truncated BPTT
    assert [h.shape for h, _ in carried] == [(1, 2, TINY.n_hid)] * 2 + [(1, 2, TINY.emb_size)]


# ---------------------------------------------------------------------------------------------------
# Schedules: STLR, discriminative rates, variable BPTT and its stream


@given(T=st.integers(2, 2000), ratio=st.sampled_from([32.0, 8.0]), cut_frac=st.sampled_from([0.1, 0.25]))
def test_stlr_closed_form(T, ratio, cut_frac):
    cut = max(1, math.floor(T * cut_frac))
    assert math.isclose(ulmfit.stlr(0, T, cut_frac, ratio), 1 / ratio)
    assert math.isclose(ulmfit.stlr(T, T, cut_frac, ratio), 1 / ratio)
    if cut < T:
        assert math.isclose(ulmfit.stlr(cut, T, cut_frac, ratio), 1.0)
    for t in range(0, T + 1, max(1, T // 50)):
        v = ulmfit.stlr(t, T, cut_frac, ratio)
        assert 1 / ratio - 1e-12 <= v <= 1 + 1e-12
        if T * cut_frac == int(T * cut_frac) and T * cut_frac >= 1:  # the paper's eq. 3 verbatim
            p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
            assert math.isclose(v, (1 + p * (ratio - 1)) / ratio, abs_tol=1e-12)


def test_discriminative_rates_step_by_2_6():
    for model, n in ((tiny_lm(0), 4), (tiny_clf(0), 5)):
        opt = ulmfit.discriminative_adam(model, 0.01, 2.6, TINY)
        group_lr = {id(p): g["base_lr"] for g in opt.param_groups for p in g["params"]}
        lrs = [group_lr[id(grp[0])] for grp in model.layer_groups()]
        assert len(lrs) == n and math.isclose(lrs[-1], 0.01)
        for lo, hi in zip(lrs, lrs[1:]):
            assert math.isclose(hi / lo, 2.6)
        assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["params"][0].dim() < 2)
        assert {id(p) for p in model.parameters()} == set(group_lr)


def test_variable_bptt_lengths_follow_their_distribution():
    s = ulmfit.LMStream(torch.arange(1000), 4, 70, 5.0, seed=0)
    n = 20000
    lengths = [s.length(k) for k in range(n)]
    short = [x for x in lengths if x < 52]  # N(35, 5) draws; N(70, 5) falls below 52 with p < 2e-4
    long = [x for x in lengths if x >= 52]
    assert binomial_ok(len(short), n, 0.05)
    assert abs(sum(long) / len(long) - 69.5) < 0.2  # int() floors N(70, 5)
    assert 4.7 < math.sqrt(sum((x - 69.5) ** 2 for x in long) / len(long)) < 5.3
    assert abs(sum(short) / len(short) - 34.5) < 0.5
    assert min(ulmfit.LMStream(torch.arange(1000), 4, 6, 5.0, seed=0).length(k) for k in range(2000)) == 5
    assert lengths[:50] == [s.length(k) for k in range(50)]  # a function of the window's number


def test_lm_stream_windows_are_contiguous_and_each_pass_starts_from_zero(monkeypatch):
    s = ulmfit.LMStream(torch.arange(1000), 4, 20, 5.0, seed=0)
    col, seen, passes = 0, [], 0
    for k in range(60):
        s.state = [(torch.ones(1, 4, 3), torch.ones(1, 4, 3))]  # what the loss leaves for the next window
        b = next(s)
        assert (s.state is None) == (col == 0)  # a new pass over the rows starts from a zero state
        assert torch.equal(b["targets"], b["input_ids"] + 1)
        assert torch.equal(b["input_ids"][:, 0], s.data[:, col])
        assert b["input_ids"].size(1) == min(s.length(k), s.data.size(1) - 1 - col)
        col = (col + b["input_ids"].size(1)) % (s.data.size(1) - 1)
        passes += col == 0
        seen.append(b["input_ids"].size(1))
    assert len(set(seen)) > 3 and passes >= 2
    position = s.position
    assert position["windows"] == 60 and position["state"][0][0].device.type == "cpu"
    other = ulmfit.LMStream(torch.arange(1000), 4, 20, 5.0, seed=0)
    other.position = position
    assert all(torch.equal(next(s)["input_ids"], next(other)["input_ids"]) for _ in range(5))
    monkeypatch.setattr(ulmfit, "WORLD", 2)
    shards = []
    for rank in (0, 1):  # each rank its shard of the stream, both with the same window lengths (one lr)
        monkeypatch.setattr(ulmfit, "RANK", rank)
        shards.append(ulmfit.LMStream(torch.arange(1000), 4, 20, 5.0, seed=0))
    assert shards[0].data.max() < 500 <= shards[1].data.min()
    assert [next(shards[0])["input_ids"].size(1) for _ in range(8)] == [next(shards[1])["input_ids"].size(1)
                                                                         for _ in range(8)]


# ---------------------------------------------------------------------------------------------------
# Classifier: gradual unfreezing, concat pooling, BPT3C


def test_gradual_unfreezing_freezes_groups():
    model = tiny_clf(0).train()
    opt = ulmfit.discriminative_adam(model, 0.01, 2.6, TINY)
    groups = model.layer_groups()
    assert ulmfit.set_trainable(model, len(groups)) is False  # all train already: nothing changed
    for n in range(1, len(groups) + 1):
        assert ulmfit.set_trainable(model, n) is True and ulmfit.set_trainable(model, n) is False
        before = [[p.detach().clone() for p in g] for g in groups]
        clf_loss(model, n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, g in enumerate(groups):
            frozen = k < len(groups) - n
            for p, old in zip(g, before[k]):
                assert p.requires_grad != frozen
                assert torch.equal(p, old) == frozen, (n, k)


@given(seed=st.integers(0, 999), lengths=st.lists(st.integers(1, 14), min_size=2, max_size=4),
       extra=st.integers(0, 5))
def test_concat_pooling_ignores_padding_and_batch_composition(seed, lengths, extra):
    model = tiny_clf(seed)
    T = max(lengths) + extra
    ids = rand_ids(seed, len(lengths), T)
    L = torch.tensor(lengths)
    together = model(ids, L)
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, :n], L[b:b + 1])
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    H, start = model.encode(ids, L)
    pooled = ulmfit.concat_pool(H, start, L)
    for b, n in enumerate(lengths):
        h = H[b, start[b]:n]
        torch.testing.assert_close(pooled[b], torch.cat([H[b, n - 1], h.max(0).values, h.mean(0)]))


def no_dropout_classifier(vocab, **kw):
    torch.manual_seed(0)
    model = ulmfit.Classifier(dataclasses.replace(TINY, vocab_size=vocab, drop_mult=0.0, **kw), 2).train()
    for m in model.modules():  # the head's fixed 0.1 too; batch norm still mixes the batch
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), max_len=st.integers(1, 12),
       bptt=st.integers(2, 7))
def test_bpt3c_gradients_reach_only_the_last_max_len_tokens(lengths, max_len, bptt):
    T, B = max(lengths), len(lengths)
    model = no_dropout_classifier(B * T + 5, bptt=bptt, max_len=max_len)
    ids = (torch.arange(B * T).view(B, T) + 5)  # every position its own word
    L = torch.tensor(lengths)
    H, start = model.encode(ids, L)
    ulmfit.concat_pool(H, start, L).square().sum().backward()  # the head's ReLU could zero a document
    g = model.encoder.embedding.weight.grad
    for b, n in enumerate(lengths):
        for t in range(T):
            got = g[ids[b, t]].abs().sum().item()
            assert (got > 0) == (max(0, n - max_len) <= t < n), (b, t)


def test_bpt3c_backpropagates_across_chunks_within_the_window():
    """The documented choice (the paper's wording; fastai detaches after every chunk): the last position's
    output sends gradients into every earlier chunk of the max_len window, none before it."""
    model = no_dropout_classifier(40, bptt=3, max_len=10)
    ids = torch.arange(5, 19)[None, :]  # 14 tokens in chunks of 3: the window is the last 10
    H, _ = model.encode(ids, torch.tensor([14]))
    H[0, -1].sum().backward()
    g = model.encoder.embedding.weight.grad[ids[0]].abs().sum(1)
    assert (g[4:] > 0).all() and (g[:4] == 0).all()


def test_vocabulary_transfer_copies_known_rows_and_means_new_ones():
    model = tiny_lm(0)
    old = list(ulmfit.SPECIALS) + [f"w{i}" for i in range(V - 5)]
    new = list(ulmfit.SPECIALS) + ["w3", "brand", "w0", "new"]
    state = ulmfit.transfer_vocab(model.state_dict(), old, new)
    emb, bias = model.encoder.embedding.weight, model.decoder.bias
    torch.testing.assert_close(state["encoder.embedding.weight"][5], emb[old.index("w3")])
    torch.testing.assert_close(state["encoder.embedding.weight"][6], emb.mean(0))
    torch.testing.assert_close(state["decoder.bias"][7], bias[old.index("w0")])
    torch.testing.assert_close(state["decoder.bias"][8], bias.mean())
    m2 = ulmfit.build_model(dataclasses.replace(TINY, vocab_size=len(new)))
    m2.load_state_dict(state)
    assert m2.decoder.weight is m2.encoder.embedding.weight


def test_tokenizer_marks_capitals_keeps_unk_and_splits_lines_at_newlines_only():
    assert ulmfit.tokenize("The Film's <unk> end.<br />Bye") == [
        "<maj>", "the", "<maj>", "film's", "<unk>", "end", ".", "<maj>", "bye"]
    itos = ulmfit.build_vocab(Counter("a a a b b c".split()), max_vocab=7, min_freq=2)
    assert itos == list(ulmfit.SPECIALS) + ["a", "b"]
    assert ulmfit.lm_tokens("a\u2028b\x85c\nd\n") == ["a", "b", "c", "<eos>", "d", "<eos>"]  # U+2028, NEL: no break


# ---------------------------------------------------------------------------------------------------
# Runs: resume equals uninterrupted, DDP, the ensemble, errors, the main job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(ulmfit.load_lm_text("builtin")[1][:6000])  # short: windows wrap around passes
    (d / "valid.txt").write_text(ulmfit.load_lm_text("builtin")[2][:3000])
    return d


def run(argv):
    return ulmfit.main(argv + FP32)


def state_of(path):
    return torch.load(path, weights_only=False)


def test_pretrain_resume_equals_uninterrupted_with_the_carried_state(tmp_path, corpus):
    args = ["pretrain", "--data", str(corpus), "--total_steps", "40", "--eval_interval", "7", "--batch_size", "8"]
    full = run(args + ["--out_dir", str(tmp_path / "a")])
    run(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "23"])
    cut = state_of(tmp_path / "b" / "ckpt.pt")["data"][0]["position"]
    assert cut["windows"] == 23 and cut["column"] > 0 and cut["state"] is not None  # mid-pass, a state carried
    part = run(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert full["loss"] == part["loss"]
    a, b = state_of(tmp_path / "a" / "ckpt.pt"), state_of(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    end = a["data"][0]["position"]
    columns = len(ulmfit.lm_tokens((corpus / "train.txt").read_text())) // 8
    assert end["windows"] == 40 and 40 * 5 > columns  # windows of at least 5: the run wrapped around a pass
    for (h1, c1), (h2, c2) in zip(end["state"], b["data"][0]["position"]["state"]):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)


def test_lm_learning_rate_is_stlr_times_the_window_length_and_pretraining_has_one_rate(tmp_path, corpus):
    import json
    run(["pretrain", "--data", str(corpus), "--total_steps", "12", "--log_interval", "1", "--out_dir", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    stream, cfg = ulmfit.LMStream(torch.arange(100), 4, TINY.bptt, TINY.bptt_std, TINY.seed), TINY
    for step, lr in lrs.items():
        want = cfg.lr * ulmfit.stlr(step - 1, 12, cfg.cut_frac, cfg.stlr_ratio) * stream.length(step - 1) / cfg.bptt
        assert math.isclose(lr, want, rel_tol=1e-9), step
    groups = state_of(tmp_path / "ckpt.pt")["optimizer"]["param_groups"]
    assert {g["base_lr"] for g in groups} == {cfg.lr}  # no discriminative rates in pretraining


def test_three_stages_and_classifier_resume_across_unfreezing(tmp_path, corpus):
    run(["pretrain", "--data", str(corpus), "--total_steps", "4", "--out_dir", str(tmp_path / "pre")])
    ft = run(["finetune-lm", "--task_data", "builtin", "--init_from", str(tmp_path / "pre" / "ckpt.pt"),
              "--out_dir", str(tmp_path / "ft")])
    assert ft["ppl"] > 1
    lm = state_of(tmp_path / "ft" / "ckpt.pt")
    base = sorted({g["base_lr"] for g in lm["optimizer"]["param_groups"]})
    assert len(base) == 4 and all(math.isclose(b / a, 2.6) for a, b in zip(base, base[1:]))  # discriminative
    assert torch.equal(lm["model"]["encoder.embedding.weight"], lm["model"]["decoder.weight"])
    args = ["classify", "--task_data", "builtin", "--init_from", str(tmp_path / "ft" / "ckpt.pt")]
    full = run(args + ["--out_dir", str(tmp_path / "a")])
    run(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "11"])  # 8 steps per epoch: unfreezing at 16
    part = run(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert full["acc"] == part["acc"] and full["loss"] == part["loss"]
    a, b = state_of(tmp_path / "a" / "ckpt.pt"), state_of(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == 24 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    clf = ulmfit.Classifier(dataclasses.replace(TINY, vocab_size=len(a["vocab"])), 2)
    clf.load_state_dict(a["model"])
    assert torch.equal(clf.encoder.rnns[0].weight_ih_l0, lm["model"]["encoder.rnns.0.weight_ih_l0"])  # frozen


def _ddp_worker(rank, out):
    import importlib
    torch.set_num_threads(1)
    mod, models = importlib.reload(ulmfit), []  # RANK and WORLD are read when the script is loaded
    real_lm, real_clf = mod.build_model, mod.Classifier
    mod.build_model = lambda cfg: models.append(real_lm(cfg)) or models[-1]
    mod.Classifier = lambda cfg, n: models.append(real_clf(cfg, n)) or models[-1]
    mod.main(["pretrain", "--data", "builtin", "--total_steps", "4", "--grad_accum", "2", "--out_dir",
              f"{out}/pre", *FP32])
    mod.main(["classify", "--task_data", "builtin", "--clf_epochs", "2", "--out_dir", f"{out}/clf", *FP32])
    torch.save([m.state_dict() for m in models], f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_stay_identical_through_variable_windows_and_unfreezing(tmp_path):
    a, b = run_two_ranks(_ddp_worker, tmp_path)
    params = [[k for k in x if "running_" not in k and "num_batches" not in k] for x in a]  # batch norm's
    assert len(a) == 2 and all(torch.equal(x[k], y[k]) for x, y, ks in zip(a, b, params) for k in ks)  # own stats
    assert len(state_of(tmp_path / "pre" / "ckpt.pt")["data"]) == 2
    assert state_of(tmp_path / "clf" / "ckpt.pt")["step"] == 2 * (64 // (8 * 2))


def test_ensemble_averages_a_forward_and_a_backward_classifier(tmp_path, monkeypatch, capsys):
    for way in ("fwd", "bwd"):
        run(["classify", "--task_data", "builtin", "--clf_epochs", "1", "--out_dir", str(tmp_path / way)]
            + ["--backwards"] * (way == "bwd"))
    seen, real = [], ulmfit.accuracy
    monkeypatch.setattr(ulmfit, "accuracy", lambda probs, ex: seen.append(probs) or real(probs, ex))
    paths = f"{tmp_path / 'fwd' / 'ckpt.pt'},{tmp_path / 'bwd' / 'ckpt.pt'}"
    r = run(["ensemble", "--task_data", "builtin", "--init_from", paths])
    fwd_p, bwd_p, ens_p = seen
    torch.testing.assert_close(ens_p, (fwd_p + bwd_p) / 2)
    assert set(r) == {"fwd_acc", "bwd_acc", "acc"} and not torch.equal(fwd_p, bwd_p)
    for init, message in ((str(tmp_path / "fwd" / "ckpt.pt"), "FWD,BWD"),
                          (paths + ",x", "FWD,BWD"),
                          (f"{tmp_path / 'bwd' / 'ckpt.pt'},{tmp_path / 'fwd' / 'ckpt.pt'}", "a forward and a backward")):
        with pytest.raises(SystemExit) as e:
            run(["ensemble", "--task_data", "builtin", "--init_from", init])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_errors_through_the_command_line(tmp_path, capsys, corpus):
    nolabel = tmp_path / "tsv"
    nolabel.mkdir()
    (nolabel / "train.tsv").write_text("pos\tgood film\nno label here\n")
    (nolabel / "dev.tsv").write_text("pos\tfine\n")
    (tmp_path / "bad.tsv.gz").write_bytes(b"not gzip")
    run(["classify", "--task_data", "builtin", "--max_steps", "1", "--out_dir", str(tmp_path / "clf")])
    cases = [
        (["pretrain", "--data", "nosuchset"], "unknown dataset"),
        (["pretrain", "--n_hid", "0"], "--n_hid must be positive"),
        (["pretrain", "--bptt", "-3"], "--bptt must be positive"),
        (["pretrain", "--drop_mult", "2.5"], "dropouts must stay in [0, 1)"),
        (["pretrain", "--cut_frac", "1.5"], "--cut_frac"),
        (["pretrain", "--data", str(corpus), "--batch_size", "500"], "too few for --batch_size"),
        (["pretrain", "--init_from", str(tmp_path / "clf" / "ckpt.pt")], "starts from scratch"),
        (["classify", "--task_data", str(nolabel)], "expected label<TAB>text"),
        (["classify", "--task_data", str(tmp_path / "nowhere")], "unknown classification data"),
        (["finetune-lm", "--task_data", "builtin"], "needs --init_from"),
        (["finetune-lm", "--init_from", str(tmp_path / "missing.pt")], "does not exist"),
        (["finetune-lm", "--init_from", str(tmp_path / "clf" / "ckpt.pt")], "is a classify checkpoint, not pretrain"),
        (["ensemble", "--init_from", ""], "FWD,BWD"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run(argv + ["--out_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
        assert message in err[0], (argv, err[0])
    with pytest.raises(SystemExit):  # PyTorch's LSTM has no float16 kernel on the CPU: said before any work
        ulmfit.main(["pretrain", "--preset", "tiny", "--device", "cpu", "--dtype", "float16", "--out_dir", "o"])
    assert "float16 needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ulmfit.UserError, match="gzip-compressed"):
        ulmfit.read_imdb(tmp_path / "bad.tsv.gz")
    assert not (tmp_path / "o").exists()


def test_main_job_runs_end_to_end_in_a_subprocess(tmp_path):
    """One real subprocess: the main job on the built-in data, each ULMFiT stage from the one before, then the same
    classifier from scratch, and the claim line (stdout and metrics.jsonl); --resume then finds every stage
    complete and only evaluates again."""
    cmd = [sys.executable, str(ROOT / "ulmfit.py"), "--preset", "tiny", "--data", "builtin", "--task_data", "builtin",
           "--out_dir", str(tmp_path), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NLP_LINEAGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "pretrained, " in r.stdout and " fine-tuned" in r.stdout
    for stage in ("pretrain", "finetune-lm", "classify", "scratch"):
        assert (tmp_path / stage / "ckpt.pt").is_file() and (tmp_path / stage / "metrics.jsonl").is_file()
    assert state_of(tmp_path / "classify" / "ckpt.pt")["config"]["init_from"] == str(tmp_path / "finetune-lm" / "best.pt")
    scratch = state_of(tmp_path / "scratch" / "ckpt.pt")["config"]
    assert scratch["init_from"] == "" and scratch["lr_decay"] == 1 and not scratch["gradual_unfreezing"]
    acc = {s: [json.loads(x) for x in (tmp_path / s / "metrics.jsonl").read_text().splitlines()][-1]["acc"]
           for s in ("classify", "scratch")}
    claim = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(claim) == 1 and claim[0] == {
        "split": "claim", "task": "builtin-synthetic", "metric": "accuracy", "with": 100 * acc["classify"],
        "without": 100 * acc["scratch"], "differs": "builtin LM, builtin-synthetic LM fine-tuning, gradual unfreezing "
        "vs the same classifier from scratch; 64 labels each"}
    line = r.stdout.strip().splitlines()[-1]
    assert line == f"claim: builtin-synthetic accuracy {100 * acc['classify']:.1f} vs {100 * acc['scratch']:.1f} " \
                   f"({claim[0]['differs']})"
    again = ulmfit.main(["--preset", "tiny", "--data", "builtin", "--task_data", "builtin", "--out_dir", str(tmp_path),
                         "--device", "cpu", "--resume"])
    assert [again[s]["step"] for s in ("pretrain", "finetune-lm", "classify", "scratch")] == [8, 6, 24, 24]
    assert again["claim"]["with"] == 100 * acc["classify"] and again["claim"]["without"] == 100 * acc["scratch"]


def test_loaders_read_the_shared_datasets(shared_data):
    name, train, val = ulmfit.load_lm_text(str(shared_data / "ptb"))
    tokens = ulmfit.lm_tokens(val)
    assert tokens.count("<eos>") == 3370 and tokens.count("<unk>") > 0  # SOURCE.md: 3,370 lines
    rows = ulmfit.read_imdb(shared_data / "imdb" / "test.tsv.gz")
    assert len(rows) == 25000 and Counter(l for l, _ in rows) == {"pos": 12500, "neg": 12500}
    _, tr, dev = ulmfit.load_classification(str(shared_data / "sst2"), 0)
    assert len(tr) == 67349 and len(dev) == 872
    _, tr, test = ulmfit.load_classification(str(shared_data / "imdb"), 0, 100, 2000)
    assert len(tr) == 100 and len(test) == 2000  # the documented seeded subsamples


def test_imdb_archive_is_converted_to_the_shared_layout(tmp_path, monkeypatch):
    """`--task_data imdb` downloads aclImdb_v1.tar.gz; its review files (train/test, pos/neg, <id>_<rating>.txt,
    the unsup split and other files ignored) become {train,test}.tsv.gz in ../shared/data/imdb's layout,
    once, and are read back with their labels; text with a tab survives."""
    import io
    import tarfile
    reviews = {"aclImdb/train/pos/0_9.txt": "Great <br />film.", "aclImdb/train/neg/3_2.txt": "Bad\tone.",
               "aclImdb/train/pos/10_7.txt": "Fine.", "aclImdb/test/neg/1_1.txt": "Awful\u2028still.",
               "aclImdb/test/pos/2_8.txt": "Lovely.", "aclImdb/train/unsup/5_0.txt": "unlabelled",
               "aclImdb/README": "readme"}
    with tarfile.open(tmp_path / "aclImdb_v1.tar.gz", "w:gz") as tar:
        for name, text in reviews.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(ulmfit, "download", lambda name, fallback: tmp_path)
    name, train, test = ulmfit.load_classification("imdb", 0)
    assert train == [("pos", "Great <br />film."), ("pos", "Fine."), ("neg", "Bad\tone.")]  # pos, neg; by id
    assert test == [("pos", "Lovely."), ("neg", "Awful\u2028still.")]
    (tmp_path / "aclImdb_v1.tar.gz").write_bytes(b"")  # converted once: the archive is not read again
    assert ulmfit.load_classification("imdb", 0)[1] == train
