"""Benchmarks for transformer.py (results in bench/RESULTS.md).

throughput: one training step (forward, label-smoothed loss, backward, Adam) of our model against a model of
  the same size built from torch.nn.Transformer with the same shared embedding, sinusoids, tied output layer
  and loss; same batch, same dtype, same process, both eager. Warm-up first, then the median of interleaved
  repeats; ratio = reference time / our time (above 1: ours is faster).
quality: the main job (issue 13) on a local Multi30k de->en (../shared/data/multi30k): train the small preset,
  average its last kept copies, then test2016 BLEU (sacreBLEU 13a, computed in-file) of beam search (beam 4) and
  of greedy decoding; prints the claim with the wall and CPU time it took. Any other flag goes to transformer.py
  (e.g. --max_steps 60 for a quick look, or the 30-minute version's flags of bench/RESULTS.md).

  python bench/bench_transformer.py throughput [--repeats 5] [--steps 3]
  python bench/bench_transformer.py quality [--data ../shared/data/multi30k] [transformer.py flags]
"""
import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transformer as T  # noqa: E402


class TorchReference(nn.Module):
    """nn.Transformer (post-LN, ReLU) between the same embedding, positional encoding and tied output layer."""

    def __init__(self, cfg: T.Config):
        super().__init__()
        self.cfg, self.pad = cfg, cfg.vocab_size - 1
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("pe", T.sinusoids(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.core = nn.Transformer(cfg.d_model, cfg.n_head, cfg.n_layer, cfg.n_layer, cfg.d_ff, cfg.dropout,
                                   batch_first=True, layer_norm_eps=1e-6)

    def emb(self, ids):
        return self.drop(self.embed(ids) * math.sqrt(self.cfg.d_model) + self.pe[:ids.size(1)])

    def forward(self, src, tgt_in):
        causal = torch.ones(tgt_in.size(1), tgt_in.size(1), dtype=torch.bool).triu(1)
        h = self.core(self.emb(src), self.emb(tgt_in), tgt_mask=causal, src_key_padding_mask=src == self.pad,
                      memory_key_padding_mask=src == self.pad, tgt_key_padding_mask=tgt_in == self.pad)
        return h @ self.embed.weight.T


def step_time(model, batch, opt, ctx, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        with ctx:
            loss = T.pretrain_loss(model, batch, label_smoothing=0.1)  # <pad> is the last id in both models
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def measured_peak(dtype, n=1024, reps=5):
    """Dense matmul FLOP/s of this CPU in this dtype (the harness's measure): the denominator of MFU."""
    a = torch.full((n, n), 0.5, dtype=dtype)
    a @ a
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def throughput(args):
    # the small preset's shape before issue 13 (d_ff 1024, dropout 0.1, an 8k vocabulary), as in bench/RESULTS.md
    cfg = dataclasses.replace(T.PRESETS["small"], n_layer=3, d_model=256, d_ff=1024, n_head=4, dropout=0.1,
                              vocab_size=8000)
    g = torch.Generator().manual_seed(0)
    B, S, L = args.batch, args.length, args.length
    src = torch.randint(0, cfg.vocab_size - 3, (B, S), generator=g)
    tgt = torch.randint(0, cfg.vocab_size - 3, (B, L + 1), generator=g)
    batch = {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}
    print(f"threads {torch.get_num_threads()}, small preset (d_model {cfg.d_model}, {cfg.n_layer}+{cfg.n_layer} "
          f"layers, vocab {cfg.vocab_size}), batch {B} x ({S} + {L}) tokens")
    for dtype in (torch.float32, torch.bfloat16):
        ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
        torch.manual_seed(0)
        ours, ref = T.build_model(cfg).train(), TorchReference(cfg).train()
        n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
        assert n_ref - n_ours == 4 * cfg.d_model  # nn.Transformer always adds a final LayerNorm to each stack
        opts = {name: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
                for name, m in (("ours", ours), ("ref", ref))}
        for name, m in (("ours", ours), ("ref", ref)):  # warm-up
            step_time(m, batch, opts[name], ctx, 1)
        times = {"ours": [], "ref": []}
        for _ in range(args.repeats):  # interleaved
            for name, m in (("ours", ours), ("ref", ref)):
                times[name].append(step_time(m, batch, opts[name], ctx, args.steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = B * (S + L)
        peak = measured_peak(dtype)
        mfu = tokens / med["ours"] * ours.flops_per_token(S, L) / peak
        print(f"{str(dtype).replace('torch.', ''):9s} ours {med['ours'] * 1e3:7.1f} ms/step "
              f"({tokens / med['ours']:,.0f} tok/s, MFU {mfu:.1%} of a measured {peak / 1e9:.0f} GFLOP/s), "
              f"nn.Transformer {med['ref'] * 1e3:7.1f} ms/step, ratio {med['ref'] / med['ours']:.2f}x")


def quality(args, flags):
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_transformer_"))
    t0, c0 = time.time(), time.process_time()
    T.main(["--data", args.data, "--out_dir", str(out), *flags])
    wall, cpu = time.time() - t0, time.process_time() - c0
    claim = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert claim["split"] == "claim", claim
    print(f"{claim['task']} BLEU {claim['with']:.2f} vs {claim['without']:.2f} ({claim['differs']}); {wall:.0f} s wall, "
          f"{cpu:.0f} s CPU, {torch.get_num_threads()} threads; flags: {' '.join(flags) or 'none (the small preset)'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["throughput", "quality"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=24)
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data/multi30k"))
    p.add_argument("--out_dir", default="", help="a new folder (default: a fresh temporary one)")
    a, rest = p.parse_known_args()
    if rest and a.what == "throughput":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    throughput(a) if a.what == "throughput" else quality(a, rest)
