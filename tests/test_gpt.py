"""gpt.py: the paper's details, the tokenizer, sampling, fine-tuning, Hugging Face parity, the training
loop's guarantees (resume, atomic checkpoints, Ctrl-C, DDP) and its errors."""
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
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(gpt.PRESETS["tiny"], vocab_size=50, dropout=0.0)


def tiny_model(seed, arch="gpt1", **kw):
    torch.manual_seed(seed)
    return gpt.build_model(dataclasses.replace(TINY, arch=arch, **kw)).eval()


def random_ids(seed, B, T, vocab=50):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def classifier(seed):
    torch.manual_seed(seed)
    return gpt.GPTClassifier(tiny_model(seed), 3, 0.0).eval()


def classifier_logits(model, ids, lengths):
    """Per-position stand-in for the padded property: the classifier's logits repeated over positions
    (they must not change with padding), beside the LM logits at real positions."""
    clf, lm = model(ids, lengths)
    return torch.cat([lm, clf[:, None, :].expand(-1, ids.size(1), -1)], dim=-1)


def gpt_loss(model, seed):
    torch.manual_seed(seed)
    ids = random_ids(seed, 2, 9)
    return gpt.pretrain_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})


PROPERTY_ROWS = [
    Rows(name=f"gpt-{arch}", model=lambda s, a=arch: tiny_model(s, a), ids=random_ids,
         attention=lambda m, ids: [(a, (m.cfg.n_head, ids.size(1))) for a in m.hidden(ids, need_weights=True)[1]],
         causal=lambda m, ids: m(ids), direction="forward", loss=gpt_loss)
    for arch in ("gpt1", "gpt2")
] + [
    Rows(name="gpt-classifier", model=classifier, ids=random_ids, padded=classifier_logits,
         loss=lambda m, s: gpt.finetune_loss(m, {**gpt.collate([(random_ids(s, 1, 7)[0].tolist(), 1),
                                                                 (random_ids(s + 1, 1, 4)[0].tolist(), 2)])}, 0.5)[0]),
]


# --- model details (section 3.1) -------------------------------------------------------------------


def test_paper_preset_matches_hugging_face_parameter_count():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel
    hf_cfg = OpenAIGPTConfig()  # openai-gpt: 12 layers, 768 wide, 12 heads, 512 positions, vocab 40478
    with torch.device("meta"):
        hf = OpenAIGPTLMHeadModel(hf_cfg)
        ours = gpt.build_model(dataclasses.replace(gpt.PRESETS["paper"], vocab_size=hf_cfg.vocab_size))
    count = lambda m: sum(p.numel() for p in m.parameters())  # tied head counted once in both
    assert count(ours) == count(hf) == 116_534_784


def test_gpt1_is_post_ln_and_gpt2_pre_ln():
    m1, m2 = tiny_model(0, "gpt1"), tiny_model(0, "gpt2")
    assert m1.ln_f is None and m2.ln_f is not None
    x = torch.randn(2, 5, TINY.d_model)
    out, _ = m1.blocks[0](x)  # post-LN: every position of the block's output is normalised
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    out2, _ = m2.blocks[0](x)  # pre-LN: the residual stream is not normalised
    assert out2.std(-1).sub(1).abs().max() > 0.05


def test_init_and_tying():
    m = tiny_model(0, "gpt2", d_model=64, n_layer=4)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.15)
    assert m.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    ids = random_ids(0, 1, 5)
    torch.testing.assert_close(m(ids), m.hidden(ids) @ m.wte.weight.T)  # LM head is W_e^T


@given(seed=st.integers(0, 1000), T=st.integers(1, 16))
def test_attention_weights_path_equals_sdpa_path(seed, T):
    m = tiny_model(seed, "gpt1", block_size=16)
    ids = random_ids(seed, 2, T)
    h_fast = m.hidden(ids)
    h_slow, atts = m.hidden(ids, need_weights=True)
    torch.testing.assert_close(h_fast, h_slow, atol=1e-5, rtol=1e-5)
    assert torch.all(atts[0].triu(1) == 0)  # no weight on future positions


