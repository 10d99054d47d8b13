"""gpt.py: the paper's details, the tokenizer, sampling, fine-tuning, Hugging Face parity, DDP and gpt.py's
own errors. The loop's guarantees common to all six scripts are in tests/test_harness.py."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import gpt
from ddp import run_two_ranks
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(gpt.PRESETS["tiny"], vocab_size=50, dropout=0.0)
BUILTIN = gpt.load_lm_text("builtin")[1]


def tiny_model(seed, arch="gpt1", **kw):
    torch.manual_seed(seed)
    return gpt.build_model(dataclasses.replace(TINY, arch=arch, **kw)).eval()


def random_ids(seed, B, T, vocab=50):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def weights_of(attn, x):
    """softmax(Q K^T / sqrt(d)) with the causal mask (B, H, T, T), recomputed from the module's weights."""
    q, k, _ = attn.qkv(x).split(x.size(-1), dim=-1)
    q, k = (t.unflatten(-1, (attn.n_head, -1)).transpose(1, 2) for t in (q, k))
    causal = torch.ones(x.size(1), x.size(1), dtype=torch.bool).tril()
    return (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).masked_fill(~causal, -math.inf).softmax(-1)


def attention_weights(model, ids):
    """The weights of every attention module, from their inputs caught by forward hooks."""
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append((m, args[0]))) for b in model.blocks]
    model(ids)
    for h in hooks:
        h.remove()
    return [(weights_of(m, x), (m.n_head, ids.size(1))) for m, x in inputs]


def classifier(seed):
    torch.manual_seed(seed)
    return gpt.GPTClassifier(tiny_model(seed), 3, 0.0).eval()


def classifier_logits(model, ids, lengths):
    """Per-position stand-in for the padded property: the classifier's logits repeated over positions
    (they must not change with padding), beside the LM logits at real positions."""
    clf, lm = model(ids, lengths)
    return torch.cat([lm, clf[:, None, :].expand(-1, ids.size(1), -1)], dim=-1)


def gpt_loss(model, seed):
    ids = random_ids(seed, 2, 9)
    return gpt.pretrain_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})


def examples(*rows):
    return [{"ids": ids, "label": label} for ids, label in rows]


PROPERTY_ROWS = [
    Rows(name=f"gpt-{arch}", model=lambda s, a=arch: tiny_model(s, a), ids=random_ids, attention=attention_weights,
         causal=lambda m, ids: m(ids), direction="forward", loss=gpt_loss)
    for arch in ("gpt1", "gpt2")
] + [
    Rows(name="gpt-classifier", model=classifier, ids=random_ids, padded=classifier_logits,
         loss=lambda m, s: gpt.finetune_loss(m, gpt.collate(examples((random_ids(s, 1, 7)[0].tolist(), 1),
                                                                     (random_ids(s + 1, 1, 4)[0].tolist(), 2))), 0.5)[0]),
]


# --- model details (section 3.1) -------------------------------------------------------------------


def test_paper_preset_matches_hugging_face_parameter_count():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel
    hf_cfg = OpenAIGPTConfig()  # openai-gpt: 12 layers, 768 wide, 12 heads, 512 positions, vocab 40478
    with torch.device("meta"):
        hf = OpenAIGPTLMHeadModel(hf_cfg)
        ours = gpt.build_model(dataclasses.replace(gpt.PRESETS["paper"], vocab_size=hf_cfg.vocab_size))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied head counted once in both)
    assert count(ours) == count(hf) == 116_534_784


def test_gpt1_is_post_ln_and_gpt2_pre_ln():
    m1, m2 = tiny_model(0, "gpt1"), tiny_model(0, "gpt2")
    assert m1.ln_f is None and m2.ln_f is not None
    x = torch.randn(2, 5, TINY.d_model)
    torch.testing.assert_close(m1.blocks[0](x).mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)  # normalised
    assert m2.blocks[0](x).std(-1).sub(1).abs().max() > 0.05  # pre-LN: the residual stream is not normalised


