"""elmo.py: character ids, the biLM's structure (clipping, residual, directions, state), the scalar mix,
downstream freezing, parity with the released TensorFlow-trained fixtures, resume and the command line."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import elmo
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(elmo.PRESETS["tiny"], vocab_size=40, dropout=0.0)



def tiny_model(seed: int, **overrides) -> elmo.BiLM:
    torch.manual_seed(seed)
    return elmo.build_model(dataclasses.replace(TINY, **overrides)).eval()


WORDS = ["the", "a", "cat", "sat", "on", "mat", "naïve", "über", "日本", "x" * 60, "<S>", "</S>", "•", "run",
         "ran", "!"]
WORD_CHARS = elmo.batch_chars([WORDS])[0]  # (n_words, 50)


def word_ids(seed, B, T):
    return torch.randint(len(WORDS), (B, T), generator=torch.Generator().manual_seed(seed))


def layers_of(model, ids, lengths=None):
    """(B, T, L+1, 2P) activations of sentences given as word ids, padded beyond lengths."""
    chars = WORD_CHARS[ids]
    if lengths is not None:
        chars = chars * (torch.arange(ids.size(1))[None, :] < lengths[:, None])[..., None]
    with torch.no_grad():
        layers, _ = model.activations(chars)
    return layers.permute(0, 2, 1, 3)


def random_stream_batch(seed, B=2, T=5, V=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(WORDS), (2, B, T), generator=g)
    return {"fwd_chars": WORD_CHARS[ids[0]], "bwd_chars": WORD_CHARS[ids[1]],
            "fwd_targets": torch.randint(V, (B, T), generator=g), "bwd_targets": torch.randint(V, (B, T), generator=g)}


P = TINY.proj_dim
PROPERTY_ROWS = [
    Rows(name="elmo-forward", model=tiny_model, ids=word_ids, direction="forward",
         causal=lambda m, ids: layers_of(m, ids)[..., :P], padded=layers_of,
         loss=lambda m, seed: elmo.pretrain_loss(m, random_stream_batch(seed))),
    Rows(name="elmo-backward", model=tiny_model, ids=word_ids, direction="backward",
         causal=lambda m, ids: layers_of(m, ids)[..., P:]),
]


# ----------------------------------------------------------------------------------------------------
# Character ids


@given(st.text(min_size=1, max_size=80))
def test_character_ids(word):
    ids = elmo.token_chars(word)
    assert len(ids) == elmo.MAX_CHARS and min(ids) >= 1 and max(ids) <= elmo.N_CHARS - 1
    data = word.encode("utf-8", "ignore")[:48]
    if word in ("<S>", "</S>"):
        data = bytes()
        assert ids[1] == (elmo.BOS_CHAR if word == "<S>" else elmo.EOS_CHAR) + 1
        n = 1
    else:
        assert ids[1:1 + len(data)] == [b + 1 for b in data]  # bytes shifted by +1, cut to 48
        n = len(data)
    assert ids[0] == elmo.BOW_CHAR + 1 and ids[1 + n] == elmo.EOW_CHAR + 1
    assert ids[2 + n:] == [elmo.PAD_CHAR + 1] * (elmo.MAX_CHARS - 2 - n)


def test_sentence_boundaries_and_padding_ids():
    assert elmo.token_chars("<S>")[:4] == [259, 257, 260, 261] and elmo.token_chars("</S>")[:4] == [259, 258, 260, 261]
    chars = elmo.batch_chars([["a", "b"], ["c"]])
    assert chars.shape == (2, 2, 50) and (chars[1, 1] == 0).all() and (chars[0, 1] > 0).any()
    assert elmo.N_CHARS == 262 and tiny_model(0).token_embedder.char_embed.weight[0].abs().sum() == 0


# ----------------------------------------------------------------------------------------------------
# The biLM


@given(seed=st.integers(0, 100), B=st.integers(1, 3), T=st.integers(1, 7))
@settings(max_examples=8)
def test_activation_shapes_and_layer0_duplicated(seed, B, T):
    model = tiny_model(seed)
    with torch.no_grad():
        layers, mask = model.activations(WORD_CHARS[word_ids(seed, B, T)])
    assert layers.shape == (B, TINY.n_layers + 1, T, 2 * P) and mask.all()
    torch.testing.assert_close(layers[:, 0, :, :P], layers[:, 0, :, P:])  # layer 0 is [x; x]


def test_paper_preset_size():
    """Section 3.1's biLM: about 93.6M parameters without the softmax."""
    with torch.device("meta"):
        model = elmo.build_model(elmo.PRESETS["paper"])
    n = sum(p.numel() for p in model.parameters())
    assert model.softmax is None and abs(n - 93.6e6) < 0.05e6, n


