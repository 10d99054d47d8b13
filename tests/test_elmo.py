"""elmo.py: character ids, the biLM's structure (clipping, residual, directions, carried state), the sampled softmax and
its initialisation, bilm-tf's optimiser at any unroll length, ELMo's scalar mix, downstream freezing, parity with the
released TensorFlow-trained fixtures, exact resume with the carried state, and the command line."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import elmo
from rows import Rows

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(elmo.PRESETS["tiny"], vocab_size=40, dropout=0.0)
TINY_ARGS = ["--preset", "tiny", "--data", "builtin", "--device", "cpu", "--dtype", "float32"]


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
        layers, _, _ = model.activations(chars)
    return layers.permute(0, 2, 1, 3)


def random_stream_batch(seed, B=2, T=5, V=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(WORDS), (2, B, T), generator=g)
    return {"fwd_chars": WORD_CHARS[ids[0]], "bwd_chars": WORD_CHARS[ids[1]],
            "fwd_targets": torch.randint(V, (B, T), generator=g), "bwd_targets": torch.randint(V, (B, T), generator=g)}


def classifier(seed):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, elmo_output=True, layer_norm=True, task_dropout=0.0)
    return elmo.Classifier(cfg, len(WORDS), 3, tiny_model(seed)).eval()


def classifier_logits(model, ids, lengths):
    """The padded property for the task model: its logits, repeated over positions, ignore the padding."""
    chars = WORD_CHARS[ids] * (torch.arange(ids.size(1))[None, :] < lengths[:, None])[..., None]
    with torch.no_grad():
        logits = model(ids, chars, lengths)
    return logits[:, None, :].expand(-1, ids.size(1), -1)


def classification_batch(seed):
    ids, lengths = word_ids(seed, 3, 5), torch.tensor([5, 3, 1])
    chars = WORD_CHARS[ids] * (torch.arange(5)[None, :] < lengths[:, None])[..., None]
    return {"word_ids": ids, "chars": chars, "lengths": lengths, "labels": torch.tensor([0, 2, 1])}


P = TINY.proj_dim
PROPERTY_ROWS = [  # elmo.py drops only through nn.Dropout (on LSTM inputs and outputs, and the task's): no `rates` row
    Rows(name="elmo-forward", model=tiny_model, ids=word_ids, direction="forward",
         causal=lambda m, ids: layers_of(m, ids)[..., :P], padded=layers_of,
         loss=lambda m, seed: elmo.pretrain_loss(m, random_stream_batch(seed))),
    Rows(name="elmo-backward", model=tiny_model, ids=word_ids, direction="backward",
         causal=lambda m, ids: layers_of(m, ids)[..., P:]),
    Rows(name="elmo-classifier", model=classifier, ids=word_ids, padded=classifier_logits,  # the biLM gets no gradient
         loss=lambda m, seed: elmo.task_loss(m, classification_batch(seed), 0.01)),
]


# ----------------------------------------------------------------------------------------------------
# Character ids


@given(st.text(min_size=1, max_size=80))
def test_character_ids(word):
    ids = elmo.token_chars(word)
    assert len(ids) == elmo.MAX_CHARS and min(ids) >= 1 and max(ids) <= elmo.N_CHARS - 1
    data = word.encode("utf-8", "ignore")[:48]
    if word in ("<S>", "</S>"):
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
    assert elmo.batch_chars([[]]).shape == (1, 0, 50)
    embed = tiny_model(0).token_embedder.char_embed
    assert elmo.N_CHARS == 262 == embed.num_embeddings and embed.weight[0].abs().sum() == 0


def test_lines_split_at_newlines_only():
    """U+2028 and NEL may stand inside a sentence: a line is what ends in \\n (never str.splitlines)."""
    assert elmo.sentence_stream("a\u2028b c\nd\x85e\n\n").count("<S>") == 2


# ----------------------------------------------------------------------------------------------------
# The biLM


@given(seed=st.integers(0, 100), B=st.integers(1, 3), T=st.integers(1, 7))
@settings(max_examples=8)
def test_activation_shapes_and_layer0_duplicated(seed, B, T):
    model = tiny_model(seed)
    with torch.no_grad():
        layers, mask, (h, c) = model.activations(WORD_CHARS[word_ids(seed, B, T)])
    assert layers.shape == (B, TINY.n_layer + 1, T, 2 * P) and mask.all()
    assert h.shape == (2, TINY.n_layer, B, P) and c.shape == (2, TINY.n_layer, B, TINY.lstm_dim)
    torch.testing.assert_close(layers[:, 0, :, :P], layers[:, 0, :, P:])  # layer 0 is [x; x]


def test_paper_preset_size():
    """Section 3.1's biLM: about 93.6M parameters without the softmax."""
    with torch.device("meta"):
        model = elmo.build_model(elmo.PRESETS["paper"])
    n = sum(p.numel() for p in model.parameters())
    assert model.softmax is None and abs(n - 93.6e6) < 0.05e6, n


