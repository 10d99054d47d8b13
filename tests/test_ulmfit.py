"""ulmfit.py: the AWD-LSTM's five dropouts, STLR, discriminative rates, gradual unfreezing, concat pooling,
BPT3C, variable BPTT, resume, errors, and the rows of the cross-model property suite."""
import dataclasses
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
from torch.func import functional_call

import ulmfit
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
V = 50
TINY = dataclasses.replace(ulmfit.PRESETS["tiny"], vocab_size=V)


def tiny_lm(seed, **kw):
    torch.manual_seed(seed)
    return ulmfit.build_model(dataclasses.replace(TINY, **kw)).eval()


def tiny_clf(seed, n_classes=3, **kw):
    torch.manual_seed(seed)
    model = ulmfit.Classifier(dataclasses.replace(TINY, bptt=3, max_len=5, **kw), n_classes)
    for bn in (model.head[0], model.head[4]):  # non-trivial running statistics for eval mode
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def rand_ids(seed, B, T):
    return torch.randint(ulmfit.BOS, V, (B, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, seed):
    ids = rand_ids(seed, 3, 7)
    return ulmfit.pretrain_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})


def frozen_clf(seed):
    model = tiny_clf(seed)
    ulmfit.set_trainable(model, 2)  # gradual unfreezing, second epoch: head and the last LSTM
    return model


def clf_loss(model, seed):
    ids = rand_ids(seed, 4, 9)
    return ulmfit.classifier_loss(model, {"input_ids": ids, "lengths": torch.tensor([9, 4, 7, 1]),
                                          "labels": torch.tensor([0, 1, 2, 1])})


def fresh(model, ids):
    return model(ids, reset=True)[0]


PROPERTY_ROWS = [
    Rows(name="ulmfit-lm", model=tiny_lm, ids=rand_ids, causal=fresh, loss=lm_loss),
    Rows(name="ulmfit-lm-backward", model=tiny_lm, ids=rand_ids, direction="backward",
         causal=lambda m, ids: fresh(m, ids.flip(1)).flip(1)),  # how --backwards reads text
    Rows(name="ulmfit-classifier", model=tiny_clf, ids=rand_ids,
         padded=lambda m, ids, lengths: m(ids, lengths)[:, None, :].expand(-1, ids.size(1), -1)),
    Rows(name="ulmfit-classifier-frozen", model=frozen_clf, ids=rand_ids, loss=clf_loss),
]



def binomial_ok(zeros: int, n: int, p: float) -> bool:
    return abs(zeros - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


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
    assert ulmfit.embedding_dropout(w, p, training=False) is w


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


@given(n_in=st.integers(1, 6), n_out=st.integers(4, 12), p=st.floats(0.1, 0.8), seed=st.integers(0, 999))
def test_weight_drop_touches_only_hidden_to_hidden_and_the_raw_weight_learns(n_in, n_out, p, seed):
    layer = ulmfit.WeightDropLSTM(n_in, n_out, p).train()
    x = torch.randn(2, 5, n_in)
    torch.manual_seed(seed)
    y, _ = layer(x)
    torch.manual_seed(seed)  # the same draw, made by hand: mask on weight_hh only
    mask = F.dropout(torch.ones_like(layer.lstm.weight_hh_l0), p, True)
    expect, _ = functional_call(layer.lstm, {"weight_hh_l0": layer.lstm.weight_hh_l0 * mask}, (x, None))
    torch.testing.assert_close(y, expect)
    y.square().sum().backward()
    g = layer.lstm.weight_hh_l0.grad
    assert g is not None and (g[mask == 0] == 0).all() and g[mask != 0].abs().sum() > 0
    assert layer.lstm.weight_ih_l0.grad.abs().sum() > 0
    assert binomial_ok((mask == 0).sum().item(), mask.numel(), p)


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
        assert all(r.weight_p == want["weight_p"] for r in enc.rnns)
        out_p = model.output_dp.p if table == "lm" else model.head[1].p
        assert out_p == want["output_p"]


def test_eval_is_deterministic_and_training_is_not():
    model = tiny_lm(0, drop_mult=1.5)
    ids = rand_ids(0, 2, 12)
    assert torch.equal(fresh(model, ids), fresh(model, ids))
    model.train()
    assert not torch.equal(fresh(model, ids), fresh(model, ids))


def test_decoder_is_tied_to_the_embedding():
    model = tiny_lm(0)
    assert model.decoder.weight.data_ptr() == model.encoder.embedding.weight.data_ptr()
    assert model.decoder.weight is model.encoder.embedding.weight
    assert model.decoder.bias is not None
    assert [r.lstm.hidden_size for r in model.encoder.rnns] == [TINY.n_hid, TINY.n_hid, TINY.emb_size]


def test_ar_and_tar_are_added():
    model = tiny_lm(0).train()
    ids = rand_ids(1, 2, 8)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    torch.manual_seed(0)
    full = ulmfit.pretrain_loss(model, batch)
    torch.manual_seed(0)
    logits, raw, dropped = model(batch["input_ids"])
    ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    expect = ce + 2 * dropped.pow(2).mean() + 1 * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    torch.testing.assert_close(full, expect)


def test_hidden_state_is_carried_between_windows():
    model = tiny_lm(3)
    ids = rand_ids(3, 2, 10)
    whole = fresh(model, ids)
    first = model(ids[:, :4], reset=True)[0]
    second = model(ids[:, 4:], reset=False)[0]
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=1e-5)
    assert all(not h.requires_grad for h, _ in model.hidden)  # detached: truncated BPTT


