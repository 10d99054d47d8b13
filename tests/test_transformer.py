"""What is particular to transformer.py: the paper's attention and masks, parity with torch.nn's Transformer
layers, the schedule, label smoothing, three-way tying, decoding, BLEU against sacrebleu, training, errors."""
import dataclasses
import io
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import transformer as T
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
V = 40  # a tiny vocabulary: ids 0..36 are tokens, 37 <s>, 38 </s>, 39 <pad>


def tiny(seed=0, **kw) -> T.Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(T.PRESETS["tiny"], vocab_size=V, d_model=32, d_ff=48, n_head=4, dropout=0.1, **kw)
    return T.build_model(cfg).eval()


def ids(seed, B, T_):
    return torch.randint(0, V - 3, (B, T_), generator=torch.Generator().manual_seed(seed))


def fixed_src(B):
    return ids(12345, B, 5)


def record(model, on=True):
    mods = [m for m in model.modules() if isinstance(m, T.MultiHeadAttention)]
    for m in mods:
        m.record = on
    return mods


def attention_rows(model, x):
    """Encoder self (S = T), decoder self (S = T + 1), encoder-decoder (S = T), for every layer."""
    tgt_in = torch.cat([torch.full((x.size(0), 1), model.bos), x.flip(1)], dim=1)
    record(model)
    model(x, tgt_in)
    H, T_ = model.cfg.n_head, x.size(1)
    out = [(layer.self_attn.weights, (H, T_)) for layer in model.encoder]
    for layer in model.decoder:
        out += [(layer.self_attn.weights, (H, T_ + 1)), (layer.cross_attn.weights, (H, T_))]
    record(model, False)
    return out


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(0, V - 3, (3, 7), generator=g), torch.randint(0, V - 3, (3, 6), generator=g)
    src[0, 4:], tgt[1, 3:] = model.pad, model.pad
    tgt_in = torch.cat([torch.full((3, 1), model.bos), tgt[:, :-1]], 1)
    return T.pretrain_loss(model, {"src": src, "tgt_in": tgt_in, "tgt_out": tgt})


PROPERTY_ROWS = [Rows(
    name="transformer",
    model=tiny,
    ids=ids,
    attention=attention_rows,
    causal=lambda m, x: m(fixed_src(x.size(0)), x),  # decoder logits (B, T, V) for target input x
    padded=lambda m, x, lengths: m.encode(x, torch.arange(x.size(1))[None] < lengths[:, None])[0],
    loss=loss_of,
)]