def test_softmax_initialised_as_bilm_tf():
    """bilm-tf: softmax weights N(0, 1/sqrt(projection_dim)), bias 0 (nn.Linear's default would be U(+-1/sqrt(d)))."""
    model = tiny_model(0, vocab_size=20000, proj_dim=16)
    W = model.softmax.weight
    assert abs(W.std().item() - 1 / math.sqrt(16)) < 0.01 and abs(W.mean().item()) < 0.005
    assert (W.abs() > 1 / math.sqrt(16)).any() and (model.softmax.bias == 0).all()


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
    """TensorFlow's gate order (i, j, f, o), its +1 on the forget gate and the projection: with the clips off, the cell
    is nn.LSTM(proj_size=P) (gates i, f, g, o) with the blocks reordered and the forget bias raised by 1."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, cell_clip=math.inf, proj_clip=math.inf)
    ours, H = elmo.LstmProjection(P, cfg), cfg.lstm_dim
    with torch.no_grad():
        ours.kernel.bias.normal_()
    ref = torch.nn.LSTM(P, H, proj_size=P, batch_first=True)
    order = torch.cat([torch.arange(0, H), torch.arange(2 * H, 3 * H), torch.arange(H, 2 * H), torch.arange(3 * H, 4 * H)])
    with torch.no_grad():
        W = ours.kernel.weight[order]
        ref.weight_ih_l0.copy_(W[:, :P])
        ref.weight_hh_l0.copy_(W[:, P:])
        ref.bias_ih_l0.copy_(ours.kernel.bias[order] + torch.cat([torch.zeros(H), torch.ones(H), torch.zeros(2 * H)]))
        ref.bias_hh_l0.zero_()
        ref.weight_hr_l0.copy_(ours.proj.weight)
        x = torch.randn(2, 7, P)
        h, (hT, cT) = ours(x, torch.ones(2, 7, dtype=torch.bool), (torch.zeros(2, P), torch.zeros(2, H)))
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
    """Two windows one after the other, the second from the first's final state, give what one long window gives."""
    cut = min(cut, T - 1)
    model = tiny_model(seed)
    b = random_stream_batch(seed, B=2, T=T)
    x_f, x_b = model.token_embedder(b["fwd_chars"]), model.token_embedder(b["bwd_chars"])
    halves = [[(x[:, s], m[:, s]) for x, m in (x_f, x_b)] for s in (slice(0, cut), slice(cut, None))]
    with torch.no_grad():
        whole, whole_state = model.run_lms(x_f, x_b)
        first, state = model.run_lms(*halves[0])
        second, second_state = model.run_lms(*halves[1], state)
        fresh, _ = model.run_lms(*halves[1])
    for d in range(2):
        for j in range(TINY.n_layer + 1):
            torch.testing.assert_close(torch.cat([first[d][j], second[d][j]], 1), whole[d][j])
    torch.testing.assert_close(second_state, whole_state)
    assert not torch.allclose(fresh[0][-1], second[0][-1])  # the carried state matters


