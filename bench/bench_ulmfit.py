"""ulmfit.py benchmarks (results in bench/RESULTS.md).

  python bench/bench_ulmfit.py throughput [--preset small] [--repeats 5]
      tokens/s of one AWD-LSTM LM training step (five dropouts, AR, TAR, Adam) against a plain stack of
      nn.LSTMs of the same sizes with a tied decoder and no regularisers: same dtype (fp32), same batch,
      same process, both eager, warm-up first, then the median of interleaved repeats, as a ratio.
  python bench/bench_ulmfit.py ptb [--minutes 15]
      the small preset pretrained on ../shared/data/ptb within M minutes: a probe times a few training
      steps, the schedule (STLR) is sized to fit the budget with room for evaluation, and the validation
      perplexity is taken over the whole validation split.
  python bench/bench_ulmfit.py imdb [--minutes 30]
      the paper's Figure 3 in miniature: IMDb accuracy with 100 and 1,000 labelled reviews, three-stage
      ULMFiT (WikiText-2 LM -> IMDb LM -> classifier) against the same classifier trained from scratch,
      all within M minutes of CPU time (process time, all threads), every stage timed. The main job
      (`python ulmfit.py`) now runs the 100-label comparison itself and writes it as its claim line; this
      mode adds the 1,000-label point and sizes the LM stages to a CPU budget.
"""
import argparse
import json
import dataclasses
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ulmfit  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class PlainLM(nn.Module):
    """The same sizes as ulmfit.LanguageModel: embedding, n_layer nn.LSTMs, tied decoder; no dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        sizes = [cfg.emb_size] + [cfg.n_hid] * (cfg.n_layer - 1) + [cfg.emb_size]
        self.rnns = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(cfg.n_layer))
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
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

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
    print(f"preset {args.preset}: emb {cfg.emb_size} hid {cfg.n_hid} layers {cfg.n_layer} vocab {cfg.vocab_size} "
          f"batch {cfg.batch_size} x bptt {cfg.bptt}, fp32, {torch.get_num_threads()} threads")
    for k in runs:
        print(f"{k:6s} tokens/s median {med[k]:.0f}  (repeats {[round(x) for x in tok[k]]})")
    print(f"ratio awd/plain {med['awd'] / med['plain']:.3f}")


def probe_steps(data: str, minutes: float, share: float, max_vocab: int, min_freq: int) -> int:
    """LM training steps of the small preset that fit share * minutes: a few steps are timed on the
    real vocabulary size (process time, so other jobs on the machine do not shrink the budget)."""
    cfg = ulmfit.PRESETS["small"]
    vocab = len(ulmfit.build_vocab(Counter(ulmfit.lm_tokens(ulmfit.load_lm_text(data)[1])), max_vocab, min_freq))
    model = ulmfit.build_model(dataclasses.replace(cfg, vocab_size=vocab)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.7, 0.99))
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.bptt + 1))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    for k in range(8):
        if k == 2:
            t0 = time.process_time()
        ulmfit.pretrain_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    per_step = (time.process_time() - t0) / 6
    return int(minutes * 60 * share / per_step)


def ptb(args):
    if not (SHARED / "ptb").is_dir():
        sys.exit("../shared/data/ptb is not there")
    t0, c0 = time.time(), time.process_time()
    # PTB is already a 10k-word vocabulary: keep every word (min_freq 1)
    steps = probe_steps(str(SHARED / "ptb"), args.minutes, 0.88, 10000, 1)  # the rest: probe, vocab, eval
    result = ulmfit.main(["pretrain", "--preset", "small", "--data", str(SHARED / "ptb"), "--out_dir",
                          args.out_dir, "--total_steps", str(steps), "--eval_batches", "0",
                          "--eval_interval", str(steps), "--dtype", "float32", "--log_interval", "100",
                          "--max_vocab", "10000", "--min_freq", "1"])
    print(f"ptb small preset, {steps} steps of batch 32 x bptt ~70: val ppl {result['ppl']:.2f} in "
          f"{time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU, {torch.get_num_threads()} threads")


def imdb(args):
    for d in ("imdb", "wikitext-2"):
        if not (SHARED / d).is_dir():
            sys.exit(f"../shared/data/{d} is not there")
    out, budget = Path(args.out_dir), args.minutes
    t0, c0, rows = time.time(), time.process_time(), []

    def stage(name, argv):
        w, c = time.time(), time.process_time()
        r = ulmfit.main(argv + ["--preset", "small", "--dtype", "float32", "--seed", str(args.seed)])
        rows.append({"run": name, **{k: r[k] for k in ("ppl", "acc") if k in r},
                     "wall_s": round(time.time() - w), "cpu_s": round(time.process_time() - c)})
        print(json.dumps(rows[-1]), flush=True)
        return r

    wt2, task = str(SHARED / "wikitext-2"), str(SHARED / "imdb")
    small = ulmfit.PRESETS["small"]
    s1 = probe_steps(wt2, budget, args.pretrain_share, small.max_vocab, small.min_freq)
    s2 = int(s1 * args.finetune_share / args.pretrain_share)
    stage("pretrain", ["pretrain", "--data", wt2, "--out_dir", str(out / "wt2"), "--total_steps", str(s1),
                       "--eval_interval", str(s1), "--log_interval", "100"])
    stage("finetune-lm", ["finetune-lm", "--init_from", str(out / "wt2" / "ckpt.pt"), "--task_data", task,
                          "--out_dir", str(out / "imdb-lm"), "--finetune_steps", str(s2), "--eval_interval",
                          str(s2), "--lm_tokens", str(args.lm_tokens), "--log_interval", "100"])
    for n in (100, 1000):
        common = ["classify", "--task_data", task, "--n_train", str(n), "--clf_epochs", str(args.epochs[n]),
                  "--clf_batch_size", str(args.batch[n]),
                  "--eval_interval", "100000", "--eval_examples", str(args.eval_examples)]
        stage(f"ulmfit-{n}", common + ["--init_from", str(out / "imdb-lm" / "ckpt.pt"),
                                       "--out_dir", str(out / f"ulmfit-{n}")])
        stage(f"scratch-{n}", common + ["--lr_decay", "1", "--no-gradual_unfreezing",
                                        "--out_dir", str(out / f"scratch-{n}")])
    print(f"total: {time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU "
          f"({(time.process_time() - c0) / 60:.1f} CPU-minutes, budget {budget}), {torch.get_num_threads()} threads")
    for n in (100, 1000):
        acc = {r["run"]: r["acc"] for r in rows if "acc" in r}
        print(f"{n} labels: ULMFiT {acc[f'ulmfit-{n}']:.4f}  from scratch {acc[f'scratch-{n}']:.4f}  "
              f"difference {100 * (acc[f'ulmfit-{n}'] - acc[f'scratch-{n}']):+.1f} points")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["throughput", "ptb", "imdb"])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--minutes", type=float, default=None, help="budget (default 15 for ptb, 30 for imdb)")
    p.add_argument("--out_dir", default="/tmp/ulmfit-bench")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--pretrain_share", type=float, default=0.13, help="imdb: share of the budget for stage 1")
    p.add_argument("--finetune_share", type=float, default=0.13, help="imdb: share of the budget for stage 2")
    p.add_argument("--lm_tokens", type=int, default=2_000_000, help="imdb: IMDb text for LM fine-tuning")
    # 100 labels: batches of 8 for 20 epochs (240 steps; in batches of 32 an epoch is 3 steps, and 30 steps
    # left the classifier at the class prior); 1,000 labels: batches of 32 for 3 epochs (93 steps)
    p.add_argument("--epochs_100", type=int, default=20)
    p.add_argument("--batch_100", type=int, default=8)
    p.add_argument("--epochs_1000", type=int, default=3)
    p.add_argument("--batch_1000", type=int, default=32)
    p.add_argument("--eval_examples", type=int, default=1000)
    a = p.parse_args()
    a.epochs = {100: a.epochs_100, 1000: a.epochs_1000}
    a.batch = {100: a.batch_100, 1000: a.batch_1000}
    a.minutes = a.minutes or (15 if a.what == "ptb" else 30)
    {"throughput": throughput, "ptb": ptb, "imdb": imdb}[a.what](a)
