"""Throughput of elmo.py's biLM against the same biLM built from nn.LSTM(proj_size=...) (no clipping).

Same sizes, same dtype (fp32), same process, both eager; warm-up first, then the median of interleaved repeats, as a
ratio. One training step = pretrain_loss forward + backward + bilm-tf's Adagrad update (bilm_tf_adagrad, its clip
included) on a batch of the pretraining stream's shape (B rows x unroll_steps tokens, both directions), starting from
the state the previous step carried, as in training.

  python bench/bench_elmo.py [--preset small] [--repeats 5] [--threads 1]
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import elmo  # noqa: E402


class TorchLstmLayer(nn.Module):
    """nn.LSTM(proj_size=P) with LstmProjection's interface: no clipping, no padding mask (none in training)."""

    def __init__(self, d_in, cfg):
        super().__init__()
        self.lstm = nn.LSTM(d_in, cfg.lstm_dim, proj_size=cfg.proj_dim, batch_first=True)

    def forward(self, x, mask, state):
        h0, c0 = state
        out, (h, c) = self.lstm(x, (h0[None].contiguous(), c0[None].contiguous()))
        return out, (h[0], c[0])


class Carry:
    """Holds the state pretrain_loss hands back, as StreamSampler does in training."""
    state = None


def make(cfg, reference: bool):
    torch.manual_seed(0)
    model = elmo.build_model(cfg)
    if reference:
        for stack in model.stacks:
            for j in range(len(stack)):
                stack[j] = TorchLstmLayer(cfg.proj_dim, cfg)
    model.train()
    opt, clip = elmo.bilm_tf_adagrad(model, cfg)
    return model, opt, clip, Carry()


def step(model, opt, clip, carry, batch):
    state = {} if carry.state is None else {"h0": carry.state[0], "c0": carry.state[1]}
    loss = elmo.pretrain_loss(model, {**batch, **state}, carry)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small", choices=list(elmo.PRESETS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = elmo.PRESETS[args.preset]
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 20000)
    B, T = cfg.batch_size, cfg.unroll_steps
    g = torch.Generator().manual_seed(0)
    words = torch.randint(1, 200, (2, B, T, elmo.MAX_CHARS), generator=g)
    batch = {"fwd_chars": words[0], "bwd_chars": words[1],
             "fwd_targets": torch.randint(cfg.vocab_size, (B, T), generator=g),
             "bwd_targets": torch.randint(cfg.vocab_size, (B, T), generator=g)}
    runs = {"elmo.py (clipped cell loop)": make(cfg, False), "nn.LSTM(proj_size) reference": make(cfg, True)}
    times = {k: [] for k in runs}
    for run in runs.values():
        step(*run, batch)  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*run, batch)
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"preset {args.preset}: B={B} T={T} proj={cfg.proj_dim} cells={cfg.lstm_dim} vocab={cfg.vocab_size} "
          f"negatives={cfg.n_negative} fp32 threads={torch.get_num_threads()}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:32s} {2 * B * T / t:8.0f} tokens/s  ({t * 1000:.1f} ms/step, both directions)")
    ours, ref = med.values()
    print(f"  ratio elmo.py / nn.LSTM reference: {ref / ours:.2f}")


if __name__ == "__main__":
    main()
