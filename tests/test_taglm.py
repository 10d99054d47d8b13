"""taglm.py: the CRF against brute force and pytorch-crf, span F1 against seqeval, BIO, the frozen LMs and their
cached embeddings, the concatenation sizes, per-LM clipping, the readers, the stages, errors, and the cross-model
property rows. The loop's guarantees common to all six scripts are in tests/test_harness.py."""
import contextlib
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import taglm
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
TINY = taglm.PRESETS["tiny"]
FP32 = ["--device", "cpu", "--dtype", "float32"]
WORDS = ["the", "a", "Paris", "internationalisation", "x", "John", "said", "on", "Monday", ".", "Acme",
         "Corp", "shares", "fell", "of", "to", "Nairobi", "é", "United", "Nations"]
TAGS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]


def ids(seed, B, T):
    return torch.randint(len(WORDS), (B, T), generator=torch.Generator().manual_seed(seed))


def chars_of(word_ids):
    """(B, T, W) character ids, W the widest word present (as collate pads), so W varies with the words."""
    chars = taglm.chars_tensor(WORDS, TINY.max_chars)[word_ids]
    return chars[..., :int((chars > 0).sum(-1).max())]


def tiny_lms(seed):
    torch.manual_seed(seed)
    return taglm.build_model(TINY, 50).eval()


def tiny_tagger(seed, **changes):
    cfg = dataclasses.replace(TINY, **changes)
    lms = tiny_lms(seed) if cfg.lm_insert != "none" else None
    torch.manual_seed(seed)
    return taglm.Tagger(cfg, len(WORDS) + 2, TAGS, lms).eval()


def alone(model, word_ids, lengths):
    """h^LM of each sentence read on its own (as cache_lm_embeddings reads it), right-padded (B, T, 2P)."""
    out = torch.zeros(*word_ids.shape, 2 * TINY.lm_proj)
    for b, n in enumerate(lengths.tolist()):
        out[b, :n] = model.lm_embeddings(chars_of(word_ids[b:b + 1, :n]))[0]
    return out


def tagger_batch(model, word_ids, lengths, seed=0):
    B, T = word_ids.shape
    g = torch.Generator().manual_seed(seed)
    batch = {"words": word_ids + 2, "chars": chars_of(word_ids), "lengths": lengths,
             "mask": torch.arange(T)[None, :] < lengths[:, None],
             "tags": torch.tensor([1, 4, 0])[torch.randint(3, (B, T), generator=g)]}  # B-PER, O, B-LOC: valid BIO
    return {**batch, "lm": alone(model, word_ids, lengths)} if model.lms is not None else batch


def lm_loss(model, seed):
    word_ids = ids(seed, 2, 7)
    return taglm.pretrain_loss(model, {"chars": chars_of(word_ids), "targets": word_ids})


def tagger_loss(m, seed):
    return m(tagger_batch(m, ids(seed, 3, 6), torch.tensor([6, 3, 1]), seed))


# taglm drops nothing at a configured rate beyond plain nn.Dropout (and nn.LSTM's own dropout between layers): no rates
PROPERTY_ROWS = [
    Rows("taglm-lm-forward", tiny_lms, ids, causal=lambda m, x: m.fwd.hidden(chars_of(x)), direction="forward",
         loss=lm_loss),
    Rows("taglm-lm-backward", tiny_lms, ids, causal=lambda m, x: m.bwd.hidden(chars_of(x)), direction="backward"),
] + [
    Rows(f"taglm-tagger-{insert}", lambda s, i=insert: tiny_tagger(s, lm_insert=i), ids,
         padded=lambda m, x, n: m.emissions(tagger_batch(m, x, n)), loss=tagger_loss)
    for insert in ("layer1", "input", "none")
]


# ---------------------------------------------------------------------------------------------------
# CRF: brute force over every tag path, pytorch-crf, gradcheck