def test_init_and_tying():
    m = tiny_model(0, "gpt2", d_model=64, n_layer=4)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.15)
    assert m.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert tiny_model(0, "gpt1", d_model=64).blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all((b.attn.qkv.bias == 0).all() for b in m.blocks)
    ids = random_ids(0, 1, 5)
    torch.testing.assert_close(m(ids), m.hidden(ids) @ m.wte.weight.T)  # the LM head is W_e^T


@given(seed=st.integers(0, 1000), T=st.integers(1, 16))
def test_attention_output_equals_the_recomputed_weights(seed, T):
    """The fused SDPA path computes exactly softmax(QK^T/sqrt(d)) V with the causal mask the tests recompute."""
    attn = tiny_model(seed, block_size=16).blocks[0].attn
    x = torch.randn(2, T, TINY.d_model, generator=torch.Generator().manual_seed(seed))
    w = weights_of(attn, x)
    v = attn.qkv(x)[..., 2 * TINY.d_model:].unflatten(-1, (TINY.n_head, -1)).transpose(1, 2)
    torch.testing.assert_close(attn(x), attn.proj((w @ v).transpose(1, 2).flatten(2)), atol=1e-5, rtol=1e-5)
    assert torch.all(w.triu(1) == 0)


def test_too_long_input_is_a_user_error():
    with pytest.raises(gpt.UserError, match="longer than the context"):
        tiny_model(0)(random_ids(0, 1, TINY.block_size + 1))


# --- tokenizer -------------------------------------------------------------------------------------

BPE = gpt.ByteBPE.train(BUILTIN[:200_000], 400, gpt.SPECIAL_TOKENS)


@given(st.text())
def test_bpe_round_trips_any_string(s):
    assert BPE.decode(BPE.encode(s)) == s


@given(st.text(max_size=40))
def test_bpe_ids_are_in_range_and_merges_apply(s):
    ids = BPE.encode(s)
    assert all(0 <= i < len(BPE) - len(gpt.SPECIAL_TOKENS) for i in ids)
    assert len(ids) <= len(s.encode("utf-8"))


def naive_bpe(text, n_merges):
    """Reference trainer: recount every pair from scratch before each merge."""
    words = [list(w.encode()) for w in gpt.PRETOKENIZE.findall(text)]
    merges = []
    for _ in range(n_merges):
        counts = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words = [gpt.ByteBPE._merge(w, best, 255 + len(merges)) for w in words]
    return merges


@given(st.text(alphabet="abcde \n", max_size=200), st.integers(1, 30))
def test_incremental_bpe_trainer_equals_naive_recount(text, n):
    assert gpt.ByteBPE.train(text, 256 + n).merges == naive_bpe(text, n)


@settings(max_examples=200)
@given(st.text(st.characters(exclude_categories=("Cn", "Cs"))))
def test_pretokenizer_equals_gpt2s_regex(s):
    """The standard-library pattern cuts any text (of characters assigned in Python's Unicode tables) as
    GPT-2's \\p{L}/\\p{N} regex does, so merges learned elsewhere apply to the same pieces."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    assert gpt.PRETOKENIZE.findall(s) == gpt2.findall(s)


def test_characters_are_bytes_without_merges(shared_data):
    text = gpt.read_text(shared_data / "tinyshakespeare" / "input.txt")
    tok = gpt.ByteBPE.train(text[:int(0.9 * len(text))], 256, gpt.SPECIAL_TOKENS)
    assert tok.merges == [] and len(tok) == 259 and tok.encode("ROMEO") == list(b"ROMEO")
    assert tok.decode(tok.encode("naïve — ☃")) == "naïve — ☃"  # nothing is unknown


def write_gpt2_folder(path, bpe, activation="gelu_new"):
    """Our BPE as GPT-2's vocab.json and merges.txt, beside a tiny random GPT2LMHeadModel of that vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - set(keep)))}
    show = lambda piece: "".join(char_of[b] for b in piece)  # noqa: E731
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe.pieces), n_positions=24, n_embd=32, n_layer=2, n_head=4,
                               activation_function=activation)).eval().save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps({show(p): i for i, p in enumerate(bpe.pieces)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(
        f"{show(bpe.pieces[a])} {show(bpe.pieces[b])}\n" for a, b in bpe.merges))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))