# -----------------------------------------------------------------------------------------------------
# Model


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.integers(1, 9), T_=st.integers(1, 9))
@settings(max_examples=10)
def test_attention_shapes_for_all_three_kinds(seed, B, S, T_):
    model = tiny(seed)
    src, tgt = ids(seed, B, S), ids(seed + 1, B, T_)
    src[0, S // 2 + 1:] = model.pad  # the first sentence has source padding
    record(model)
    model(src, tgt)
    H = model.cfg.n_head
    for layer in model.encoder:
        assert layer.self_attn.weights.shape == (B, H, S, S)
    for layer in model.decoder:
        self_w, cross_w = layer.self_attn.weights, layer.cross_attn.weights
        assert self_w.shape == (B, H, T_, T_) and cross_w.shape == (B, H, T_, S)
        assert torch.allclose(self_w.sum(-1), torch.ones(())) and torch.allclose(cross_w.sum(-1), torch.ones(()))
        assert (self_w.triu(1) == 0).all()  # no position looks ahead
        assert (cross_w[0, :, :, S // 2 + 1:] == 0).all()  # nor at source padding


@given(seed=st.integers(0, 2**16), t=st.integers(0, 6))
@settings(max_examples=10)
def test_decoder_outputs_at_t_ignore_later_target_tokens(seed, t):
    model, src = tiny(seed), ids(seed, 2, 6)
    tgt = ids(seed + 1, 2, 8)
    changed = tgt.clone()
    changed[:, t + 1:] = ids(seed + 2, 2, 8)[:, t + 1:]
    torch.testing.assert_close(model(src, tgt)[:, :t + 1], model(src, changed)[:, :t + 1], atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 2**16), extra=st.integers(1, 5))
@settings(max_examples=10)
def test_decoder_ignores_source_padding_content_and_amount(seed, extra):
    """Each sentence alone, unpadded, gives the same logits as in a padded batch, whatever the padding holds."""
    model = tiny(seed)
    lengths = [3, 6, 1]
    src = ids(seed, 3, 6 + extra)  # garbage everywhere after each length
    mask = torch.arange(6 + extra)[None] < torch.tensor(lengths)[:, None]
    tgt = ids(seed + 1, 3, 4)
    batched = model(src, tgt, mask)
    padded = model(src.masked_fill(~mask, model.pad), tgt)  # the same, padded with <pad>
    for b, n in enumerate(lengths):
        alone = model(src[b:b + 1, :n], tgt[b:b + 1])[0]
        torch.testing.assert_close(batched[b], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[b], alone, atol=1e-5, rtol=1e-5)


def test_sinusoids_match_the_formula():
    pe = T.sinusoids(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


def copy_mha(ours: T.MultiHeadAttention, theirs: nn.MultiheadAttention):
    theirs.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
    theirs.out_proj.weight.copy_(ours.o.weight)
    theirs.out_proj.bias.copy_(ours.o.bias)


@torch.no_grad()
def test_parity_with_torch_encoder_and_decoder_layers():
    model = tiny(3)
    for p in model.parameters():  # random biases and norms too, so a misplaced one shows
        p.add_(0.1 * torch.randn_like(p))
    cfg = model.cfg
    kw = dict(d_model=cfg.d_model, nhead=cfg.n_head, dim_feedforward=cfg.d_ff, dropout=0.1, batch_first=True,
              layer_norm_eps=1e-6, norm_first=False)
    enc, dec = nn.TransformerEncoderLayer(**kw).eval(), nn.TransformerDecoderLayer(**kw).eval()
    ours_enc, ours_dec = model.encoder[0], model.decoder[0]
    copy_mha(ours_enc.self_attn, enc.self_attn)
    copy_mha(ours_dec.self_attn, dec.self_attn)
    copy_mha(ours_dec.cross_attn, dec.multihead_attn)
    for ours, theirs in ((ours_enc, enc), (ours_dec, dec)):
        theirs.linear1.load_state_dict(ours.ff.w_1.state_dict())
        theirs.linear2.load_state_dict(ours.ff.w_2.state_dict())
        subs = [ours.sub_1, ours.sub_2] + ([ours.sub_3] if ours is ours_dec else [])
        for i, sub in enumerate(subs, 1):
            getattr(theirs, f"norm{i}").load_state_dict(sub.norm.state_dict())
    x, y = torch.randn(2, 7, cfg.d_model), torch.randn(2, 5, cfg.d_model)
    real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    torch.testing.assert_close(ours_enc(x, real[:, None, None, :]), enc(x, src_key_padding_mask=~real),
                               atol=1e-5, rtol=1e-5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(ours_dec(y, x, real[:, None, None, :], causal),
                               dec(y, x, tgt_mask=~causal, memory_key_padding_mask=~real), atol=1e-5, rtol=1e-5)


def test_three_way_tying_shares_storage_and_gets_gradient_from_each_use():
    model = tiny(1).train()
    mats = [p for p in model.parameters() if p.shape == (V, model.cfg.d_model)]
    assert len(mats) == 1  # one matrix: source embedding, target embedding and pre-softmax linear
    src, tgt = ids(1, 2, 6), ids(2, 2, 5)
    batch = {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}
    torch.manual_seed(0)
    T.pretrain_loss(model, batch).backward()
    tied = model.embed.weight.grad.clone()
    # the same computation with three separate copies of the matrix, one per use
    W = model.embed.weight.detach()
    uses = [W.clone().requires_grad_() for _ in range(3)]
    del model.embed.weight
    try:
        torch.manual_seed(0)
        model.embed.weight = uses[0]
        memory, mask = model.encode(src)
        model.embed.weight = uses[1]
        logits = model.decode(batch["tgt_in"], memory, mask) @ uses[2].T
        T.label_smoothed_loss(logits, batch["tgt_out"], model.cfg.label_smoothing, model.pad).backward()
    finally:
        model.embed.weight = nn.Parameter(W)
    for u in uses:
        assert u.grad.abs().sum() > 0
    torch.testing.assert_close(tied, sum(u.grad for u in uses), atol=1e-6, rtol=1e-5)


def test_paper_preset_size():
    model = T.build_model(dataclasses.replace(T.PRESETS["paper"], vocab_size=37000))
    assert sum(p.numel() for p in model.parameters()) == 63_082_496  # about 63M (Table 3: 65M)


# -----------------------------------------------------------------------------------------------------
# Objective and schedule


@given(d_model=st.sampled_from([64, 256, 512, 1024]), warmup=st.integers(1, 5000))
@settings(max_examples=15)
def test_schedule_peaks_at_warmup_and_follows_eq_3(d_model, warmup):
    p = nn.Parameter(torch.zeros(2, 2))
    opt = T.make_optimizer(nn.ParameterList([p]), d_model ** -0.5, 0.0, (0.9, 0.98), 1e-9, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.noam_lambda(warmup))
    rates = []
    for step in range(1, warmup + 30):
        rates.append(opt.param_groups[0]["lr"])  # the rate of update number `step`
        assert rates[-1] == pytest.approx(d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5), rel=1e-9)
        opt.step()
        sched.step()
    assert max(rates) == pytest.approx(d_model ** -0.5 * warmup ** -0.5, rel=1e-9)
    assert rates.index(max(rates)) + 1 == warmup


@given(n=st.integers(1, 20), vocab=st.integers(4, 50), eps=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_label_smoothing_targets_and_loss_equal_direct_kl(n, vocab, eps, seed):
    g = torch.Generator().manual_seed(seed)
    pad = vocab - 1
    targets = torch.randint(0, vocab - 1, (1, n), generator=g)
    targets[0, 1::3] = pad  # some padding, ignored
    q = T.smoothed_targets(targets, vocab, eps, pad)
    keep = targets.flatten() != pad
    torch.testing.assert_close(q[keep].sum(-1), torch.ones(int(keep.sum())))
    assert (q[:, pad] == 0).all() and (q[~keep] == 0).all()
    for i, y in enumerate(targets.flatten().tolist()):
        if y != pad:
            others = [k for k in range(vocab) if k not in (y, pad)]
            assert torch.allclose(q[i, others], torch.tensor(eps / (vocab - 1)))
            assert q[i, y].item() == pytest.approx(1 - eps + eps / (vocab - 1))
    logits = torch.randn(1, n, vocab, generator=g)
    logp = logits[0].log_softmax(-1)[keep]
    kl = (torch.xlogy(q[keep], q[keep]) - q[keep] * logp).sum() / keep.sum()
    torch.testing.assert_close(T.label_smoothed_loss(logits, targets, eps, pad), kl, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------------------------------
# Decoding


@given(seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_cached_incremental_decoding_equals_full_recomputation(seed):
    model = tiny(seed)
    src, tgt = ids(seed, 2, 6), ids(seed + 1, 2, 7)
    src[1, 4:] = model.pad
    full = model(src, tgt)
    memory, mask = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, mask, cache) @ model.embed.weight.T for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_beam_of_one_equals_greedy(seed):
    model = tiny(seed)
    src = ids(seed, 3, 6)
    src[2, 3:] = model.pad
    assert T.beam_search(model, src, beam=1, alpha=0.6, max_extra=6) == T.greedy_decode(model, src, max_extra=6)


# -----------------------------------------------------------------------------------------------------
# BLEU against sacrebleu


def random_sentence(rng):
    words = ["a", "dog", "runs", ",", "the", "cat", ".", "5.3", "1,000", "x-ray", "don't", "&amp;", "(b)", "\"hi\""]
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))


@given(seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_bleu_agrees_with_sacrebleu_on_random_corpora(seed):
    import sacrebleu
    rng = random.Random(seed)
    refs = [random_sentence(rng) for _ in range(rng.randint(1, 8))]
    hyps = [r if rng.random() < 0.3 else random_sentence(rng) for r in refs]
    ours, theirs = T.corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, [refs]).score
    assert abs(ours - theirs) < 0.01, (ours, theirs)


def test_bleu_agrees_with_sacrebleu_on_multi30k(shared_data):
    import sacrebleu
    refs = (shared_data / "multi30k" / "test_2016_flickr.en").read_text().splitlines()
    hyps = (shared_data / "multi30k" / "tok" / "test_2016_flickr.lc.norm.tok.en").read_text().splitlines()
    hyps = [h if i % 3 else h.capitalize() for i, h in enumerate(hyps)]  # some lines nearly right
    ours, theirs = T.corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, [refs]).score
    assert abs(ours - theirs) < 0.01 and 10 < theirs < 100, (ours, theirs)


# -----------------------------------------------------------------------------------------------------
# Data


@given(seed=st.integers(0, 2**16), budget=st.integers(20, 200), world=st.integers(1, 3))
@settings(max_examples=10)
def test_token_batches_respect_the_budget_and_cover_every_pair_once(seed, budget, world):
    rng = random.Random(seed)
    pairs = [([1] * rng.randint(1, 15), [2] * rng.randint(2, 15)) for _ in range(60)]
    sampler = T.TokenBatches(pairs, budget, 0, seed)
    seen = sorted(i for b in sampler.batches for i in b)
    assert seen == list(range(60))
    for b in sampler.batches:
        assert len(b) == 1 or len(b) * (max(len(pairs[i][0]) for i in b) + max(len(pairs[i][1]) for i in b)) <= budget
    ranks = [T.TokenBatches(pairs, budget, 0, seed, r, world) for r in range(world)]
    if ranks[0].per_epoch:
        per_rank = [[next(s)["src"].shape for _ in range(ranks[0].per_epoch)] for s in ranks]
        assert len({len(p) for p in per_rank}) == 1


def test_multi30k_folder_loads(shared_data):
    cfg = dataclasses.replace(T.PRESETS["tiny"], data=str(shared_data / "multi30k"))
    name, splits = T.load_parallel(cfg)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [29000, 1014, 1000]
    assert splits["train"][1][0].startswith("Two young, White males")


# -----------------------------------------------------------------------------------------------------
# Training, resume, averaging, translation and the command line


BASE = ["--preset", "tiny", "--data", "builtin", "--device", "cpu", "--dtype", "float32", "--beam_size", "1",
        "--max_extra_len", "4"]



@pytest.mark.slow
def test_tiny_preset_learns_the_copy_task_exactly(tmp_path):
    metrics = T.main(["train", *BASE, "--beam_size", "2", "--out_dir", str(tmp_path), "--keep_checkpoints", "0"])
    exact = sum(h == r for _, h, r in metrics["translations"]) / len(metrics["translations"])
    assert exact == 1.0 and metrics["bleu"] == pytest.approx(100.0)


def test_resume_equals_uninterrupted(tmp_path):
    args = ["train", *BASE, "--total_steps", "8", "--eval_interval", "4", "--warmup_steps", "4"]
    whole = T.main(args + ["--out_dir", str(tmp_path / "a")])
    T.main(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "4"])
    resumed = T.main(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert resumed["step"] == whole["step"] == 8
    assert resumed["loss"] == whole["loss"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "a").glob("ckpt_*.pt")) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]