def test_too_long_input_is_a_user_error():
    m = tiny_model(0)
    with pytest.raises(gpt.UserError, match="longer than the context"):
        m(random_ids(0, 1, TINY.block_size + 1))


# --- tokenizers ------------------------------------------------------------------------------------

BPE = gpt.ByteBPE.train("\n".join(gpt.builtin_text()[:20]), 400, gpt.SPECIAL_TOKENS)


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


def test_bpe_trains_on_wikitext2_in_seconds(shared_data):
    import time
    text = (shared_data / "wikitext-2" / "train.txt").read_text()
    t0 = time.time()
    tok = gpt.ByteBPE.train(text, 4096, gpt.SPECIAL_TOKENS)
    assert time.time() - t0 < 60 and len(tok) == 4096
    sample = text[:20000]
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample) / 3  # it compresses


def test_char_tokenizer_maps_unseen_characters_to_unknown():
    tok = gpt.CharTokenizer.train("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.encode("hex") == tok.encode("he") + [0] and tok.unseen["x"] == 1


def test_gpt2_vocabulary_files_give_hugging_face_ids(tmp_path):
    """Write our BPE in GPT-2's vocab.json/merges.txt format, load it back through load_hf_tokenizer and
    through Hugging Face's GPT2Tokenizer: same ids on ASCII text (the pre-tokenizers agree there)."""
    from transformers import AutoTokenizer
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in
                                            enumerate(sorted(set(range(256)) - set(keep)))}
    show = lambda piece: "".join(char_of[b] for b in piece)
    vocab = {show(p): i for i, p in enumerate(BPE.pieces)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(
        f"{show(BPE.pieces[a])} {show(BPE.pieces[b])}\n" for a, b in BPE.merges))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.vocab_size == len(BPE.pieces)  # the file was read, not ignored
    ours = gpt.load_hf_tokenizer(tmp_path)
    for text in ["Hello world, it's 2024!", "  spaces\n\nand\ttabs  ", "the value of x_1 is 3.14159",
                 gpt.builtin_text()[3][:2000]]:
        text = text.encode("ascii", "ignore").decode()
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False) == BPE.encode(text)


# --- sampling --------------------------------------------------------------------------------------


def test_kv_cached_logits_equal_full_recompute():
    m = tiny_model(3, "gpt2", block_size=16)
    ids = random_ids(3, 2, 12)
    cache = m.new_cache()
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
    a = [1, 5, 7, 9, 3]
    b = [2, 4, 6]
    alone_a = m(torch.tensor([a]), torch.tensor([5]))[0]
    alone_b = m(torch.tensor([b]), torch.tensor([3]))[0]
    batch = gpt.collate([(a, 0), (b, 1)])
    together = m(batch["input_ids"], batch["lengths"])[0]
    torch.testing.assert_close(together, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-5)


def test_finetune_loss_is_clf_plus_half_lm():
    m = classifier(0)
    batch = gpt.collate([([1, 5, 7, 9, 3], 0), ([2, 4, 6], 2)])
    total, clf_logits = gpt.finetune_loss(m, batch, 0.5)
    clf = F.cross_entropy(clf_logits, batch["labels"])
    lm_a = F.cross_entropy(m.gpt(torch.tensor([[1, 5, 7, 9]]))[0], torch.tensor([5, 7, 9, 3]), reduction="sum")
    lm_b = F.cross_entropy(m.gpt(torch.tensor([[2, 4]]))[0], torch.tensor([4, 6]), reduction="sum")
    torch.testing.assert_close(total, clf + 0.5 * (lm_a + lm_b) / 6, atol=1e-5, rtol=1e-5)


