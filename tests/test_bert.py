"""bert.py: WordPiece, the create_pretraining_data pipeline (masking, NSP), the model against Hugging Face,
pretraining and fine-tuning through the command line. Cross-model properties: PROPERTY_ROWS below."""
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import bert
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent



@functools.lru_cache(maxsize=None)
def builtin_tok() -> bert.WordPiece:
    _, train, _ = bert.load_documents("builtin")
    extra = ["café naïve résumé Zürich São Paulo façade", "中文 日本語 한국어 Ελληνικά русский"] * 5
    return bert.WordPiece.train([s for d in train[:30] for s in d] + extra, 300)


@functools.lru_cache(maxsize=None)
def builtin_docs():
    _, train, _ = bert.load_documents("builtin")
    return bert.tokenize_documents(train[:6], builtin_tok())


def tiny_cfg(**kw) -> bert.Config:
    return dataclasses.replace(bert.PRESETS["tiny"], vocab_size=len(builtin_tok()), **kw)


def tiny_model(seed: int) -> bert.BertForPreTraining:
    torch.manual_seed(seed)
    return bert.build_model(tiny_cfg()).eval()


def random_ids(seed: int, B: int, T: int) -> torch.Tensor:
    return torch.randint(5, len(builtin_tok()), (B, T), generator=torch.Generator().manual_seed(seed))


def pretraining_batch(seed: int, cfg=None) -> dict:
    cfg = cfg or tiny_cfg()
    inst = bert.create_instances(builtin_docs(), builtin_tok(), cfg, cfg.max_seq_length, random.Random(seed), True)
    return bert.collate_pretraining(random.Random(seed).sample(inst, 8), builtin_tok(), cfg, cfg.max_seq_length)


PROPERTY_ROWS = [Rows(
    name="bert",
    model=tiny_model,
    ids=random_ids,
    attention=lambda m, ids: [(a, (m.cfg.n_head, ids.size(1))) for a in m.bert(ids, need_weights=True)[2]],
    padded=lambda m, ids, lengths: m.bert(ids, None, torch.arange(ids.size(1))[None, :] < lengths[:, None])[0],
    loss=lambda m, seed: bert.pretrain_loss(m, pretraining_batch(seed)),
)]


# ---------------------------------------------------------------------------------------------------
# WordPiece


def hf_tokenizer(tok: bert.WordPiece, tmp: Path, lower: bool):
    from transformers import BertTokenizer
    tok.save(tmp / "vocab.txt")
    hf = BertTokenizer.from_pretrained(str(tmp), do_lower_case=lower)
    assert len(hf) == len(tok)  # the file was read (transformers 5 ignores BertTokenizer(vocab_file=...))
    return hf


PIECES = st.one_of(
    st.characters(max_codepoint=0x17F, exclude_categories=("Cs",)),
    st.sampled_from(list("中文日本語한국어ÀÉÎõüñçßØ—“”…«»¿¡·ﬁΣσς\u00a0\u2028\u200b\u0301\t\n\r\x0b\x00\ufffd")),
    st.sampled_from(["[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[mask]", "##", " the ", "café", "naïve",
                     "attribute", "x" * 101, "Zürich"]),
)


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_matches_hugging_face(lower, tmp_path):
    tok = bert.WordPiece(builtin_tok().vocab, lower)
    hf = hf_tokenizer(tok, tmp_path, lower)

    @settings(max_examples=150)
    @given(st.lists(PIECES, max_size=30).map("".join))
    def check(text):
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)

    check()


def test_wordpiece_training_and_vocab_file(tmp_path):
    tok = builtin_tok()
    assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tok) == 300 and len(set(tok.vocab)) == 300
    merged = [t for t in tok.vocab[5:] if len(t.removeprefix("##")) > 1]
    assert merged, "no merges learned"
    assert tok.encode("x" * 101) == [tok.unk_id] and tok.encode("x" * 100) != [tok.unk_id]
    text = "The attribute access of class instances."
    tok.save(tmp_path / "vocab.txt")
    loaded = bert.WordPiece.load(tmp_path / "vocab.txt")
    assert loaded.vocab == tok.vocab and loaded.encode(text) == tok.encode(text)
    assert tok.decode(tok.encode(text)) == "the attribute access of class instances ."


