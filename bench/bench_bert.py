"""Benchmarks for bert.py (results in bench/RESULTS.md).

throughput: bert.py's pretraining step (MLM + NSP loss, backward, AdamW) against Hugging Face
  BertForPreTraining at the same config (the small preset: 4 layers, 4 heads, width 128, FFN 512, vocab
  8000, dropout 0.1), batch 16 x 128, the same 15% of positions masked and the same NSP labels, same
  process, eager, fp32 and bf16 autocast. Warm-up, then the median of interleaved repeats, as a ratio;
  MFU against this machine's measured matmul peak in that dtype.
quality: the paper's claim in miniature, as it was before the main job made it (the old small preset's recipe
  pinned; `python bert.py` supersedes it). Pretrain on WikiText-2, then fine-tune on SST-2 (a seeded subsample
  of train, the whole dev set) from that checkpoint and, with the same budget, from a random initialisation of
  the same model and vocabulary. Every run goes through bert.py's command line.

  python bench/bench_bert.py throughput [--repeats 5]
  python bench/bench_bert.py quality [--pretrain_steps 1000 --max_seq_length 128 --train_examples 67349]
"""
import argparse
import contextlib
import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
import bert  # noqa: E402
from bench_gpt import interleaved_medians, peak_flops  # noqa: E402


def throughput(repeats: int, steps: int):
    from transformers import BertConfig, BertForPreTraining
    torch.manual_seed(0)
    V, B, T = 8000, 16, 128
    cfg = dataclasses.replace(bert.PRESETS["small"], vocab_size=V, dropout=0.1)  # HF's default dropout
    ours = bert.build_model(cfg)
    hf = BertForPreTraining(BertConfig(vocab_size=V, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=512))
    ids = torch.randint(5, V, (B, T))
    labels = torch.full((B, T), -100)
    masked = torch.rand(B, T).argsort(-1)[:, :round(0.15 * T)]  # 19 of 128 positions per row
    labels.scatter_(1, masked, ids.gather(1, masked))
    batch = {"input_ids": ids, "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T),
             "attention_mask": torch.ones(B, T, dtype=torch.bool), "mlm_labels": labels,
             "nsp_labels": torch.randint(2, (B,))}
    flops_per_step = bert.flops_per_token(cfg, T, 0.15) * B * T

    def hf_loss(m):
        return m(input_ids=ids, token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"].long(),
                 labels=labels, next_sentence_label=batch["nsp_labels"]).loss

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"attention: HF {hf.config._attn_implementation}, ours SDPA")
    for dtype in (torch.float32, torch.bfloat16):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        med = interleaved_medians({"bert.py": (ours, lambda m: bert.pretrain_loss(m, batch)), "hf": (hf, hf_loss)},
                                  ctx, steps, repeats)
        peak = peak_flops(dtype)
        label = "bf16" if dtype == torch.bfloat16 else "fp32"
        print(f"{label}: bert.py {med['bert.py'] * 1e3:.1f} ms/step, HF {med['hf'] * 1e3:.1f} ms/step, "
              f"ratio (HF time / bert.py time) {med['hf'] / med['bert.py']:.2f}x; matmul peak "
              f"{peak / 1e9:.0f} GFLOP/s, MFU bert.py {flops_per_step / med['bert.py'] / peak:.1%}, "
              f"HF {flops_per_step / med['hf'] / peak:.1%}", flush=True)


def run(args: list[str]) -> float:
    cmd = [sys.executable, str(ROOT / "bert.py"), *args]
    print("$ python bert.py " + " ".join(args), flush=True)
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    lines = out.stdout.strip().split("\n")
    print("\n".join(lines[:3] + ["..."] + lines[-2:]))
    print(f"wall time {time.time() - t0:.1f} s", flush=True)
    return time.time() - t0


def quality(a):
    out = Path(a.out_dir)
    common = ["--preset", "small", "--seed", str(a.seed), "--device", "cpu", "--max_seq_length", str(a.max_seq_length),
              *"--wordpiece_vocab_size 8000 --dupe_factor 5 --masked_lm_prob 0.15 --max_predictions_per_seq 20 "
              "--dropout 0.1 --lr 5e-4 --finetune_lr 1e-4".split()]  # the small preset before the main job's claim
    run(["pretrain", *common, "--data", str(SHARED / "wikitext-2"), "--total_steps", str(a.pretrain_steps),
         "--warmup_steps", str(max(1, a.pretrain_steps // 20)), "--eval_interval", str(a.pretrain_steps),
         "--log_interval", str(max(1, a.pretrain_steps // 5)), "--out_dir", str(out / "pretrain")])
    ckpt = torch.load(out / "pretrain" / "ckpt.pt", weights_only=False)
    torch.manual_seed(a.seed)  # the same model and vocabulary, untrained
    ckpt["model"] = bert.build_model(bert.Config(**ckpt["config"])).state_dict()
    (out / "random").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out / "random" / "ckpt.pt")
    rows = (SHARED / "sst2" / "train.tsv").read_text().rstrip("\n").split("\n")
    header, rows = rows[0], rows[1:]
    sample = random.Random(a.seed).sample(rows, min(a.train_examples, len(rows)))
    (out / "sst2").mkdir(exist_ok=True)
    (out / "sst2" / "train.tsv").write_text("\n".join([header, *sample]) + "\n")
    (out / "sst2" / "dev.tsv").write_text((SHARED / "sst2" / "dev.tsv").read_text())
    result = {}
    for init in ("pretrain", "random"):
        run(["finetune", *common, "--init_from", str(out / init / "ckpt.pt"), "--finetune_data", str(out / "sst2"),
             "--finetune_epochs", str(a.finetune_epochs), "--eval_interval", "100000", "--log_interval", "100",
             "--finetune_examples", "0",
             "--out_dir", str(out / f"finetune-{init}")])
        metrics = [json.loads(x) for x in (out / f"finetune-{init}" / "metrics.jsonl").read_text().split("\n") if x]
        result[init] = [m for m in metrics if m["split"] == "val"][-1]["acc"]
    pre = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().split("\n") if x]
    val = [m for m in pre if m["split"] == "val"][-1]
    print(f"pretraining: MLM accuracy {val['mlm_acc']:.3f}, NSP accuracy {val['nsp_acc']:.3f}; SST-2 dev accuracy "
          f"from pretrained {result['pretrain']:.3f}, from random init {result['random']:.3f}, "
          f"difference {100 * (result['pretrain'] - result['random']):+.1f} points")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["throughput", "quality"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pretrain_steps", type=int, default=1000)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--train_examples", type=int, default=67349)
    p.add_argument("--finetune_epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out_dir", default="out/bench-bert")
    args = p.parse_args()
    throughput(args.repeats, args.steps) if args.what == "throughput" else quality(args)