def test_gpt2_vocabulary_files_give_hugging_face_ids(tmp_path):
    """A GPT-2 folder's vocab.json and merges.txt read by load_hf give GPT2Tokenizer's ids, also on text with
    numerals outside \\d, accents and symbols (where a naive `re` pre-tokenizer cuts differently)."""
    from transformers import AutoTokenizer
    write_gpt2_folder(tmp_path, BPE)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.vocab_size == len(BPE.pieces)  # the file was read, not ignored
    _, ours, _ = gpt.load_hf(tmp_path, gpt.PRESETS["tiny"])
    for text in ["Hello world, it's 2024!", "  spaces\n\nand\ttabs  ", "x² + H₂O = Ⅻ ½", "naïve café\u2028next",
                 "the value of x_1 is 3.14159", BUILTIN[3000:5000]]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False) == BPE.encode(text)


# --- sampling --------------------------------------------------------------------------------------


def test_kv_cached_logits_equal_full_recompute():
    m = tiny_model(3, "gpt2", block_size=16)
    ids = random_ids(3, 2, 12)
    cache = [[None, None] for _ in m.blocks]
    steps = [m(ids[:, :5], cache)[:, -1]] + [m(ids[:, t:t + 1], cache)[:, -1] for t in range(5, 12)]
    torch.testing.assert_close(torch.stack(steps, 1), m(ids)[:, 4:], atol=1e-5, rtol=1e-5)


@settings(max_examples=8)
@given(seed=st.integers(0, 1000), T=st.integers(1, 10), new=st.integers(1, 40), arch=st.sampled_from(["gpt1", "gpt2"]))
def test_greedy_with_kv_cache_equals_full_recompute(seed, T, new, arch):
    m = tiny_model(seed, arch, block_size=16)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8)  # a sharper random model: greedy choices depend on the whole context
    ids = random_ids(seed, 2, T)
    cached = gpt.generate(m, ids, new, temperature=0, use_cache=True)
    full = gpt.generate(m, ids, new, temperature=0, use_cache=False)
    assert torch.equal(cached, full)  # the window slides past block_size=16 in many examples


@given(seed=st.integers(0, 1000), k=st.integers(1, 50), p=st.floats(0.05, 1.0))
def test_top_k_and_top_p_filters(seed, k, p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed))
    kept = gpt.filter_logits(logits, top_k=k).isfinite()
    assert (kept.sum(-1) == k).all()  # random floats: no ties
    assert kept.gather(-1, logits.argmax(-1, keepdim=True)).all()
    nucleus = gpt.filter_logits(logits, top_p=p).isfinite()
    probs = logits.softmax(-1)
    mass = (probs * nucleus).sum(-1)
    assert (mass >= p - 1e-6).all()  # enough mass kept ...
    smallest_kept = probs.masked_fill(~nucleus, 2).min(-1).values
    assert (mass - smallest_kept < p + 1e-6).all()  # ... and no token more than needed


# --- fine-tuning -----------------------------------------------------------------------------------


def test_padding_does_not_change_the_prediction():
    m = classifier(0)
    a, b = [1, 5, 7, 9, 3], [2, 4, 6]
    alone_a = m(torch.tensor([a]), torch.tensor([5]))[0]
    alone_b = m(torch.tensor([b]), torch.tensor([3]))[0]
    batch = gpt.collate(examples((a, 0), (b, 1)))
    together = m(batch["input_ids"], batch["lengths"])[0]
    torch.testing.assert_close(together, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-5)