@st.composite
def crf_case(draw, max_tags=5, max_len=5):
    N, T, B = draw(st.integers(1, max_tags)), draw(st.integers(1, max_len)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    g = torch.Generator().manual_seed(seed)
    allowed = None
    if draw(st.booleans()):  # random constraints; every tag may start, end and follow itself
        trans = (torch.rand(N, N, generator=g) < 0.6) | torch.eye(N, dtype=torch.bool)
        allowed = (trans, torch.rand(N, generator=g) < 0.7, torch.rand(N, generator=g) < 0.7)
        allowed[1][0] = allowed[2][0] = True
    crf = taglm.CRF(N, allowed)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    emissions = torch.randn(B, T, N, generator=g) * 2
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return crf, emissions, mask


def brute_force(crf, emissions, mask):
    """Every path of every sequence, scored from the definition: (log Z, best score, best path) each."""
    emissions, start, trans, end = crf.scores(emissions)
    out = []
    for b in range(emissions.size(0)):
        L = int(mask[b].sum())
        paths = torch.tensor(list(itertools.product(range(emissions.size(2)), repeat=L)))  # (P, L)
        e = emissions[b, torch.arange(L), paths].sum(1)
        s = start[paths[:, 0]] + e + trans[paths[:, :-1], paths[:, 1:]].sum(1) + end[paths[:, -1]]
        out.append((torch.logsumexp(s, 0), s.max(), paths[s.argmax()]))
    return out


@given(crf_case())
@settings(max_examples=25)
def test_crf_log_partition_and_likelihood_equal_brute_force(case):
    crf, emissions, mask = case
    with torch.no_grad():
        log_z = crf.log_partition(emissions, mask)
        for b, (bf_log_z, _, best) in enumerate(brute_force(crf, emissions, mask)):
            torch.testing.assert_close(log_z[b], bf_log_z, atol=1e-4, rtol=1e-5)
            tags = torch.zeros(1, mask.size(1), dtype=torch.long)
            tags[0, :len(best)] = best
            ll = crf(emissions[b:b + 1], tags, mask[b:b + 1])
            torch.testing.assert_close(ll[0], brute_force(crf, emissions[b:b + 1], mask[b:b + 1])[0][1] - bf_log_z,
                                       atol=1e-4, rtol=1e-5)


@given(crf_case(max_tags=3, max_len=4))
@settings(max_examples=15)
def test_crf_probabilities_of_all_paths_sum_to_one(case):
    crf, emissions, mask = case
    L = int(mask[0].sum())
    total = torch.stack([crf(emissions[:1], torch.tensor([list(p) + [0] * (mask.size(1) - L)]), mask[:1])[0]
                         for p in itertools.product(range(emissions.size(2)), repeat=L)])
    torch.testing.assert_close(total.logsumexp(0), torch.tensor(0.0), atol=1e-4, rtol=0)


@given(crf_case())
@settings(max_examples=25)
def test_viterbi_equals_brute_force_argmax_and_its_score(case):
    crf, emissions, mask = case
    with torch.no_grad():
        path, score = crf.viterbi(emissions, mask)
        for b, (_, best_score, best) in enumerate(brute_force(crf, emissions, mask)):
            torch.testing.assert_close(score[b], best_score, atol=1e-4, rtol=1e-5)
            assert path[b, :len(best)].tolist() == best.tolist()
            assert (path[b, len(best):] == 0).all()
        torch.testing.assert_close(crf.path_score(emissions, path, mask), score, atol=1e-4, rtol=1e-5)


@given(crf_case(), st.integers(1, 4), st.integers(0, 2**16))
def test_crf_ignores_padding(case, extra, seed):
    crf, emissions, mask = case
    g = torch.Generator().manual_seed(seed)
    B, T, N = emissions.shape
    tags = torch.randint(N, (B, T), generator=g)
    longer = torch.cat([emissions, 50 * torch.randn(B, extra, N, generator=g)], 1)
    longer_mask = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], 1)
    longer_tags = torch.cat([tags, torch.randint(N, (B, extra), generator=g)], 1)
    with torch.no_grad():
        torch.testing.assert_close(crf(emissions, tags, mask), crf(longer, longer_tags, longer_mask))
        assert torch.equal(crf.viterbi(emissions, mask)[0], crf.viterbi(longer, longer_mask)[0][:, :T])


@given(crf_case())
@settings(max_examples=25)
def test_crf_agrees_with_pytorch_crf(case):
    torchcrf = pytest.importorskip("torchcrf")
    crf, emissions, mask = case
    crf = taglm.CRF(crf.transitions.size(0))  # pytorch-crf has no constraints
    theirs = torchcrf.CRF(crf.transitions.size(0), batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
        theirs.transitions.copy_(crf.transitions)
        theirs.start_transitions.copy_(crf.start)
        theirs.end_transitions.copy_(crf.end)
    tags = torch.randint(emissions.size(2), mask.shape)
    torch.testing.assert_close(crf(emissions, tags, mask), theirs(emissions, tags, mask, reduction="none"),
                               atol=1e-5, rtol=1e-5)
    path, _ = crf.viterbi(emissions, mask)
    assert [row[:n] for row, n in zip(path.tolist(), mask.sum(1).tolist())] == theirs.decode(emissions, mask)


def test_crf_stays_finite_when_tags_are_unreachable():
    """Constraints that leave tags 1 and 2 unreachable (no allowed start, only themselves as predecessors):
    their exp-space sums underflow, and the loss and its gradient must still be finite and log Z equal to
    brute force."""
    allowed = (torch.eye(3, dtype=torch.bool), torch.tensor([True, False, False]), torch.ones(3, dtype=torch.bool))
    crf = taglm.CRF(3, allowed)
    emissions = (3 * torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))).requires_grad_()
    mask = torch.ones(2, 6, dtype=torch.bool)
    ll = crf(emissions, torch.zeros(2, 6, dtype=torch.long), mask)
    ll.sum().backward()
    assert torch.isfinite(ll).all() and torch.isfinite(emissions.grad).all()
    assert torch.allclose(ll, torch.zeros(2), atol=1e-5)  # the only allowed path has probability 1
    for (log_z, _, _), ours in zip(brute_force(crf, emissions.detach(), mask), crf.log_partition(emissions, mask)):
        assert torch.allclose(ours, log_z, atol=1e-4)


def test_crf_runs_in_fp32_under_bf16_autocast():
    crf, g = taglm.CRF(4), torch.Generator().manual_seed(0)
    emissions, tags = torch.randn(2, 5, 4, generator=g), torch.randint(4, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.autocast("cpu", torch.bfloat16):
        ll = crf(emissions.bfloat16(), tags, mask)
    assert ll.dtype == torch.float32
    torch.testing.assert_close(ll, crf(emissions.bfloat16().float(), tags, mask))


def test_crf_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    crf = taglm.CRF(4).double()
    emissions = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tags = torch.randint(4, (3, 5), generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1])[:, None]
    params = [p.detach().clone().requires_grad_() for p in (crf.transitions, crf.start, crf.end)]

    def log_likelihood(e, trans, start, end):
        return torch.func.functional_call(crf, {"transitions": trans, "start": start, "end": end}, (e, tags, mask))

    assert torch.autograd.gradcheck(log_likelihood, (emissions, *params))


@given(st.integers(0, 2**16), st.integers(1, 12))
def test_constrained_viterbi_gives_valid_bio(seed, T):
    tag_list = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    crf = taglm.CRF(len(tag_list), taglm.allowed_transitions(tag_list))
    g = torch.Generator().manual_seed(seed)
    emissions = 5 * torch.randn(4, T, len(tag_list), generator=g)
    emissions[..., 2] += 10  # I-PER everywhere would be the unconstrained best
    lengths = torch.randint(1, T + 1, (4,), generator=g)
    path, _ = crf.viterbi(emissions, torch.arange(T)[None, :] < lengths[:, None])
    for row, n in zip(path.tolist(), lengths.tolist()):
        assert is_valid_bio([tag_list[j] for j in row[:n]])