@given(seed=st.integers(0, 1000), scale=st.floats(0.1, 100.0))
@settings(max_examples=10)
def test_clipping_bounds_hold_for_any_input(seed, scale):
    torch.manual_seed(seed)
    layer = elmo.LstmProjection(P, TINY)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(scale)
        x = torch.randn(3, 6, P) * scale
        state = (torch.zeros(3, P), torch.zeros(3, TINY.lstm_dim))
        for t in range(6):  # one step at a time, to see every cell state
            h, state = layer(x[:, t:t + 1], torch.ones(3, 1, dtype=torch.bool), state)
            assert h.abs().max() <= TINY.proj_clip and state[1].abs().max() <= TINY.cell_clip


def test_cell_equals_torch_lstm_when_no_clip_binds():
    """Gate order, forget bias and projection: with the clips off, the cell is nn.LSTM(proj_size=P)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, cell_clip=math.inf, proj_clip=math.inf)
    ours = elmo.LstmProjection(P, cfg)
    ref = torch.nn.LSTM(P, cfg.lstm_dim, proj_size=P, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(ours.input_linear.weight)
        ref.weight_hh_l0.copy_(ours.state_linear.weight)
        ref.bias_hh_l0.copy_(ours.state_linear.bias)
        ref.bias_ih_l0.zero_()
        ref.weight_hr_l0.copy_(ours.proj.weight)
        x = torch.randn(2, 7, P)
        h, (hT, cT) = ours(x, torch.ones(2, 7, dtype=torch.bool), (torch.zeros(2, P), torch.zeros(2, cfg.lstm_dim)))
        h_ref, (h_n, c_n) = ref(x)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(cT, c_n[0])


def test_residual_on_the_second_layer_only():
    model = tiny_model(3)
    ids = word_ids(3, 2, 5)
    with torch.no_grad():
        for stack in model.stacks:
            stack[1].proj.weight.zero_()  # layer 2's LSTM outputs 0: layer 2 = its residual input = layer 1
            stack[0].proj.weight.zero_()  # layer 1's LSTM outputs 0: no residual from layer 0 keeps it 0
    out = layers_of(model, ids)
    assert out[:, :, 1].abs().max() == 0 and out[:, :, 0].abs().max() > 0
    torch.testing.assert_close(out[:, :, 2], out[:, :, 1])
    model = tiny_model(3)
    with torch.no_grad():
        for stack in model.stacks:
            stack[1].proj.weight.zero_()
    out = layers_of(model, ids)
    torch.testing.assert_close(out[:, :, 2], out[:, :, 1])
    assert out[:, :, 1].abs().max() > 0


@given(seed=st.integers(0, 1000), T=st.integers(2, 8), cut=st.integers(1, 7))
@settings(max_examples=8)
def test_carried_state_continues_the_stream(seed, T, cut):
    """Stateful: two windows one after the other give what one long window gives (truncated BPTT)."""
    cut = min(cut, T - 1)
    model = tiny_model(seed)
    b = random_stream_batch(seed, B=2, T=T)
    x_f, x_b = model.embed_tokens(b["fwd_chars"]), model.embed_tokens(b["bwd_chars"])
    with torch.no_grad():
        whole = model.run_lms(x_f, x_b)
        model.stateful = True
        first = model.run_lms(*[(x[:, :cut], m[:, :cut]) for x, m in (x_f, x_b)])
        second = model.run_lms(*[(x[:, cut:], m[:, cut:]) for x, m in (x_f, x_b)])
        model.reset_states()
        again = model.run_lms(*[(x[:, :cut], m[:, :cut]) for x, m in (x_f, x_b)])
    for d in range(2):
        for j in range(TINY.n_layers + 1):
            torch.testing.assert_close(torch.cat([first[d][j], second[d][j]], 1), whole[d][j])
            torch.testing.assert_close(again[d][j], first[d][j])


def test_sampled_softmax_trains_and_full_softmax_evaluates():
    model = tiny_model(0, n_negative=8, dropout=0.1)
    b = random_stream_batch(0)
    model.train()
    torch.manual_seed(1)
    sampled = elmo.pretrain_loss(model, b)
    sampled.backward()
    assert torch.isfinite(sampled) and model.softmax.weight.grad.abs().sum() > 0
    model.eval()
    full = elmo.pretrain_loss(model, b)
    (fwd, bwd) = model.run_lms(model.embed_tokens(b["fwd_chars"]), model.embed_tokens(b["bwd_chars"]))
    ce = lambda h, y: torch.nn.functional.cross_entropy(model.softmax(h).flatten(0, 1), y.flatten())
    torch.testing.assert_close(full, 0.5 * (ce(fwd[-1], b["fwd_targets"]) + ce(bwd[-1], b["bwd_targets"])))


def test_log_uniform_sampler_frequencies():
    """The negatives follow Q(k) = log((k+2)/(k+1)) / log(V+1): compare the head of many draws."""
    V, S = 50, 40000
    torch.manual_seed(0)
    draws = elmo.log_uniform_sample(V, S)
    q = torch.log1p(1.0 / (torch.arange(V) + 1.0)) / math.log(V + 1)
    freq = torch.bincount(draws, minlength=V).float() / S
    assert abs(q.sum().item() - 1) < 1e-6 and 0 <= draws.min() and draws.max() < V
    torch.testing.assert_close(freq[:8], q[:8], atol=0.01, rtol=0)


# ----------------------------------------------------------------------------------------------------
# ELMo and downstream use


@given(seed=st.integers(0, 1000), layer_norm=st.booleans())
@settings(max_examples=10)
def test_scalar_mix(seed, layer_norm):
    g = torch.Generator().manual_seed(seed)
    layers = torch.randn(2, 3, 5, 4, generator=g) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mix = elmo.ScalarMix(3, layer_norm)
    with torch.no_grad():
        mix.w.copy_(torch.randn(3, generator=g))
        mix.gamma.fill_(1.7)
    s = mix.w.softmax(0)
    assert abs(s.sum().item() - 1) < 1e-6
    out = mix(layers, mask)
    if layer_norm:  # one mean and variance per layer over every unmasked element of the batch
        m = mask[:, None, :, None].expand_as(layers)
        normed = torch.stack([(layers[:, j] - layers[:, j][m[:, j]].mean()) /
                              torch.sqrt(layers[:, j][m[:, j]].var(unbiased=False) + 1e-12) for j in range(3)], 1)
        garbage = layers.masked_fill(~m, 1e3)  # padded elements do not enter the statistics
        torch.testing.assert_close(mix(garbage, mask)[mask], out[mask])
    else:
        normed = layers
    torch.testing.assert_close(out, 1.7 * (s[None, :, None, None] * normed).sum(1))
    (out.sum() + mix.l2()).backward()
    assert mix.w.grad.abs().sum() > 0 and mix.gamma.grad.abs() > 0


def test_biLM_frozen_in_downstream_use():
    torch.manual_seed(0)
    bilm = elmo.build_model(TINY)
    before = {k: v.clone() for k, v in bilm.state_dict().items() if k != "_extra_state"}
    cfg = dataclasses.replace(TINY, elmo_output=True)
    model = elmo.Classifier(cfg, 10, 2, bilm).train()
    assert len(model.elmo.mixes) == 2 and not bilm.training
    opt = elmo.make_optimizer(model, 0.1, 0.0, (0.9, 0.999), 1e-8, torch.device("cpu"))
    ids = word_ids(0, 3, 4)
    batch = {"word_ids": ids % 10, "chars": WORD_CHARS[ids], "lengths": torch.tensor([4, 2, 1]),
             "labels": torch.tensor([0, 1, 1])}
    for _ in range(2):
        opt.zero_grad()
        elmo.task_loss(model, batch, 0.01).backward()
        assert all(p.grad is None for p in bilm.parameters())
        for mix in model.elmo.mixes:
            assert mix.w.grad.abs().sum() > 0 and mix.gamma.grad.abs() > 0
        opt.step()
    for k, v in bilm.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------------------------------
# The released weights (../shared/data/elmo-fixtures, from AllenNLP's tests)


def released(shared_data):
    pytest.importorskip("h5py")
    fx = shared_data / "elmo-fixtures"
    model, _, _ = elmo.load_allennlp(f"{fx / 'options.json'},{fx / 'lm_weights.hdf5'}", TINY)
    return model.eval(), fx


def test_released_weights_top_layer_parity_stateful(shared_data):
    import h5py
    model, fx = released(shared_data)
    sentences = json.loads((fx / "sentences.json").read_text())
    fresh, _ = released(shared_data)
    model.stateful = True  # the reference carried the state from batch to batch, per row
    for i in range(10):
        batch = [sentences[k][i].split() for k in range(3)]
        chars = elmo.batch_chars(batch)
        with torch.no_grad():
            layers, mask = model.activations(chars)
            if i == 0:  # from zero state: the stateless path
                stateless, _ = fresh.activations(chars)
                torch.testing.assert_close(stateless, layers, atol=1e-6, rtol=0)
        assert mask.sum(1).tolist() == [len(s) for s in batch]
        for k in range(3):
            with h5py.File(fx / f"lm_embeddings_{k}.hdf5", "r") as f:
                expected = np.concatenate([f[str(i)][0], f[str(i)][1]], axis=-1)
            got = layers[k, 2, :len(batch[k])].numpy()
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_released_weights_token_embeddings(shared_data):
    import h5py
    model, fx = released(shared_data)
    words = (fx / "vocab_test.txt").read_text().strip().split("\n")
    with torch.no_grad():
        got = model.token_embedder(elmo.batch_chars([words]))[0].numpy()
    with h5py.File(fx / "elmo_token_embeddings.hdf5", "r") as f:
        np.testing.assert_allclose(got, f["embedding"][...], atol=1e-5, rtol=1e-5)


def test_embed_stage_writes_the_layers(shared_data, tmp_path):
    pytest.importorskip("h5py")
    import h5py
    fx = shared_data / "elmo-fixtures"
    text = tmp_path / "s.txt"
    text.write_text("the cat sat\na naïve dog\n")
    elmo.main(["embed", "--init_from", f"allennlp:{fx / 'options.json'},{fx / 'lm_weights.hdf5'}",
               "--embed_file", str(text), "--out_dir", str(tmp_path / "e")])
    model, _ = released(shared_data)
    with torch.no_grad():
        layers, _ = model.activations(elmo.batch_chars([["a", "naïve", "dog"]]))
    with h5py.File(tmp_path / "e" / "elmo.hdf5", "r") as f:
        assert f["0"].shape == (3, 3, 32)
        np.testing.assert_allclose(f["1"][...], layers[0].numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Training, resume and the command line

TINY_ARGS = ["--preset", "tiny", "--data", "builtin", "--device", "cpu", "--dtype", "float32"]


def test_resume_equals_uninterrupted(tmp_path):
    run = lambda out, *extra: elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / out),
                                         "--n_negative", "16", *extra])
    straight = run("a")
    run("b", "--max_steps", "3")
    resumed = run("b", "--resume")
    assert resumed["loss"] == straight["loss"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    for k in a["model"]:
        if k != "_extra_state":
            assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(sum(a["model"]["_extra_state"], []), sum(b["model"]["_extra_state"], [])):
        assert all(torch.equal(x, y) for x, y in zip(sa, sb))  # the carried state is checkpointed
    assert a["data"] == b["data"]


def test_task_stage_leaves_the_biLM_unchanged(tmp_path, monkeypatch):
    elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "lm"), "--max_steps", "2"])
    out = elmo.main(["task", *TINY_ARGS, "--task_data", "builtin", "--init_from", str(tmp_path / "lm" / "ckpt.pt"),
                     "--out_dir", str(tmp_path / "task"), "--layer_norm", "--elmo_output"])
    assert 0 <= out["acc"] <= 1
    lm = torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=False)["model"]
    clf = torch.load(tmp_path / "task" / "ckpt.pt", weights_only=False)["model"]
    for k, v in lm.items():
        if k != "_extra_state":
            assert torch.equal(clf["elmo.bilm." + k], v), k
    lines = [json.loads(l) for l in (tmp_path / "task" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {l["split"] for l in lines} and all("loss" in l for l in lines)
    # embed without h5py writes npz: one (L+1, n, 2P) array per line, as the biLM computes them
    text = tmp_path / "s.txt"
    text.write_text("the cat sat on the mat\nnaïve !\n")
    monkeypatch.setitem(sys.modules, "h5py", None)
    elmo.main(["embed", *TINY_ARGS, "--init_from", str(tmp_path / "task" / "ckpt.pt"), "--embed_file", str(text),
               "--out_dir", str(tmp_path / "e")])
    model, _, _ = elmo.load_pretrained(dataclasses.replace(TINY, init_from=str(tmp_path / "lm" / "ckpt.pt")))
    with torch.no_grad():
        chars = elmo.batch_chars([["the", "cat", "sat", "on", "the", "mat"], ["naïve", "!"]])
        layers, _ = model.eval().activations(chars)
    saved = np.load(tmp_path / "e" / "elmo.npz")
    np.testing.assert_allclose(saved["0"], layers[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(saved["1"], layers[1, :, :2].numpy(), atol=1e-6)


def test_adagrad_on_the_mean_loss_equals_bilm_tf_on_the_loss_times_unroll_steps():
    """The docstring's claim: accumulator 1/k^2 on g gives the updates of accumulator 1 on k g (k = 20)."""
    k, g = 20, torch.Generator().manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
    opt_ours = torch.optim.Adagrad([ours], lr=0.2, initial_accumulator_value=TINY.adagrad_init, eps=1e-10)
    opt_theirs = torch.optim.Adagrad([theirs], lr=0.2, initial_accumulator_value=1.0, eps=1e-10)
    assert TINY.adagrad_init == 1 / k ** 2 and TINY.grad_clip == 10 / k
    for _ in range(5):
        grad = torch.randn(6, generator=g)
        ours.grad, theirs.grad = grad.clone(), k * grad
        opt_ours.step()
        opt_theirs.step()
        torch.testing.assert_close(ours, theirs)


