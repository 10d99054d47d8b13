"""bert.py: Google's tokenizer and the WordPiece trainer (against Hugging Face and a brute-force trainer), the
create_pretraining_data pipeline (exact masking counts, NSP pairs, static copies, two phases), the model against
Hugging Face, fine-tuning, the main job and bert-specific errors. Cross-model properties: PROPERTY_ROWS below."""
import dataclasses
import functools
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings, strategies as st

import bert
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
FP32 = ["--device", "cpu", "--dtype", "float32"]


@functools.lru_cache(maxsize=None)
def builtin_tok() -> bert.WordPiece:
    _, train, _ = bert.load_documents("builtin")
    extra = ["café naïve résumé Zürich São Paulo façade", "中文 日本語 한국어 Ελληνικά русский"] * 5
    return bert.WordPiece.train([s for d in train[:30] for s in d] + extra, 300)


def encode_documents(docs, tok):
    return [d for d in ([ids for ids in map(tok.encode, doc) if ids] for doc in docs) if d]


@functools.lru_cache(maxsize=None)
def builtin_docs():
    _, train, _ = bert.load_documents("builtin")
    return encode_documents(train[:6], builtin_tok())


def tiny_cfg(**kw) -> bert.Config:
    return dataclasses.replace(bert.PRESETS["tiny"], vocab_size=len(builtin_tok().vocab), **kw)


def tiny_model(seed: int) -> bert.BertForPreTraining:
    torch.manual_seed(seed)
    return bert.build_model(tiny_cfg()).eval()


def random_ids(seed: int, B: int, T: int) -> torch.Tensor:
    return torch.randint(5, len(builtin_tok().vocab), (B, T), generator=torch.Generator().manual_seed(seed))


def pretraining_batch(seed: int, cfg=None) -> dict:
    cfg = cfg or tiny_cfg()
    instances = bert.create_instances(builtin_docs(), builtin_tok(), cfg, cfg.max_seq_length, random.Random(seed))
    return bert.collate(random.Random(seed).sample(instances, 8))


def encoder(model, ids, keep=None):
    keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep
    return model.bert(ids, torch.zeros_like(ids), keep)