def sampled_softmax_reference(h, targets, W, b, sampled):
    """The sampled softmax written out: true logit and S negatives, each less log(S Q(k)), accidental hits removed."""
    V, S = W.size(0), len(sampled)
    log_sq = lambda k: torch.log(S * torch.log(torch.tensor((k + 2.0) / (k + 1.0))) / math.log(V + 1))
    rows = []
    for n in range(len(targets)):
        true = h[n] @ W[targets[n]] + b[targets[n]] - log_sq(targets[n].item())
        negs = [h[n] @ W[k] + b[k] - log_sq(k.item()) if k != targets[n] else torch.tensor(-math.inf) for k in sampled]
        rows.append(-torch.log_softmax(torch.stack([true, *negs]), 0)[0])
    return torch.stack(rows).mean()


def test_sampled_softmax_is_tensorflows_and_full_softmax_evaluates():
    model = tiny_model(0, n_negative=8, vocab_size=40)
    h, targets = torch.randn(1, 12, P), torch.randint(40, (1, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    torch.manual_seed(5)
    sampled_loss = model.lm_loss(h, targets)
    torch.manual_seed(5)  # the same draw: TensorFlow's log-uniform sampler, floor(exp(u log(V+1))) - 1
    sampled = ((torch.rand(8) * math.log(41)).exp() - 1).long()
    ref = sampled_softmax_reference(h[0], targets[0], model.softmax.weight, model.softmax.bias, sampled)
    torch.testing.assert_close(sampled_loss, ref)
    model.eval()
    torch.testing.assert_close(model.lm_loss(h, targets), F.cross_entropy(model.softmax(h[0]), targets[0]))
    b = random_stream_batch(0)  # the objective is the mean of the two directions' losses (eq. 3)
    (fwd, bwd), _ = model.run_lms(model.token_embedder(b["fwd_chars"]), model.token_embedder(b["bwd_chars"]))
    ce = lambda h, y: F.cross_entropy(model.softmax(h).flatten(0, 1), y.flatten())
    torch.testing.assert_close(elmo.pretrain_loss(model, b), 0.5 * (ce(fwd[-1], b["fwd_targets"]) +
                                                                   ce(bwd[-1], b["bwd_targets"])))


def test_log_uniform_sampler_frequencies():
    """The draw above follows Q(k) = log((k+2)/(k+1)) / log(V+1) over the vocabulary."""
    V, S = 50, 40000
    torch.manual_seed(0)
    draws = ((torch.rand(S) * math.log(V + 1)).exp() - 1).long().clamp(max=V - 1)
    q = torch.log1p(1.0 / (torch.arange(V) + 1.0)) / math.log(V + 1)
    freq = torch.bincount(draws, minlength=V).float() / S
    assert abs(q.sum().item() - 1) < 1e-6 and 0 <= draws.min() and draws.max() < V
    torch.testing.assert_close(freq[:8], q[:8], atol=0.01, rtol=0)


@pytest.mark.parametrize("k", [20, 5])
def test_adagrad_equals_bilm_tf_at_any_unroll_length(k):
    """bilm-tf: G = k * grad(mean loss), clipped at global norm 10, Adagrad from accumulator 1 without epsilon. Ours on
    grad(mean loss) with bilm_tf_adagrad's accumulator and clip must make the same updates, clipping or not."""
    cfg = dataclasses.replace(TINY, unroll_steps=k, lr=0.2, grad_clip=10.0)
    g = torch.Generator().manual_seed(k)
    ours = torch.nn.Linear(3, 2)
    opt, clip = elmo.bilm_tf_adagrad(ours, cfg)
    params = [p.detach().clone().double() for p in ours.parameters()]
    acc = [torch.ones_like(p) for p in params]
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) * (3.0 if step % 2 else 0.01) for p in ours.parameters()]
        for p, gr in zip(ours.parameters(), grads):
            p.grad = gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(list(ours.parameters()), clip)
        opt.step()
        G = [k * gr.double() for gr in grads]  # bilm-tf's gradient, of the loss times unroll_steps
        total = torch.sqrt(sum((x ** 2).sum() for x in G))
        G = [x * min(1.0, 10.0 / total.item()) for x in G]
        for p, a, x in zip(params, acc, G):
            a += x ** 2
            p -= 0.2 * x / a.sqrt()
        for p, ref in zip(ours.parameters(), params):
            torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-7)
        assert (norm * k > 10.0) == bool(step % 2)  # large gradients clip, small ones do not