def test_schedules():
    constant = elmo.lr_lambda(0, 100, 0.0, "constant")
    assert constant(0) == constant(99) == 1.0
    cosine = elmo.lr_lambda(10, 100, 0.1, "cosine")
    assert cosine(0) == 0.1 and cosine(10) == 1.0 and abs(cosine(100) - 0.1) < 1e-12
    assert all(cosine(s) >= cosine(s + 1) for s in range(10, 100))


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        elmo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_errors_through_the_command_line(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    sents = tmp_path / "s.txt"
    sents.write_text("a b\n")
    bad_tsv = tmp_path / "bad"
    bad_tsv.mkdir()
    (bad_tsv / "train.tsv").write_text("1\tgood film\n0\n")
    (bad_tsv / "dev.tsv").write_text("1\tfine\n")
    cases = [
        (["pretrain", "--preset", "huge"], "invalid choice"),
        (["pretrain", *TINY_ARGS, "--data", "nosuchdata"], "unknown dataset"),
        (["pretrain", *TINY_ARGS, "--data", str(tmp_path / "missing.txt")], "unknown dataset"),
        (["pretrain", *TINY_ARGS, "--data", str(empty)], "is empty"),
        (["pretrain", *TINY_ARGS, "--proj_dim", "0"], "--proj_dim must be positive"),
        (["pretrain", *TINY_ARGS, "--dropout", "1.0"], "--dropout must be in [0, 1)"),
        (["pretrain", *TINY_ARGS, "--filters", "3y16"], "--filters must look like"),
        (["pretrain", *TINY_ARGS, "--batch_size", "100000"], "too few"),
        (["task", *TINY_ARGS, "--task_data", "builtin"], "needs --init_from"),
        (["task", *TINY_ARGS, "--no-use_elmo", "--task_data", str(bad_tsv)], "expected label<TAB>text"),
        (["embed", *TINY_ARGS, "--init_from", "x.pt"], "needs --embed_file"),
        (["pretrain", *TINY_ARGS, "--init_from", str(tmp_path / "nope.pt")], "does not exist"),
        (["task", *TINY_ARGS, "--init_from", "allennlp:only-one-path"], "OPTIONS_JSON,WEIGHTS_HDF5"),
    ]
    for argv, message in cases:
        assert message in error_of(capsys, argv), argv
    (bad_tsv / "train.tsv").write_text("1\tgood film\n0\tbad film\n")
    (bad_tsv / "dev.tsv").write_text("2\tfine\n")
    out = elmo.main(["task", *TINY_ARGS, "--no-use_elmo", "--task_data", str(bad_tsv),
                     "--out_dir", str(tmp_path / "t")])
    assert out["acc"] == 0.0 and "unseen in training" in capsys.readouterr().out  # counted as errors
    # a checkpoint of another architecture, and one from another script
    elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "lm"), "--max_steps", "1"])
    assert "lstm_dim" in error_of(capsys, ["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "lm"),
                                            "--resume", "--lstm_dim", "12"])
    torch.save({"script": "gpt.py", "config": {}}, tmp_path / "gpt.pt")
    assert "not elmo.py" in error_of(capsys, ["embed", *TINY_ARGS, "--init_from", str(tmp_path / "gpt.pt"),
                                              "--embed_file", str(sents)])
    # a non-finite loss stops the run with the step
    monkeypatch.setattr(elmo, "pretrain_loss", lambda m, b: torch.tensor(float("nan"), requires_grad=True))
    assert "at step 0" in error_of(capsys, ["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "nan")])
    monkeypatch.undo()
    # the released-weights loader names h5py when it is missing
    monkeypatch.setitem(sys.modules, "h5py", None)
    assert "pip install h5py" in error_of(capsys, ["embed", *TINY_ARGS, "--embed_file", str(sents),
                                                   "--init_from", f"allennlp:{empty},{empty}"])


def test_smoke_main_job_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "elmo.py"), *TINY_ARGS, "--task_data", "builtin",
                        "--out_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "task dev accuracy with ELMo" in r.stdout and "without" in r.stdout
    for stage in ("pretrain", "task", "baseline"):
        assert (tmp_path / stage / "ckpt.pt").is_file() and (tmp_path / stage / "metrics.jsonl").is_file()