def attention_inputs(model, ids, keep=None):
    """(layer, its input x, its key mask) for each layer, caught by forward hooks, and the encoder's output."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((m, *args))) for layer in model.bert.layers]
    try:
        out = encoder(model, ids, keep)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def attention_weights(model, ids, keep=None):
    """softmax(QK^T / sqrt(d)) of every layer (B, H, T, S), recomputed from its qkv weights and hooked input."""
    seen, _ = attention_inputs(model, ids, keep)
    weights = []
    for layer, x, keep in seen:
        q, k, _ = rearrange(layer.qkv(x), "b t (three h d) -> three b h t d", three=3, h=layer.n_head)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        weights.append((scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1), (layer.n_head, ids.size(1))))
    return weights


def sequence(rng: random.Random, n: int, tok: bert.WordPiece, pads: int = 0) -> list[int]:
    """[CLS] A [SEP] B [SEP] of n tokens (no special token inside), with `pads` [PAD] ids scattered in it."""
    normal = [i for i, t in enumerate(tok.vocab) if t not in bert.SPECIALS]
    body = [rng.choice(normal) for _ in range(n - 3)]
    for _ in range(pads):
        body[rng.randrange(len(body))] = tok.pad_id
    cut = rng.randint(1, len(body) - 1)
    return [tok.cls_id, *body[:cut], tok.sep_id, *body[cut:], tok.sep_id]


def masking_rates(seed: int) -> list:
    """What bert.py masks at configured rates, as (what, hits, trials, rate). The positions: Google's exact count,
    round(0.15 n) of the n tokens of each sequence, [CLS] and both [SEP]s counted in n as Google's code counts them
    (the lengths vary, 20 to 133, so the cap of 20 never binds): hits are the chosen positions, trials all n tokens.
    Among the chosen: [MASK] 80%, a random token 10% (from the whole vocabulary, so it is [MASK] or the original
    itself with 1/V each), kept 10%."""
    tok, rng, counts = builtin_tok(), random.Random(seed), Counter()
    for _ in range(300):
        ids = sequence(rng, rng.randint(20, 133), tok)
        out, positions, _ = bert.mask_tokens(ids, tok, rng, 0.15, 20)
        counts.update(tokens=len(ids), chosen=len(positions))
        counts.update("mask" if out[p] == tok.mask_id else "kept" if out[p] == ids[p] else "random" for p in positions)
    V = len(tok.vocab)
    return [("MLM positions", counts["chosen"], counts["tokens"], 0.15),
            ("[MASK]", counts["mask"], counts["chosen"], 0.8 + 0.1 / V),
            ("random token", counts["random"], counts["chosen"], 0.1 * (1 - 2 / V)),
            ("kept", counts["kept"], counts["chosen"], 0.1 + 0.1 / V)]


PROPERTY_ROWS = [Rows(
    name="bert",
    model=tiny_model,
    ids=random_ids,
    attention=attention_weights,
    padded=lambda m, ids, lengths: encoder(m, ids, torch.arange(ids.size(1))[None, :] < lengths[:, None])[0],
    loss=lambda m, seed: bert.pretrain_loss(m, pretraining_batch(seed)),
    rates=masking_rates,
)]


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def hf_tokenizer(vocab: list[str], tmp: Path, lower: bool, legacy: bool = False):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    (tmp / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    hf = (BertTokenizerLegacy if legacy else BertTokenizer).from_pretrained(str(tmp), do_lower_case=lower)
    assert len(hf) == len(vocab)  # the file was read (transformers 5 ignores BertTokenizer(vocab_file=...))
    return hf


PIECES = st.one_of(  # no Σ: Hugging Face's tokenizers library lower-cases per character (see the next test)
    st.characters(max_codepoint=0x17F, exclude_categories=("Cs",)),
    st.sampled_from(list("中文日本語한국어ÀÉÎõüñçßØ—“”…«»¿¡·ﬁσς\u00a0\u2028\u2029\u200b\u0301\t\n\r\x0b\x85\x00\ufffd")),
    st.sampled_from(["[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[mask]", "##", " the ", "café", "naïve",
                     "attribute", "x" * 101, "Zürich"]),
)


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_matches_hugging_face(lower, tmp_path):
    tok = bert.WordPiece(builtin_tok().vocab, lower)
    hf = hf_tokenizer(tok.vocab, tmp_path, lower)

    @settings(max_examples=150)
    @given(st.lists(PIECES, max_size=30).map("".join))
    def check(text):
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)

    check()


def test_basic_tokenizer_is_googles(tmp_path):
    """Google drops control and format characters (Cc, Cf) only and lower-cases whole words with str.lower.
    Hugging Face's tokenizers library drops every category C, private-use ones too, and lower-cases per
    character; its legacy Python tokenizer lower-cases as Google's (it drops category C too)."""
    vocab = [*bert.SPECIALS, "a", "##b", "x", "##y", "zero", "##width", "οδος", "οδοσ", "x\ue000y", "."]
    tok, fast = bert.WordPiece(vocab), hf_tokenizer(vocab, tmp_path, True)
    legacy = hf_tokenizer(vocab, tmp_path, True, legacy=True)
    ids = lambda *pieces: [vocab.index(p) for p in pieces]
    for text, pieces in [("zero\u200bwidth", ["zero", "##width"]), ("a\x85b", ["a", "##b"]), ("a\x00\ufffdb", ["a", "##b"]),
                         ("x\U000e0001y", ["x", "##y"]), ("x\u2028y", ["x", "[UNK]"]), ("a\u00a0x", ["a", "x"])]:
        assert tok.encode(text) == ids(*pieces) == fast(text, add_special_tokens=False)["input_ids"], repr(text)
    for text in ("ΟΔΟΣ", "ΟΔΟΣ.", "Ο ΟΔΟΣ"):  # the final sigma: ς
        assert tok.encode(text) == legacy(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode("ΟΔΟΣ.") == ids("οδος", ".") != fast("ΟΔΟΣ.", add_special_tokens=False)["input_ids"]
    assert bert.basic_tokenize("x\ue000y ΟΔΟΣ", True) == ["x\ue000y", "οδος"]  # U+E000 (Co) stays, as Google's
    assert tok.encode("x\ue000y") == ids("x\ue000y") and fast.tokenize("x\ue000y") == ["x", "##y"]
    assert bert.basic_tokenize("Naïve CAFÉ, 中文!", False) == ["Naïve", "CAFÉ", ",", "中", "文", "!"]


def test_wordpiece_training_and_vocab_size():
    tok = builtin_tok()
    assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert len(tok.vocab) == 300 == len(set(tok.vocab))
    assert [t for t in tok.vocab[5:] if len(t.removeprefix("##")) > 1], "no merges learned"
    assert tok.encode("x" * 101) == [tok.unk_id] and tok.encode("x" * 100) != [tok.unk_id]  # the 100-character limit
    alphabet = sorted({"h", "w", "a", "b", "c", "##e", "##l", "##o", "##r", "##d"})  # of "hello world a b c"
    assert bert.WordPiece.train(["hello world", "a b c"], 15).vocab == [*bert.SPECIALS, *alphabet]
    with pytest.raises(bert.UserError, match="below the 15 that the 5 special tokens and the 10 characters"):
        bert.WordPiece.train(["hello world", "a b c"], 14)


def test_too_small_a_vocabulary_is_one_line_naming_the_minimum(capsys, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(f"sentence {i} here.\nand more {i}." for i in range(6)))  # 4 train documents
    err = expect_error(capsys, "pretrain", "--preset", "tiny", "--data", str(data), "--wordpiece_vocab_size", "3",
                       "--out_dir", str(tmp_path / "o"))
    alphabet = set("sham.0123") | {"##" + c for c in "entcrod"}  # sentence here and more . 0-3
    assert f"--wordpiece_vocab_size 3 is below the {5 + len(alphabet)}" in err and not (tmp_path / "o").exists()


def naive_wordpiece(texts, vocab_size):
    """Brute force: recount every pair of every word before each merge; the most frequent, ties to the smaller ids."""
    words = Counter(w for t in texts for w in bert.basic_tokenize(t, True))
    vocab = list(bert.SPECIALS) + sorted({w[0] for w in words} | {"##" + c for w in words for c in w[1:]})
    seqs = {w: [vocab.index(w[0])] + [vocab.index("##" + c) for c in w[1:]] for w in words}
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                counts[p] += words[w]
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merged = vocab[pair[0]] + vocab[pair[1]][2:]
        vocab += [] if merged in vocab else [merged]
        for w, s in seqs.items():
            out, j = [], 0
            while j < len(s):
                hit = j + 1 < len(s) and (s[j], s[j + 1]) == pair
                out.append(vocab.index(merged) if hit else s[j])
                j += 2 if hit else 1
            seqs[w] = out
    return vocab


@given(st.lists(st.text(alphabet="abcab ", max_size=30), max_size=8), st.integers(0, 25))
def test_incremental_trainer_equals_brute_force(texts, merges):
    base = len(naive_wordpiece(texts, 0))
    assert bert.WordPiece.train(texts, base + merges).vocab == naive_wordpiece(texts, base + merges)


def test_wordpiece_is_greedy_longest_match_first():
    tok = bert.WordPiece(list(bert.SPECIALS) + ["un", "unaff", "##aff", "##able", "##a", "##ffable", "a"])
    ids = {t: i for i, t in enumerate(tok.vocab)}
    assert tok.encode("unaffable") == [ids["unaff"], ids["##able"]]
    assert tok.encode("unaffablex") == [tok.unk_id]  # no piece for x: the whole word is unknown
    assert tok.encode("Un [MASK]a") == [ids["un"], tok.mask_id, ids["a"]]  # special tokens matched in the text


@functools.lru_cache(maxsize=None)
def wikitext2(shared_data: Path):
    """WikiText-2's training documents and the small preset's WordPiece vocabulary of them, and its training time."""
    import time
    _, train, _ = bert.load_documents(str(shared_data / "wikitext-2"))
    t0 = time.time()
    tok = bert.WordPiece.train((s for d in train for s in d), 8000)
    return train, tok, time.time() - t0


def test_wordpiece_trains_on_wikitext2_in_seconds(shared_data):
    _, tok, seconds = wikitext2(shared_data)
    assert seconds < 60 and len(tok.vocab) == 8000 and tok.vocab[:5] == list(bert.SPECIALS)


# ---------------------------------------------------------------------------------------------------
# Masking (create_masked_lm_predictions)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 300), max_pred=st.integers(1, 80), pads=st.integers(0, 3))
def test_masking_exact_count_never_specials(seed, n, max_pred, pads):
    tok, rng = builtin_tok(), random.Random(seed)
    ids = sequence(rng, n, tok, min(pads, (n - 3) // 2))
    out, positions, labels = bert.mask_tokens(ids, tok, rng, 0.15, max_pred)
    real = sum(t not in (tok.cls_id, tok.sep_id, tok.pad_id) for t in ids)
    assert len(positions) == min(max_pred, max(1, round(0.15 * n)), real) == len(set(positions))
    assert positions == sorted(positions) and all(ids[p] not in (tok.cls_id, tok.sep_id, tok.pad_id) for p in positions)
    assert labels == [ids[p] for p in positions]
    assert all(out[i] == ids[i] for i in range(n) if i not in positions)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**32 - 1))
def test_masking_rates_within_binomial_bounds(seed):
    for what, hits, trials, rate in masking_rates(seed):
        assert abs(hits / trials - rate) < 5 * (rate * (1 - rate) / trials) ** 0.5, (what, hits, trials, rate)


# ---------------------------------------------------------------------------------------------------
# Next-sentence prediction pairs (create_instances_from_document)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.integers(5, 64))
def test_nsp_instances(seed, seq_len):
    tok, rng = builtin_tok(), random.Random(seed)
    normal = [i for i, t in enumerate(tok.vocab) if t not in bert.SPECIALS]
    per_doc = 9  # document d writes only the ids normal[9 d] ... normal[9 d + 8]
    doc_of = {normal[i]: i // per_doc for i in range(30 * per_doc)}
    docs = [[[normal[d * per_doc + rng.randrange(per_doc)] for _ in range(rng.randint(1, 12))]
             for _ in range(rng.randint(1, 15))] for d in range(30)]
    cfg = tiny_cfg(max_seq_length=min(seq_len, 64))
    instances = bert.create_instances(docs, tok, cfg, seq_len, rng)
    for x in instances:
        ids = [x["labels"][x["positions"].index(i)] if i in x["positions"] else t for i, t in enumerate(x["ids"])]
        assert len(ids) <= seq_len and set(x) == {"ids", "n_a", "is_random_next", "positions", "labels"}
        assert ids[0] == tok.cls_id and ids[x["n_a"] + 1] == tok.sep_id and ids[-1] == tok.sep_id
        a, b = ids[1:x["n_a"] + 1], ids[x["n_a"] + 2:-1]
        assert a and b and tok.sep_id not in a + b
        (doc_a,) = {doc_of[t] for t in a}
        if x["is_random_next"]:
            assert doc_a not in {doc_of[t] for t in b}  # a NotNext B never comes from A's document
        else:
            assert {doc_of[t] for t in b} == {doc_a}
    batch = bert.collate(instances[:16])
    for r, x in enumerate(instances[:16]):
        seg, n = batch["token_type_ids"][r], len(x["ids"])
        assert seg[:x["n_a"] + 2].eq(0).all() and seg[x["n_a"] + 2:n].eq(1).all() and seg[n:].eq(0).all()
        assert batch["attention_mask"][r].sum() == n and batch["nsp_labels"][r] == int(x["is_random_next"])
        assert batch["input_ids"][r, :n].tolist() == x["ids"] and batch["input_ids"][r, n:].eq(0).all()
        assert (batch["mlm_labels"][r] != -100).nonzero().flatten().tolist() == x["positions"]


def notnext_rate(docs, tok, cfg, seeds):
    instances = [x for seed in seeds for x in bert.create_instances(docs, tok, cfg, 128, random.Random(seed))]
    return sum(x["is_random_next"] for x in instances) / len(instances), len(instances)


def test_notnext_rate_on_the_builtin_corpus():
    """Above 50%, as in Google's data: one-segment chunks are always NotNext, and a NotNext pair puts A's unused
    segments back. The Python documentation has long sentences: at length 128 with the 300-token vocabulary, 60%."""
    _, train, _ = bert.load_documents("builtin")
    rate, n = notnext_rate(encode_documents(train, builtin_tok()), builtin_tok(), tiny_cfg(), range(3))
    assert n > 4000 and 0.57 < rate < 0.63, (rate, n)


def test_notnext_rate_on_wikitext2_is_google_like(shared_data):
    train, tok, _ = wikitext2(shared_data)  # the first 300 of its 629 articles
    rate, n = notnext_rate(encode_documents(train[:300], tok), tok, dataclasses.replace(bert.PRESETS["small"],
                                                                                       vocab_size=8000), [0])
    assert n > 10_000 and 0.52 < rate < 0.56, (rate, n)


def test_static_copies_two_phases_and_position():
    docs, tok = builtin_docs(), builtin_tok()
    cfg = tiny_cfg(dupe_factor=3, batch_size=4, total_steps=1000)
    sampler = bert.PretrainingSampler(docs, tok, cfg)
    next(sampler)
    instances = sampler.phase[1].examples  # all three copies, shuffled together
    copies = [bert.create_instances(docs, tok, cfg, cfg.max_seq_length, random.Random(f"{cfg.seed}-0-{c}"))
              for c in range(3)]
    assert instances == [x for c in copies for x in c] and copies[0] != copies[1] != copies[2]
    first = [next(sampler) for _ in range(5)]
    again = bert.PretrainingSampler(docs, tok, cfg)
    again.position = 1  # what --resume sets
    assert all(a[k].equal(b[k]) for a, b in zip(first, (next(again) for _ in range(5))) for k in a)
    phased = bert.PretrainingSampler(docs, tok, tiny_cfg(two_phase=True, batch_size=4, total_steps=10, grad_accum=2))
    lengths = [next(phased)["input_ids"].size(1) for _ in range(20)]
    assert max(lengths[:18]) <= 64 < max(lengths[18:]) <= 128  # steps 10 and on (draws 18 and on) at max_position


# ---------------------------------------------------------------------------------------------------
# Model: Hugging Face parity, parameter count, tied embedding, attention


def test_paper_preset_has_bert_base_parameter_count():
    from transformers import BertConfig, BertForPreTraining
    with torch.device("meta"):
        ours = bert.build_model(bert.PRESETS["paper"])
        theirs = BertForPreTraining(BertConfig())  # bert-base-uncased's config
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(theirs) == 110_106_428


def hf_folder(tmp_path, act="gelu"):
    from transformers import BertConfig, BertForPreTraining
    torch.manual_seed(0)
    vocab = list(builtin_tok().vocab)
    vocab[0:5], vocab[10:15] = vocab[10:15], vocab[0:5]  # specials not at 0-4: the file's ids are kept
    hf = BertForPreTraining(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=40, hidden_act=act)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    return hf, vocab


def test_logits_match_hugging_face(tmp_path):
    hf, vocab = hf_folder(tmp_path)
    model, tok, cfg = bert.load_hf(tmp_path, bert.PRESETS["tiny"])
    model.eval()
    assert tok.vocab == vocab and tok.mask_id == 14 and tok.pad_id == 10 and cfg.d_ff == 48 and cfg.max_position == 40
    ids, seg = random_ids(1, 3, 12), torch.randint(0, 2, (3, 12))
    for lengths in ([12, 12, 12], [12, 5, 1]):
        keep = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
        with torch.no_grad():
            theirs = hf(input_ids=ids, token_type_ids=seg, attention_mask=keep.long())
            mlm, nsp = model({"input_ids": ids, "token_type_ids": seg, "attention_mask": keep,
                              "mlm_labels": torch.zeros_like(ids)})  # every position scored
        torch.testing.assert_close(mlm, theirs.prediction_logits.flatten(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nsp, theirs.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_hugging_face_folders_bert_cannot_read_are_one_line(tmp_path, capsys):
    hf_folder(tmp_path, act="gelu_new")
    capsys.readouterr()  # Hugging Face's progress bar
    argv = ["finetune", "--preset", "tiny", "--out_dir", str(tmp_path / "o"), "--init_from"]
    assert "gelu_new" in expect_error(capsys, *argv, f"hf:{tmp_path}")
    assert "has no config.json" in expect_error(capsys, *argv, f"hf:{tmp_path / 'nothing'}")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    (tmp_path / "model.safetensors").unlink()
    assert "no model.safetensors" in expect_error(capsys, *argv, f"hf:{tmp_path}")
    assert not (tmp_path / "o").exists()


def test_both_uses_of_the_tied_embedding_get_gradient():
    model = tiny_model(0).train()
    emb, batch = model.bert.tok.weight, pretraining_batch(0)
    mlm, nsp = model(batch)
    targets = batch["mlm_labels"][batch["mlm_labels"] != -100]
    (g_nsp,) = torch.autograd.grad(torch.nn.functional.cross_entropy(nsp, batch["nsp_labels"]), emb, retain_graph=True)
    (g_mlm,) = torch.autograd.grad(torch.nn.functional.cross_entropy(mlm, targets), emb)
    seen = torch.zeros(len(emb), dtype=torch.bool)
    seen[batch["input_ids"].unique()] = True
    assert g_nsp[seen].abs().sum() > 0 and g_nsp[~seen].abs().sum() == 0  # NSP reaches it as the input table only
    assert g_mlm[~seen].abs().sum(-1).gt(0).all()  # rows never in the input: the output decoder's gradient


def test_attention_helper_reproduces_each_layer():
    """The weights the property rows read, times V, through the layer's projection and norms, give the layer's
    output: the helper recomputes what the layer computes, padded keys included."""
    model, ids = tiny_model(3), random_ids(3, 2, 9)
    keep = torch.arange(9)[None, :] < torch.tensor([9, 4])[:, None]
    seen, _ = attention_inputs(model, ids, keep)
    for (layer, x, k), (att, _) in zip(seen, attention_weights(model, ids, keep)):
        v = rearrange(layer.qkv(x), "b t (three h d) -> three b h t d", three=3, h=layer.n_head)[2]
        h = layer.ln_1(x + layer.proj(rearrange(att @ v, "b h t d -> b t (h d)")))
        torch.testing.assert_close(layer.ln_2(h + layer.fc2(torch.nn.functional.gelu(layer.fc1(h)))), layer(x, k),
                                   atol=1e-5, rtol=1e-5)
        assert att[1, :, :, 4:].eq(0).all()


# ---------------------------------------------------------------------------------------------------
# Data


def test_load_documents_layouts(tmp_path):
    (tmp_path / "plain").mkdir()
    for i in range(3):  # a folder without train.txt and valid.txt: all its files, the last 10% of documents held out
        (tmp_path / "plain" / f"part{i}.txt").write_text("".join(f"Doc {i}{j} one.\r\nDoc {i}{j}\u2028two.\n\n"
                                                                 for j in range(4)))
    name, train, val = bert.load_documents(str(tmp_path / "plain"))
    assert name == "plain" and len(train) == 10 and val == [["Doc 22 one.", "Doc 22\u2028two."],
                                                              ["Doc 23 one.", "Doc 23\u2028two."]]
    wiki = " \n = First = \n \n Alpha beta . Gamma @-@ delta ! <unk> eps . \n \n = = Part = = \n \n Zeta .\n"
    (tmp_path / "wiki.txt").write_text(wiki + wiki.replace("First", "Second") * 3)
    _, train, val = bert.load_documents(str(tmp_path / "wiki.txt"))
    assert train[0] == ["Alpha beta .", "Gamma-delta !", "[UNK] eps .", "Zeta ."] and len(train) == 2 == len(val)
    assert builtin_tok().encode("[UNK] eps")[0] == builtin_tok().unk_id
    (tmp_path / "cls").mkdir()  # classification data: its training sentences, 8 a document, never its labels or dev
    (tmp_path / "cls" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"line {i} \t{i % 2}\n" for i in range(300)))
    (tmp_path / "cls" / "dev.tsv").write_text("sentence\tlabel\nheld out \t1\n")
    name, train, val = bert.load_documents(str(tmp_path / "cls"))
    assert name == "cls" and len(train) == 36 and len(val) == 2 and train[0] == [f"line {i} " for i in range(8)]
    assert val[-1] == [f"line {i} " for i in range(296, 300)]


# ---------------------------------------------------------------------------------------------------
# Stages through the command line


def run_main(*argv) -> dict:
    return bert.main([*argv, *FP32])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    run_main("pretrain", "--preset", "tiny", "--data", "builtin", "--total_steps", "4", "--out_dir", str(out))
    return out / "ckpt.pt"


def test_resume_across_the_phase_switch_with_accumulation(tmp_path):
    args = ["pretrain", "--preset", "tiny", "--data", "builtin", "--total_steps", "10", "--eval_interval", "5",
            "--log_interval", "1", "--two_phase", "--grad_accum", "2"]
    full = run_main(*args, "--out_dir", str(tmp_path / "a"))
    run_main(*args, "--out_dir", str(tmp_path / "b"), "--max_steps", "8")  # the phase switches at step 9
    resumed = run_main(*args, "--out_dir", str(tmp_path / "b"), "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    assert full["step"] == resumed["step"] == 10 and full["loss"] == resumed["loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert 0 <= full["mlm_acc"] <= 1 and 0 <= full["nsp_acc"] <= 1


def test_finetune_sentence_pairs(pretrained, tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    rng = random.Random(0)
    words = ["cat", "dog", "tree", "house", "river", "stone"]
    for split, n in (("train", 96), ("dev", 32)):
        rows = []
        for _ in range(n):
            a, b = rng.choice(words), rng.choice(words)
            rows.append(f"{'same' if a == b else 'different'}\tthe {a} is here\tthe {b} is there\n")
        (data / f"{split}.tsv").write_text("".join(rows))
    out = run_main("finetune", "--preset", "tiny", "--init_from", str(pretrained), "--finetune_data", str(data),
                   "--out_dir", str(tmp_path / "ft"), "--finetune_batch_size", "16")
    assert out["step"] == 6 and 0 <= out["acc"] <= 1
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["labels"] == ["different", "same"] and ckpt["stage"] == "finetune"
    tok = bert.WordPiece(**ckpt["tokenizer"])
    (x,) = bert.encode_classification([("same", "a cat\tthe dog")], tok, {"same": 1}, 32, "dev")
    assert x["ids"] == [tok.cls_id, *tok.encode("a cat"), tok.sep_id, *tok.encode("the dog"), tok.sep_id]
    assert x["n_a"] == len(tok.encode("a cat")) and x["label"] == 1
    (x,) = bert.encode_classification([("same", "a b c d e f\tg h")], tok, {"same": 1}, 8, "dev")
    assert x["ids"] == [tok.cls_id, *tok.encode("a b c"), tok.sep_id, *tok.encode("g h"), tok.sep_id]
    (x,) = bert.encode_classification([("other", "a b c d e f")], tok, {"same": 1}, 5, "dev")
    assert x["ids"] == [tok.cls_id, *tok.encode("a b c"), tok.sep_id] and x["label"] == -1
    batch = bert.collate([x, x])
    assert batch["token_type_ids"].eq(0).all() and batch["labels"].tolist() == [-1, -1]
    again = run_main("pretrain", "--preset", "tiny", "--data", "builtin", "--init_from", str(tmp_path / "ft" / "ckpt.pt"),
                     "--total_steps", "1", "--out_dir", str(tmp_path / "again"))  # a fine-tuned encoder pretrains on
    assert again["step"] == 1


def test_random_init_baseline_and_label_subset(pretrained, tmp_path):
    cfg = dataclasses.replace(bert.PRESETS["tiny"], init_from=str(pretrained))
    (model, tok, _), (scratch, tok2, _) = (bert.load_pretrained(dataclasses.replace(cfg, finetune_random_init=r))
                                           for r in (False, True))
    weights = torch.load(pretrained, weights_only=False)["model"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and tok.vocab == tok2.vocab
    assert not torch.equal(scratch.bert.tok.weight, weights["bert.tok.weight"])  # the same shapes, untrained
    out = run_main("finetune", "--preset", "tiny", "--init_from", str(pretrained), "--finetune_data", "builtin",
                   "--finetune_examples", "100", "--finetune_batch_size", "10", "--out_dir", str(tmp_path / "ft"))
    assert out["step"] == 10  # 100 of the 2,000 synthetic examples in batches of 10, one epoch


def test_main_job_runs_as_a_script(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bert.py"), "--preset", "tiny", "--data", "builtin",
                        "--finetune_data", "builtin", "--out_dir", str(tmp_path), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SYNTHETIC" in r.stdout and "from RANDOM INIT" in r.stdout
    (claim,) = [line for line in r.stdout.split("\n") if line.startswith("claim: ")]
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().split("\n") if x]
    assert record["split"] == "claim" and record["task"] == "builtin-synthetic" and record["metric"] == "dev accuracy"
    assert claim == (f"claim: builtin-synthetic dev accuracy {record['with']:.1f} vs {record['without']:.1f} "
                     f"({record['differs']})")
    assert 0 <= record["with"] <= 100 and 0 <= record["without"] <= 100 and "random init" in record["differs"]
    assert "pretraining on builtin" in record["differs"] and "2,000 labels" in record["differs"]
    fin_acc, base_acc = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().split("\n") if x][-1]["acc"]
                         for d in ("finetune", "scratch"))
    assert (record["with"], record["without"]) == (100 * fin_acc, 100 * base_acc)  # each arm's last dev accuracy
    for stage in ("pretrain", "finetune", "scratch"):
        assert {"ckpt.pt", "config.json", "metrics.jsonl"} <= {p.name for p in (tmp_path / stage).iterdir()}
    pre, fin, base = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("pretrain", "finetune", "scratch"))
    assert (tmp_path / "pretrain" / "best.pt").exists() and fin["config"]["init_from"].endswith("best.pt")
    assert base["config"]["finetune_random_init"] and not fin["config"]["finetune_random_init"]
    assert fin["tokenizer"] == base["tokenizer"] == pre["tokenizer"]  # the same vocabulary in both arms
    vocab = (tmp_path / "pretrain" / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == list(bert.SPECIALS) and len(vocab) == 301  # 300 tokens, each with its newline


def expect_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--data", "no/such/corpus.txt"], "does not exist"),
    (["pretrain", "--data", "wikitext3"], "unknown dataset 'wikitext3'"),
    (["pretrain", "--n_head", "3"], "must divide"),
    (["pretrain", "--max_seq_length", "200"], "context"),
    (["pretrain", "--max_seq_length", "4"], "at least 5"),
    (["pretrain", "--masked_lm_prob", "1.5"], "--masked_lm_prob"),
    (["pretrain", "--dupe_factor", "0"], "--dupe_factor must be positive"),
    (["pretrain", "--gelu", "tanh"], "unrecognized"),
    (["pretrain", "--dynamic_masking"], "unrecognized"),
    (["finetune"], "needs --init_from"),
    (["finetune", "--init_from", "no/such/ckpt.pt"], "does not exist"),
])
def test_bad_flags(capsys, tmp_path, argv, message):
    assert message in expect_error(capsys, *argv, "--preset", "tiny", "--out_dir", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_bad_data(capsys, tmp_path, pretrained):
    (tmp_path / "one.txt").write_text("A sentence.\nAnother one.\n")
    err = expect_error(capsys, "pretrain", "--preset", "tiny", "--data", str(tmp_path / "one.txt"), "--out_dir",
                       str(tmp_path / "o"))
    assert "gives 0 training and 1 validation documents" in err
    bad = tmp_path / "tsv"
    bad.mkdir()
    (bad / "train.tsv").write_text("1\tfine\nno label here\n")
    (bad / "dev.tsv").write_text("1\tfine\n")
    err = expect_error(capsys, "finetune", "--preset", "tiny", "--init_from", str(pretrained),
                       "--finetune_data", str(bad), "--out_dir", str(tmp_path / "x"))
    assert "train.tsv:2" in err and not (tmp_path / "x").exists()
    with pytest.raises(bert.UserError, match="lacks some of"):
        bert.WordPiece(["a", "b"])


# ---------------------------------------------------------------------------------------------------
# Real data in ../shared/data


def test_wikitext2_documents_and_sst2(shared_data):
    name, train, val = bert.load_documents(str(shared_data / "wikitext-2"))
    assert len(train) == 629 and len(val) == 60
    assert train[0][0].startswith("Senjō no Valkyria 3 : [UNK] Chronicles ( Japanese :")
    sentences = [s for d in train for s in d]
    assert len(sentences) > 70_000 and not any("@-@" in s or "<unk>" in s or s.startswith("= ") for s in sentences)
    assert all(s.endswith((" .", " ?", " !")) for s in train[0][:3])
    _, rows, dev = bert.load_classification(str(shared_data / "sst2"), 0)
    assert len(rows) == 67_349 and len(dev) == 872 and {r[0] for r in dev} == {"0", "1"}