def test_finetune_loss_averages_the_lm_loss_per_sequence_then_over_the_batch():
    """L3 = L_clf + 0.5 L_LM with the official code's averaging: each sequence's mean, then the batch mean
    (a token-weighted mean over the batch would differ: the sequences have 4 and 2 predicted tokens)."""
    m = classifier(0)
    batch = gpt.collate(examples(([1, 5, 7, 9, 3], 0), ([2, 4, 6], 2)))
    total, clf_logits = gpt.finetune_loss(m, batch, 0.5)
    clf = F.cross_entropy(clf_logits, batch["labels"])
    lm_a = F.cross_entropy(m.gpt(torch.tensor([[1, 5, 7, 9]]))[0], torch.tensor([5, 7, 9, 3]))
    lm_b = F.cross_entropy(m.gpt(torch.tensor([[2, 4]]))[0], torch.tensor([4, 6]))
    torch.testing.assert_close(total, clf + 0.5 * (lm_a + lm_b) / 2, atol=1e-5, rtol=1e-5)


def test_schedules():
    cosine = gpt.warmup_then_decay(10, 110, 0.1, "cosine")
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    linear = gpt.warmup_then_decay(2, 102, 0.0, "linear")
    assert linear(1) == 1.0 and linear(52) == pytest.approx(0.5) and linear(102) == 0.0


def test_sst2_loader_reads_glue_layout(shared_data):
    rows = gpt.read_tsv(shared_data / "sst2" / "train.tsv")
    dev = gpt.read_tsv(shared_data / "sst2" / "dev.tsv")
    assert len(rows) == 67349 and len(dev) == 872 and {label for label, _ in rows} == {"0", "1"}


def test_tsv_rows_split_at_newlines_only(tmp_path):
    """U+2028, U+2029 and NEL (U+0085) may stand inside a sentence: a row ends at \\n (or \\r\\n) only."""
    (tmp_path / "train.tsv").write_text("1\tgood\u2028film\r\n0\tbad\x85film\n1\tfine\u2029one\n", encoding="utf-8")
    assert gpt.read_tsv(tmp_path / "train.tsv") == [("1", "good\u2028film"), ("0", "bad\x85film"), ("1", "fine\u2029one")]


# --- stages ----------------------------------------------------------------------------------------


def run(tmp_path, *args):
    return gpt.main(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32", "--device", "cpu",
                     "--out_dir", str(tmp_path), *args])


def test_pretraining_lowers_the_loss_and_writes_its_files(tmp_path):
    metrics = run(tmp_path, "--total_steps", "60", "--eval_interval", "30")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["loss"] > val[-1]["loss"] and val[-1]["loss"] < math.log(300) - 1
    assert {"lr", "tok_s", "mfu", "elapsed", "eta"} <= records[0].keys()
    assert metrics["step"] == 60 and metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 60
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "step", "data", "config", "tokenizer", "best"} <= ckpt.keys()