# ---------------------------------------------------------------------------------------------------
# BIO and span F1 (seqeval as the oracle)


def is_valid_bio(tags):
    return all(not t.startswith("I-") or (i and tags[i - 1][2:] == t[2:]) for i, t in enumerate(tags))


tag_seq = st.lists(st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-MISC"]), max_size=15)


@given(tag_seq)
def test_iob1_to_bio_is_valid_bio_and_keeps_spans(tags):
    bio = taglm.iob1_to_bio(tags)
    assert is_valid_bio(bio)
    assert taglm.spans(bio) == taglm.spans(tags)
    assert taglm.iob1_to_bio(bio) == bio  # BIO is IOB1's fixed point
    assert [t[2:] for t in bio] == [t[2:] for t in tags]


def test_iob1_to_bio_examples():
    assert taglm.iob1_to_bio(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]
    assert taglm.spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5)}


def check_against_seqeval(gold, pred):
    seqeval = pytest.importorskip("seqeval.metrics")
    ours = taglm.span_f1(gold, pred)
    for name in ("precision", "recall", "f1"):
        theirs = getattr(seqeval, f"{name}_score")(gold, pred, zero_division=0)
        assert ours[name] == pytest.approx(theirs, abs=1e-9), name
    report = seqeval.classification_report(gold, pred, output_dict=True, zero_division=0)
    for typ, s in ours["per_type"].items():
        if typ in report:
            assert s["f1"] == pytest.approx(report[typ]["f1-score"], abs=1e-9), typ
            assert s["precision"] == pytest.approx(report[typ]["precision"], abs=1e-9), typ


@given(st.lists(st.tuples(tag_seq, st.integers(0, 2**16)), min_size=1, max_size=6))
def test_span_f1_agrees_with_seqeval_on_random_bio(pairs):
    gold, pred = [], []
    for tags, seed in pairs:
        g = torch.Generator().manual_seed(seed)
        noisy = [t if torch.rand(1, generator=g) < 0.7 else ["O", "B-PER", "I-PER", "B-LOC"][
            int(torch.randint(4, (1,), generator=g))] for t in tags]
        gold.append(taglm.iob1_to_bio(tags))
        pred.append(taglm.iob1_to_bio(noisy))
    check_against_seqeval(gold, pred)


def test_span_f1_agrees_with_seqeval_on_real_tags(shared_data):
    _, splits = taglm.load_tagging(str(shared_data / "conll2003"), 0)
    gold = [s["tags"] for s in splits["dev"]]
    g = torch.Generator().manual_seed(0)
    pred = []
    for tags in gold:  # a plausible tagger's mistakes: drop, retype and split some spans
        row = list(tags)
        for i in range(len(row)):
            r = float(torch.rand(1, generator=g))
            if r < 0.03:
                row[i] = "O"
            elif r < 0.06 and row[i] != "O":
                row[i] = row[i][:2] + ("ORG" if row[i][2:] != "ORG" else "PER")
        pred.append(taglm.iob1_to_bio(row))
    check_against_seqeval(gold, pred)
    assert taglm.span_f1(gold, gold)["f1"] == 1.0


def test_allowed_transitions_accept_exactly_valid_bio():
    tag_list = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    trans, start, end = taglm.allowed_transitions(tag_list)
    assert end.all()
    for seq in itertools.product(range(len(tag_list)), repeat=3):
        ok = bool(start[seq[0]]) and all(trans[a, b] for a, b in zip(seq, seq[1:]))
        assert ok == is_valid_bio([tag_list[i] for i in seq])


# ---------------------------------------------------------------------------------------------------
# The LMs and the tagger: the objective, concatenation sizes, h^LM


def test_each_lm_gets_exactly_the_gradient_of_its_own_loss():
    """The joint loss is the sum, not the mean: the forward LM's gradient is that of the forward loss alone
    (a separate run's), the backward LM's that of the backward loss."""
    model = tiny_lms(0).train()
    word_ids = ids(1, 3, 6)
    batch = {"chars": chars_of(word_ids), "targets": word_ids}
    torch.manual_seed(0)  # the same dropout masks in every pass
    taglm.pretrain_loss(model, batch).backward()
    joint = {k: p.grad.clone() for k, p in model.named_parameters()}
    for direction, index in (("fwd", 0), ("bwd", 1)):
        torch.manual_seed(0)
        model.zero_grad()
        fwd_loss, bwd_loss = taglm.pretrain_losses(model, batch)
        (fwd_loss, bwd_loss)[index].backward()
        for k, p in model.named_parameters():
            if k.startswith(direction):
                torch.testing.assert_close(joint[k], p.grad, atol=1e-6, rtol=1e-5)
            else:
                assert p.grad is None or not p.grad.any(), k  # no gradient crosses between the LMs


@pytest.mark.parametrize("insert", ["input", "layer1", "layer2", "none"])
def test_input_sizes_at_the_concatenation(insert):
    model = tiny_tagger(0, lm_insert=insert)
    seen = {}
    for name in ("layer1", "layer2", "out"):
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, (args[0].data if hasattr(args[0], "data") and
                                                               not torch.is_tensor(args[0]) else args[0]).size(-1)))
    model.emissions(tagger_batch(model, ids(0, 2, 5), torch.tensor([5, 2])))
    x = TINY.char_filters + TINY.word_dim
    lm, h = 2 * TINY.lm_proj, 2 * TINY.hidden
    expected = {"input": (x + lm, h, h), "layer1": (x, h + lm, h), "layer2": (x, h, h + lm), "none": (x, h, h)}
    assert (seen["layer1"], seen["layer2"], seen["out"]) == expected[insert]
    assert (model.layer1.input_size, model.layer2.input_size, model.out.in_features) == expected[insert]


