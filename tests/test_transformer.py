"""transformer.py: the paper's attention and masks, parity with torch.nn's Transformer layers, the schedule, label
smoothing, three-way tying, beam search (beam 1 is greedy search; a wide beam finds the brute-force best), BLEU
against sacrebleu, the parallel corpus and its token batches, kept copies and averaging, translation, DDP and
transformer.py's own errors. The loop's guarantees common to all six scripts are in tests/test_harness.py."""
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings, strategies as st

import transformer as T
from ddp import run_two_ranks
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
V = 40  # a tiny vocabulary: ids 0..36 are tokens, 37 <s>, 38 </s>, 39 <pad>
FP32 = ["--device", "cpu", "--dtype", "float32"]
BASE = ["--preset", "tiny", "--data", "builtin", *FP32, "--max_extra_len", "4"]


def tiny(seed=0, **kw) -> T.Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(T.PRESETS["tiny"], **{"vocab_size": V, "d_model": 32, "d_ff": 48, "n_head": 4,
                                                    "dropout": 0.1, **kw})
    return T.build_model(cfg).eval()


def ids(seed, B, T_, vocab=V):
    return torch.randint(0, vocab - 3, (B, T_), generator=torch.Generator().manual_seed(seed))


def fixed_src(B):
    return ids(12345, B, 5)


def new_cache(model):
    return [{"self": {}, "cross": {}} for _ in model.decoder]


def attention_weights(model, run) -> dict:
    """Run `run()` with a forward hook on every MultiHeadAttention and return {module: weights (B, H, T, S)},
    softmax(Q K^T / sqrt(d_k)) (eq. 1) recomputed from the module's projections and the inputs it was given;
    each hook also checks that those weights, times V and W^O, give the module's own output."""
    weights = {}

    def hook(mod, args, kwargs, out):
        x, kv, mask = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("mask")
        q, k, v = (rearrange(proj(t), "b t (h d) -> b h t d", h=mod.n_head)
                   for proj, t in ((mod.q, x), (mod.k, kv), (mod.v, kv)))
        att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        weights[mod] = (att if mask is None else att.masked_fill(~mask, -math.inf)).softmax(-1)
        y = mod.o(rearrange(weights[mod] @ v, "b h t d -> b t (h d)"))
        torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-5)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, T.MultiHeadAttention)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return weights


def attention_rows(model, x):
    """Encoder self-attention (S = T), decoder self-attention (S = T + 1) and encoder-decoder attention (S = T)."""
    tgt_in = torch.cat([torch.full((x.size(0), 1), model.bos), x.flip(1)], dim=1)
    w = attention_weights(model, lambda: model(x, tgt_in))
    H, T_ = model.cfg.n_head, x.size(1)
    return [(w[layer.self_attn], (H, T_)) for layer in model.encoder] + [
        pair for layer in model.decoder for pair in ((w[layer.self_attn], (H, T_ + 1)), (w[layer.cross_attn], (H, T_)))]


def batch_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(0, V - 3, (3, 7), generator=g), torch.randint(0, V - 3, (3, 6), generator=g)
    src[0, 4:], tgt[1, 3:] = model.pad, model.pad
    return {"src": src, "tgt_in": torch.cat([torch.full((3, 1), model.bos), tgt[:, :-1]], 1), "tgt_out": tgt}


def dropout_rates(seed):
    """How often the embedding dropout and the residual (sublayer) dropouts zero a non-zero element in one training
    forward pass at P_drop = 0.1 (section 5.4)."""
    model, seen = tiny(seed, dropout=0.1).train(), {"embedding": [0, 0], "sublayer": [0, 0]}

    def count(kind):
        def hook(mod, args, out):
            real = args[0] != 0
            seen[kind][0] += ((out == 0) & real).sum().item()
            seen[kind][1] += real.sum().item()
        return hook

    handles = [model.drop.register_forward_hook(count("embedding"))] + [
        layer.drop.register_forward_hook(count("sublayer")) for layer in [*model.encoder, *model.decoder]]
    torch.manual_seed(seed)
    T.pretrain_loss(model, batch_of(model, seed))
    for h in handles:
        h.remove()
    return [(f"{kind} dropout", hits, trials, 0.1) for kind, (hits, trials) in seen.items()]