def test_wordpiece_is_greedy_longest_match_first():
    tok = bert.WordPiece(list(bert.SPECIALS) + ["un", "unaff", "##aff", "##able", "##a", "##ffable", "a"])
    ids = {t: i for i, t in enumerate(tok.vocab)}
    assert tok.encode("unaffable") == [ids["unaff"], ids["##able"]]
    assert tok.encode("unaffablex") == [tok.unk_id]  # no piece for x: the whole word is unknown
    assert tok.encode("Un [MASK]a") == [ids["un"], tok.mask_id, ids["a"]]


# ---------------------------------------------------------------------------------------------------
# Masking (create_masked_lm_predictions)


def sequence(rng: random.Random, n: int, tok: bert.WordPiece, pads: int = 0) -> list[int]:
    """[CLS] A [SEP] B [SEP] of n tokens with `pads` [PAD] ids scattered inside."""
    body = [tok.normal_ids[rng.randrange(len(tok.normal_ids))] for _ in range(n - 3)]
    for _ in range(pads):
        body[rng.randrange(len(body))] = tok.pad_id
    cut = rng.randint(1, len(body) - 1)
    return [tok.cls_id, *body[:cut], tok.sep_id, *body[cut:], tok.sep_id]


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 300), max_pred=st.integers(1, 80), pads=st.integers(0, 3))
def test_masking_exact_count_never_specials(seed, n, max_pred, pads):
    tok, rng = builtin_tok(), random.Random(seed)
    ids = sequence(rng, n, tok, min(pads, (n - 3) // 2))
    out, positions, labels = bert.mask_tokens(ids, tok, rng, 0.15, max_pred)
    expected = min(max_pred, max(1, round(0.15 * n)))
    assert len(positions) == expected == len(set(positions))
    assert all(ids[p] not in (tok.cls_id, tok.sep_id, tok.pad_id) for p in positions)
    assert labels == [ids[p] for p in positions]
    assert all(out[i] == ids[i] for i in range(n) if i not in positions)
    assert all(out[p] == tok.mask_id or out[p] in tok.normal_ids for p in positions)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**32 - 1))
def test_masking_80_10_10_within_binomial_bounds(seed):
    tok, rng = builtin_tok(), random.Random(seed)
    counts, total = {"mask": 0, "random": 0, "same": 0}, 0
    for _ in range(400):
        ids = sequence(rng, 128, tok)
        out, positions, _ = bert.mask_tokens(ids, tok, rng, 0.15, 20)
        for p in positions:
            kind = "mask" if out[p] == tok.mask_id else "same" if out[p] == ids[p] else "random"
            counts[kind] += 1
        total += len(positions)
    p_same = 0.1 + 0.1 / len(tok.normal_ids)  # a random token can equal the original
    for kind, p in (("mask", 0.8), ("random", 0.1 - 0.1 / len(tok.normal_ids)), ("same", p_same)):
        sigma = (p * (1 - p) / total) ** 0.5
        assert abs(counts[kind] / total - p) < 5 * sigma, (kind, counts, total)