def test_lm_embeddings_are_each_lms_top_layer_between_boundaries():
    model = tiny_tagger(0)
    word_ids = ids(1, 2, 5)
    h = model.lm_embeddings(chars_of(word_ids))  # (B, T, 2P)
    for b in range(2):
        sentence = ["</s>"] + [WORDS[i] for i in word_ids[b]] + ["</s>"]
        chars = taglm.chars_tensor(sentence, TINY.max_chars)[None]
        fwd, bwd = model.lms.fwd.hidden(chars)[0, 1:-1], model.lms.bwd.hidden(chars)[0, 1:-1]
        torch.testing.assert_close(h[b], torch.cat([fwd, bwd], -1), atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 50), n=st.integers(1, 9), batch_size=st.integers(1, 4))
def test_cached_lm_embeddings_are_each_sentence_read_alone_without_dropout(seed, n, batch_size):
    """The cache (sentences of one length batched together) gives each sentence the h^LM it has read alone, and the
    frozen LMs run without dropout even when left in train mode."""
    model = tiny_tagger(seed)
    model.lms.train()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (n,), generator=g)
    word_ids = ids(seed, n, int(lengths.max()))
    examples = [{"words": word_ids[i, :k] + 2, "chars": chars_of(word_ids[i:i + 1, :k])[0], "tags": torch.zeros(
        k, dtype=torch.long)} for i, k in enumerate(lengths.tolist())]
    taglm.cache_lm_embeddings(model, examples, batch_size, torch.device("cpu"), contextlib.nullcontext())
    expected = alone(model.eval(), word_ids, lengths)
    for i, e in enumerate(examples):
        torch.testing.assert_close(e["lm"], expected[i, :len(e["words"])], atol=1e-6, rtol=1e-5)
    batch = taglm.collate(examples)
    torch.testing.assert_close(batch["lm"], expected, atol=1e-6, rtol=1e-5)  # collate pads h^LM with zeros


def test_the_tagger_trains_no_lm_weight():
    model = tiny_tagger(0)
    tagger_loss(model.train(), 0).backward()
    assert all(p.grad is None for p in model.lms.parameters())
    assert all(p.grad is not None for k, p in model.named_parameters() if not k.startswith("lms."))


def test_flops_count_each_weight_use():
    """2 per frozen weight, 6 per trained one, character-level weights once per character, `skip` free."""
    model = tiny_tagger(0)
    n = lambda mods: sum(p.numel() for m in mods for k, p in m.named_parameters() if "weight" in k)  # noqa: E731
    lm_mods = [m for m in model.lms.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LSTM, torch.nn.Conv1d))]
    char = [m for m in model.chars.modules() if isinstance(m, torch.nn.Conv1d)]
    lm_char = [m for m in lm_mods if isinstance(m, torch.nn.Conv1d)]
    word = [model.layer1, model.layer2, model.out]
    expect = 6 * (n(word) + 5 * n(char)) + 2 * (n(set(lm_mods) - set(lm_char)) + 5 * n(lm_char))
    assert taglm.flops_per_token(model, 5.0) == expect
    assert taglm.flops_per_token(model, 5.0, skip=model.lms) == 6 * (n(word) + 5 * n(char))


def test_lm_filters_are_width_x_count():
    assert taglm.parse_filters("1x32,2x32,7x1024") == [(1, 32), (2, 32), (7, 1024)]
    for bad in ("1:32", "1x32,", "0x4", "2x-1", "x", "3x"):
        with pytest.raises(taglm.UserError, match="width x count"):
            taglm.parse_filters(bad)


# ---------------------------------------------------------------------------------------------------
# Data: LM windows and text, CoNLL files, the synthetic task


def test_lm_windows_pair_each_token_with_its_characters_and_id():
    cfg = dataclasses.replace(TINY, lm_block_size=3, lm_batch_size=2, max_chars=10)
    stream = taglm.LMWindows("a b c\n\nd a\n\u2028\ne f g h", [taglm.UNK, taglm.BOUNDARY, "b", "a"], cfg, "test")
    assert len(stream.types) == 12  # a b c </s> d a </s> e f g h </s>: blank (and U+2028-only) lines are skipped
    batch = stream.window([2])  # c </s> d a
    assert batch["targets"].tolist() == [[0, 1, 0, 3]]  # c and d are outside the vocabulary: <unk>
    expected = taglm.chars_tensor(["c", taglm.BOUNDARY, "d", "a"], 10)
    assert torch.equal(batch["chars"][0, :, :expected.size(1)], expected)
    first = [next(stream)["targets"] for _ in range(5)]
    assert stream.position == 5 and all(b.shape == (2, 4) for b in first)
    stream.position = 2  # resume: the position alone gives the same batches
    assert all(torch.equal(next(stream)["targets"], b) for b in first[2:])


def test_bucket_sampler_draws_each_sentence_once_an_epoch_in_batches_of_similar_lengths():
    _, splits = taglm.load_tagging("builtin", 0)
    word_list, tag_list, _ = taglm.tag_vocab(splits, TINY)
    examples = taglm.encode_tagging(splits["train"], {w: i for i, w in enumerate(word_list)},
                                    {t: i for i, t in enumerate(tag_list)}, TINY.max_chars, "train")
    sampler = taglm.BucketSampler(examples, 8, seed=3)
    epoch = [next(sampler) for _ in range(sampler.per_epoch)]
    assert sorted(sampler.order) == list(range(len(examples))) and sampler.per_epoch == len(examples) // 8
    assert sum(len(b["lengths"]) for b in epoch) == 8 * sampler.per_epoch
    padding = sum(int((~b["mask"]).sum()) for b in epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(3)).tolist()
    shuffled = [taglm.collate([examples[i] for i in order[k:k + 8]]) for k in range(0, 8 * sampler.per_epoch, 8)]
    assert padding < 0.25 * sum(int((~b["mask"]).sum()) for b in shuffled)  # far less padding than plain shuffling
    first = list(sampler.order)
    next(sampler)  # the next epoch: another order
    assert sampler.order != first
    resumed = taglm.BucketSampler(examples, 8, seed=3)
    resumed.position = 5  # resume: the position alone gives the same batches
    batch = next(resumed)
    assert all(torch.equal(batch[k], epoch[5][k]) for k in ("words", "chars", "tags"))