def test_finetune_resume_mid_epoch_equals_uninterrupted(tmp_path):
    run(tmp_path / "lm", "--total_steps", "10")
    args = ["finetune", "--preset", "tiny", "--finetune_data", "builtin", "--dtype", "float32", "--init_from",
            str(tmp_path / "lm" / "ckpt.pt"), "--finetune_epochs", "2", "--eval_interval", "200"]
    full = gpt.main(args + ["--out_dir", str(tmp_path / "a")])
    gpt.main(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "333"])  # stops inside epoch 2
    resumed = gpt.main(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert resumed["step"] == full["step"] == 500 and resumed["loss"] == full["loss"] and resumed["acc"] == full["acc"]


def test_finetune_and_sample_stages(tmp_path, capsys):
    run(tmp_path / "lm", "--total_steps", "20")
    out = gpt.main(["finetune", "--preset", "tiny", "--finetune_data", "builtin", "--dtype", "float32",
                    "--init_from", str(tmp_path / "lm" / "ckpt.pt"), "--out_dir", str(tmp_path / "ft"),
                    "--finetune_lr", "1e-3", "--finetune_epochs", "2", "--eval_interval", "1000"])
    assert out["step"] == 2 * (2000 // 8) and out["acc"] > 0.6  # synthetic task: chance is 0.5
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["labels"] == ["0", "1"] and ckpt["stage"] == "finetune"
    res = gpt.main(["sample", "--preset", "tiny", "--init_from", str(tmp_path / "ft" / "ckpt.pt"),
                    "--prompt", "def f(x):", "--max_new_tokens", "5", "--num_samples", "2"])
    assert len(res["samples"]) == 2 and all(s.startswith("def f(x):") for s in res["samples"])
    capsys.readouterr()
    gpt.main(["sample", "--preset", "tiny", "--init_from", str(tmp_path / "lm" / "ckpt.pt"),
              "--prompt", "x" * 200, "--max_new_tokens", "2", "--num_samples", "1"])
    assert "only its last 32 fit the context" in capsys.readouterr().out


def test_the_baseline_is_the_same_model_untrained_on_the_same_seeded_labels(tmp_path, capsys, monkeypatch):
    """finetune_random_init: init_from's tokenizer and architecture with the weights a new model of the seed gets;
    finetune_examples: the same subset of the training rows in both arms, drawn with --seed."""
    run(tmp_path / "lm", "--total_steps", "10", "--n_layer", "3")
    cfg = dataclasses.replace(TINY, init_from=str(tmp_path / "lm" / "ckpt.pt"))
    lm = torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=False)
    (pre, tok, pre_cfg), (_, rand_tok, rand_cfg) = (gpt.load_pretrained(cfg, weights=w) for w in (True, False))
    assert pre_cfg == rand_cfg and pre_cfg.n_layer == 3 and tok.state() == rand_tok.state() == lm["tokenizer"]
    assert all(torch.equal(v, lm["model"][k]) for k, v in pre.state_dict().items())
    torch.manual_seed(0)
    fresh = gpt.build_model(rand_cfg).state_dict()
    torch.manual_seed(0)
    rand = gpt.load_pretrained(cfg, weights=False)[0].state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in rand.items())
    assert not any(torch.equal(v, lm["model"][k]) for k, v in rand.items() if v.dim() == 2)
    seen, encode = [], gpt.encode_classification
    monkeypatch.setattr(gpt, "encode_classification", lambda rows, *a: seen.append(rows) or encode(rows, *a))
    args = ["finetune", "--preset", "tiny", "--finetune_data", "builtin", "--dtype", "float32", "--init_from",
            cfg.init_from, "--finetune_examples", "100", "--eval_interval", "1000"]
    outs = [gpt.main(args + ["--out_dir", str(tmp_path / arm), *more]) for arm, more in (
        ("pre", []), ("rand", ["--finetune_random_init"]), ("seed", ["--seed", "1"]))]
    assert [o["examples"] for o in outs] == [100] * 3 and [o["step"] for o in outs] == [100 // 8] * 3
    assert seen[0] == seen[2] and len(seen[0]) == 100 and seen[4] != seen[0]  # train rows: the seed draws them
    assert "from RANDOM INIT: 100 train / 400 dev examples" in capsys.readouterr().out


def test_a_classification_folder_pretrains_on_its_training_sentences_only(tmp_path):
    """SST-2 as unlabelled text (the main job's): train.tsv's sentences, a line each, never its labels nor dev.tsv."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"a fine film {i} \t1\n" for i in range(50)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe dev sentence \t0\n")
    name, train, valid = gpt.load_unlabelled_text(str(tmp_path))
    assert train.split("\n") == [f"a fine film {i}" for i in range(45)] and valid == "a fine film 45\na fine film 46" \
        "\na fine film 47\na fine film 48\na fine film 49" and name == tmp_path.name
    assert gpt.load_unlabelled_text("builtin") == gpt.load_lm_text("builtin")


def test_character_level_checkpoints_fine_tune_too(tmp_path):
    """Characters are bytes with GPT's special tokens, so a character-level LM can be fine-tuned as well."""
    run(tmp_path / "lm", "--tokenizer", "char", "--total_steps", "5")
    out = gpt.main(["finetune", "--preset", "tiny", "--finetune_data", "builtin", "--dtype", "float32", "--init_from",
                    str(tmp_path / "lm" / "ckpt.pt"), "--out_dir", str(tmp_path / "ft"), "--max_steps", "3"])
    assert out["step"] == 3 and 0 <= out["acc"] <= 1


def _ddp_worker(rank, out_dir):
    gpt.RANK, gpt.WORLD = rank, 2  # read from the environment at import, before this worker set it
    models, real_build = [], gpt.build_model
    gpt.build_model = lambda cfg: models.append(real_build(cfg)) or models[-1]
    gpt.main(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32", "--total_steps", "8",
              "--eval_interval", "4", "--out_dir", out_dir, "--grad_accum", "2"])
    torch.save(models[0].state_dict(), f"{out_dir}/rank{rank}.pt")