def test_schedules():
    cosine = gpt.lr_lambda(10, 110, 0.1, "cosine")
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    linear = gpt.lr_lambda(2, 102, 0.0, "linear")
    assert linear(1) == 1.0 and linear(52) == pytest.approx(0.5) and linear(102) == 0.0


def test_sst2_loader_reads_glue_layout(shared_data):
    rows = gpt.read_tsv(shared_data / "sst2" / "train.tsv", header=True)
    dev = gpt.read_tsv(shared_data / "sst2" / "dev.tsv", header=True)
    assert len(rows) == 67349 and len(dev) == 872 and {l for l, _ in rows} == {"0", "1"}


def test_shakespeare_characters(shared_data):
    text = gpt.read_text(shared_data / "tinyshakespeare" / "input.txt")
    assert len(gpt.CharTokenizer.train(text[:int(0.9 * len(text))])) == 66  # 65 characters + unknown


# --- training loop ---------------------------------------------------------------------------------


def run(tmp_path, *args):
    return gpt.main(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32",
                     "--out_dir", str(tmp_path), *args])


def test_training_lowers_the_loss_and_writes_its_files(tmp_path):
    metrics = run(tmp_path, "--total_steps", "60", "--eval_interval", "30")
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["loss"] > val[-1]["loss"] and val[-1]["loss"] < math.log(300) - 1
    assert all({"step", "split", "loss"} <= r.keys() for r in records)
    assert {"lr", "tok_s", "mfu", "elapsed", "eta"} <= records[0].keys()
    assert metrics["step"] == 60 and metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 60
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "step", "data", "rng", "config", "tokenizer",
            "best"} <= ckpt.keys()