# ----------------------------------------------------------------------------------------------------
# ELMo and downstream use


def elmo_over(layers, mask, n_mixes, layer_norm):
    """An Elmo whose frozen biLM returns the given layers."""
    bilm = tiny_model(0)
    bilm.activations = lambda chars, state=None: (layers, mask, None)
    return elmo.Elmo(bilm, n_mixes, 0.0, layer_norm)


@given(seed=st.integers(0, 1000), layer_norm=st.booleans())
@settings(max_examples=10)
def test_scalar_mix(seed, layer_norm):
    g = torch.Generator().manual_seed(seed)
    layers = torch.randn(2, 3, 5, 4, generator=g) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mix = elmo_over(layers, mask, 2, layer_norm)
    with torch.no_grad():
        mix.w.copy_(torch.randn(2, 3, generator=g))
        mix.gamma.copy_(torch.tensor([1.7, 0.3]))
    s = mix.w.softmax(-1)
    assert torch.allclose(s.sum(-1), torch.ones(2))
    out = mix(None)
    if layer_norm:  # one mean and variance per layer over every unmasked element of the batch
        m = mask[:, None, :, None].expand_as(layers)
        normed = torch.stack([(layers[:, j] - layers[:, j][m[:, j]].mean()) /
                              torch.sqrt(layers[:, j][m[:, j]].var(unbiased=False) + 1e-12) for j in range(3)], 1)
        garbage = elmo_over(layers.masked_fill(~m, 1e3), mask, 2, True)  # padding does not enter the statistics
        garbage.load_state_dict(mix.state_dict())
        torch.testing.assert_close(garbage(None)[:, mask], out[:, mask])
    else:
        normed = layers
    for k, gamma in enumerate((1.7, 0.3)):
        torch.testing.assert_close(out[k], gamma * (s[k][None, :, None, None] * normed).sum(1))
    (out.sum() + (mix.w ** 2).sum()).backward()
    assert mix.w.grad.abs().sum() > 0 and (mix.gamma.grad.abs() > 0).all()


def test_biLM_frozen_in_downstream_use():
    torch.manual_seed(0)
    bilm = elmo.build_model(dataclasses.replace(TINY, dropout=0.5))  # its dropout must stay off inside ELMo
    before = {k: v.clone() for k, v in bilm.state_dict().items()}
    cfg = dataclasses.replace(TINY, elmo_output=True, task_dropout=0.0)
    model = elmo.Classifier(cfg, 10, 2, bilm).train()
    assert model.elmo.w.shape == (2, TINY.n_layer + 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 0.1)
    ids = word_ids(0, 3, 4)
    batch = {"word_ids": ids % 10, "chars": WORD_CHARS[ids], "lengths": torch.tensor([4, 2, 1]),
             "labels": torch.tensor([0, 1, 1])}
    torch.testing.assert_close(model.elmo(batch["chars"]), model.elmo(batch["chars"]))  # no dropout in the biLM
    for _ in range(2):
        opt.zero_grad()
        elmo.task_loss(model, batch, 0.01).backward()
        assert all(p.grad is None for p in bilm.parameters())
        assert (model.elmo.w.grad.abs().sum(-1) > 0).all() and (model.elmo.gamma.grad.abs() > 0).all()
        opt.step()
    for k, v in bilm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_task_loss_adds_the_l2_penalty_on_the_mix_weights():
    model = classifier(0)
    with torch.no_grad():
        model.elmo.w.fill_(0.5)
    ids = word_ids(1, 2, 3)
    batch = {"word_ids": ids, "chars": WORD_CHARS[ids], "lengths": torch.tensor([3, 2]), "labels": torch.tensor([0, 2])}
    plain = F.cross_entropy(model(batch["word_ids"], batch["chars"], batch["lengths"]), batch["labels"])
    torch.testing.assert_close(elmo.task_loss(model, batch, 0.1), plain + 0.1 * 0.25 * model.elmo.w.numel())