PROPERTY_ROWS = [Rows(
    name="transformer",
    model=tiny,
    ids=ids,
    attention=attention_rows,
    causal=lambda m, x: m(fixed_src(x.size(0)), x),  # decoder logits (B, T, V) for the target input x
    padded=lambda m, x, lengths: m.encode(x, torch.arange(x.size(1))[None] < lengths[:, None])[0],
    loss=lambda m, seed: T.pretrain_loss(m, batch_of(m, seed)),
    rates=dropout_rates,
)]


# --- the model (section 3) ---------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.integers(1, 9), T_=st.integers(1, 9))
@settings(max_examples=10)
def test_attention_of_all_three_kinds(seed, B, S, T_):
    model = tiny(seed)
    src, tgt = ids(seed, B, S), ids(seed + 1, B, T_)
    src[0, S // 2 + 1:] = model.pad  # the first sentence has source padding
    w = attention_weights(model, lambda: model(src, tgt))
    H = model.cfg.n_head
    for layer in model.encoder:
        assert w[layer.self_attn].shape == (B, H, S, S)
    for layer in model.decoder:
        self_w, cross_w = w[layer.self_attn], w[layer.cross_attn]
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
def test_parity_with_torch_post_ln_encoder_and_decoder_layers():
    """torch.nn's layers with norm_first=False are the paper's post-LN sublayers: same weights, same outputs."""
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
    for ours, theirs, n in ((ours_enc, enc, 2), (ours_dec, dec, 3)):
        theirs.linear1.load_state_dict(ours.ff.w_1.state_dict())
        theirs.linear2.load_state_dict(ours.ff.w_2.state_dict())
        for i in range(1, n + 1):
            getattr(theirs, f"norm{i}").load_state_dict(getattr(ours, f"norm_{i}").state_dict())
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
    batch = batch_of(model, 1)
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
        memory, mask = model.encode(batch["src"])
        model.embed.weight = uses[1]
        logits = model.decode(batch["tgt_in"], memory, mask) @ uses[2].T
        F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=model.pad,
                        label_smoothing=0.1).backward()
    finally:
        model.embed.weight = nn.Parameter(W)
    for u in uses:
        assert u.grad.abs().sum() > 0
    torch.testing.assert_close(tied, sum(u.grad for u in uses), atol=1e-6, rtol=1e-5)


def test_paper_preset_size():
    with torch.device("meta"):
        model = T.build_model(dataclasses.replace(T.PRESETS["paper"], vocab_size=37000))
    assert sum(p.numel() for p in model.parameters()) == 63_082_496  # about 63M (Table 3: 65M)


# --- the objective and the schedule (section 5) ------------------------------------------------------


@given(d_model=st.sampled_from([64, 256, 512, 1024]), warmup=st.integers(1, 5000))
@settings(max_examples=15)
def test_schedule_peaks_at_warmup_and_follows_eq_3(d_model, warmup):
    p = nn.Parameter(torch.zeros(2, 2))
    opt = T.adamw(nn.ParameterList([p]), d_model ** -0.5, 0.0, (0.9, 0.98), 1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.noam(warmup))
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
def test_label_smoothed_loss_is_the_cross_entropy_against_smoothed_targets(n, vocab, eps, seed):
    """q = (1 - eps) one_hot(y) + eps / V (Szegedy et al.), averaged over the targets that are not <pad> (the last
    id), built here element by element."""
    g = torch.Generator().manual_seed(seed)
    pad = vocab - 1
    targets = torch.randint(0, vocab - 1, (1, n), generator=g)
    targets[0, 1::3] = pad  # some padding, ignored
    logits = torch.randn(1, n, vocab, generator=g)
    total, count = 0.0, 0
    for i, y in enumerate(targets[0].tolist()):
        if y != pad:
            q = [(1 - eps) * (k == y) + eps / vocab for k in range(vocab)]
            total -= sum(qk * lp for qk, lp in zip(q, logits[0, i].log_softmax(-1).tolist()))
            count += 1
    loss = T.pretrain_loss(lambda src, tgt_in: logits, {"src": None, "tgt_in": None, "tgt_out": targets}, eps)
    assert loss.item() == pytest.approx(total / count, rel=1e-5, abs=1e-6)