# ---------------------------------------------------------------------------------------------------
# Schedules: STLR, discriminative rates, variable BPTT


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
        opt = ulmfit.make_optimizer(model, 0.01, TINY, torch.device("cpu"))
        group_lr = {}
        for g in opt.param_groups:
            for p in g["params"]:
                group_lr[id(p)] = g["base_lr"]
        lrs = [group_lr[id(grp[0])] for grp in model.layer_groups()]
        assert len(lrs) == n and math.isclose(lrs[-1], 0.01)
        for lo, hi in zip(lrs, lrs[1:]):
            assert math.isclose(hi / lo, 2.6)
        assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["params"][0].dim() < 2)
        assert {id(p) for p in model.parameters()} == set(group_lr)


def test_variable_bptt_lengths_follow_their_distribution():
    import random
    rng = random.Random(0)
    n = 20000
    lengths = [ulmfit.bptt_length(rng, 70, 5.0) for _ in range(n)]
    short = [x for x in lengths if x < 52]  # N(35, 5) draws; N(70, 5) falls below 52 with p < 2e-4
    long = [x for x in lengths if x >= 52]
    assert binomial_ok(len(short), n, 0.05)
    assert abs(sum(long) / len(long) - 69.5) < 0.2  # int() floors N(70, 5)
    sd = math.sqrt(sum((x - 69.5) ** 2 for x in long) / len(long))
    assert 4.7 < sd < 5.3
    assert abs(sum(short) / len(short) - 34.5) < 0.5
    assert min(ulmfit.bptt_length(rng, 6, 5.0) for _ in range(2000)) == 5  # at least 5


def test_lm_stream_windows_are_contiguous_and_lr_scale_uses_their_length():
    ids = torch.arange(1000)
    s = ulmfit.LMStream(ids, 4, 20, 5.0, seed=0)
    col, seen = 0, []
    for _ in range(30):
        b = next(s)
        assert bool(b["reset"]) == (col == 0)
        assert torch.equal(b["targets"], b["input_ids"] + 1)
        assert torch.equal(b["input_ids"][:, 0], s.data[:, col])
        col = (col + b["input_ids"].size(1)) % (s.data.size(1) - 1)
        seen.append(b["input_ids"].size(1))
    assert len(set(seen)) > 3 and min(seen) >= 1


# ---------------------------------------------------------------------------------------------------
# Classifier: gradual unfreezing, concat pooling, BPT3C


def test_gradual_unfreezing_freezes_groups():
    model = tiny_clf(0).train()
    opt = ulmfit.make_optimizer(model, 0.01, TINY, torch.device("cpu"))
    groups = model.layer_groups()
    for n in range(1, len(groups) + 1):
        ulmfit.set_trainable(model, n)
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


@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), max_len=st.integers(1, 12),
       bptt=st.integers(2, 7))
def test_bpt3c_gradients_reach_only_the_last_max_len_tokens(lengths, max_len, bptt):
    T = max(lengths)
    B = len(lengths)
    torch.manual_seed(0)
    model = ulmfit.Classifier(dataclasses.replace(TINY, vocab_size=B * T + 5, bptt=bptt, max_len=max_len), 2)
    model.train()
    for m in model.modules():  # keep the mixing of batch norm but no random drops
        if isinstance(m, (ulmfit.LockedDropout, torch.nn.Dropout)):
            m.p = 0.0
    model.encoder.embed_p = 0.0
    for r in model.encoder.rnns:
        r.weight_p = 0.0
    ids = (torch.arange(B * T).view(B, T) + 5)  # every position its own word
    L = torch.tensor(lengths)
    H, start = model.encode(ids, L)
    ulmfit.concat_pool(H, start, L).square().sum().backward()  # the head's ReLU could zero a document
    g = model.encoder.embedding.weight.grad
    for b, n in enumerate(lengths):
        for t in range(T):
            got = g[ids[b, t]].abs().sum().item()
            if t < max(0, n - max_len) or t >= n:
                assert got == 0, (b, t)
            else:
                assert got > 0, (b, t)