# ----------------------------------------------------------------------------------------------------
# The released weights (../shared/data/elmo-fixtures, from AllenNLP's tests)


def released(shared_data):
    pytest.importorskip("h5py")
    fx = shared_data / "elmo-fixtures"
    model, _, _ = elmo.load_allennlp(str(fx / "options.json"), str(fx / "lm_weights.hdf5"), TINY)
    return model.eval(), fx


def test_released_weights_top_layer_parity_stateful(shared_data):
    """TensorFlow carried the state from batch to batch, per row (3 streams x 10 batches); we pass it along."""
    import h5py
    model, fx = released(shared_data)
    sentences = json.loads((fx / "sentences.json").read_text())
    state = None
    for i in range(10):
        batch = [sentences[k][i].split() for k in range(3)]
        with torch.no_grad():
            layers, mask, state = model.activations(elmo.batch_chars(batch), state)
        assert mask.sum(1).tolist() == [len(s) for s in batch]
        for k in range(3):
            with h5py.File(fx / f"lm_embeddings_{k}.hdf5", "r") as f:
                expected = np.concatenate([f[str(i)][0], f[str(i)][1]], axis=-1)
            np.testing.assert_allclose(layers[k, 2, :len(batch[k])].numpy(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the last batch from a zero state differs: the carried state matters
        fresh, _, _ = model.activations(elmo.batch_chars(batch))
    assert not torch.allclose(fresh[:, 2], layers[:, 2], atol=1e-4)


def test_released_weights_token_embeddings(shared_data):
    import h5py
    model, fx = released(shared_data)
    words = (fx / "vocab_test.txt").read_text().strip().split("\n")
    with torch.no_grad():
        got = model.token_embedder(elmo.batch_chars([words]))[0][0].numpy()
    with h5py.File(fx / "elmo_token_embeddings.hdf5", "r") as f:
        np.testing.assert_allclose(got, f["embedding"][...], atol=1e-5, rtol=1e-5)


def test_embed_stage_writes_the_layers_in_fp32_under_auto(shared_data, tmp_path):
    """The suite's --dtype auto is bf16; embed still computes the vectors in fp32 (they are what a user keeps)."""
    pytest.importorskip("h5py")
    import h5py
    fx = shared_data / "elmo-fixtures"
    text = tmp_path / "s.txt"
    text.write_text("the cat sat\na naïve\u2028dog\n\nend\n")  # U+2028 splits words, not lines; an empty line
    out = elmo.main(["embed", "--init_from", f"allennlp:{fx / 'options.json'},{fx / 'lm_weights.hdf5'}",
                     "--embed_file", str(text), "--out_dir", str(tmp_path / "e")])
    model, _ = released(shared_data)
    with torch.no_grad():
        layers, _, _ = model.activations(elmo.batch_chars([["a", "naïve", "dog"]]))
    with h5py.File(tmp_path / "e" / "elmo.hdf5", "r") as f:
        assert out["sentences"] == 4 and sorted(f) == ["0", "1", "2", "3"]
        assert f["0"].shape == (3, 3, 32) and f["2"].shape == (3, 0, 32) and f["3"].shape == (3, 1, 32)
        np.testing.assert_allclose(f["1"][...], layers[0].numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Training, resume and the command line


def test_resume_with_the_carried_state_equals_uninterrupted(tmp_path):
    """Stopped at step 3 and resumed equals the uninterrupted run: the carried LSTM state is in the checkpoint's data
    position (on the CPU), not in the model; a resume from a zeroed state would differ."""
    run = lambda out, *extra: elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / out),
                                         "--n_negative", "16", *extra])
    straight = run("a")
    run("b", "--max_steps", "3")
    b3 = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    h, c = b3["data"][0]["position"]["state"]
    assert h.shape == (2, TINY.n_layer, TINY.batch_size, TINY.proj_dim) and c.shape[-1] == TINY.lstm_dim
    assert h.device.type == "cpu" and h.abs().sum() > 0 and b3["data"][0]["position"]["pos"] == 3 * TINY.unroll_steps
    assert not any("extra_state" in k for k in b3["model"])
    (tmp_path / "z").mkdir()
    b3["data"][0]["position"]["state"] = (torch.zeros_like(h), torch.zeros_like(c))
    torch.save(b3, tmp_path / "z" / "ckpt.pt")
    resumed, zeroed = run("b", "--resume"), run("z", "--resume")
    assert resumed["loss"] == straight["loss"] and zeroed["loss"] != straight["loss"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["data"][0]["position"]["state"], b["data"][0]["position"]["state"]))
    # bilm-tf's optimiser for unroll_steps 6: the clip 10/6 and the accumulator from 1/36
    assert a["config"]["grad_clip"] == 10 / 6 and a["optimizer"]["param_groups"][0]["initial_accumulator_value"] == 1 / 36