@given(seed=st.integers(0, 2**32 - 1), n_words=st.integers(2, 60), max_pred=st.integers(1, 30))
def test_whole_word_masking_masks_whole_words(seed, n_words, max_pred):
    tok, rng = builtin_tok(), random.Random(seed)
    starts = [i for i in tok.normal_ids if not tok.continuation[i]]
    conts = [i for i in tok.normal_ids if tok.continuation[i]]
    words, ids = [], [tok.cls_id]
    for w in range(n_words):
        if w == n_words // 2:
            ids.append(tok.sep_id)
        pieces = [rng.choice(starts)] + [rng.choice(conts) for _ in range(rng.choice([0, 0, 1, 2, 4]))]
        words.append(list(range(len(ids), len(ids) + len(pieces))))
        ids += pieces
    ids.append(tok.sep_id)
    out, positions, _ = bert.mask_tokens(ids, tok, rng, 0.15, max_pred, whole_word=True)
    chosen = set(positions)
    expected = min(max_pred, max(1, round(0.15 * len(ids))))
    masked_words = [w for w in words if chosen & set(w)]
    for w in masked_words:
        assert set(w) <= chosen  # all pieces of a word, or none
        assert len({out[i] == tok.mask_id for i in w}) == 1  # one 80/10/10 draw per word
    assert sum(map(len, masked_words)) == len(positions) <= expected
    shortfall = expected - len(positions)
    unmasked = [w for w in words if not chosen & set(w)]
    assert shortfall == 0 or all(len(w) > shortfall for w in unmasked)
    assert shortfall < max(map(len, words))