def test_pretrain_lm_reads_tagging_data_as_its_training_sentences_never_test(tmp_path):
    sentence = "John NNP I-NP I-PER\nsaid VBD I-VP O\nhello UH I-NP O\n\n"
    test = "Zanzibar NNP I-NP I-LOC\n"
    folder = write_conll(tmp_path / "data", train=GOOD + sentence * 6, dev=sentence * 4, test=test)
    taglm.main(["pretrain-lm", "--preset", "tiny", "--data", str(folder), "--out_dir", str(tmp_path / "lm"),
                "--lm_total_steps", "2", *FP32])
    vocab = torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=False)["lm_vocab"]
    assert {"John", "said", "hello"} <= set(vocab) and "Zanzibar" not in vocab and "I-PER" not in vocab


def test_lm_text_reads_any_folder_and_says_when_a_path_is_missing(tmp_path, capsys):
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "a.txt").write_text("one two three\n" * 50)
    (tmp_path / "own" / "b.txt").write_text("four five\n" * 50)
    name, train, valid = taglm.load_lm_text(str(tmp_path / "own"))  # no train.txt / valid.txt: a 90/10 split
    assert name == "own" and len(train) == int(0.9 * len(train + valid)) and "five" in valid
    with pytest.raises(SystemExit) as e:
        taglm.main(["pretrain-lm", "--preset", "tiny", "--data", str(tmp_path / "nope"), "--out_dir",
                    str(tmp_path / "o")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_ptb_is_read_from_the_cache_under_its_dataset_names(tmp_path, monkeypatch):
    monkeypatch.setenv("NLP_LINEAGE_CACHE", str(tmp_path))
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "train.txt").write_text(" the cat sat \n")
    (tmp_path / "ptb" / "valid.txt").write_text(" a dog \n")
    assert taglm.load_lm_text("ptb") == ("ptb", " the cat sat \n", " a dog \n")


def test_reads_lm_text_folders(shared_data):
    name, train, valid = taglm.load_lm_text(str(shared_data / "wikitext-2"))
    assert len(train.encode()) == 10797148 and valid == (shared_data / "wikitext-2" / "valid.txt").read_text()


def test_conll_lines_split_at_newlines_only():
    """U+2028, NEL and other breaks that str.splitlines() and str.split() take for line ends or spaces stay inside
    their token; line numbers in messages count real lines."""
    text = "a\u2028b NN I-NP I-PER\nc\x85d NN O O\ne\x0bf NN O O\n\nx NN O O\n"
    sentences, columns = taglm.parse_conll(text, "t", None)
    assert columns == 4 and sentences == [{"words": ["a\u2028b", "c\x85d", "e\x0bf"], "tags": ["I-PER", "O", "O"]},
                                          {"words": ["x"], "tags": ["O"]}]
    with pytest.raises(taglm.UserError, match=r"^t:6: expected 4"):
        taglm.parse_conll(text + "y NN O\n", "t", None)


def test_conll2000_layout_takes_dev_from_train_and_reads_gzip(tmp_path):
    import gzip
    train = "".join(f"w{i} NN B-NP\nv NN I-NP\n\n" for i in range(20))
    (tmp_path / "train.txt.gz").write_bytes(gzip.compress(train.encode()))
    (tmp_path / "test.txt.gz").write_bytes(gzip.compress(b"t NN B-VP\n"))
    name, splits = taglm.load_tagging(str(tmp_path), 0)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [18, 2, 1]
    assert splits["dev"][0] == {"words": ["w18", "v"], "tags": ["B-NP", "I-NP"]}
    (tmp_path / "test.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(taglm.UserError, match="not gzip-compressed"):
        taglm.load_tagging(str(tmp_path), 0)


def test_synthetic_task_is_deterministic_iob1():
    a, b = taglm.synthetic_ner(50, 3), taglm.synthetic_ner(50, 3)
    assert a == b and a != taglm.synthetic_ner(50, 4)
    sentences, columns = taglm.parse_conll(a, "synthetic", 4)
    assert len(sentences) == 50
    assert any(t.startswith("I-") for s in sentences for t in s["tags"])


def test_reads_conll2003(shared_data):
    name, splits = taglm.load_tagging(str(shared_data / "conll2003"), 0)
    train = splits["train"]
    assert (len(train), len(splits["dev"]), len(splits["test"])) == (14041, 3250, 3453)
    assert sum(len(s["words"]) for s in train) == 203621
    assert all(is_valid_bio(s["tags"]) for s in train)
    counts = {}
    for s in train:
        for typ, _, _ in taglm.spans(s["tags"]):
            counts[typ] = counts.get(typ, 0) + 1
    assert counts == {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600}  # SOURCE.md, the published counts


def test_reads_conll2000_with_dev_from_train(shared_data, capsys):
    name, splits = taglm.load_tagging(str(shared_data / "conll2000"), 0)
    assert len(splits["train"]) + len(splits["dev"]) == 8936 and len(splits["dev"]) == 893
    assert len(splits["test"]) == 2012 and sum(len(s["words"]) for s in splits["test"]) == 47377
    tags = {t: i for i, t in enumerate(sorted({t for s in splits["train"] for t in s["tags"]}))}
    assert "I-LST" not in tags  # real data: the test set's I-LST never occurs in training
    examples = taglm.encode_tagging(splits["test"], {}, tags, 50, "test")
    assert "test data has 2 tags unseen in training (I-LST)" in capsys.readouterr().out
    assert sum(int((e["tags"] < 0).sum()) for e in examples) == 2 and sum(e["gold"].count("I-LST") for e in examples) == 2


# ---------------------------------------------------------------------------------------------------
# Through the command line: the stages, frozen LMs, best.pt, early stopping, resume, errors, smoke run


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    summary = taglm.main(["pretrain-lm", "--preset", "tiny", "--data", "builtin", "--out_dir", str(out),
                          "--lm_total_steps", "6", "--eval_interval", "3", *FP32])
    assert summary["ppl_fwd"] > 1 and summary["ppl_bwd"] > 1
    assert summary["loss"] == pytest.approx(sum(map(math.log, (summary["ppl_fwd"], summary["ppl_bwd"]))))
    return out / "ckpt.pt"


def tag_args(out, *more):
    return ["tag", "--preset", "tiny", "--tag_data", "builtin", "--out_dir", str(out), "--eval_interval", "4",
            *FP32, *more]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lms_do_not_change_and_the_test_split_is_logged(lm_ckpt, tmp_path):
    summary = taglm.main(tag_args(tmp_path, "--init_from", str(lm_ckpt), "--max_steps", "4"))
    assert 0 <= summary["test_f1"] <= 1 and set(summary["test_per_type"]) <= {"PER", "LOC", "ORG", "MISC"}
    before = torch.load(lm_ckpt, weights_only=False)["model"]
    after = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for k, v in before.items():
        assert torch.equal(after["model"][f"lms.{k}"], v), k
    trainable = {id(p) for g in after["optimizer"]["param_groups"] for p in g["params"]}
    assert len(trainable) == sum(1 for k in after["model"] if not k.startswith("lms."))
    test = [r for r in records(tmp_path) if r["split"] == "test"]
    assert len(test) == 1 and test[0]["f1"] == summary["test_f1"] and {"loss", "precision", "recall"} <= test[0].keys()


def test_per_lm_clipping_clips_each_lm_on_its_own(tmp_path, monkeypatch):
    """With --grad_clip c, the harness gets two groups, each LM's parameters, and each LM's norm is brought to c on
    its own (as two separate runs would), not the pair's together."""
    real_clip, real_loop, seen, models = torch.nn.utils.clip_grad_norm_, taglm.train_loop, [], []

    def clip(params, max_norm):
        params = list(params)
        real_clip(params, max_norm)
        seen.append(({id(p) for p in params}, float(torch.stack([p.grad.norm() for p in params]).norm())))

    def loop(cfg, stage, model, *args, **kw):
        models.append(model)
        return real_loop(cfg, stage, model, *args, **kw)

    monkeypatch.setattr(taglm.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(taglm, "train_loop", loop)
    taglm.main(["pretrain-lm", "--preset", "tiny", "--data", "builtin", "--out_dir", str(tmp_path), "--max_steps", "1",
                "--grad_clip", "1e-4", *FP32])
    groups = [{id(p) for p in models[0].fwd.parameters()}, {id(p) for p in models[0].bwd.parameters()}]
    assert [group for group, _ in seen] == groups
    assert all(norm == pytest.approx(1e-4, rel=1e-3) for _, norm in seen)


def test_the_test_f1_is_that_of_the_best_dev_model(lm_ckpt, tmp_path, monkeypatch):
    """best.pt holds the best dev F1's weights; the test evaluation reads them, whatever the last step left."""
    real = taglm.train_loop

    def then_spoil(cfg, stage, model, *args, **kw):
        out = real(cfg, stage, model, *args, **kw)
        with torch.no_grad():
            model.out.weight.mul_(-3)  # the weights after training are no longer the best ones
        return out

    monkeypatch.setattr(taglm, "train_loop", then_spoil)
    summary = taglm.main(tag_args(tmp_path, "--init_from", str(lm_ckpt), "--max_steps", "4"))
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["stage"] == "tag" and best["best"] == summary["best"]
    model = taglm.build_model(dataclasses.replace(TINY, **{k: best["config"][k] for k in taglm.LM_FIELDS}),
                              len(best["lm_vocab"]))
    tagger = taglm.Tagger(TINY, len(best["words"]), best["tags"], model)
    tagger.load_state_dict(best["model"])
    _, splits = taglm.load_tagging("builtin", TINY.seed)
    examples = taglm.encode_tagging(splits["test"], {w: i for i, w in enumerate(best["words"])},
                                    {t: i for i, t in enumerate(best["tags"])}, TINY.max_chars, "test")
    taglm.cache_lm_embeddings(tagger, examples, 8, torch.device("cpu"), contextlib.nullcontext())
    with torch.no_grad():
        test, _ = taglm.evaluate_tagger(tagger.eval(), examples, best["tags"], 8, torch.device("cpu"))
    logged = [r for r in records(tmp_path) if r["split"] == "test"][0]
    assert logged["loss"] == pytest.approx(test["loss"], rel=1e-6) and logged["f1"] == test["f1"]


def test_early_stopping_on_dev_f1(tmp_path, capsys):
    """With a learning rate too small to change the dev F1, `patience` evaluations without a better one stop."""
    summary = taglm.main(tag_args(tmp_path, "--lm_insert", "none", "--eval_interval", "1", "--patience", "2",
                                  "--lr", "1e-12", "--epochs", "3"))
    assert summary["step"] == 3 and "early stopping at step 3: no better dev f1 in 2" in capsys.readouterr().out


def test_labelled_trains_on_a_subset_drawn_by_the_seed_the_same_in_both_arms(lm_ckpt, tmp_path, capsys):
    for arm in (["--init_from", str(lm_ckpt)], ["--lm_insert", "none"], ["--lm_insert", "none", "--seed", "7"]):
        taglm.main(tag_args(tmp_path / str(len(list(tmp_path.iterdir()))), *arm, "--labelled", "100", "--max_steps", "1"))
    assert capsys.readouterr().out.count("tagging builtin-synthetic: 100 train, 200 dev, 200 test") == 3
    _, splits = taglm.load_tagging("builtin", TINY.seed)
    drawn = taglm.random.Random(TINY.seed).sample(splits["train"], 100)
    words = [torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["words"] for d in "012"]
    assert words[0] == words[1] == taglm.tag_vocab({"train": drawn, "dev": [], "test": []}, TINY)[0] != words[2]


def test_tag_resume_mid_epoch_recomputes_the_lm_cache_from_its_own_checkpoint(lm_ckpt, tmp_path):
    """Resumed, `tag` takes the frozen LMs from its own checkpoint (not --init_from), recomputes h^LM and ends where
    the uninterrupted run ends."""
    common = ["--init_from", str(lm_ckpt), "--log_interval", "1", "--eval_interval", "3"]
    taglm.main(tag_args(tmp_path / "a", *common, "--max_steps", "6"))
    taglm.main(tag_args(tmp_path / "b", *common, "--max_steps", "3"))
    b = taglm.main(tag_args(tmp_path / "b", "--init_from", "/no/such/ckpt.pt", "--log_interval", "1",
                            "--eval_interval", "3", "--max_steps", "6", "--resume"))
    a, b_state = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b_state[k]) for k in a)
    assert [r for r in records(tmp_path / "a") if r["split"] == "test"][0]["loss"] == \
        [r for r in records(tmp_path / "b") if r["split"] == "test"][-1]["loss"] and b["step"] == 6


def test_lm_pretraining_resume_equals_uninterrupted(tmp_path):
    common = ["pretrain-lm", "--preset", "tiny", "--data", "builtin", "--eval_interval", "3", "--log_interval", "1", *FP32]
    taglm.main([*common, "--out_dir", str(tmp_path / "a"), "--max_steps", "6"])
    taglm.main([*common, "--out_dir", str(tmp_path / "b"), "--max_steps", "3"])
    taglm.main([*common, "--out_dir", str(tmp_path / "b"), "--max_steps", "6", "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_one_big_batch(lm_ckpt, tmp_path, monkeypatch):
    """Two micro-batches of 4 (loss divided by 2) give the update of one batch of 8: same sentences, since the
    epoch's permutation is cut into consecutive batches; dropout off so no RNG differs. Plain SGD, whose update is
    linear in the gradient (Adam's first steps are lr * sign(g), which turns float noise in near-zero gradients
    into lr-sized differences)."""
    monkeypatch.setattr(taglm.torch.optim, "Adam", lambda params, lr, fused=False: torch.optim.SGD(params, lr=lr))
    common = ["--init_from", str(lm_ckpt), "--eval_interval", "2", "--max_steps", "2", "--dropout", "0", "--lr", "0.5"]
    taglm.main(tag_args(tmp_path / "big", *common, "--batch_size", "8"))
    taglm.main(tag_args(tmp_path / "acc", *common, "--batch_size", "4", "--grad_accum", "2"))
    taglm.main(tag_args(tmp_path / "small", *common, "--batch_size", "4"))
    a, b, c = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in ("big", "acc", "small"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not torch.allclose(a["out.weight"], c["out.weight"], atol=1e-5)  # batches of 4 alone differ


def test_training_logs_mfu(lm_ckpt, tmp_path):
    taglm.main(tag_args(tmp_path, "--init_from", str(lm_ckpt), "--max_steps", "2", "--log_interval", "1"))
    train = [r for r in records(tmp_path) if r["split"] == "train"]
    assert train and all(0 < r["mfu"] < 1 and r["tok_s"] > 0 for r in train)


@pytest.mark.slow
def test_compiled_tagger_checkpoint_has_plain_names(lm_ckpt, tmp_path):
    out = taglm.main(tag_args(tmp_path, "--init_from", str(lm_ckpt), "--max_steps", "2", "--compile"))
    names = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"].keys()
    assert 0 <= out["test_f1"] <= 1 and not any("_orig_mod" in k for k in names) and "crf.transitions" in names


def write_conll(folder: Path, train: str, dev="x NN I-NP O\n", test="x NN I-NP O\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("eng.train", train), ("eng.testa", dev), ("eng.testb", test)):
        (folder / name).write_text(text)
    return folder


GOOD = "-DOCSTART- -X- O O\n\nJohn NNP I-NP I-PER\nsaid VBD I-VP O\n\n"


@pytest.mark.parametrize("files, argv, message", [
    ({"train": GOOD + "Paris NNP I-LOC\n"}, [], "data/eng.train:6: expected 4 space-separated columns"),
    ({"train": GOOD + "Paris NNP I-NP LOCATION\n"}, [], "is not O, B-TYPE or I-TYPE"),
    ({"train": ""}, [], "is empty"),
    ({"train": GOOD, "dev": "x NN O\n"}, [], "expected 4 space-separated columns"),
    ({}, ["--tag_data", "no/such/place"], "unknown tagging data 'no/such/place'"),
    ({}, ["--dropout", "1.0"], "--dropout and --lm_dropout must be in [0, 1)"),
    ({}, ["--hidden", "0"], "--hidden must be positive"),
    ({}, ["--lm_insert", "layer3"], "invalid choice"),
    ({}, ["--lm_filters", "3x"], "--lm_filters must look like 1x32"),
    ({}, ["--lm_filters", "1:32"], "--lm_filters must look like 1x32"),
    ({}, ["--lm_insert", "layer1", "--init_from", ""], "tag needs --init_from"),
    ({}, ["--lm_insert", "layer1", "--init_from", "missing.pt"], "checkpoint missing.pt does not exist"),
    ({}, ["--glove", "GLOVE"], "glove.txt:1: expected a word and 16 numbers"),
    ({}, ["--glove", "BADGLOVE"], "bad.txt:2: a vector value is not a number"),
])
def test_errors_through_the_command_line(tmp_path, capsys, files, argv, message):
    argv = [a.replace("BADGLOVE", str(tmp_path / "bad.txt")).replace("GLOVE", str(tmp_path / "glove.txt")) for a in argv]
    (tmp_path / "glove.txt").write_text("john 0.1 0.2\n")
    (tmp_path / "bad.txt").write_text("zzz" + " 0" * 16 + "\njohn " + "0 " * 15 + "x\n")
    data = ["--tag_data", str(write_conll(tmp_path / "data", **files))] if files else ["--tag_data", "builtin"]
    with pytest.raises(SystemExit) as e:
        taglm.main(tag_args(tmp_path / "out", "--lm_insert", "none", *data, *argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_init_from_must_be_an_lm_checkpoint(lm_ckpt, tmp_path, capsys):
    taglm.main(tag_args(tmp_path / "t", "--init_from", str(lm_ckpt), "--max_steps", "1"))
    with pytest.raises(SystemExit) as e:
        taglm.main(tag_args(tmp_path / "u", "--init_from", str(tmp_path / "t" / "ckpt.pt")))
    assert e.value.code == 2 and "is a tag checkpoint, not pretrain-lm" in capsys.readouterr().err


def test_unseen_eval_tag_is_a_warning_and_counts_as_an_error(tmp_path, capsys):
    data = write_conll(tmp_path / "d", GOOD * 3, dev=GOOD, test="Ann NNP I-NP I-ART\nsaid VBD I-VP O\n")
    summary = taglm.main(tag_args(tmp_path / "out", "--lm_insert", "none", "--tag_data", str(data), "--max_steps", "2"))
    assert "test data has 1 tags unseen in training (B-ART)" in capsys.readouterr().out
    assert summary["test_f1"] == 0.0 and summary["test_per_type"]["ART"]["recall"] == 0.0


def test_glove_vectors_initialise_the_word_embeddings(tmp_path):
    vec = [0.5 * i for i in range(16)]
    glove = [f"{w} " + " ".join(str(v + i) for v in vec) for i, w in enumerate(["john", "ann", "zzz"])]
    (tmp_path / "g.txt").write_text("\n".join(glove) + "\n")
    data = write_conll(tmp_path / "d", GOOD * 3 + "Bob NNP I-NP I-PER\n", dev="Ann NNP I-NP I-PER\n")
    taglm.main(tag_args(tmp_path / "out", "--lm_insert", "none", "--tag_data", str(data), "--glove",
                        str(tmp_path / "g.txt"), "--max_steps", "1", "--lr", "1e-9"))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    for i, word in enumerate(["john", "ann"]):  # a training word and a dev word GloVe knows
        row = ckpt["model"]["words.weight"][ckpt["words"].index(word)]
        torch.testing.assert_close(row, torch.tensor(vec) + i, atol=1e-6, rtol=0)
    assert "zzz" not in ckpt["words"] and "bob" not in ckpt["words"]  # not in the data; a singleton: <unk>


def test_smoke_subprocess_main_job(tmp_path):
    """The main job end to end in its own process: LMs, then the tagger on them, the test F1, and no line that is not
    ours (PyTorch's oneDNN note about LSTMs with projections is silenced where the LSTM runs)."""
    r = subprocess.run([sys.executable, str(ROOT / "taglm.py"), "--preset", "tiny", "--data", "builtin",
                        "--tag_data", "builtin", "--out_dir", str(tmp_path), "--max_steps", "3"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "NLP_LINEAGE_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr
    assert "test F1" in r.stdout and "SYNTHETIC" in r.stdout
    assert "oneDNN" not in r.stdout + r.stderr and "Warning" not in r.stderr, r.stderr
    assert (tmp_path / "lm" / "ckpt.pt").is_file() and (tmp_path / "tag" / "best.pt").is_file()
    # both arms, the second beside the first in its own process, then the claim: test F1 with vs without the LMs
    assert (tmp_path / "tag-none" / "best.pt").is_file()
    assert "test F1" in (tmp_path / "tag-none" / "stdout.log").read_text()  # its log
    claim = [r for r in records(tmp_path) if r["split"] == "claim"]
    arms = [[r for r in records(tmp_path / d) if r["split"] == "test"][0]["f1"] for d in ("tag", "tag-none")]
    assert len(claim) == 1 and claim[0]["task"] == "builtin-synthetic" and claim[0]["metric"] == "test F1"
    assert [claim[0]["with"], claim[0]["without"]] == [round(100 * f1, 2) for f1 in arms]
    assert claim[0]["differs"].startswith("frozen LM embeddings at layer1 vs none")
    line = r.stdout.strip().splitlines()[-1]
    assert line == f"claim: builtin-synthetic test F1 {claim[0]['with']:.1f} vs {claim[0]['without']:.1f} " \
                   f"({claim[0]['differs']})"
    assert json.loads((tmp_path / "tag-none" / "config.json").read_text())["lm_insert"] == "none"


def test_an_error_in_the_second_process_is_one_line_in_the_first(tmp_path):
    good = dataclasses.replace(TINY, tag_data="builtin", lm_insert="none", out_dir=str(tmp_path / "a"), max_steps=2,
                               device="cpu", dtype="float32")
    bad = dataclasses.replace(good, tag_data=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "b"))
    with pytest.raises(taglm.UserError, match="unknown tagging data"):
        taglm.side_by_side(taglm.tag, good, bad)
    assert (tmp_path / "a" / "best.pt").is_file()