def test_vocabulary_transfer_copies_known_rows_and_means_new_ones():
    model = tiny_lm(0)
    old = list(ulmfit.SPECIALS) + [f"w{i}" for i in range(V - 5)]
    new = list(ulmfit.SPECIALS) + ["w3", "brand", "w0", "new"]
    state = ulmfit.transfer_vocab(model.state_dict(), old, new)
    emb, bias = model.encoder.embedding.weight, model.decoder.bias
    torch.testing.assert_close(state["encoder.embedding.weight"][5], emb[old.index("w3")])
    torch.testing.assert_close(state["encoder.embedding.weight"][6], emb.mean(0))
    torch.testing.assert_close(state["decoder.bias"][8], bias.mean())
    m2 = ulmfit.build_model(dataclasses.replace(TINY, vocab_size=len(new)))
    m2.load_state_dict(state)
    assert m2.decoder.weight is m2.encoder.embedding.weight


def test_tokenizer_marks_capitals_and_keeps_unk():
    assert ulmfit.tokenize("The Film's <unk> end.<br />Bye") == [
        "<maj>", "the", "<maj>", "film's", "<unk>", "end", ".", "<maj>", "bye"]
    v = ulmfit.Vocab.build(Counter("a a a b b c".split()), max_vocab=7, min_freq=2)
    assert v.itos == list(ulmfit.SPECIALS) + ["a", "b"] and v.encode(["c", "a"]) == [ulmfit.UNK, 5]


# ---------------------------------------------------------------------------------------------------
# Runs: resume equals uninterrupted, errors, the main job


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "text.txt").write_text("\n".join(ulmfit.builtin_text()[:12]))
    return d / "text.txt"


def run(argv):
    return ulmfit.main(argv + ["--preset", "tiny", "--device", "cpu", "--dtype", "float32"])


def state_of(path):
    return torch.load(path, weights_only=False)


