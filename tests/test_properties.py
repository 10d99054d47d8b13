"""Cross-model properties, one test per property, parametrised over every script's rows.

Each tests/test_<model>.py defines `PROPERTY_ROWS`: a list of `Rows` objects (tests/rows.py) saying how to
build a tiny model of that script, feed it and read its outputs. A row leaves a hook as None where the
property does not apply to that model (no attention in an LSTM, no causality in BERT).
"""
import importlib
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

ROOT = Path(__file__).resolve().parent
ROWS = [row for f in sorted(ROOT.glob("test_*.py")) if f.stem not in ("test_properties", "test_copies")
        for row in getattr(importlib.import_module(f.stem), "PROPERTY_ROWS", [])]


def rows_with(hook):
    rows = [r for r in ROWS if getattr(r, hook) is not None]
    return pytest.mark.parametrize("row", rows, ids=[r.name for r in rows])


@rows_with("attention")
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 12))
def test_attention_shapes_and_rows_sum_to_one(row, seed, B, T):
    model = row.model(seed)
    ids = row.ids(seed, B, T)
    for att, (H, S) in row.attention(model, ids):
        assert att.shape[:2] == (B, H) and att.shape[-1] == S, att.shape
        assert torch.allclose(att.sum(-1), torch.ones(()), atol=1e-5)
        assert (att >= 0).all()


@rows_with("causal")
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(2, 12), data=st.data())
def test_causality(row, seed, B, T, data):
    """Changing tokens after t (before t for a backward LM) never changes the outputs at t."""
    model = row.model(seed)
    ids = row.ids(seed, B, T)
    t = data.draw(st.integers(0, T - 2))
    changed = ids.clone()
    later = slice(t + 1, None) if row.direction == "forward" else slice(0, t)
    changed[:, later] = row.ids(seed + 1, B, T)[:, later]
    if row.direction == "backward" and t == 0:
        return
    keep = slice(0, t + 1) if row.direction == "forward" else slice(t, None)
    a, b = row.causal(model, ids), row.causal(model, changed)
    torch.testing.assert_close(a[:, keep], b[:, keep], atol=1e-5, rtol=1e-5)


@rows_with("padded")
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 10), extra=st.integers(1, 6))
def test_padding_invariance(row, seed, B, T, extra):
    """Outputs at real positions ignore what sits at padded positions and how much padding there is."""
    model = row.model(seed)
    ids = row.ids(seed, B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    base = row.padded(model, ids, lengths)
    noise = row.ids(seed + 7, B, T + extra)
    noisy = noise.clone()
    noisy[:, :T] = ids
    real = torch.arange(T + extra)[None, :] < lengths[:, None]
    noisy = torch.where(real, noisy, noise)  # garbage after each sequence's end, and more of it
    other = row.padded(model, noisy, lengths)
    for b in range(B):
        n = lengths[b].item()
        torch.testing.assert_close(base[b][:n], other[b][:n], atol=1e-5, rtol=1e-5)


@rows_with("loss")
@given(seed=st.integers(0, 2**16))
def test_gradient_flow(row, seed):
    """One backward of the pretraining loss gives every trainable parameter a finite gradient, non-zero
    except where the row names a reason, and none to frozen parameters."""
    model = row.model(seed)
    model.train()
    loss = row.loss(model, seed)
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        if not any(name.startswith(z) for z in row.zero_grad_ok):
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@rows_with("rates")
@given(seed=st.integers(0, 2**16))
def test_masking_and_dropout_rates(row, seed):
    """Everything a script masks or drops at a configured rate happens at that rate: the observed count is
    within 5 standard deviations of the binomial mean (a false alarm about once in two million checks), and
    exactly never or always when the rate is 0 or 1. A wrong rate (15% read as 10%, a dropout applied twice
    or to the wrong axis) is many deviations away at the trial counts the rows use."""
    for what, hits, trials, rate in row.rates(seed):
        assert trials > 0, what
        if rate in (0.0, 1.0):
            assert hits == rate * trials, (what, hits, trials, rate)
            continue
        sd = math.sqrt(trials * rate * (1 - rate))
        assert abs(hits - trials * rate) <= 5 * sd, (what, hits, trials, rate)