# ---------------------------------------------------------------------------------------------------
# Next-sentence prediction instances (create_instances_from_document)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.integers(5, 64))
def test_nsp_instances(seed, seq_len):
    tok, rng = builtin_tok(), random.Random(seed)
    per_doc = 9  # document d writes only ids first + 9 d ... first + 9 d + 8
    doc_of = {tok.normal_ids[i]: i // per_doc for i in range(30 * per_doc)}
    docs = [[[tok.normal_ids[d * per_doc + rng.randrange(per_doc)] for _ in range(rng.randint(1, 12))]
             for _ in range(rng.randint(1, 15))] for d in range(30)]
    cfg = tiny_cfg(max_seq_length=min(seq_len, 64))
    instances = bert.create_instances(docs, tok, cfg, seq_len, rng, static=False)
    for n_a, is_random, ids, _, _ in instances:
        assert len(ids) <= seq_len
        assert ids[0] == tok.cls_id and ids[n_a + 1] == tok.sep_id and ids[-1] == tok.sep_id
        a, b = ids[1:n_a + 1], ids[n_a + 2:-1]
        assert a and b and tok.sep_id not in a + b
        assert len({doc_of[t] for t in a}) == 1
        (doc_a,) = {doc_of[t] for t in a}
        if is_random:
            assert doc_a not in {doc_of[t] for t in b}  # a NotNext B never comes from A's document
        else:
            assert {doc_of[t] for t in b} == {doc_a}
    batch = bert.collate_pretraining(instances[:16], tok, cfg, seq_len, random.Random(seed))
    for r, (n_a, is_random, ids, _, _) in enumerate(instances[:16]):
        seg, n = batch["token_type_ids"][r], len(ids)
        assert seg[:n_a + 2].eq(0).all() and seg[n_a + 2:n].eq(1).all() and seg[n:].eq(0).all()
        assert batch["attention_mask"][r].sum() == n and batch["nsp_labels"][r] == int(is_random)


def test_nsp_label_balance_on_real_text():
    """Half NotNext, plus the chunks of a single segment, which are always NotNext (Google's rule)."""
    _, train, _ = bert.load_documents("builtin")
    docs = bert.tokenize_documents(train, builtin_tok())
    instances = bert.create_instances(docs, builtin_tok(), tiny_cfg(), 128, random.Random(0), True)
    n, k = len(instances), sum(x[1] for x in instances)
    assert n > 1000 and 0.5 - 5 * (0.25 / n) ** 0.5 < k / n < 0.65, (k, n)


def test_sampler_copies_dynamic_masking_and_two_phases():
    docs, tok = builtin_docs(), builtin_tok()
    static = bert.PretrainingSampler(docs, tok, tiny_cfg(dupe_factor=2, batch_size=4), 100)
    copies = []
    for epoch in range(3):
        static.load_state_dict({"epoch": epoch, "index": 0, "drawn": 0})
        next(static)
        copies.append(static.instances)
    assert copies[0] == copies[2] != copies[1]  # epoch e uses copy e mod dupe_factor
    dynamic = bert.PretrainingSampler(docs, tok, tiny_cfg(dynamic_masking=True, batch_size=4), 100)
    draws = []
    for drawn in (0, 1):
        dynamic.load_state_dict({"epoch": 0, "index": 0, "drawn": drawn})
        draws.append(next(dynamic))
    assert draws[0]["nsp_labels"].equal(draws[1]["nsp_labels"])  # the same instances, masked anew
    assert not draws[0]["mlm_labels"].equal(draws[1]["mlm_labels"])
    cfg = tiny_cfg(two_phase=True, batch_size=4)
    phased = bert.PretrainingSampler(docs, tok, cfg, 10)
    lengths = [next(phased)["input_ids"].size(1) for _ in range(10)]
    assert max(lengths[:9]) <= cfg.max_seq_length < max(lengths[9:]) <= cfg.max_position


# ---------------------------------------------------------------------------------------------------
# Model: Hugging Face parity, parameter count, tied embedding


def test_paper_preset_has_bert_base_parameter_count():
    from transformers import BertConfig, BertForPreTraining
    with torch.device("meta"):
        ours = bert.build_model(bert.PRESETS["paper"])
        theirs = BertForPreTraining(BertConfig())  # bert-base-uncased's config
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(theirs) == 110_106_428


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_logits_match_hugging_face(act, tmp_path):
    from transformers import BertConfig, BertForPreTraining
    torch.manual_seed(0)
    hf_cfg = BertConfig(vocab_size=len(builtin_tok()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, hidden_act=act)
    hf = BertForPreTraining(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    builtin_tok().save(tmp_path / "vocab.txt")
    model, tok, cfg = bert.load_hf(str(tmp_path), bert.PRESETS["tiny"])
    model.eval()
    assert cfg.gelu == ("exact" if act == "gelu" else "tanh") and tok.vocab == builtin_tok().vocab
    ids, seg = random_ids(1, 3, 12), torch.randint(0, 2, (3, 12))
    for lengths in ([12, 12, 12], [12, 5, 1]):
        mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
        with torch.no_grad():
            theirs = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask.long())
            mlm, nsp = model(ids, seg, mask)
        torch.testing.assert_close(mlm, theirs.prediction_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nsp, theirs.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_both_uses_of_the_tied_embedding_get_gradient():
    model = tiny_model(0).train()
    emb = model.bert.tok.weight
    batch = pretraining_batch(0)
    mlm, nsp, *_ = bert.pretrain_losses(model, batch)
    (g_nsp,) = torch.autograd.grad(nsp, emb, retain_graph=True)  # NSP reaches it only as the input table
    (g_mlm,) = torch.autograd.grad(mlm, emb)
    seen = torch.zeros(len(emb), dtype=torch.bool)
    seen[batch["input_ids"].unique()] = True
    assert g_nsp[seen].abs().sum() > 0 and g_nsp[~seen].abs().sum() == 0
    assert g_mlm[~seen].abs().sum(-1).gt(0).all()  # rows never in the input: the output decoder's gradient


# ---------------------------------------------------------------------------------------------------
# Training through the command line


def run_main(*argv) -> dict:
    return bert.main([*argv, "--device", "cpu", "--dtype", "float32"])


def last(path: Path, split: str) -> dict:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split][-1]


def test_resume_equals_uninterrupted(tmp_path):
    args = ["pretrain", "--preset", "tiny", "--data", "builtin", "--total_steps", "8", "--eval_interval", "4",
            "--log_interval", "1", "--dynamic_masking", "--whole_word_mask", "--two_phase", "--grad_accum", "2"]
    full = run_main(*args, "--out_dir", str(tmp_path / "a"))
    run_main(*args, "--out_dir", str(tmp_path / "b"), "--max_steps", "5")
    resumed = run_main(*args, "--out_dir", str(tmp_path / "b"), "--resume")
    assert full["step"] == resumed["step"] == 8
    assert last(tmp_path / "a", "train")["loss"] == last(tmp_path / "b", "train")["loss"]
    assert full["loss"] == resumed["loss"] and 0 <= full["mlm_acc"] <= 1 and 0 <= full["nsp_acc"] <= 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    torch.set_num_threads(1)
    run_main("pretrain", "--preset", "tiny", "--data", "builtin", "--total_steps", "4", "--out_dir", str(out))
    return out / "ckpt.pt"


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
    tok = bert.tokenizer_from_state(ckpt["tokenizer"])
    ((ids, n_first, label),) = bert.encode_classification([("same", "a cat\tthe dog")], tok, {"same": 1}, 32, "dev")
    assert ids == [tok.cls_id, *tok.encode("a cat"), tok.sep_id, *tok.encode("the dog"), tok.sep_id]
    assert n_first == 2 + len(tok.encode("a cat")) and label == 1
    ((ids, _, _),) = bert.encode_classification([("same", "a b c d e f\tg h")], tok, {"same": 1}, 8, "dev")
    assert ids == [tok.cls_id, *tok.encode("a b c"), tok.sep_id, *tok.encode("g h"), tok.sep_id]


def test_main_job_runs_as_a_script(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bert.py"), "--preset", "tiny", "--data", "builtin",
                        "--finetune_data", "builtin", "--out_dir", str(tmp_path), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MLM accuracy" in r.stdout and "dev accuracy" in r.stdout and "SYNTHETIC" in r.stdout
    for stage in ("pretrain", "finetune"):
        assert {"ckpt.pt", "config.json", "metrics.jsonl"} <= {p.name for p in (tmp_path / stage).iterdir()}
    assert (tmp_path / "pretrain" / "vocab.txt").is_file()


def expect_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--data", "no/such/corpus"], "unknown dataset"),
    (["pretrain", "--preset", "huge"], "invalid choice"),
    (["pretrain", "--n_head", "3"], "must divide"),
    (["pretrain", "--dropout", "1.0"], "--dropout must be in [0, 1)"),
    (["pretrain", "--max_seq_length", "200"], "context"),
    (["pretrain", "--batch_size", "0"], "--batch_size must be positive"),
    (["pretrain", "--gelu", "relu"], "--gelu"),
    (["pretrain", "--masked_lm_prob", "1.5"], "--masked_lm_prob"),
    (["finetune"], "needs --init_from"),
    (["finetune", "--init_from", "no/such/ckpt.pt"], "does not exist"),
])
def test_bad_flags(capsys, argv, message):
    assert message in expect_error(capsys, *argv, *([] if "--preset" in argv else ["--preset", "tiny"]))


def test_bad_data(capsys, tmp_path, pretrained):
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in expect_error(capsys, "pretrain", "--preset", "tiny", "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "one.txt").write_text("A sentence.\nAnother one.\n")
    assert "at least 4" in expect_error(capsys, "pretrain", "--preset", "tiny", "--data", str(tmp_path / "one.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "UTF-8" in expect_error(capsys, "pretrain", "--preset", "tiny", "--data", str(tmp_path / "latin1.txt"))
    (tmp_path / "folder").mkdir()
    assert "train.txt" in expect_error(capsys, "pretrain", "--preset", "tiny", "--data", str(tmp_path / "folder"))
    bad = tmp_path / "tsv"
    bad.mkdir()
    (bad / "train.tsv").write_text("1\tfine\nno label here\n")
    (bad / "dev.tsv").write_text("1\tfine\n")
    err = expect_error(capsys, "finetune", "--preset", "tiny", "--init_from", str(pretrained),
                       "--finetune_data", str(bad), "--out_dir", str(tmp_path / "x"))
    assert "train.tsv:2" in err and not (tmp_path / "x").exists()
    err = expect_error(capsys, "pretrain", "--preset", "tiny", "--data", "builtin", "--resume", "--d_model", "64",
                       "--n_head", "2", "--out_dir", str(pretrained.parent))
    assert "d_model=32" in err
    assert "config.json" in expect_error(capsys, "finetune", "--preset", "tiny", "--init_from", f"hf:{tmp_path}")


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
