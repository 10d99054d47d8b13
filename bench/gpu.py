"""Every script on a CUDA GPU (issue 14): does it train there, how fast, and how it compares with Hugging Face.

What it measures, in this order, on one machine in one run (results: a markdown table, printed and written
between the GPU markers of bench/RESULTS.md):
  1. tiny runs: each script's training stage through its command line, `--preset tiny --data builtin --device
     cuda --dtype bfloat16 --log_interval 1 --max_steps 20`, then `--resume --max_steps 40` (schedules shorter
     than 40 steps are set to 40), a subprocess per run with a timeout, the six scripts side by side. Passes when
     both runs exit 0, the second says it resumed and reaches step 40, and the training loss falls (the mean of
     the last third of the logged steps below that of the first third, from metrics.jsonl).
  2. throughput: a training step of each script's `paper` preset on a synthetic batch in the script's own
     format (random ids of the stage's shapes and dtypes; word-level models draw Zipf-like ids): build_model,
     the script's pretrain_loss under bf16 autocast, backward, the stage's clipping and optimizer. Two warm-up
     steps, then the median of up to 20 steps timed one by one with torch.cuda.synchronize; tokens/s, MFU
     (FLOPs per token from the script's own flops_per_token; ulmfit.py has none: 6N, as its stage passes the
     loop) against the measured bf16 matmul peak (8192x8192 matmuls, the median of 10 groups of 10), and
     torch.cuda.max_memory_allocated. Eager first; torch.compile in a subprocess per model (compile time apart
     from step time), in priority order while the budget lasts. A step too slow for the budget or out of
     memory halves the batch; the table says so.
  3. against Hugging Face, same process, same weights (theirs copied into ours by the script's own load_hf),
     same batch, bf16 autocast, the same optimizer and clipping, HF's attention_implementation "sdpa": gpt.py
     at GPT-2 124M (12 layers, 12 heads, width 768, context 1024, vocab 50304, batch 16, dropout 0, as
     nanoGPT's GPT-2 run) against GPT2LMHeadModel, and bert.py's `paper` preset (BERT-Base, dropout 0.1,
     batch 256 of length 128, a tenth of the rows shorter) against BertForPreTraining. Warm-up, then the median
     of 7 interleaved repeats (ABBA order), as a ratio of step times (HF / ours); eager pair and compiled pair
     apart (both compiled).
  4. data parallel: gpt.py pretrain under `torchrun --nproc_per_node=<all local GPUs>` (NCCL), tiny preset,
     builtin data, 10 steps: exit 0 and rank 0's checkpoint holding one data position per rank. One GPU runs
     one rank without a process group: NCCL needs two.

Budget: at most 8 minutes on one GPU (--budget 480): tiny runs 23%, eager throughput 19%, the eager pairs 10%,
torchrun 9%, torch.compile the rest, in this order: the GPT-2 pair, the BERT pair, transformer.py, gpt.py's
GPT-1, taglm.py, ulmfit.py, elmo.py (its LSTM is a Python loop over time steps: the slowest to compile), bert.py
alone (without it, bert.py's compiled row is its side of the BERT pair: the same batch). A part
that would run over shrinks (fewer steps, a smaller batch, no compile) and the table says so; progress lines
show the elapsed time. GPU memory is freed between parts.

Goals it reports against, without enforcing them: gpt.py at 124M with torch.compile at 40% MFU or more in bf16
on an H100/H200-class GPU, and at 1.2x Hugging Face's step or better; bert.py at 1.3x BertForPreTraining or
better; every tiny run passing on CUDA.

  python bench/gpu.py                      # on a CUDA machine: all of the above, into bench/RESULTS.md
  python bench/gpu.py --out -              # print the table only
  python bench/gpu.py --budget 300         # a shorter run: the parts shrink to fit 5 minutes
  python bench/gpu.py --device cpu         # the dry run (--quick implied): tiny sizes on the CPU, what needs
                                           # CUDA (peak memory, NCCL) skipped; about 1-2 minutes on 2 cores

--quick runs the same logic at tiny sizes (tiny presets, 5 + 5 steps); its torch.compile uses TorchDynamo with
the "eager" backend (tracing and graph breaks without inductor's code generation, which takes a minute per model
on a CPU), so its compiled figures are not compile speed. Without CUDA, `python bench/gpu.py` exits with status 2
and one line, before anything else. Imports: torch, the six scripts, and transformers for the comparisons.
"""
import argparse
import dataclasses
import functools
import gc
import importlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("gpt", "bert", "transformer", "elmo", "ulmfit", "taglm")
BEGIN = "<!-- bench/gpu.py: begin (everything down to the end marker is replaced on each run) -->"
END = "<!-- bench/gpu.py: end -->"
SHARES = {"tiny": 0.23, "eager": 0.19, "pairs": 0.10, "ddp": 0.09}  # of the budget; compile: the rest
QUICK_SHARES = {"tiny": 0.55, "eager": 0.12, "pairs": 0.12, "ddp": 0.10}
RESERVE = 0.02  # kept for writing the table
COMPILE_ORDER = (("pair", "gpt2"), ("pair", "bert"), ("script", "transformer"), ("script", "gpt"),
                 ("script", "taglm"), ("script", "ulmfit"), ("script", "elmo"), ("script", "bert"))