def test_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path / "a", "--total_steps", "30", "--eval_interval", "10")
    run(tmp_path / "b", "--total_steps", "30", "--eval_interval", "10", "--max_steps", "17")
    resumed = run(tmp_path / "b", "--total_steps", "30", "--eval_interval", "10", "--resume")
    assert resumed["loss"] == full["loss"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_resume_equals_uninterrupted(tmp_path):
    run(tmp_path / "lm", "--total_steps", "10")
    args = ["finetune", "--preset", "tiny", "--finetune_data", "builtin", "--dtype", "float32", "--init_from",
            str(tmp_path / "lm" / "ckpt.pt"), "--finetune_epochs", "2", "--eval_interval", "200"]
    full = gpt.main(args + ["--out_dir", str(tmp_path / "a")])
    gpt.main(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "333"])  # stops inside epoch 2
    resumed = gpt.main(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert resumed["step"] == full["step"] == 500 and resumed["loss"] == full["loss"]
    assert resumed["acc"] == full["acc"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run(tmp_path, "--total_steps", "10")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(gpt.torch, "save", crash)
    with pytest.raises(OSError):
        gpt.save_checkpoint(tmp_path / "ckpt.pt", {"x": 1})
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_ctrl_c_saves_and_resume_continues(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gpt.pretrain_loss

    def interrupt_at_12(model, batch):
        calls["n"] += model.training
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(gpt, "pretrain_loss", interrupt_at_12)
    out = run(tmp_path / "b", "--total_steps", "30", "--eval_interval", "10")
    assert out == {"step": 12, "interrupted": True}
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 12
    monkeypatch.setattr(gpt, "pretrain_loss", real)
    resumed = run(tmp_path / "b", "--total_steps", "30", "--eval_interval", "10", "--resume")
    full = run(tmp_path / "a", "--total_steps", "30", "--eval_interval", "10")
    assert resumed["loss"] == full["loss"]


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


def _ddp_worker(rank, world, out_dir, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    models = []
    real_build = gpt.build_model
    gpt.build_model = lambda cfg: models.append(real_build(cfg)) or models[-1]
    gpt.main(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32", "--total_steps", "8",
              "--eval_interval", "4", "--out_dir", out_dir, "--grad_accum", "2"])
    torch.save(models[0].state_dict(), f"{out_dir}/rank{rank}.pt")


def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 8
    assert len(torch.load(tmp_path / "ckpt.pt", weights_only=False)["data"]) == 2


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
    ours, _, cfg = gpt.load_hf(str(tmp_path), gpt.PRESETS["tiny"])
    ours.eval()
    assert cfg.arch == ("gpt2" if kind == "gpt2" else "gpt1")
    ids = random_ids(1, 3, 20, 97)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
        cache = ours.new_cache()  # a KV-cached step keeps agreeing
        ours(ids[:, :19], cache)
        torch.testing.assert_close(ours(ids[:, 19:], cache)[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)


# --- errors through the command line ---------------------------------------------------------------


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gpt.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("args,message", [
    (["--data", "no/such/file.txt"], "unknown dataset"),
    (["--data", "nope"], "unknown dataset"),
    (["--preset", "huge"], "invalid choice"),
    (["--n_head", "3"], "must divide"),
    (["--dropout", "1.0"], "dropout"),
    (["--n_layer", "0"], "n_layer must be positive"),
    (["--batch_size", "-2"], "batch_size must be positive"),
    (["--dtype", "float8"], "dtype"),
    (["--block_size", "100000"], "fewer than one block"),
    (["--no_such_flag", "1"], "unrecognized"),
    (["--n_layer", "two"], "invalid int"),
])
def test_bad_flags(args, message, capsys, tmp_path):
    assert message in error_of(["pretrain", "--preset", "tiny", "--data", "builtin", "--out_dir",
                                str(tmp_path), *args], capsys)


def test_bad_files(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1") * 100)
    base = ["pretrain", "--preset", "tiny", "--out_dir", str(tmp_path / "o")]
    assert "empty" in error_of(base + ["--data", str(tmp_path / "empty.txt")], capsys)
    assert "UTF-8" in error_of(base + ["--data", str(tmp_path / "latin1.txt")], capsys)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_bad_checkpoints(tmp_path, capsys):
    run(tmp_path / "lm", "--total_steps", "10")
    base = ["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32"]
    # resume with a different architecture
    assert "n_layer" in error_of(base + ["--out_dir", str(tmp_path / "lm"), "--resume", "--n_layer", "3"], capsys)
    # resume where no checkpoint is
    assert "does not exist" in error_of(base + ["--out_dir", str(tmp_path / "none"), "--resume"], capsys)
    # not a checkpoint
    (tmp_path / "junk.pt").write_text("junk")
    assert "not a readable checkpoint" in error_of(["sample", "--init_from", str(tmp_path / "junk.pt")], capsys)
    # a character-level model cannot be fine-tuned
    gpt.main(base + ["--tokenizer", "char", "--out_dir", str(tmp_path / "char"), "--total_steps", "5"])
    assert "character-level" in error_of(["finetune", "--preset", "tiny", "--finetune_data", "builtin",
                                          "--init_from", str(tmp_path / "char" / "ckpt.pt")], capsys)
    # a checkpoint of another script
    ckpt = torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=False)
    torch.save({**ckpt, "script": "bert.py"}, tmp_path / "bert.pt")
    assert "bert.py" in error_of(["sample", "--init_from", str(tmp_path / "bert.pt")], capsys)


def test_bad_classification_data(tmp_path, capsys):
    run(tmp_path / "lm", "--total_steps", "5")
    data = tmp_path / "cls"
    data.mkdir()
    (data / "train.tsv").write_text("1\tgood film\n0\tbad film\nno label here\n")
    (data / "dev.tsv").write_text("1\tfine\n")
    args = ["finetune", "--preset", "tiny", "--init_from", str(tmp_path / "lm" / "ckpt.pt"),
            "--finetune_data", str(data), "--out_dir", str(tmp_path / "ft")]
    assert "expected label<TAB>text" in error_of(args, capsys)
    (data / "train.tsv").write_text("1\tgood film\n0\tbad film\n" * 8)
    (data / "dev.tsv").write_text("1\tfine\n2\tunheard-of label\n")
    out = gpt.main(args + ["--dtype", "float32"])  # an unseen dev label: a warning, counted as an error
    assert out["acc"] <= 0.5
    assert "unseen in training" in capsys.readouterr().out


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--total_steps", "10", "--eval_interval", "5")
    good = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(gpt, "pretrain_loss", lambda m, b: m(b["input_ids"]).sum() * float("nan"))
    err = error_of(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32",
                    "--out_dir", str(tmp_path), "--total_steps", "20", "--resume"], capsys)
    assert "at step 10" in err and (tmp_path / "ckpt.pt").read_bytes() == good


def test_main_job_runs_as_a_script(tmp_path):
    """One real subprocess: the default main job on the built-in data, end to end."""
    env = {**os.environ, "NLP_LINEAGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "gpt.py"), "--preset", "tiny", "--data", "builtin",
                        "--out_dir", str(tmp_path / "out"), "--max_new_tokens", "10"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "final step 40" in r.stdout and "samples from" in r.stdout
    assert (tmp_path / "out" / "pretrain" / "ckpt.pt").exists()
    help_text = subprocess.run([sys.executable, str(ROOT / "gpt.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert "pretrain" in help_text and "--finetune_lr" in help_text and "6.25e-05" in help_text


def test_bfloat16_autocast_trains(tmp_path):
    out = gpt.main(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "bfloat16",
                    "--out_dir", str(tmp_path), "--total_steps", "20"])
    assert math.isfinite(out["loss"]) and out["loss"] < math.log(300)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # master weights stay fp32


@pytest.mark.slow
def test_compiled_checkpoint_has_plain_names(tmp_path):
    gpt.main(["pretrain", "--preset", "tiny", "--data", "builtin", "--dtype", "float32", "--compile",
              "--out_dir", str(tmp_path), "--total_steps", "4", "--eval_interval", "4"])
    names = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"].keys()
    assert not any("_orig_mod" in k for k in names) and "wte.weight" in names


def test_download_checks_sha256_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("NLP_LINEAGE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "data.txt"
    src.write_text("some text\n")
    import hashlib
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    assert gpt.download("x", {"data.txt": (src.as_uri(), good)}) == tmp_path / "cache" / "x"
    src.write_text("changed")  # cached: not fetched again
    assert (gpt.download("x", {"data.txt": (src.as_uri(), good)}) / "data.txt").read_text() == "some text\n"
    with pytest.raises(gpt.UserError, match="sha256"):
        gpt.download("y", {"data.txt": (src.as_uri(), good)})
    assert not (tmp_path / "cache" / "y" / "data.txt").exists()
    assert gpt.download("z", {"data.txt": ((tmp_path / "absent").as_uri(), good)}) is None  # offline


def test_named_datasets_from_their_pinned_bytes(tmp_path, monkeypatch, shared_data):
    """Serve ../shared/data through file:// in place of the pinned URLs: the recorded sha256s must match
    the real files, and the named loaders must split them as documented."""
    monkeypatch.setenv("NLP_LINEAGE_CACHE", str(tmp_path))
    local = {"shakespeare": shared_data / "tinyshakespeare", "wikitext2": shared_data / "wikitext-2",
             "sst2": shared_data / "sst2"}
    monkeypatch.setattr(gpt, "DATASETS", {name: {f: ((local[name] / f).as_uri(), sha) for f, (_, sha) in files.items()}
                                          for name, files in gpt.DATASETS.items()})
    name, train, val = gpt.load_lm_text("shakespeare")
    assert name == "shakespeare" and len(train) == 1003854 and len(val) == 111540  # nanoGPT's split
    name, train, val = gpt.load_lm_text("wikitext2")
    assert val.startswith(" \n = Homarus gammarus = \n")
    name, train_rows, dev_rows = gpt.load_classification("sst2", 0)
    assert len(train_rows) == 67349 and len(dev_rows) == 872