# --- decoding (section 6.1) ---------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_cached_incremental_decoding_equals_full_recomputation(seed):
    model = tiny(seed)
    src, tgt = ids(seed, 2, 6), ids(seed + 1, 2, 7)
    src[1, 4:] = model.pad
    full = model(src, tgt)
    memory, mask = model.encode(src)
    cache = new_cache(model)
    steps = [model.decode(tgt[:, t:t + 1], memory, mask, cache) @ model.embed.weight.T for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def log_probs(model, src, prefix):
    """log p(next | <s> prefix) (V,) by a full pass without a cache; <s> and <pad> are never generated."""
    logits = model(src, torch.tensor([[model.bos] + prefix]))[0, -1]
    logits[[model.bos, model.pad]] = -math.inf
    return logits.log_softmax(-1)


@torch.no_grad()
def greedy_reference(model, src, max_extra):
    """Greedy search, one sentence (1, S) at a time, recomputing everything: the most probable token until </s>,
    or until input length + max_extra tokens (the source's </s> counted in its length, as beam_search does)."""
    tokens, steps = [], min(src.size(1) + max_extra, model.cfg.max_len)
    while len(tokens) < steps - 1:
        nxt = log_probs(model, src, tokens).argmax().item()
        if nxt == model.eos:
            break
        tokens.append(nxt)
    return tokens


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.integers(1, 8), max_extra=st.integers(0, 8),
       cut=st.integers(1, 8), sharp=st.booleans())
@settings(max_examples=25)
def test_beam_of_one_is_greedy_search(seed, B, S, max_extra, cut, sharp):
    """Why the separate greedy decoder could go: beam search with beam 1 picks the same tokens, for batches with
    padding, any length limit, and models sure enough of </s> to stop early."""
    model = tiny(seed, max_len=12)  # at times shorter than input + max_extra: the limit is clamped
    if sharp:
        with torch.no_grad():
            model.embed.weight[model.eos] *= 4
    src = ids(seed, B, S)
    src[0, min(cut, S):] = model.pad
    got = T.beam_search(model, src, beam=1, alpha=0.6, max_extra=max_extra)
    want = [greedy_reference(model, row[row != model.pad][None], max_extra) for row in src]
    assert got == want


@given(seed=st.integers(0, 2**16), alpha=st.sampled_from([0.0, 0.6, 1.5]))
@settings(max_examples=8)
@torch.no_grad()
def test_a_beam_wide_enough_finds_the_brute_force_best(seed, alpha):
    """Three tokens, at most three before </s>: a beam of 40 holds all 40 hypotheses, so beam search returns the
    one with the best log P / lp(|Y|) (|Y| counts </s>, forced after three tokens) over all of them."""
    torch.manual_seed(seed)
    model = T.build_model(dataclasses.replace(T.PRESETS["tiny"], vocab_size=6, d_model=16, d_ff=32, n_head=2,
                                              dropout=0.0)).eval()
    for p in model.parameters():
        p.mul_(3)  # a sharper model: scores spread out
    src = torch.tensor([[1, 2]])  # 2 tokens + 2 extra: steps = 4, the last forces </s>
    best, best_hyp = -math.inf, None
    for length in range(4):
        for hyp in itertools.product(range(3), repeat=length):
            score = sum(log_probs(model, src, list(hyp[:i]))[t].item() for i, t in enumerate(hyp))
            score += log_probs(model, src, list(hyp))[model.eos].item()
            if score / ((5 + length + 1) / 6) ** alpha > best:
                best, best_hyp = score / ((5 + length + 1) / 6) ** alpha, list(hyp)
    assert T.beam_search(model, src, beam=40, alpha=alpha, max_extra=2) == [best_hyp]


