"""Benchmarks for gpt.py (results in bench/RESULTS.md).

throughput: gpt.py's training step against Hugging Face GPT2LMHeadModel at the same config (6 layers,
  6 heads, width 384, context 256, batch 16, vocab 65, no dropout), same process, same weights, eager,
  fp32 and bf16 autocast. Warm-up, then the median of interleaved repeats, reported as a ratio; MFU
  against this machine's measured matmul peak in that dtype.
quality: the nanoGPT CPU shakespeare config, run through gpt.py's command line and timed end to end.

  python bench/bench_gpt.py throughput [--repeats 7]
  python bench/bench_gpt.py quality --data ../shared/data/tinyshakespeare/input.txt
"""
import argparse
import contextlib
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import gpt  # noqa: E402


def peak_flops(dtype, n=2048, reps=10):
    a = torch.full((n, n), 0.5, dtype=dtype)
    for _ in range(3):
        a @ a
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def interleaved_medians(runs: dict, ctx, steps: int, repeats: int) -> dict:
    """{name: (model, loss_fn)} -> {name: median seconds per training step (loss, backward, AdamW)}: one
    warm-up round, then `repeats` rounds interleaved so that both sides share the machine's noise."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in runs.items()}

    def step(name):
        m, loss_fn = runs[name]
        t0 = time.perf_counter()
        for _ in range(steps):
            with ctx:
                loss = loss_fn(m)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    for name in runs:  # warm-up
        step(name)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name in runs:
            times[name].append(step(name))
    return {k: statistics.median(v) for k, v in times.items()}


def throughput(repeats: int, steps: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = dataclasses.replace(gpt.PRESETS["tiny"], arch="gpt2", n_layer=6, n_head=6, d_model=384, block_size=256,
                              vocab_size=65, dropout=0.0)
    ours = gpt.build_model(cfg)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=256, n_embd=384, n_layer=6, n_head=6,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    x = torch.randint(65, (16, 256))
    y = torch.randint(65, (16, 256))
    flops_per_step = ours.flops_per_token() * x.numel()

    def ours_loss(m):
        return gpt.pretrain_loss(m, {"input_ids": x, "targets": y})

    def hf_loss(m):
        return F.cross_entropy(m(x).logits.float().flatten(0, 1), y.flatten())  # same loss as ours

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"attention: HF {hf.config._attn_implementation}, ours SDPA")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        med = interleaved_medians({"gpt.py": (ours, ours_loss), "hf": (hf, hf_loss)}, ctx, steps, repeats)
        peak = peak_flops(dtype)
        label = "bf16" if dtype == torch.bfloat16 else "fp32"
        results[label] = med
        print(f"{label}: gpt.py {med['gpt.py'] * 1e3:.1f} ms/step, HF {med['hf'] * 1e3:.1f} ms/step, "
              f"ratio (HF time / gpt.py time) {med['hf'] / med['gpt.py']:.2f}x; matmul peak {peak / 1e9:.0f} GFLOP/s, "
              f"MFU gpt.py {flops_per_step / med['gpt.py'] / peak:.1%}, HF {flops_per_step / med['hf'] / peak:.1%}")
    return results


def quality(data: str, extra: list[str]):
    """nanoGPT's README CPU run: 4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations,
    lr 1e-3 cosine to 1e-4 with 100 warm-up steps, no dropout, AdamW betas (0.9, 0.99), weight decay 0.1,
    clip 1.0, eval every 250 steps on 20 batches. Timed end to end, start-up and evaluation included."""
    cmd = [sys.executable, str(ROOT / "gpt.py"), "pretrain", "--data", data, "--tokenizer", "char",
           "--arch", "gpt2", "--n_layer", "4", "--n_head", "4", "--d_model", "128", "--block_size", "64",
           "--batch_size", "12", "--total_steps", "2000", "--lr", "1e-3", "--min_lr", "1e-4",
           "--warmup_steps", "100", "--dropout", "0", "--beta2", "0.99", "--weight_decay", "0.1",
           "--grad_clip", "1.0", "--eval_interval", "250", "--eval_batches", "20", "--log_interval", "250",
           *extra]
    with tempfile.TemporaryDirectory() as tmp:  # a fresh out_dir for every run (gpt.py refuses to reuse one)
        print(" ".join(cmd[1:]), "--out_dir", tmp)
        t0 = time.time()
        out = subprocess.run([*cmd, "--out_dir", tmp], capture_output=True, text=True)
        wall = time.time() - t0
    print(out.stdout[-2000:], out.stderr[-2000:])
    print(f"wall time {wall:.1f} s")
    if out.returncode:
        sys.exit(out.returncode)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["throughput", "quality"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
    args, extra = p.parse_known_args()
    if args.what == "throughput":
        throughput(args.repeats, args.steps)
    else:
        quality(args.data, extra)