def test_evaluation_reads_the_validation_stream_from_a_zero_state(tmp_path):
    elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path), "--max_steps", "2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model = elmo.build_model(dataclasses.replace(TINY, **{k: ckpt["config"][k] for k in elmo.ARCH_FIELDS}))
    model.load_state_dict(ckpt["model"])
    _, train_text, val_text = elmo.load_lm_text("builtin")
    train_words, val_words = elmo.sentence_stream(train_text), elmo.sentence_stream(val_text)
    table = elmo.WordTable(ckpt["vocab"], train_words, val_words, 0)
    val = elmo.StreamSampler(val_words, table, TINY.batch_size, TINY.unroll_steps, "validation")
    with torch.no_grad():
        n = min(val.windows, TINY.eval_batches)
        loss = sum(elmo.pretrain_loss(model.eval(), next(val), val).item() for _ in range(n)) / n
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n") if line]
    assert math.isclose([r for r in logged if r["split"] == "val"][-1]["loss"], loss, rel_tol=1e-6)


def test_task_and_embed_from_a_pretrained_biLM(tmp_path, monkeypatch, capsys):
    pytest.importorskip("h5py")
    import h5py
    elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "lm"), "--max_steps", "2"])
    out = elmo.main(["task", *TINY_ARGS, "--task_data", "builtin", "--init_from", str(tmp_path / "lm" / "ckpt.pt"),
                     "--out_dir", str(tmp_path / "task"), "--layer_norm", "--elmo_output", "--max_steps", "3"])
    assert 0 <= out["acc"] <= 1 and out["data"] == "builtin-synthetic"
    lm = torch.load(tmp_path / "lm" / "ckpt.pt", weights_only=False)["model"]
    clf = torch.load(tmp_path / "task" / "ckpt.pt", weights_only=False)["model"]
    for k, v in lm.items():
        assert torch.equal(clf["elmo.bilm." + k], v), k
    lines = [json.loads(line) for line in (tmp_path / "task" / "metrics.jsonl").read_text().split("\n") if line]
    assert {"train", "val"} <= {line["split"] for line in lines} and all("loss" in line for line in lines)
    resumed = elmo.main(["task", *TINY_ARGS, "--task_data", "builtin", "--out_dir", str(tmp_path / "task"),
                         "--layer_norm", "--elmo_output", "--resume"])  # the biLM comes from the checkpoint itself
    assert resumed["step"] > 3
    text = tmp_path / "s.txt"
    text.write_text("the cat sat on the mat\nnaïve !\n")
    elmo.main(["embed", *TINY_ARGS, "--init_from", str(tmp_path / "lm" / "ckpt.pt"), "--embed_file", str(text),
               "--out_dir", str(tmp_path / "e")])
    model, _, _ = elmo.load_pretrained(dataclasses.replace(TINY, init_from=str(tmp_path / "lm" / "ckpt.pt")))
    with torch.no_grad():
        layers, _, _ = model.eval().activations(elmo.batch_chars([["the", "cat", "sat", "on", "the", "mat"],
                                                                  ["naïve", "!"]]))
    with h5py.File(tmp_path / "e" / "elmo.hdf5", "r") as f:
        np.testing.assert_allclose(f["0"][...], layers[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(f["1"][...], layers[1, :, :2].numpy(), atol=1e-6)
    monkeypatch.setitem(sys.modules, "h5py", None)  # embed writes hdf5 only: without h5py, one line naming it
    assert "pip install h5py" in error_of(capsys, ["embed", *TINY_ARGS, "--init_from", str(tmp_path / "lm" / "ckpt.pt"),
                                                    "--embed_file", str(text), "--out_dir", str(tmp_path / "e2")])


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        elmo.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_errors_through_the_command_line(capsys, tmp_path, monkeypatch):
    """elmo.py's own checks (the harness's generic ones are tests/test_harness.py's): one line, status 2."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    sents = tmp_path / "s.txt"
    sents.write_text("a b\n")
    bad_tsv = tmp_path / "bad"
    bad_tsv.mkdir()
    (bad_tsv / "train.tsv").write_text("1\tgood film\n0\n")
    (bad_tsv / "dev.tsv").write_text("1\tfine\n")
    cases = [
        (["pretrain", *TINY_ARGS, "--data", "nosuchdata"], "unknown dataset"),
        (["pretrain", *TINY_ARGS, "--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["pretrain", *TINY_ARGS, "--data", str(empty)], "is empty"),
        (["pretrain", *TINY_ARGS, "--proj_dim", "0"], "--proj_dim must be positive"),
        (["pretrain", *TINY_ARGS, "--n_layer", "-1"], "--n_layer must be positive"),
        (["pretrain", *TINY_ARGS, "--dropout", "1.0"], "--dropout and --task_dropout must be in [0, 1)"),
        (["pretrain", *TINY_ARGS, "--vocab_size", "2"], "--vocab_size 0 or at least 4"),
        (["pretrain", *TINY_ARGS, "--filters", "3y16"], "--filters must look like"),
        (["pretrain", *TINY_ARGS, "--filters", "60x4"], "--filters must look like"),
        (["pretrain", *TINY_ARGS, "--batch_size", "100000"], "too few"),
        (["task", *TINY_ARGS, "--task_data", "builtin"], "needs --init_from"),
        (["task", *TINY_ARGS, "--no-use_elmo", "--task_data", str(bad_tsv)], "expected label<TAB>text"),
        (["task", *TINY_ARGS, "--no-use_elmo", "--task_data", str(tmp_path / "nodir")], "neither sst2"),
        (["embed", *TINY_ARGS, "--init_from", "x.pt"], "needs --embed_file"),
        (["embed", *TINY_ARGS, "--embed_file", str(sents)], "needs --init_from"),
        (["task", *TINY_ARGS, "--init_from", "allennlp:only-one-path"], "OPTIONS_JSON,WEIGHTS_HDF5"),
        (["task", *TINY_ARGS, "--init_from", f"allennlp:{sents},{sents}"], "is not an ELMo options file"),
    ]
    for argv, message in cases:
        assert message in error_of(capsys, argv), argv
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"lstm": {"n_layers": 1, "dim": 8, "projection_dim": 4}, "char_cnn": {
        "embedding": {"dim": 4}, "filters": [[1, 4]], "n_highway": 1, "max_characters_per_token": 50}}))
    if importlib.util.find_spec("h5py"):
        assert "not an hdf5 file" in error_of(capsys, ["embed", *TINY_ARGS, "--embed_file", str(sents),
                                                       "--init_from", f"allennlp:{options},{sents}"])
    (bad_tsv / "train.tsv").write_text("1\tgood film\n0\tbad film\n")
    (bad_tsv / "dev.tsv").write_text("2\tfine\n")
    out = elmo.main(["task", *TINY_ARGS, "--no-use_elmo", "--task_data", str(bad_tsv),
                     "--out_dir", str(tmp_path / "t")])
    assert out["acc"] == 0.0 and "unseen in training" in capsys.readouterr().out  # counted as errors
    assert "--use_elmo False" in error_of(capsys, ["task", *TINY_ARGS, "--task_data", str(bad_tsv), "--out_dir",
                                                    str(tmp_path / "t"), "--resume", "--init_from", "x.pt"])
    elmo.main(["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "lm"), "--max_steps", "1"])
    assert "lstm_dim" in error_of(capsys, ["pretrain", *TINY_ARGS, "--out_dir", str(tmp_path / "lm"),
                                            "--resume", "--lstm_dim", "12"])
    assert "is a task checkpoint, not pretrain" in error_of(capsys, ["task", *TINY_ARGS, "--task_data", str(bad_tsv),
                                                                     "--init_from", str(tmp_path / "t" / "ckpt.pt"),
                                                                     "--out_dir", str(tmp_path / "t2")])
    monkeypatch.setitem(sys.modules, "h5py", None)  # the released-weights loader names h5py when it is missing
    assert "pip install h5py" in error_of(capsys, ["task", *TINY_ARGS, "--init_from", f"allennlp:{empty},{empty}"])


def test_smoke_main_job_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "elmo.py"), *TINY_ARGS, "--task_data", "builtin",
                        "--out_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    claim = [line for line in r.stdout.split("\n") if line.startswith("claim: ")]
    assert len(claim) == 1 and claim[0].startswith("claim: builtin-synthetic dev accuracy "), r.stdout[-2000:]
    assert "with ELMo vs without" in claim[0] and "200 labels" in claim[0], claim
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n") if line]
    assert len(records) == 1 and records[0]["split"] == "claim", records
    record = records[0]
    assert record["task"] == "builtin-synthetic" and record["metric"] == "dev accuracy" and record["differs"] in claim[0]
    assert 0 <= record["with"] <= 100 and 0 <= record["without"] <= 100
    assert claim[0].startswith(f"claim: builtin-synthetic dev accuracy {record['with']:.1f} vs {record['without']:.1f} (")
    for stage in ("pretrain", "task", "baseline"):
        assert (tmp_path / stage / "ckpt.pt").is_file() and (tmp_path / stage / "metrics.jsonl").is_file()
    assert (tmp_path / "pretrain" / "best.pt").is_file()  # the task with ELMo starts from the best biLM
    assert r.stdout.count("task on builtin-synthetic: 200 train / 400 dev") == 2  # both arms: 200 of the 2,000


@pytest.mark.slow
def test_each_rank_carries_the_state_of_its_own_rows_under_torchrun(tmp_path):
    """Two Gloo ranks: every rank's data position (its offset and carried state, on the CPU) is in the checkpoint, and
    a resumed run takes each rank's own back."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *extra: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node=2", str(ROOT / "elmo.py"), "pretrain", *TINY_ARGS,
                                         "--out_dir", str(tmp_path / "out"), *extra],
                                        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    r = run("--max_steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    data = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["data"]
    (h0, _), (h1, _) = (d["position"]["state"] for d in data)
    assert len(data) == 2 and h0.device.type == h1.device.type == "cpu" and not torch.equal(h0, h1)
    r = run("--resume")
    assert r.returncode == 0 and "resumed pretrain" in r.stdout, r.stderr[-3000:]
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["step"] == TINY.total_steps