@given(seed=st.integers(0, 2**16))
@settings(max_examples=8)
def test_beam_search_of_a_padded_batch_equals_each_sentence_alone(seed):
    model = tiny(seed, max_len=20)
    lengths = [2, 6, 4]
    src = ids(seed, 3, 6)
    for b, n in enumerate(lengths):
        src[b, n:] = model.pad
    batched = T.beam_search(model, src, beam=3, alpha=0.6, max_extra=5)
    assert batched == [T.beam_search(model, src[b:b + 1, :n], 3, 0.6, 5)[0] for b, n in enumerate(lengths)]


# --- BLEU against sacrebleu --------------------------------------------------------------------------


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
    refs = (shared_data / "multi30k" / "test_2016_flickr.en").read_text().split("\n")[:-1]
    hyps = (shared_data / "multi30k" / "tok" / "test_2016_flickr.lc.norm.tok.en").read_text().split("\n")[:-1]
    hyps = [h if i % 3 else h.capitalize() for i, h in enumerate(hyps)]  # some lines nearly right
    ours, theirs = T.corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, [refs]).score
    assert abs(ours - theirs) < 0.01 and 10 < theirs < 100, (ours, theirs)


# --- data (section 5.1) --------------------------------------------------------------------------------


def random_pairs(seed, n=60):
    """Pairs whose source tokens are their index: a batch shows which pairs it holds."""
    rng = random.Random(seed)
    return [{"src": [i] * rng.randint(1, 15), "tgt": [2] * rng.randint(2, 15)} for i in range(n)]


@given(seed=st.integers(0, 2**16), budget=st.integers(20, 200), world=st.integers(1, 3))
@settings(max_examples=10)
def test_token_batches_respect_the_budget_and_ranks_share_them(seed, budget, world):
    pairs = random_pairs(seed)
    batches = T.token_batches(pairs, budget, seed)
    assert sorted(i for b in batches for i in b) == list(range(60))  # every pair once
    for b in batches:
        S, T_ = max(len(pairs[i]["src"]) for i in b), max(len(pairs[i]["tgt"]) for i in b)
        assert len(b) == 1 or len(b) * (S + T_) <= budget
    drawn = []
    try:
        for rank in range(world):  # each rank draws an epoch of its own batches, as many as the others
            T.RANK, T.WORLD = rank, world
            if len(batches) < world:
                with pytest.raises(T.UserError, match="cannot feed"):
                    T.TokenBatches(pairs, budget, V - 1, seed)
                return
            sampler = T.TokenBatches(pairs, budget, V - 1, seed)
            drawn.append({row[0].item() for _ in range(sampler.per_epoch) for row in next(sampler)["src"]})
    finally:
        T.RANK, T.WORLD = 0, 1
    assert sum(len(d) for d in drawn) == len(set().union(*drawn))  # no pair on two ranks in one epoch


@given(seed=st.integers(0, 2**16), k=st.integers(0, 40))
@settings(max_examples=10)
def test_token_batches_resume_at_any_position_mid_epoch(seed, k):
    """The checkpoint keeps `position` only: a sampler set to k draws what an uninterrupted one draws after k,
    across epoch boundaries too (a new order each epoch)."""
    pairs = random_pairs(seed)
    whole = T.TokenBatches(pairs, 60, 0, seed)
    first = [next(whole) for _ in range(k + 10)]
    resumed = T.TokenBatches(pairs, 60, 0, seed)
    resumed.position = k
    for a in first[k:]:
        b = next(resumed)
        assert all(torch.equal(a[key], b[key]) for key in a)
    epochs = [[next(whole)["src"].shape for _ in range(whole.per_epoch)] for _ in range(2)]
    assert epochs[0] != epochs[1] or whole.per_epoch < 3  # each epoch shuffles the batches anew