def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    a, b = run_two_ranks(_ddp_worker, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 8 and len(ckpt["data"]) == 2 and ckpt["data"][0]["position"] == ckpt["data"][1]["position"]


# --- Hugging Face weights --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai-gpt", "gpt2"])
def test_hugging_face_weights_give_the_same_logits(tmp_path, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, OpenAIGPTConfig, OpenAIGPTLMHeadModel
    torch.manual_seed(0)
    if kind == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=24, n_embd=32, n_layer=3, n_head=4))
    else:
        hf = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=97, n_positions=24, n_embd=32, n_layer=3, n_head=4))
    hf.eval().save_pretrained(tmp_path)
    ours, _, cfg = gpt.load_hf(tmp_path, gpt.PRESETS["tiny"])
    ours.eval()
    assert cfg.arch == ("gpt2" if kind == "gpt2" else "gpt1")
    ids = random_ids(1, 3, 20, 97)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
        cache = [[None, None] for _ in ours.blocks]  # a KV-cached step keeps agreeing
        ours(ids[:, :19], cache)
        torch.testing.assert_close(ours(ids[:, 19:], cache)[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)


def test_hf_gpt2_with_exact_gelu_is_refused(tmp_path):
    write_gpt2_folder(tmp_path, BPE, activation="gelu")  # GPT2's "gelu" is the exact (erf) GELU
    with pytest.raises(gpt.UserError, match="activation gelu"):
        gpt.load_hf(tmp_path, gpt.PRESETS["tiny"])


# --- errors particular to gpt.py ---------------------------------------------------------------------


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gpt.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("args,message", [
    (["--n_head", "3"], "must divide"),
    (["--dropout", "1.0"], "dropout"),
    (["--top_p", "0"], "top_p"),
    (["--min_lr", "1"], "min_lr"),
    (["--arch", "gpt3"], "invalid choice"),
    (["--tokenizer", "words"], "invalid choice"),
    (["--bpe_vocab_size", "258"], "at least 259"),
    (["--vocab_size", "10"], "below the tokenizer"),
    (["--block_size", "100000"], "fewer than one"),
])
def test_bad_flags(args, message, capsys, tmp_path):
    assert message in error_of(["pretrain", "--preset", "tiny", "--data", "builtin", "--out_dir", str(tmp_path), *args],
                               capsys)


def test_bad_inputs_for_the_later_stages(tmp_path, capsys):
    run(tmp_path / "lm", "--total_steps", "5")
    ckpt = str(tmp_path / "lm" / "ckpt.pt")
    assert "needs --init_from" in error_of(["finetune", "--preset", "tiny", "--out_dir", str(tmp_path / "f")], capsys)
    assert "needs --init_from" in error_of(["sample", "--preset", "tiny"], capsys)
    assert "no tokens" in error_of(["sample", "--preset", "tiny", "--init_from", ckpt, "--prompt", ""], capsys)
    (tmp_path / "hf").mkdir()
    assert "no config.json" in error_of(["sample", "--init_from", f"hf:{tmp_path / 'hf'}"], capsys)
    data = tmp_path / "cls"
    data.mkdir()
    (data / "train.tsv").write_text("1\tgood film\n0\tbad film\nno label here\n")
    (data / "dev.tsv").write_text("1\tfine\n")
    args = ["finetune", "--preset", "tiny", "--init_from", ckpt, "--finetune_data", str(data), "--dtype", "float32"]
    assert "train.tsv:3: expected label<TAB>text" in error_of(args + ["--out_dir", str(tmp_path / "a")], capsys)
    (data / "train.tsv").write_text("1\tgood film\n0\tbad film\n" * 8)
    (data / "dev.tsv").write_text("1\tfine\n2\tunheard-of label\n")
    out = gpt.main(args + ["--out_dir", str(tmp_path / "b")])  # an unseen dev label: a warning, counted as an error
    assert out["acc"] <= 0.5 and "unseen in training" in capsys.readouterr().out


def test_main_job_runs_as_a_script(tmp_path):
    """One real subprocess: the main job on the built-in data, end to end: pretraining, samples from its best
    checkpoint, fine-tuning from it and from random init on the same seeded labels, and the claim line."""
    env = {**os.environ, "NLP_LINEAGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "gpt.py"), "--preset", "tiny", "--data", "builtin", "--finetune_data",
                        "builtin", "--finetune_examples", "200", "--max_new_tokens", "10", "--out_dir",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 40/40 | val loss" in r.stdout and "-" * 60 + "\n" in r.stdout and "from RANDOM INIT" in r.stdout
    claim = r.stdout.rstrip().split("\n")[-1]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["split"] == "claim" and records[0]["metric"] == "dev accuracy"
    rec = records[0]
    assert rec["task"] == "builtin-synthetic" and "random init" in rec["differs"] and "200 labels" in rec["differs"]
    assert claim == f"claim: builtin-synthetic dev accuracy {rec['with']:.1f} vs {rec['without']:.1f} ({rec['differs']})"
    assert all(0 <= rec[k] <= 100 for k in ("with", "without"))
    arms = {arm: torch.load(tmp_path / "out" / arm / "ckpt.pt", weights_only=False) for arm in ("finetune", "scratch")}
    assert [(c["config"]["finetune_random_init"], c["config"]["finetune_examples"], c["step"]) for c in arms.values()
            ] == [(False, 200, 200 // 8), (True, 200, 200 // 8)]  # one epoch of batch 8 each
    assert all(c["config"]["init_from"].endswith("best.pt") for c in arms.values())
    assert (tmp_path / "out" / "pretrain" / "best.pt").exists()


def test_bfloat16_autocast_trains(tmp_path):
    out = run(tmp_path, "--total_steps", "20", "--dtype", "bfloat16")
    assert math.isfinite(out["loss"]) and out["loss"] < math.log(300)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # master weights stay fp32


@pytest.mark.slow
def test_compiled_checkpoint_has_plain_names(tmp_path):
    run(tmp_path, "--compile", "--total_steps", "4", "--eval_interval", "4")
    names = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"].keys()
    assert not any("_orig_mod" in k for k in names) and "wte.weight" in names


def test_named_datasets_from_their_pinned_bytes(tmp_path, monkeypatch, shared_data):
    """Serve ../shared/data through file:// in place of the pinned URLs: the recorded sha256s must match
    the real files, and the named loaders must split them as documented."""
    monkeypatch.setenv("NLP_LINEAGE_CACHE", str(tmp_path))
    local = {"shakespeare": shared_data / "tinyshakespeare", "wikitext2": shared_data / "wikitext-2",
             "sst2": shared_data / "sst2"}
    monkeypatch.setattr(gpt, "DATASETS", {name: {f: ((local[name] / f).as_uri(), sha) for f, (_, sha) in files.items()}
                                          for name, files in gpt.DATASETS.items()})
    name, train, val = gpt.load_lm_text("shakespeare")
    assert name == "input.txt" or name == "shakespeare"
    assert len(train) == 1003854 and len(val) == 111540  # nanoGPT's split
    name, train, val = gpt.load_lm_text("wikitext2")
    assert val.startswith(" \n = Homarus gammarus = \n")
    name, train_rows, dev_rows = gpt.load_classification("sst2", 0)
    assert len(train_rows) == 67349 and len(dev_rows) == 872
    name, train, val = gpt.load_unlabelled_text("sst2")  # the main job's pretraining text: no label, no dev sentence
    assert name == "sst2" and len((train + "\n" + val).split("\n")) == 67349 and "\t" not in train + val
    assert train.startswith("hide new secretions from the parental units\n") and dev_rows[0][1].strip() not in train