def test_average_checkpoints_and_translate(tmp_path, monkeypatch, capsys):
    T.main(["train", *BASE, "--total_steps", "4", "--eval_interval", "2", "--out_dir", str(tmp_path / "t")])
    paths = sorted(str(p) for p in (tmp_path / "t").glob("ckpt_*.pt"))
    assert len(paths) == 2
    T.main(["average", *paths, "--out_dir", str(tmp_path / "avg")])
    with pytest.raises(SystemExit):  # never over a training checkpoint
        T.main(["average", *paths, "--out_dir", str(tmp_path / "t")])
    assert "is a training checkpoint" in capsys.readouterr().err
    states = [torch.load(p, weights_only=False)["model"] for p in paths]
    avg = torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=False)["model"]
    for k in avg:
        torch.testing.assert_close(avg[k], (states[0][k] + states[1][k]) / 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2 3\n4 5 6 7 8 9 0 1\n"))
    capsys.readouterr()
    out = T.main(["translate", "--init_from", str(tmp_path / "avg" / "ckpt.pt"), "--device", "cpu"])
    assert len(out) == 2 and capsys.readouterr().out.splitlines() == out


def test_script_runs_as_a_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "transformer.py"), *BASE, "--max_steps", "3",
                        "--out_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC copy task" in r.stdout and "test BLEU" in r.stdout and "translated" in r.stdout
    assert (tmp_path / "train" / "ckpt.pt").is_file() and (tmp_path / "train" / "metrics.jsonl").is_file()


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_errors_from_the_command_line(tmp_path, capsys):
    assert "unknown dataset" in error_of(["train", "--data", "nonsense"], capsys)
    assert "invalid choice" in error_of(["--preset", "huge"], capsys)
    assert "must divide" in error_of(["train", "--n_head", "3"], capsys)
    assert "--dropout" in error_of(["train", "--dropout", "1.0"], capsys)
    assert "--d_model must be positive" in error_of(["train", "--d_model", "0"], capsys)
    assert "translate needs --init_from" in error_of(["translate"], capsys)
    assert "average needs checkpoint paths" in error_of(["average"], capsys)
    assert "does not exist" in error_of(["translate", "--init_from", str(tmp_path / "none.pt")], capsys)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.de").write_text("a\nb\n")
    (corpus / "train.en").write_text("a\n")
    (corpus / "val.de").write_text("a\n")
    (corpus / "val.en").write_text("a\n")
    assert "has 2 lines but" in error_of(["train", "--data", str(corpus)], capsys)
    (corpus / "train.en").write_text("")
    assert "is empty" in error_of(["train", "--data", str(corpus)], capsys)
    (corpus / "train.en").write_bytes(b"\xff\xfe\n\x80\n")
    assert "not UTF-8" in error_of(["train", "--data", str(corpus)], capsys)
    (corpus / "train.en").write_text("a b\n" + "x " * 100 + "\n")
    assert "more than --max_len" in error_of(["train", *BASE[:2], "--data", str(corpus)], capsys)
    nan = error_of(["train", *BASE, "--lr_factor", "1e30", "--warmup_steps", "1", "--out_dir", str(tmp_path / "n")],
                   capsys)
    assert "loss became nan at step" in nan and "no checkpoint was written yet" in nan
    not_a_ckpt = tmp_path / "bad.pt"
    not_a_ckpt.write_text("hello")
    assert "not a readable checkpoint" in error_of(["translate", "--init_from", str(not_a_ckpt)], capsys)


def test_checkpoint_from_a_different_model_is_refused(tmp_path, capsys, monkeypatch):
    T.main(["train", *BASE, "--max_steps", "1", "--out_dir", str(tmp_path)])
    assert "d_model" in error_of(["train", *BASE, "--d_model", "32", "--out_dir", str(tmp_path), "--resume"], capsys)
    gpt_like = tmp_path / "gpt.pt"
    torch.save({"script": "gpt.py", "config": {}, "model": {}}, gpt_like)
    assert "not transformer.py" in error_of(["translate", "--init_from", str(gpt_like)], capsys)
    other = tmp_path / "other"
    T.main(["train", *BASE, "--max_steps", "1", "--d_model", "32", "--out_dir", str(other)])
    assert "d_model" in error_of(["average", str(tmp_path / "ckpt.pt"), str(other / "ckpt.pt"),
                                  "--out_dir", str(tmp_path / "avg")], capsys)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 " * 80 + "\n"))
    assert "more than the model's max_len" in error_of(["translate", "--init_from", str(tmp_path / "ckpt.pt")],
                                                       capsys)