def test_a_parallel_corpus_splits_at_newlines_only(tmp_path):
    """U+2028 and NEL inside a sentence stay in it; \\r\\n ends a line; one final newline ends the last line."""
    (tmp_path / "train.de").write_text("ein\u2028satz\r\nzwei\u0085zwei\r\ndrei\r\n", newline="")
    (tmp_path / "train.en").write_text("one sentence\ntwo\ntrailing blank line follows\n\n")
    (tmp_path / "val.de").write_text("a\nb\nc")
    (tmp_path / "val.en").write_text("a\nb\nc\n")
    split = T.read_parallel(tmp_path, "val", "de", "en")
    assert split == {"src": ["a", "b", "c"], "tgt": ["a", "b", "c"]}
    with pytest.raises(T.UserError, match="has 3 lines but .* has 4"):
        T.read_parallel(tmp_path, "train", "de", "en")
    (tmp_path / "train.en").write_text("one sentence\ntwo\nthree\n")
    split = T.read_parallel(tmp_path, "train", "de", "en")
    assert split["src"] == ["ein\u2028satz", "zwei\u0085zwei", "drei"] and len(split["tgt"]) == 3


def test_multi30k_folder_loads(shared_data):
    name, splits, test = T.load_parallel(dataclasses.replace(T.PRESETS["tiny"], data=str(shared_data / "multi30k")))
    assert [len(splits[s]["src"]) for s in ("train", "val", "test")] == [29000, 1014, 1000]
    assert (name, test) == ("multi30k", "test2016")  # the claim's task: "multi30k test2016"
    assert all(len(splits[s]["src"]) == len(splits[s]["tgt"]) for s in splits)
    assert splits["train"]["tgt"][0].startswith("Two young, White males")