def test_pretrain_resume_equals_uninterrupted(tmp_path, corpus):
    args = ["pretrain", "--data", str(corpus), "--total_steps", "8", "--eval_interval", "3"]
    full = run(args + ["--out_dir", str(tmp_path / "a")])
    run(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "5"])
    part = run(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert full["loss"] == part["loss"]
    a, b = state_of(tmp_path / "a" / "ckpt.pt"), state_of(tmp_path / "b" / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (h1, c1), (h2, c2) in zip(a["data"][0]["hidden"], b["data"][0]["hidden"]):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)


def test_three_stages_and_classifier_resume_across_unfreezing(tmp_path, corpus):
    run(["pretrain", "--data", str(corpus), "--total_steps", "4", "--out_dir", str(tmp_path / "pre")])
    ft = run(["finetune-lm", "--task_data", "builtin", "--init_from", str(tmp_path / "pre" / "ckpt.pt"),
              "--out_dir", str(tmp_path / "ft")])
    assert ft["ppl"] > 1
    args = ["classify", "--task_data", "builtin", "--init_from", str(tmp_path / "ft" / "ckpt.pt")]
    full = run(args + ["--out_dir", str(tmp_path / "a")])
    run(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "11"])  # 8 steps per epoch
    part = run(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert full["acc"] == part["acc"] and full["loss"] == part["loss"]
    a, b = state_of(tmp_path / "a" / "ckpt.pt"), state_of(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    pre = state_of(tmp_path / "ft" / "ckpt.pt")["model"]
    assert torch.equal(pre["encoder.embedding.weight"], pre["decoder.weight"])


def test_bidirectional_ensemble_averages_both_directions(tmp_path, corpus, monkeypatch):
    seen = []
    real = ulmfit.accuracy
    monkeypatch.setattr(ulmfit, "accuracy", lambda probs, ex: seen.append(probs) or real(probs, ex))
    r = run(["--data", str(corpus), "--task_data", "builtin", "--total_steps", "2", "--finetune_steps", "2",
             "--clf_epochs", "1", "--bidirectional", "--out_dir", str(tmp_path)])
    assert set(r) == {"fwd", "bwd", "ensemble"}
    bwd = state_of(tmp_path / "bwd" / "classify" / "ckpt.pt")
    assert bwd["config"]["backwards"] and not state_of(tmp_path / "fwd" / "pretrain" / "ckpt.pt")["config"]["backwards"]
    fwd_p, bwd_p, ens_p = seen[-3:]
    torch.testing.assert_close(ens_p, (fwd_p + bwd_p) / 2)
    assert set(r["ensemble"]) == {"fwd_acc", "bwd_acc", "acc"}


def test_errors_through_the_command_line(tmp_path, capsys, corpus):
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    nolabel = tmp_path / "tsv"
    nolabel.mkdir()
    (nolabel / "train.tsv").write_text("pos\tgood film\nno label here\n")
    (nolabel / "dev.tsv").write_text("pos\tfine\n")
    run(["pretrain", "--data", str(corpus), "--total_steps", "2", "--out_dir", str(tmp_path / "ok")])
    cases = [
        (["pretrain", "--data", "nosuchset"], "unknown dataset"),
        (["pretrain", "--preset", "huge"], "invalid choice"),
        (["pretrain", "--n_hid", "0"], "--n_hid must be positive"),
        (["pretrain", "--bptt", "-3"], "--bptt must be positive"),
        (["pretrain", "--drop_mult", "2.5"], "dropouts must stay in [0, 1)"),
        (["pretrain", "--data", str(bad_utf8)], "not UTF-8"),
        (["pretrain", "--data", str(empty)], "is empty"),
        (["classify", "--task_data", str(nolabel)], "expected label<TAB>text"),
        (["classify", "--task_data", str(tmp_path / "nowhere")], "unknown classification data"),
        (["finetune-lm", "--task_data", "builtin"], "needs --init_from"),
        (["finetune-lm", "--init_from", str(tmp_path / "missing.pt")], "does not exist"),
        (["pretrain", "--data", str(corpus), "--out_dir", str(tmp_path / "ok"), "--resume", "--emb_size", "20"],
         "emb_size"),
        (["pretrain", "--data", str(corpus), "--out_dir", str(tmp_path / "nan"), "--lr", "1e30",
          "--total_steps", "6", "--grad_clip", "0"], "loss became"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
        assert message in err[0], (argv, err[0])


@pytest.mark.slow
def test_main_job_runs_end_to_end_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "ulmfit.py"), "--preset", "tiny", "--data", "builtin",
                        "--task_data", "builtin", "--out_dir", str(tmp_path), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "classifier accuracy" in r.stdout and "fine-tuned LM ppl" in r.stdout
    for stage in ("pretrain", "finetune-lm", "classify"):
        assert (tmp_path / stage / "ckpt.pt").is_file() and (tmp_path / stage / "metrics.jsonl").is_file()


def test_loaders_read_the_shared_datasets(shared_data):
    name, train, val = ulmfit.load_lm_text(str(shared_data / "ptb"))
    tokens = ulmfit.lm_tokens(val)
    assert tokens.count("<eos>") == 3370 and tokens.count("<unk>") > 0  # SOURCE.md: 3,370 lines
    rows = ulmfit.read_imdb(shared_data / "imdb" / "test.tsv.gz")
    assert len(rows) == 25000 and Counter(l for l, _ in rows) == {"pos": 12500, "neg": 12500}
    _, tr, dev = ulmfit.load_classification(str(shared_data / "sst2"), 0)
    assert len(tr) == 67349 and len(dev) == 872


def test_imdb_archive_is_converted_to_the_shared_layout(tmp_path, monkeypatch):
    """`--task_data imdb` downloads aclImdb_v1.tar.gz; its review files (train/test, pos/neg, <id>_<rating>.txt,
    the unsup split and other files ignored) become {train,test}.tsv.gz in ../shared/data/imdb's layout,
    once, and are read back with their labels; text with a tab survives."""
    import io
    import tarfile
    reviews = {"aclImdb/train/pos/0_9.txt": "Great <br />film.", "aclImdb/train/neg/3_2.txt": "Bad\tone.",
               "aclImdb/train/pos/10_7.txt": "Fine.", "aclImdb/test/neg/1_1.txt": "Awful.",
               "aclImdb/test/pos/2_8.txt": "Lovely.", "aclImdb/train/unsup/5_0.txt": "unlabelled",
               "aclImdb/README": "readme"}
    with tarfile.open(tmp_path / "aclImdb_v1.tar.gz", "w:gz") as tar:
        for name, text in reviews.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(ulmfit, "download", lambda name, files: tmp_path)
    name, train, test = ulmfit.load_classification("imdb", 0)
    assert train == [("pos", "Great <br />film."), ("pos", "Fine."), ("neg", "Bad\tone.")]  # pos, neg; by id
    assert test == [("pos", "Lovely."), ("neg", "Awful.")]
    (tmp_path / "aclImdb_v1.tar.gz").write_bytes(b"")  # converted once: the archive is not read again
    assert ulmfit.load_classification("imdb", 0)[1] == train


def test_classifier_flops_count_backward_only_for_unfrozen_layers():
    model = tiny_clf(0)
    n = sum(p.numel() for r in model.encoder.rnns for p in r.parameters())
    ulmfit.set_trainable(model, len(model.layer_groups()))
    assert model.flops_per_token() == 6 * n
    ulmfit.set_trainable(model, 1)  # the head only: the LSTMs run forward
    assert model.flops_per_token() == 2 * n
