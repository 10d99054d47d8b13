"""ulmfit.py benchmarks (results in bench/RESULTS.md).

  python bench/bench_ulmfit.py throughput [--preset small] [--repeats 5]
      tokens/s of one AWD-LSTM LM training step (five dropouts, AR, TAR, Adam) against a plain stack of
      nn.LSTMs of the same sizes with a tied decoder and no regularisers: same dtype (fp32), same batch,
      same process, both eager, warm-up first, then the median of interleaved repeats, as a ratio.
  python bench/bench_ulmfit.py ptb [--minutes M]
      the small preset pretrained on ../shared/data/ptb for at most M minutes of wall time; prints the
      validation perplexity over the whole validation split.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ulmfit  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class PlainLM(nn.Module):
    """The same sizes as ulmfit.LanguageModel: embedding, n_layers nn.LSTMs, tied decoder; no dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        sizes = [cfg.emb_size] + [cfg.n_hid] * (cfg.n_layers - 1) + [cfg.emb_size]
        self.rnns = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(cfg.n_layers))
        self.decoder = nn.Linear(cfg.emb_size, cfg.vocab_size)
        self.decoder.weight = self.embedding.weight

    def forward(self, ids):
        x = self.embedding(ids)
        for rnn in self.rnns:
            x, _ = rnn(x)
        return self.decoder(x)


def throughput(args):
    cfg = dataclasses.replace(ulmfit.PRESETS[args.preset], vocab_size=args.vocab)
    torch.manual_seed(0)
    awd, plain = ulmfit.build_model(cfg).train(), PlainLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.bptt + 1))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "reset": torch.tensor(False)}

    def awd_loss():
        return ulmfit.pretrain_loss(awd, batch)

    def plain_loss():
        return F.cross_entropy(plain(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())

    runs = {"awd": (awd, awd_loss), "plain": (plain, plain_loss)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.7, 0.99)) for k, (m, _) in runs.items()}

    def steps(name, n):
        _, loss_fn = runs[name]
        t0 = time.perf_counter()
        for _ in range(n):
            loss = loss_fn()
            loss.backward()
            nn.utils.clip_grad_norm_(runs[name][0].parameters(), 0.3)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return n * cfg.batch_size * cfg.bptt / (time.perf_counter() - t0)

    for name in runs:
        steps(name, 2)  # warm-up
    tok = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:  # interleaved
            tok[name].append(steps(name, args.steps))
    med = {k: statistics.median(v) for k, v in tok.items()}
    print(f"preset {args.preset}: emb {cfg.emb_size} hid {cfg.n_hid} layers {cfg.n_layers} vocab {cfg.vocab_size} "
          f"batch {cfg.batch_size} x bptt {cfg.bptt}, fp32, {torch.get_num_threads()} threads")
    for k in runs:
        print(f"{k:6s} tokens/s median {med[k]:.0f}  (repeats {[round(x) for x in tok[k]]})")
    print(f"ratio awd/plain {med['awd'] / med['plain']:.3f}")


def ptb(args):
    if not (SHARED / "ptb").is_dir():
        sys.exit("../shared/data/ptb is not there")
    cfg = ulmfit.PRESETS["small"]
    t0 = time.time()
    # run the whole schedule of a budget-sized run: steps chosen from a measured rate, so STLR ends
    result = ulmfit.main(["pretrain", "--preset", "small", "--data", str(SHARED / "ptb"), "--out_dir",
                          args.out_dir, "--total_steps", str(args.steps), "--eval_batches", "0",
                          "--eval_interval", str(args.steps), "--dtype", "float32", "--max_vocab", "10000",
                          "--min_freq", "1"])
    print(f"ptb small preset, {args.steps} steps of batch {cfg.batch_size} x bptt ~{cfg.bptt}: "
          f"val ppl {result['ppl']:.2f} in {time.time() - t0:.0f}s wall")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["throughput", "ptb"])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out_dir", default="/tmp/ulmfit-bench-ptb")
    a = p.parse_args()
    throughput(a) if a.what == "throughput" else ptb(a)