def test_multi30k_by_name_from_its_pinned_gzipped_files(tmp_path, monkeypatch, shared_data):
    """--data multi30k downloads the published .gz files once, checks their sha256 and unpacks them; here they are
    served from file:// (gzipped copies of ../shared/data, with their own sha256s)."""
    monkeypatch.setenv("NLP_LINEAGE_CACHE", str(tmp_path / "cache"))
    files = {}
    for name in T.DATASETS["multi30k"]:
        data = gzip.compress((shared_data / "multi30k" / name[:-3]).read_bytes(), mtime=0)
        (tmp_path / name).write_bytes(data)
        files[name] = ((tmp_path / name).as_uri(), hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(T, "DATASETS", {"multi30k": files})
    name, splits, test = T.load_parallel(T.PRESETS["tiny"])
    assert [len(splits[s]["tgt"]) for s in ("train", "val", "test")] == [29000, 1014, 1000]
    assert (tmp_path / "cache" / "multi30k" / "val.de").read_bytes() == (shared_data / "multi30k" / "val.de").read_bytes()


def test_the_tiny_preset_on_real_multi30k_names_the_max_len_that_fits(shared_data, tmp_path, capsys):
    err = error_of(["train", "--preset", "tiny", "--data", str(shared_data / "multi30k"), *FP32,
                    "--out_dir", str(tmp_path)], capsys)
    assert "more than --max_len 64; pass --max_len" in err
    fits = int(err.split("pass --max_len ")[1].split()[0])
    longest = int(err.split(" has ")[1].split()[0])
    assert 64 < longest <= fits and not (tmp_path / "ckpt.pt").exists()


def test_a_pair_longer_than_max_len_names_one_that_fits_and_that_one_works(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "val"):
        (corpus / f"{split}.de").write_text("1 2 3\n" + "4 " * 70 + "\n")
        (corpus / f"{split}.en").write_text("a b c\nd e\n")
    argv = ["train", *BASE[:2], "--data", str(corpus), *FP32, "--max_steps", "1"]
    err = error_of([*argv, "--out_dir", str(tmp_path / "a")], capsys)
    assert "val line 2 has" in err and "more than --max_len 64; pass --max_len 128" in err
    out = T.main([*argv, "--out_dir", str(tmp_path / "b"), "--max_len", "128", "--max_extra_len", "2"])
    assert out["step"] == 1 and "no test.de: the test BLEU is measured on the validation" in capsys.readouterr().out


# --- training, kept copies, averaging, translation ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 6 steps, evaluated every 2, that keeps copies of its last 2 evaluations."""
    out = tmp_path_factory.mktemp("trained")
    T.main(["train", *BASE, "--total_steps", "6", "--eval_interval", "2", "--keep_checkpoints", "2",
            "--out_dir", str(out)])
    return out


def test_kept_copies_are_complete_checkpoints_of_the_last_evaluations(trained):
    assert sorted(p.name for p in trained.glob("ckpt_*.pt")) == ["ckpt_0000004.pt", "ckpt_0000006.pt"]
    assert not list(trained.glob(".*.tmp"))
    final = torch.load(trained / "ckpt.pt", weights_only=False)
    for step in (4, 6):
        kept = T.load_checkpoint(trained / f"ckpt_{step:07d}.pt", ("train",))
        assert kept["step"] == step and kept["config"] == final["config"] and kept["tokenizer"] == final["tokenizer"]
        model, tok, cfg = T.load_trained(T.PRESETS["tiny"], kept)  # loads: what translate and average need
        assert model.state_dict().keys() == final["model"].keys()
    kept = torch.load(trained / "ckpt_0000006.pt", weights_only=False)
    assert all(torch.equal(kept["model"][k], final["model"][k]) for k in kept["model"])  # the same weights


def test_average_of_a_folder_or_a_list_is_the_mean(trained, tmp_path, capsys):
    states = [torch.load(trained / f"ckpt_{s:07d}.pt", weights_only=False)["model"] for s in (4, 6)]
    T.main(["average", "--init_from", str(trained), "--out_dir", str(tmp_path / "folder")])
    T.main(["average", "--init_from", f"{trained}/ckpt_0000004.pt,{trained}/ckpt_0000006.pt",
            "--out_dir", str(tmp_path / "list")])
    for out in ("folder", "list"):
        avg = T.load_checkpoint(tmp_path / out / "ckpt.pt", ("average",))
        assert avg["step"] == 6 and len(avg["averaged"]) == 2
        for k, v in avg["model"].items():
            torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2)
    T.main(["average", "--init_from", str(trained), "--average_last", "1", "--out_dir", str(tmp_path / "last")])
    last = torch.load(tmp_path / "last" / "ckpt.pt", weights_only=False)
    assert last["averaged"] == [str(trained / "ckpt_0000006.pt")]
    assert all(torch.equal(last["model"][k], states[1][k]) for k in last["model"])
    assert "is a training checkpoint" in error_of(["average", "--init_from", str(trained), "--out_dir", str(trained)],
                                                  capsys)


def test_average_refuses_checkpoints_of_other_models(trained, tmp_path, capsys):
    T.main(["train", *BASE, "--max_steps", "1", "--d_model", "32", "--out_dir", str(tmp_path / "other")])
    err = error_of(["average", "--init_from", f"{trained}/ckpt.pt,{tmp_path}/other/ckpt.pt", "--out_dir",
                    str(tmp_path / "avg")], capsys)
    assert "is another model" in err and not (tmp_path / "avg").exists()
    (tmp_path / "empty").mkdir()
    assert "holds no kept copies" in error_of(["average", "--init_from", str(tmp_path / "empty")], capsys)


def test_a_kept_copy_is_written_atomically(tmp_path, capsys, monkeypatch):
    """Interrupted while its kept copy is being written, a run leaves no ckpt_STEP.pt (a broken piece of one was
    what a plain copy left behind), only the temporary file."""
    real = torch.save

    def save(obj, f, *args, **kw):
        if "ckpt_" in getattr(f, "name", ""):
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        T.main(["train", *BASE, "--total_steps", "2", "--eval_interval", "2", "--keep_checkpoints", "2",
                "--out_dir", str(tmp_path)])
    assert e.value.code == 130
    assert not list(tmp_path.glob("ckpt_*.pt")) and list(tmp_path.glob(".ckpt_0000002.pt.tmp"))