TINY_STAGES = {"gpt": ("pretrain", "total_steps"), "bert": ("pretrain", "total_steps"),
               "transformer": ("train", "total_steps"), "elmo": ("pretrain", "total_steps"),
               "ulmfit": ("pretrain", "total_steps"), "taglm": ("pretrain-lm", "lm_total_steps")}


def script(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


class Clock:
    """The run's budget: elapsed and remaining seconds, each part's share, progress lines."""

    def __init__(self, budget: float, shares: dict):
        self.t0, self.budget, self.shares = time.monotonic(), budget, shares

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def allot(self, part: str) -> float:
        """Seconds for `part`: its share, but never the time that the parts after it need for theirs."""
        later = list(self.shares)[list(self.shares).index(part) + 1:]
        keep = (sum(self.shares[p] for p in later) + RESERVE) * self.budget
        return max(0.0, min(self.shares[part] * self.budget, self.left() - keep))

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_command(cmd: list, timeout: float, cwd: Path, env: dict) -> dict:
    """A subprocess in its own process group (killed whole on timeout): rc, stdout, stderr, seconds."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "seconds": time.monotonic() - t0,
            "timed_out": timed_out}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def child_env(tmp: Path, threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "NLP_LINEAGE_CACHE": str(tmp / "cache"),
            "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------------
# The bf16 matmul peak: MFU's denominator

def matmul_peak(device: torch.device, quick: bool) -> dict:
    n, groups, per_group = (1024, 5, 2) if quick else (8192, 10, 10)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(per_group):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / per_group)
    return {"flops": 2 * n ** 3 / statistics.median(times), "how": f"{n}x{n}, the median of {groups} groups of "
            f"{per_group}"}


# ---------------------------------------------------------------------------------------------------
# 1. Tiny runs through each script's command line: run, resume, loss falls

def tiny_chain(name: str, device: str, k: int, deadline: float, tmp: Path, env: dict) -> dict:
    stage, field = TINY_STAGES[name]
    length = getattr(script(name).PRESETS["tiny"], field)
    schedule = [f"--{field}", str(2 * k)] if length < 2 * k else []
    out = tmp / f"tiny-{name}"
    base = [sys.executable, str(ROOT / f"{name}.py"), stage, "--preset", "tiny", "--data", "builtin", "--out_dir",
            str(out), "--device", device, "--dtype", "bfloat16", "--log_interval", "1", *schedule]
    row = {"stage": stage, "steps": f"{k} + {k}" + (f" (--{field} {2 * k})" if schedule else ""), "seconds": 0.0}
    for n, extra in enumerate((["--max_steps", str(k)], ["--resume", "--max_steps", str(2 * k)]), 1):
        left = deadline - time.monotonic()
        if left < 2:
            return {**row, "status": f"skipped (budget) before run {n}"}
        r = run_command(base + extra, left, tmp, env)
        row["seconds"] += r["seconds"]
        if r["timed_out"]:
            return {**row, "status": f"FAIL: run {n} timed out after {r['seconds']:.0f} s (budget)"}
        if r["rc"] != 0:
            return {**row, "status": f"FAIL: run {n} exit {r['rc']}: {last_line(r['stderr'] or r['stdout'])}"}
        if n == 2:
            row["resumed"] = "resumed" in r["stdout"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])]
    third = max(1, len(losses) // 3)
    first, last = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
    row.update(first=first, last=last, last_step=max(r["step"] for r in records))
    problems = [p for p, bad in (("did not resume", not row["resumed"]), (f"ended at step {row['last_step']}, "
                f"not {2 * k}", row["last_step"] != 2 * k), ("loss did not fall", not last < first)) if bad]
    return {**row, "status": "FAIL: " + ", ".join(problems) if problems else "pass"}


def tiny_runs(clock: Clock, device: str, quick: bool, tmp: Path) -> dict:
    budget, k = clock.allot("tiny"), 5 if quick else 20
    if budget < 10:
        clock.log(f"tiny runs: skipped, {budget:.0f} s of budget")
        return {name: {"status": "skipped (budget)"} for name in SCRIPTS}
    workers = min(len(SCRIPTS), max(2, (os.cpu_count() or 2) // 2))
    clock.log(f"tiny runs: {len(SCRIPTS)} scripts, {workers} at a time, {budget:.0f} s budget")
    deadline, env = time.monotonic() + budget, child_env(tmp, max(1, (os.cpu_count() or 2) // workers))

    def one(name):
        try:
            row = tiny_chain(name, device, k, deadline, tmp, env)
        except Exception as e:  # a broken metrics file and the like: reported, not fatal
            row = {"status": f"FAIL: {e.__class__.__name__}: {e}"[:160]}
        clock.log(f"tiny {name}: {row['status']} ({row.get('seconds', 0):.0f} s)")
        return name, row
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, SCRIPTS))


# ---------------------------------------------------------------------------------------------------
# 2. Workloads: each script's model, synthetic batch, loss, optimizer and clipping, FLOPs per token

@dataclasses.dataclass
class Workload:
    cfg: object
    build: object  # () -> the model (measure_script calls it on the device)
    batch: dict  # on the CPU; moved to the device by measure_script
    loss: object  # (model, batch) -> loss
    make_opt: object  # model -> optimizer (the stage's)
    clip: float
    clip_groups: object  # raw model -> lists of parameters clipped together
    batch_size: int
    paper_batch: int
    tokens: int  # per step
    flops: object  # raw model -> training FLOPs per token
    flops_from: str
    size: str


def zipf(gen: torch.Generator, vocab: int, shape) -> torch.Tensor:
    """Word ids by frequency rank, log-uniform (Zipf-like), as word-level text gives them."""
    return ((torch.rand(shape, generator=gen) * math.log(vocab + 1)).exp() - 1).long().clamp(0, vocab - 1)


def random_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 11))) for _ in range(n)]


def whole(model):
    return [list(model.parameters())]


def gpt_workload(m, quick: bool, batch: int | None) -> Workload:
    cfg = m.PRESETS["tiny" if quick else "paper"]
    cfg = dataclasses.replace(cfg, vocab_size=cfg.bpe_vocab_size if quick else 40478)  # GPT-1's 40,478
    B, T, gen = batch or cfg.batch_size, cfg.block_size, torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (B, T + 1), generator=gen)
    return Workload(cfg, lambda: m.build_model(cfg), {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}, m.pretrain_loss,
                    lambda model: m.adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), 1e-8),
                    cfg.grad_clip, whole, B, cfg.batch_size, B * T, lambda model: model.flops_per_token(),
                    "gpt.py GPT.flops_per_token", f"{'tiny' if quick else 'paper (GPT-1)'}: {cfg.arch}, "
                    f"{cfg.n_layer} layers, width {cfg.d_model}, context {T}, vocab {cfg.vocab_size:,}")


def bert_batch(cfg, B: int, gen: torch.Generator) -> dict:
    """Pairs `[CLS] A [SEP] B [SEP]` as create_instances makes them: a tenth of the rows shorter (short_seq_prob),
    padded; min(max_predictions_per_seq, round(0.15 n)) positions masked; NotNext at random."""
    T, V = cfg.max_seq_length, cfg.vocab_size
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "token_type_ids": torch.zeros(B, T, dtype=torch.long),
             "attention_mask": torch.zeros(B, T, dtype=torch.bool), "mlm_labels": torch.full((B, T), -100),
             "nsp_labels": torch.randint(2, (B,), generator=gen)}
    for r in range(B):
        n = T if torch.rand((), generator=gen) >= cfg.short_seq_prob else int(torch.randint(8, T, (), generator=gen))
        ids, a = torch.randint(5, V, (n,), generator=gen), n // 2
        ids[0], ids[a], ids[n - 1] = 2, 3, 3  # [CLS] A [SEP] B [SEP]
        candidates = torch.tensor([i for i in range(n) if i not in (0, a, n - 1)])
        chosen = candidates[torch.randperm(len(candidates), generator=gen)][
            :min(cfg.max_predictions_per_seq, max(1, round(n * cfg.masked_lm_prob)))]
        batch["mlm_labels"][r, chosen] = ids[chosen]
        ids[chosen] = 4  # [MASK]
        batch["input_ids"][r, :n], batch["attention_mask"][r, :n], batch["token_type_ids"][r, a + 1:n] = ids, True, 1
    return batch


def bert_workload(m, quick: bool, batch: int | None) -> Workload:
    cfg = m.PRESETS["tiny" if quick else "paper"]
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or cfg.wordpiece_vocab_size)
    B, T = batch or cfg.batch_size, cfg.max_seq_length
    batch_ = bert_batch(cfg, B, torch.Generator().manual_seed(0))
    return Workload(cfg, lambda: m.build_model(cfg), batch_, m.pretrain_loss,
                    lambda model: m.adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-6), cfg.grad_clip, whole,
                    B, cfg.batch_size, B * T, lambda model: m.flops_per_token(cfg, T, cfg.masked_lm_prob),
                    "bert.py flops_per_token, as its pretrain stage calls it",
                    f"{'tiny' if quick else 'paper (BERT-Base)'}: {cfg.n_layer} layers, width {cfg.d_model}, "
                    f"length {T}, vocab {cfg.vocab_size:,}")


def transformer_workload(m, quick: bool, batch: int | None) -> Workload:
    cfg = m.PRESETS["tiny" if quick else "paper"]
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or cfg.bpe_vocab_size)
    S = T = 16 if quick else 32  # WMT'14 EN-DE sentences are some 30 BPE tokens
    B, V, gen = batch or cfg.batch_tokens // (S + T), cfg.vocab_size, torch.Generator().manual_seed(0)
    src, tgt = torch.randint(V - 3, (B, S), generator=gen), torch.randint(V - 3, (B, T + 1), generator=gen)
    src[:, -1], tgt[:, 0], tgt[:, -1] = V - 2, V - 3, V - 2  # </s>, <s>, </s>
    return Workload(cfg, lambda: m.build_model(cfg), {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]},
                    functools.partial(m.pretrain_loss, label_smoothing=cfg.label_smoothing),
                    lambda model: m.adamw(model, cfg.lr_factor * cfg.d_model ** -0.5, cfg.weight_decay,
                                          (cfg.beta1, cfg.beta2), cfg.adam_eps),
                    cfg.grad_clip, whole, B, cfg.batch_tokens // (S + T), B * (S + T),
                    lambda model: model.flops_per_token(S, T), "transformer.py Transformer.flops_per_token",
                    f"{'tiny' if quick else 'paper (base)'}: {cfg.n_layer}+{cfg.n_layer} layers, width "
                    f"{cfg.d_model}, vocab {V:,}, source and target {S} tokens")


def elmo_workload(m, quick: bool, batch: int | None) -> Workload:
    cfg = m.PRESETS["tiny" if quick else "paper"]
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 793_471)  # the 1B Word Benchmark's
    B, T, V, gen = batch or cfg.batch_size, cfg.unroll_steps, cfg.vocab_size, torch.Generator().manual_seed(0)
    table = torch.tensor([m.token_chars(w) for w in random_words(4096)])  # (n, 50)
    words = {d: zipf(gen, V, (B, T + 1)) for d in ("fwd", "bwd")}
    batch = {f"{d}_{k}": v for d, ids in words.items() for k, v in (("chars", table[ids[:, :-1] % len(table)]),
                                                                     ("targets", ids[:, 1:]))}
    batch |= {"h0": torch.zeros(2, cfg.n_layer, B, cfg.proj_dim), "c0": torch.zeros(2, cfg.n_layer, B, cfg.lstm_dim)}
    return Workload(cfg, lambda: m.build_model(cfg), batch, m.pretrain_loss,
                    lambda model: m.bilm_tf_adagrad(model, cfg)[0],
                    cfg.grad_clip / cfg.unroll_steps, whole, B, cfg.batch_size, B * T,
                    lambda model: model.flops_per_token(), "elmo.py BiLM.flops_per_token",
                    f"{'tiny' if quick else 'paper'}: LSTM {cfg.lstm_dim}/{cfg.proj_dim} x {cfg.n_layer} each way, "
                    f"{T} steps, vocab {V:,}, {cfg.n_negative or 'no'} sampled negatives")


def ulmfit_workload(m, quick: bool, batch: int | None) -> Workload:
    cfg = m.PRESETS["tiny" if quick else "paper"]
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or cfg.max_vocab)
    B, T, gen = batch or cfg.batch_size, cfg.bptt, torch.Generator().manual_seed(0)
    ids = zipf(gen, cfg.vocab_size, (B, T + 1))
    return Workload(cfg, lambda: m.build_model(cfg), {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}, m.pretrain_loss,
                    lambda model: m.discriminative_adam(model, cfg.lr, 1.0, cfg), cfg.grad_clip, whole, B,
                    cfg.batch_size, B * T, lambda model: 6 * sum(p.numel() for p in model.parameters()),
                    "6N, counted here as ulmfit.py's stage does: it has no flops_per_token",
                    f"{'tiny' if quick else 'paper'}: AWD-LSTM {cfg.n_layer} x {cfg.n_hid}, embedding "
                    f"{cfg.emb_size}, bptt {T}, vocab {cfg.vocab_size:,}")


def taglm_workload(m, quick: bool, batch: int | None) -> Workload:
    cfg = m.PRESETS["tiny" if quick else "paper"]
    B, T, V, gen = batch or cfg.lm_batch_size, cfg.lm_block_size, cfg.lm_vocab_size, torch.Generator().manual_seed(0)
    table, ids = m.chars_tensor(random_words(4096), cfg.max_chars), zipf(gen, V, (B, T + 1))
    chars = table[ids % len(table)]
    chars = chars[..., :int((chars > 0).sum(-1).max())]  # as LMWindows.window cuts them
    per_token = (chars > 0).sum(-1).float().mean().item()
    return Workload(cfg, lambda: m.build_model(cfg, V), {"chars": chars, "targets": ids}, m.pretrain_loss,
                    lambda model: torch.optim.Adam(model.parameters(), cfg.lm_lr,
                                                   fused=next(model.parameters()).is_cuda),
                    cfg.grad_clip, lambda model: [list(model.fwd.parameters()), list(model.bwd.parameters())], B,
                    cfg.lm_batch_size, B * T, lambda model: m.flops_per_token(model, per_token),
                    "taglm.py flops_per_token", f"{'tiny' if quick else 'paper'}: 2 LMs, LSTM {cfg.lm_hidden}/"
                    f"{cfg.lm_proj} x {cfg.lm_n_layer}, {T} tokens, vocab {V:,}")


WORKLOADS = {"gpt": gpt_workload, "bert": bert_workload, "transformer": transformer_workload,
             "elmo": elmo_workload, "ulmfit": ulmfit_workload, "taglm": taglm_workload}


def make_step(model, raw, batch, loss_fn, opt, clip: float, clip_groups, ctx):
    """One training step as the harness's loop takes it: loss under autocast, backward, clipping, optimizer."""
    def step():
        with ctx:
            loss = loss_fn(model, batch)
        loss.backward()
        for group in clip_groups(raw) if clip > 0 else []:
            nn.utils.clip_grad_norm_([p for p in group if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, device) -> float:
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def compiler(quick: bool):
    return functools.partial(torch.compile, backend="eager" if quick else "inductor")


def measure_script(name: str, device: str, quick: bool, compile_: bool, budget: float, batch: int | None) -> dict:
    """Median step time of `name`'s workload; a step too slow for the budget (eager) or out of memory halves the
    batch (at most five times)."""
    notes, t_start = [], time.perf_counter()
    for _ in range(6):
        res = measure_once(name, torch.device(device), quick, compile_, budget - (time.perf_counter() - t_start), batch)
        free()
        if "shrink" not in res:
            return {**res, "notes": notes}
        notes.append(res["why"])
        batch = res["shrink"]
    return {"ok": False, "error": "; ".join(notes)}


def measure_once(name: str, device: torch.device, quick: bool, compile_: bool, budget: float, batch) -> dict:
    w = WORKLOADS[name](script(name), quick, batch)
    try:
        with torch.device(device):
            raw = w.build()
        batch_ = {k: v.to(device) for k, v in w.batch.items()}
        model = compiler(quick)(raw) if compile_ else raw
        ctx = torch.autocast(device.type, dtype=torch.bfloat16)
        step = make_step(model, raw, batch_, w.loss, w.make_opt(raw), w.clip, w.clip_groups, ctx)
        t0 = time.perf_counter()
        first = timed(step, device)  # compiles, if compiling
        second = timed(step, device)
        if not (compile_ or quick) and w.batch_size > 1 and second * 8 > budget:
            return {"shrink": w.batch_size // 2, "why": f"a step of batch {w.batch_size} took {second:.1f} s"}
        spent = time.perf_counter() - t0 - (first if compile_ else 0)
        n = max(3, min(20, int((budget - spent) / max(second, 1e-6))))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed(step, device) for _ in range(n)]
        n_params = sum(p.numel() for p in raw.parameters())
        params = f"{n_params / 1e6:.1f}M" if n_params >= 1e6 else f"{n_params / 1e3:.0f}k"
        return {"ok": True, "size": f"{w.size} ({params} parameters)",
                "batch": w.batch_size, "paper_batch": w.paper_batch, "tokens": w.tokens, "flops": w.flops(raw),
                "flops_from": w.flops_from, "median_s": statistics.median(times), "steps": n,
                "compile_s": first if compile_ else None,
                "peak_mem": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    except torch.cuda.OutOfMemoryError:
        if w.batch_size == 1:
            return {"ok": False, "error": "out of memory at batch 1"}
        return {"shrink": w.batch_size // 2, "why": f"batch {w.batch_size} ran out of memory"}


# ---------------------------------------------------------------------------------------------------
# 3. Against Hugging Face: same weights (theirs, copied into ours by the script's load_hf), same batch

def hf_pair(kind: str, quick: bool):
    """(ours, theirs, batch, our loss, their loss, optimizer factory, clip, tokens, FLOPs/token, description)."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-hf-"))
    try:
        if kind == "gpt2":
            m = script("gpt")
            L, H, C, T, V, B = (2, 2, 64, 64, 512, 4) if quick else (12, 12, 768, 1024, 50304, 16)
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=V - 1, eos_token_id=V - 1, attn_implementation="sdpa"))
            hf.save_pretrained(tmp)
            ours, _, cfg = m.load_hf(tmp, dataclasses.replace(m.PRESETS["paper"], dropout=0.0))
            ids = torch.randint(V, (B, T + 1), generator=torch.Generator().manual_seed(0))
            batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

            def theirs_loss(model, b):
                logits = model(b["input_ids"], use_cache=False).logits
                return F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten())
            return (ours, hf, batch, m.pretrain_loss, theirs_loss,
                    lambda model: m.adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), 1e-8),
                    cfg.grad_clip, B * T, ours.flops_per_token(),
                    f"gpt.py vs GPT2LMHeadModel: {L} layers, {H} heads, width {C}, context {T}, vocab {V}, "
                    f"batch {B}, dropout 0")
        m = script("bert")
        cfg = m.PRESETS["tiny" if quick else "paper"]
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or cfg.wordpiece_vocab_size)
        hf = transformers.BertForPreTraining(transformers.BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_position,
            type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout, hidden_act="gelu",
            attention_probs_dropout_prob=cfg.dropout, layer_norm_eps=1e-12, attn_implementation="sdpa"))
        hf.save_pretrained(tmp)
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = specials + [f"w{i}" for i in range(len(specials), cfg.vocab_size)]
        (tmp / "vocab.txt").write_text("".join(f"{t}\n" for t in words))
        ours, _, _ = m.load_hf(tmp, cfg)
        B, T = cfg.batch_size, cfg.max_seq_length  # bert_workload's batch
        batch = bert_batch(cfg, B, torch.Generator().manual_seed(0))

        def theirs_loss(model, b):
            out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                        attention_mask=b["attention_mask"].long())
            return (F.cross_entropy(out.prediction_logits.float().flatten(0, 1), b["mlm_labels"].flatten())
                    + F.cross_entropy(out.seq_relationship_logits.float(), b["nsp_labels"]))  # as pretrain_loss
        return (ours, hf, batch, m.pretrain_loss, theirs_loss,
                lambda model: m.adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-6), cfg.grad_clip, B * T,
                m.flops_per_token(cfg, T, cfg.masked_lm_prob),
                f"bert.py vs BertForPreTraining: {cfg.n_layer} layers, width {cfg.d_model}, length {T}, vocab "
                f"{cfg.vocab_size}, batch {B}, dropout {cfg.dropout}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_pair(kind: str, device: str, quick: bool, compile_: bool, budget: float, repeats: int = 7) -> dict:
    """Warm-up, then `repeats` interleaved repeats (ABBA) of k steps each; median step time of each, the ratio."""
    device, t_start = torch.device(device), time.perf_counter()
    ours, hf, batch, ours_loss, hf_loss, make_opt, clip, tokens, flops, what = hf_pair(kind, quick)
    batch = {k: v.to(device) for k, v in batch.items()}
    ctx, steps, compile_s = torch.autocast(device.type, dtype=torch.bfloat16), {}, {}
    for name, raw, loss_fn in (("ours", ours, ours_loss), ("hf", hf, hf_loss)):
        raw.to(device).train()
        model = compiler(quick)(raw) if compile_ else raw
        steps[name] = make_step(model, raw, batch, loss_fn, make_opt(raw), clip, whole, ctx)
        compile_s[name] = timed(steps[name], device)  # the first step: compiles, if compiling
    per_step = max(timed(steps["ours"], device) + timed(steps["hf"], device), 1e-6) / 2
    k = max(1, min(5, int((budget - (time.perf_counter() - t_start)) / (2 * repeats * per_step))))
    times = {"ours": [], "hf": []}
    for r in range(repeats):
        for name in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            times[name].append(sum(timed(steps[name], device) for _ in range(k)) / k)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"ok": True, "what": what, "ours_s": median["ours"], "hf_s": median["hf"], "ratio": median["hf"] / median[
        "ours"], "tokens": tokens, "flops": flops, "repeats": repeats, "k": k, "attn": hf.config._attn_implementation,
        "compile_s": compile_s if compile_ else None}


def measure(spec: dict) -> dict:
    if spec["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the harness
    if spec["job"] == "pair":
        return measure_pair(spec["name"], spec["device"], spec["quick"], spec["compile"], spec["budget"])
    return measure_script(spec["name"], spec["device"], spec["quick"], spec["compile"], spec["budget"],
                          spec.get("batch"))


def measure_guarded(spec: dict) -> dict:
    """measure() in this process, an exception reported as the result."""
    try:
        return measure(spec)
    except Exception as e:
        return {"ok": False, "error": f"{e.__class__.__name__}: {e}"[:200].replace("\n", " ").replace("|", "/")}
    finally:
        if spec["compile"]:
            torch._dynamo.reset()
        free()


def measure_isolated(spec: dict, timeout: float, tmp: Path) -> dict:
    """measure() in a subprocess with a timeout (torch.compile's time is hard to foresee); its result, or why not."""
    r = run_command([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], timeout, tmp,
                    child_env(tmp, os.cpu_count() or 1))
    if r["timed_out"]:
        return {"ok": False, "error": f"skipped: did not finish within its {timeout:.0f} s of budget"}
    results = [line[7:] for line in r["stdout"].splitlines() if line.startswith("RESULT ")]
    if r["rc"] != 0 or not results:
        return {"ok": False, "error": f"worker exit {r['rc']}: {last_line(r['stderr'])}"}
    return json.loads(results[-1])


# ---------------------------------------------------------------------------------------------------
# 4. gpt.py under torchrun

def ddp_run(clock: Clock, tmp: Path) -> dict:
    budget, n = clock.allot("ddp"), torch.cuda.device_count()
    if budget < 10:
        return {"status": f"skipped (budget: {budget:.0f} s)"}
    out = tmp / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "gpt.py"), "pretrain", "--preset", "tiny", "--data", "builtin", "--device", "cuda",
           "--dtype", "bfloat16", "--out_dir", str(out), "--max_steps", "10", "--log_interval", "5"]
    clock.log(f"torchrun: gpt.py pretrain on {n} GPU(s), {budget:.0f} s budget")
    r = run_command(cmd, budget, tmp, child_env(tmp, max(1, (os.cpu_count() or n) // n)))
    what = f"`torchrun --nproc_per_node={n} gpt.py pretrain --preset tiny --data builtin --max_steps 10`"
    if r["timed_out"] or r["rc"] != 0:
        why = "timed out (budget)" if r["timed_out"] else f"exit {r['rc']}: {last_line(r['stderr'])}"
        return {"what": what, "status": f"FAIL: {why}", "seconds": r["seconds"]}
    data = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["data"]
    positions = [d["position"] for d in data]
    distinct = n == 1 or len({repr(d["rng"][0]) for d in data}) == n  # python RNG states: each rank its own
    ok = len(data) == n and distinct and all(p == 10 for p in positions)
    status = ("pass" if ok else "FAIL") + f": exit 0, the checkpoint holds {len(data)} data position(s) ({positions})"
    if n == 1:
        status += "; one GPU: one rank without a process group, NCCL not exercised (needs 2+ GPUs)"
    return {"what": what, "status": status, "seconds": r["seconds"]}


# ---------------------------------------------------------------------------------------------------
# The table

def fmt_mem(b) -> str:
    return "skipped (no CUDA)" if b is None else f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 28 else f"{b / 2 ** 20:.0f} MiB"


def fmt_s(s: float) -> str:
    return f"{s // 60:.0f} min {s % 60:.0f} s" if s >= 60 else f"{s:.0f} s"


def render(r: dict) -> str:
    peak, quick, cuda = r["peak"]["flops"], r["quick"], r["device"] == "cuda"
    mfu = lambda res, s: res["tokens"] / s * res["flops"] / peak  # noqa: E731
    lines = [f"### {'CUDA' if cuda else 'CPU dry run (`--device cpu`: tiny sizes, NOT GPU figures)'}: "
             "every script (bench/gpu.py)", "",
             f"`{r['command']}` · {r['machine']} · bf16 matmul peak **{peak / 1e12:.3g} TFLOP/s** "
             f"({r['peak']['how']}) · "
             f"wall time {fmt_s(r['wall'])} (budget {fmt_s(r['budget'])}) · {r['date']}", "",
             f"**Tiny runs** (`<script> <stage> --preset tiny --data builtin --device {r['device']} --dtype bfloat16 "
             f"--log_interval 1 --max_steps k`, then `--resume --max_steps 2k`; a subprocess each, the scripts side by "
             "side):", "",
             "| script | stage | steps | train loss, first third → last third | time | result |",
             "|---|---|---|---|---:|---|"]
    for name in SCRIPTS:
        t = r["tiny"][name]
        loss = f"{t['first']:.3f} → {t['last']:.3f}" if "first" in t else "—"
        lines.append(f"| {name}.py | {t.get('stage', TINY_STAGES[name][0])} | {t.get('steps', '—')} | {loss} | "
                     f"{fmt_s(t.get('seconds', 0))} | {t['status']} |")
    lines += ["", f"**Training step throughput** ({'tiny' if quick else '`paper`'} presets, synthetic batch in the "
              "script's own format, its pretrain_loss under bf16 autocast, backward, its stage's clipping and "
              "optimizer; median step after warm-up; MFU against the bf16 matmul peak above; compile time = the first "
              f"compiled step{', TorchDynamo with the eager backend (--quick)' if quick else ''}):", "",
              "| script | size | batch | tokens/step | eager tok/s | eager MFU | eager peak memory | compile | "
              "compiled tok/s | compiled MFU | compiled peak memory | FLOPs per token |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in SCRIPTS:
        e, c = r["eager"][name], r["compiled"].get(name) or {"ok": False, "error": "not run"}
        if not e.get("ok"):
            lines.append(f"| {name}.py | {e.get('error', '—')} | | | | | | | | | | |")
            continue
        batch = f"{e['batch']}" + (f" (paper {e['paper_batch']}: {'; '.join(e['notes'])})" if e["notes"] else "")
        comp = [fmt_s(c["compile_s"]), f"{c['tokens'] / c['median_s']:,.0f}", f"{mfu(c, c['median_s']):.1%}",
                fmt_mem(c["peak_mem"]) if "peak_mem" in c else c.get("mem", "—")] if c.get("ok") else [
                c["error"], "—", "—", "—"]
        lines.append(f"| {name}.py | {e['size']} | {batch} | {e['tokens']:,} | {e['tokens'] / e['median_s']:,.0f} | "
                     f"{mfu(e, e['median_s']):.1%} | {fmt_mem(e['peak_mem'])} | {' | '.join(comp)} | "
                     f"{e['flops'] / 1e6:,.1f}M ({e['flops_from']}) |")
    lines += ["", "**Against Hugging Face** (same process, HF's weights copied into ours by the script's load_hf, same "
              "batch, bf16 autocast, the script's optimizer and clipping for both; warm-up, then the median of "
              "interleaved ABBA repeats of k steps; ratio = HF step time / ours):", "",
              "| comparison | mode | HF attention | ours ms/step | HF ms/step | ratio | MFU ours | MFU HF | goal |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    goals = {"gpt2": 1.2, "bert": 1.3}
    for kind in ("gpt2", "bert"):
        for mode in ("eager", "compiled"):
            p = r["pairs"][kind][mode]
            if not p.get("ok"):
                lines.append(f"| {kind} | {mode} | | {p.get('error', '—')} | | | | | ≥ {goals[kind]}x |")
                continue
            comp = (f" (compile {fmt_s(p['compile_s']['ours'])} / {fmt_s(p['compile_s']['hf'])})"
                    if p["compile_s"] else "")
            lines.append(f"| {p['what']} | {mode}{comp}, {p['repeats']} repeats of {p['k']} | {p['attn']} | "
                         f"{p['ours_s'] * 1e3:.1f} | {p['hf_s'] * 1e3:.1f} | **{p['ratio']:.2f}x** | "
                         f"{mfu(p, p['ours_s']):.1%} | {mfu(p, p['hf_s']):.1%} | ≥ {goals[kind]}x: "
                         f"{'met' if p['ratio'] >= goals[kind] else 'not met'} |")
    d = r["ddp"]
    lines += ["", "**Data parallel**:", "", "| run | result |", "|---|---|",
              f"| {d.get('what', 'gpt.py pretrain under torchrun')} | {d['status']} |"]
    g124 = r["pairs"]["gpt2"]["compiled"]
    mfu_124 = f"{mfu(g124, g124['ours_s']):.1%}" if g124.get("ok") else "not measured (" + g124.get("error", "") + ")"
    passed = sum(t["status"] == "pass" for t in r["tiny"].values())
    ratio = lambda kind: "; ".join(f"{mode} {p['ratio']:.2f}x" for mode in ("eager", "compiled")  # noqa: E731
                                   if (p := r["pairs"][kind][mode]).get("ok")) or "not measured"
    lines += ["", "**Goals** (reported, not enforced" + ("; on a CPU dry run they do not apply" if not cuda else "") +
              "):", "", "| goal | measured |", "|---|---|",
              f"| gpt.py 124M, bf16, torch.compile: MFU ≥ 40% (H100/H200 class) | {mfu_124} |",
              f"| gpt.py 124M ≥ 1.2x GPT2LMHeadModel | {ratio('gpt2')} |",
              f"| bert.py ≥ 1.3x BertForPreTraining | {ratio('bert')} |",
              f"| every tiny run passes on CUDA | {passed}/6 pass{'' if cuda else ' (on the CPU)'} |"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, table: str) -> None:
    """Replace what lies between the GPU markers of `path` (adding the section, or the file, if absent); atomic."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if starts and ends and starts[0] < ends[-1]:
        new = "".join(lines[:starts[0] + 1]) + "\n" + table + "\n" + "".join(lines[ends[-1]:])
    else:
        new = (text.rstrip("\n") + "\n\n" if text.strip() else "") + "## GPUs\n\n" + BEGIN + "\n\n" + table + \
            "\n" + END + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def machine(device: str) -> str:
    import transformers
    cpu = f"{os.cpu_count()} CPU cores"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} x {names[0]}, {cpu} ({versions}, CUDA {torch.version.cuda})"
    return f"CPU only, {cpu}, measured on {torch.get_num_threads()} thread ({versions})"


# ---------------------------------------------------------------------------------------------------
# The run

def run_all(args, argv: list) -> dict:
    quick, device = args.quick or args.device == "cpu", args.device
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: two threads on a shared 2-core machine wait on each other
    budget = args.budget if args.budget is not None else 150.0 if quick else 480.0
    clock, tmp = Clock(budget, QUICK_SHARES if quick else SHARES), Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    r = {"device": device, "quick": quick, "budget": budget, "date": time.strftime("%Y-%m-%d"),
         "command": " ".join(["python bench/gpu.py", *argv]), "machine": machine(device)}
    try:
        r["peak"] = matmul_peak(torch.device(device), quick)
        free()
        clock.log(f"{r['machine']}; bf16 matmul peak {r['peak']['flops'] / 1e12:.3g} TFLOP/s")
        r["tiny"] = tiny_runs(clock, device, quick, tmp)

        r["eager"], allotted = {}, clock.allot("eager")
        deadline = time.monotonic() + allotted
        for i, name in enumerate(SCRIPTS):
            share = (deadline - time.monotonic()) / (len(SCRIPTS) - i)
            if share < 1:
                r["eager"][name] = {"ok": False, "error": "skipped (budget)"}
                continue
            spec = {"job": "script", "name": name, "device": device, "quick": quick, "compile": False, "budget": share}
            r["eager"][name] = res = measure_guarded(spec)
            clock.log(f"eager {name}: " + (f"{res['tokens'] / res['median_s']:,.0f} tok/s, batch {res['batch']}"
                                           if res["ok"] else res["error"]))

        r["pairs"], share = {"gpt2": {}, "bert": {}}, clock.allot("pairs") / 2
        for kind in ("gpt2", "bert"):
            if share < 2:
                r["pairs"][kind]["eager"] = {"ok": False, "error": "skipped (budget)"}
                continue
            spec = {"job": "pair", "name": kind, "device": device, "quick": quick, "compile": False, "budget": share}
            r["pairs"][kind]["eager"] = res = measure_guarded(spec)
            clock.log(f"pair {kind} eager: " + (f"ratio {res['ratio']:.2f}x" if res["ok"] else res["error"]))

        r["ddp"] = ddp_run(clock, tmp) if device == "cuda" else {"status": "skipped (no CUDA)"}
        if device == "cuda":
            clock.log(f"torchrun: {r['ddp']['status']}")

        r["compiled"] = {}
        for job, name in COMPILE_ORDER:
            eager = r["eager"][name] if job == "script" else r["pairs"][name]["eager"]
            left = clock.left() - RESERVE * budget
            if not eager.get("ok"):
                res = {"ok": False, "error": "skipped (no eager figure)"}
            elif left < (5 if quick else 45):
                res = {"ok": False, "error": f"skipped (budget: {max(left, 0):.0f} s left)"}
            else:
                spec = {"job": job, "name": name, "device": device, "quick": quick, "compile": True,
                        "budget": min(20.0, left / 4), "batch": eager.get("batch")}
                clock.log(f"compile {name}{' pair' if job == 'pair' else ''}: up to {left:.0f} s")
                res = measure_guarded(spec) if quick else measure_isolated(spec, min(left, 240.0), tmp)
                first = res.get("compile_s") if job == "script" else (res.get("compile_s") or {}).get("ours")
                clock.log(f"compile {name}: " + (f"first step {first:.1f} s" if res.get("ok") else res["error"]))
            if job == "script":
                r["compiled"][name] = res
            else:
                r["pairs"][name]["compiled"] = res
        pair = r["pairs"]["bert"]["compiled"]
        if not r["compiled"]["bert"].get("ok") and pair.get("ok"):  # the pair's batch is bert_workload's
            r["compiled"]["bert"] = {"ok": True, "compile_s": pair["compile_s"]["ours"], "tokens": pair["tokens"],
                                     "median_s": pair["ours_s"], "flops": pair["flops"],
                                     "mem": "— (the HF pair's run: both models resident)"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r["wall"] = clock.elapsed()
    return r


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: (print(f"error: {message}", file=sys.stderr), sys.exit(2))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run (implies --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: the logic, not the figures")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="markdown file whose GPU section is "
                   "replaced (created if absent); - prints only")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 480; --quick 150)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement in a subprocess (torch.compile)
    args = p.parse_args(argv)
    if args.budget is not None and not (args.budget >= 0 and math.isfinite(args.budget)):
        p.error(f"--budget must be a number of seconds, not {args.budget}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(measure(spec)), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); run it on a "
              "CUDA machine, or `python bench/gpu.py --device cpu` for the dry run", file=sys.stderr)
        sys.exit(2)
    if args.out != "-" and not Path(args.out).resolve().parent.is_dir():
        print(f"error: --out {args.out}: its folder does not exist", file=sys.stderr)
        sys.exit(2)
    table = render(run_all(args, argv))
    print("\n" + table, flush=True)
    if args.out != "-":
        write_section(Path(args.out), table)
        print(f"written into {args.out} (between its GPU markers)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