def test_translate_reads_standard_input_at_newlines_only(trained, monkeypatch, capsys):
    model, tok, cfg = T.load_trained(dataclasses.replace(T.PRESETS["tiny"], init_from=str(trained / "ckpt.pt")))
    lines = ["1 2 3", "4\u2028 5", "", "6 7 8 9"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\r\n".join(lines) + "\r\n"))
    capsys.readouterr()
    out = T.main(["translate", "--preset", "tiny", "--init_from", str(trained / "ckpt.pt"), *FP32,
                  "--beam_size", "2"])
    assert len(out) == 4 and capsys.readouterr().out == "\n".join(out) + "\n"
    assert out == T.translate_lines(model, tok, lines, dataclasses.replace(cfg, beam_size=2), torch.device("cpu"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert T.main(["translate", "--init_from", str(trained / "ckpt.pt"), *FP32]) == []
    assert capsys.readouterr().out == ""


def test_main_job_runs_as_a_script(tmp_path):
    """One real subprocess: the main job on the built-in data, end to end: training, the average of the last kept
    copies, the test BLEU of beam search and of greedy search, and the claim line last (issue 13)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NLP_LINEAGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "transformer.py"), *BASE, "--max_steps", "3", "--eval_interval", "2",
                        "--keep_checkpoints", "2", "--out_dir", str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC copy task" in r.stdout and "averaged 2 checkpoints" in r.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "val" and (tmp_path / "out" / "train" / "ckpt.pt").is_file()  # no decoding there
    avg = T.load_checkpoint(tmp_path / "out" / "average" / "ckpt.pt", ("average",))
    assert [Path(p).name for p in avg["averaged"]] == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    beam, greedy = (json.loads(line) for line in (tmp_path / "out" / "test" / "metrics.jsonl").read_text().splitlines())
    assert (beam["split"], beam["beam"], greedy["split"], greedy["beam"]) == ("test", 2, "test", 1)
    assert beam["loss"] == greedy["loss"] and beam["step"] == 3  # one model, the average of steps 2 and 3
    claim = r.stdout.strip().splitlines()[-1]
    assert claim == f"claim: builtin-copy test BLEU {beam['bleu']:.1f} vs {greedy['bleu']:.1f} (beam search of 2 vs " \
        "greedy decoding)"
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())  # one line: the claim
    assert record == {"split": "claim", "task": "builtin-copy test", "metric": "BLEU", "with": beam["bleu"],
                      "without": greedy["bleu"], "differs": "beam search of 2 vs greedy decoding"}


def test_the_test_stage_scores_a_checkpoint_as_train_did(trained, tmp_path, capsys):
    """`test` decodes the test split with --init_from's model: the same BLEU and loss train measured at its end, and
    greedy search with --beam_size 1 (the two arms of the main job's claim, each a stage command)."""
    at_end = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    argv = ["test", "--preset", "tiny", "--data", "builtin", *FP32, "--max_extra_len", "4", "--init_from",
            str(trained / "ckpt.pt"), "--out_dir", str(tmp_path)]
    beam = T.main(argv)
    assert (beam["task"], beam["beam"], beam["step"]) == ("builtin-copy test", 2, 6)
    assert beam["bleu"] == pytest.approx(at_end["bleu"]) and beam["loss"] == pytest.approx(at_end["loss"])
    greedy = T.main([*argv, "--beam_size", "1"])
    assert greedy["beam"] == 1 and "(greedy, " in capsys.readouterr().out
    assert [json.loads(line)["beam"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 1]


def test_bfloat16_autocast_trains_and_translates(tmp_path):
    out = T.main(["train", *BASE, "--dtype", "bfloat16", "--total_steps", "4", "--eval_interval", "2",
                  "--keep_checkpoints", "1", "--out_dir", str(tmp_path)])
    assert math.isfinite(out["loss"]) and math.isfinite(out["test_loss"]) and 0 <= out["bleu"] <= 100
    for name in ("ckpt.pt", "ckpt_0000004.pt"):  # master weights stay fp32, in the kept copy too
        assert all(v.dtype == torch.float32 for v in torch.load(tmp_path / name, weights_only=False)["model"].values())


@pytest.mark.slow
def test_the_tiny_preset_learns_the_copy_task_exactly(tmp_path):
    metrics = T.main(["train", "--preset", "tiny", "--data", "builtin", *FP32, "--out_dir", str(tmp_path)])
    assert metrics["bleu"] == pytest.approx(100.0)


def _ddp_worker(rank, out_dir):
    T.RANK, T.WORLD = rank, 2  # read from the environment at import, before this worker set it
    models, real_build = [], T.build_model
    T.build_model = lambda cfg: models.append(real_build(cfg)) or models[-1]
    T.main(["train", *BASE, "--total_steps", "4", "--eval_interval", "2", "--keep_checkpoints", "2",
            "--grad_accum", "2", "--out_dir", out_dir])
    torch.save(models[0].state_dict(), f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    a, b = run_two_ranks(_ddp_worker, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["data"]) == 2 and ckpt["data"][0]["position"] == 8
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]


# --- errors particular to transformer.py ---------------------------------------------------------------


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("args,message", [
    (["--n_head", "3"], "must divide"),
    (["--d_model", "15", "--n_head", "5"], "must be even"),
    (["--dropout", "1.0"], "--dropout"),
    (["--label_smoothing", "1.0"], "--label_smoothing"),
    (["--beta2", "1.0"], "--beta2"),
    (["--d_model", "0"], "--d_model must be positive"),
    (["--warmup_steps", "0"], "--warmup_steps must be positive"),
    (["--beam_size", "0"], "--beam_size must be positive"),
    (["--average_last", "0"], "--average_last must be positive"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints must not be negative"),
    (["--bpe_vocab_size", "258"], "at least 259"),
    (["--vocab_size", "10"], "is not the vocabulary's"),
])
def test_bad_flags(args, message, capsys, tmp_path):
    assert message in error_of(["train", *BASE, "--out_dir", str(tmp_path), *args], capsys)


def test_bad_inputs(trained, tmp_path, capsys, monkeypatch):
    assert "translate needs --init_from" in error_of(["translate"], capsys)
    assert "average needs --init_from" in error_of(["average"], capsys)
    assert "test needs --init_from" in error_of(["test"], capsys)
    assert "does not exist" in error_of(["translate", "--init_from", str(tmp_path / "none.pt")], capsys)
    assert "does not exist" in error_of(["average", "--init_from", f"{trained}/ckpt.pt,{tmp_path}/none.pt"], capsys)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = ["train", *BASE[:2], *FP32, "--data", str(corpus), "--out_dir", str(tmp_path / "o")]
    assert "does not exist" in error_of(train, capsys)
    for split, text in (("train", "a\nb\n"), ("val", "a\n")):
        (corpus / f"{split}.de").write_text(text)
        (corpus / f"{split}.en").write_text(text)
    (corpus / "train.en").write_text("a\n")
    assert "has 2 lines but" in error_of(train, capsys)
    (corpus / "train.en").write_text(" \n")
    assert "is empty" in error_of(train, capsys)
    (corpus / "train.en").write_bytes(b"\xff\xfe\n\x80\n")
    assert "not UTF-8" in error_of(train, capsys)
    (tmp_path / "pairs.tsv").write_text("ein satz\ta sentence\n")
    assert "is a file, not a folder with train.de" in error_of([*train, "--data", str(tmp_path / "pairs.tsv")], capsys)
    assert "unknown dataset 'wmt14'" in error_of([*train, "--data", "wmt14"], capsys)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 " * 80 + "\n"))
    assert "more than --max_len 64" in error_of(
        ["translate", "--preset", "tiny", "--init_from", str(trained / "ckpt.pt"), *FP32], capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\n"), encoding="utf-8"))
    assert "standard input is not UTF-8" in error_of(["translate", "--init_from", str(trained / "ckpt.pt")], capsys)
    other = tmp_path / "gpt.pt"
    torch.save({"script": "gpt.py", "stage": "pretrain", "config": {}, "model": {}}, other)
    assert "written by gpt.py" in error_of(["translate", "--init_from", str(other)], capsys)
