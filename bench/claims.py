"""Each paper's own comparison, bigger than its main job: the "Claims" section of bench/RESULTS.md.

Every script's main job ends with `claim: <task> <metric> <with> vs <without> (<what differs>)` after about
ten minutes. This runs the same comparisons with about `--minutes` (30) CPU-minutes of pretraining and
training each, on ../shared/data passed as local paths (nothing is downloaded):

  1. the main job with a bigger budget (more pretraining steps; the same evaluation), which writes the claim
     record of the main job's recipe into its metrics.jsonl;
  2. a baseline given its fair chance: both arms fine-tuned again from that run's pretrained checkpoint at each
     learning rate of a small sweep, with every seed of --seeds (the seed draws the fine-tuning's
     initialisation and order, and the labelled subset: the same subset for both arms), each arm then
     reported at its own best learning rate (the mean over seeds), and the gap of each seed beside it. (transformer.py's two arms
     are two decodings of one trained model: nothing to sweep.)

It writes a table (script, the paper's figure, with, without, gap, the gap of each seed, the learning rates
picked, CPU-minutes, command) between the markers of RESULTS.md's Claims section, and a picture of it,
bench/claims.png: one pair of bars per paper (matplotlib is a bench-only dependency; the scripts never
import it).

  python bench/claims.py                              # all six, about 30 CPU-minutes each plus the sweeps
  python bench/claims.py --only gpt,bert --minutes 10 --threads 1
  python bench/claims.py --from_runs                  # rebuild the table and the picture from finished runs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
START, END = "<!-- claims: begin (bench/claims.py writes this) -->", "<!-- claims: end -->"


@dataclass
class Recipe:
    """One paper's comparison: the main job's flags at `minutes` CPU-minutes, and each arm as a stage command
    (arms[name](run_dir, lr, seed, out_dir) -> argv after the script) whose out_dir/metrics.jsonl holds `metric`
    in its records; the arm called "with" is the paper's method. The learning rate is chosen on the "val" split
    and the `report` split's figure is reported (the same split where the task has no labelled test set)."""
    figure: str
    main: Callable[[float], list[str]]
    arms: dict = field(default_factory=dict)
    lrs: tuple = ()
    metric: str = "acc"  # chosen by: the last "val" record's (dev accuracy, dev F1)
    report: str = "val"  # reported: that record's split, "val" or "test" (taglm.py's CoNLL test F1)
    scale: float = 100.0  # the metric in the records -> the claim's scale (accuracy in %)


def steps(base: int, minutes: float, main_minutes: float) -> str:
    """A main job's step count scaled from the CPU-minutes its whole run took (user + system, both threads, as
    measured in RESULTS.md) to `minutes`: more pretraining, the same evaluation."""
    return str(max(1, round(base * minutes / main_minutes)))


def D(name: str) -> str:  # the real data, as a local path
    return str(DATA / name)


SST2, IMDB, CONLL, ULMFIT_CPU = D("sst2"), D("imdb"), D("conll2003"), 15.9


def finetune_sst2(*flags: str):  # gpt.py's and bert.py's arms: the same fine-tuning from pretrain/best.pt
    return lambda run, lr, seed, out: ["finetune", "--init_from", str(run / "pretrain" / "best.pt"), "--finetune_data",
                                       SST2, "--finetune_lr", f"{lr:g}", "--seed", str(seed), *flags, "--out_dir",
                                       str(out)]


PRETRAINED_VS_RANDOM = {"with": finetune_sst2(), "without": finetune_sst2("--finetune_random_init")}
RECIPES: dict[str, Recipe] = {
    "gpt": Recipe(
        "Radford et al. 2018, Table 5: no pre-training",
        lambda m: ["--data", SST2, "--finetune_data", SST2, "--total_steps", steps(2400, m, 12.0)],
        PRETRAINED_VS_RANDOM,
        lrs=(1e-4, 5e-4, 1e-3)),
    "bert": Recipe(
        "Devlin et al. 2018, 5.1 / Table 6: pretrained vs no pretraining (GLUE)",
        lambda m: ["--data", SST2, "--finetune_data", SST2, "--total_steps", steps(3000, m, 13.4)],
        PRETRAINED_VS_RANDOM,
        lrs=(1e-4, 3e-4, 1e-3)),
    "elmo": Recipe(
        "Peters et al. 2018, Table 1: baseline vs + ELMo",
        lambda m: ["--data", SST2, "--task_data", SST2, "--total_steps", steps(1200, m, 13.8)],
        {"with": lambda run, lr, seed, out: ["task", "--init_from", str(run / "pretrain" / "best.pt"), "--task_data",
                                             SST2, "--task_lr", f"{lr:g}", "--seed", str(seed), "--out_dir", str(out)],
         "without": lambda run, lr, seed, out: ["task", "--no-use_elmo", "--task_data", SST2, "--task_lr", f"{lr:g}",
                                                "--seed", str(seed), "--out_dir", str(out)]},
        lrs=(3e-4, 1e-3, 3e-3)),
    "ulmfit": Recipe(
        "Howard & Ruder 2018, Figure 3: ULMFiT vs from scratch, 100 IMDb labels",
        lambda m: ["--data", D("wikitext-2"), "--task_data", IMDB, "--total_steps", steps(200, m, ULMFIT_CPU),
                   "--finetune_steps", steps(400, m, ULMFIT_CPU), "--lm_tokens", steps(1_100_000, m, ULMFIT_CPU)],
        {"with": lambda run, lr, seed, out: ["classify", "--init_from", str(run / "finetune-lm" / "best.pt"),
                                             "--task_data", IMDB, "--clf_lr", f"{lr:g}", "--seed", str(seed),
                                             "--out_dir", str(out)],
         "without": lambda run, lr, seed, out: ["classify", "--lr_decay", "1", "--no-gradual_unfreezing",
                                                "--task_data", IMDB, "--clf_lr", f"{lr:g}", "--seed", str(seed),
                                                "--out_dir", str(out)]},
        lrs=(3e-3, 1e-2, 3e-2)),
    "taglm": Recipe(
        "Peters et al. 2017, Table 1 / 4: with vs without the LM embeddings (CoNLL-2003 NER)",
        lambda m: ["--data", CONLL, "--tag_data", CONLL, "--lm_total_steps", steps(1300, m, 14.4)],
        {"with": lambda run, lr, seed, out: ["tag", "--init_from", str(run / "lm" / "ckpt.pt"), "--tag_data", CONLL,
                                             "--lr", f"{lr:g}", "--seed", str(seed), "--out_dir", str(out)],
         "without": lambda run, lr, seed, out: ["tag", "--lm_insert", "none", "--tag_data", CONLL, "--lr", f"{lr:g}",
                                                "--seed", str(seed), "--out_dir", str(out)]},
        lrs=(5e-4, 1e-3, 2e-3), metric="f1", report="test"),
    "transformer": Recipe(
        "Vaswani et al. 2017, Table 2 (WMT; here Multi30k): beam 4 vs greedy",
        lambda m: ["--data", D("multi30k"), "--total_steps", steps(1500, m, 13.5)]),
}


def run(argv: list[str], threads: int, log: Path) -> float:
    """Run one stage or main job of a script, its output into `log`; return the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", "python", " ".join(argv), flush=True)
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"error: {' '.join(argv)} exited with {code}; its output is in {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"  {cpu / 60:.1f} CPU-minutes, {(time.time() - t0) / 60:.1f} minutes wall", flush=True)
    return cpu


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: run without --from_runs first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def claim_of(out: Path) -> dict:
    """The last claim record a main job wrote into out/metrics.jsonl."""
    claims = [r for r in records(out) if r.get("split") == "claim"]
    if not claims:
        raise SystemExit(f"error: {out}/metrics.jsonl holds no claim record")
    return claims[-1]


def final_of(out: Path, metric: str, split: str = "val") -> float:
    """`metric` of a run's last `split` record: the trained model's, as the main job reports it (the best of
    several evaluations would pick a model by the very set it is scored on)."""
    values = [r[metric] for r in records(out) if r.get("split") == split and metric in r]
    if not values:
        raise SystemExit(f"error: {out}/metrics.jsonl holds no {split} {metric}")
    return values[-1]


def sweep(results: dict) -> dict:
    """{(arm, lr, seed): (chosen by, reported)} -> each arm at the lr of its best mean `chosen by` over seeds:
    {arm: (lr, the mean reported, {seed: reported})}; of equal means, the lower lr."""
    picked = {}
    for arm in sorted({a for a, _, _ in results}):
        by_lr = {}
        for (a, lr, seed), scores in results.items():
            if a == arm:
                by_lr.setdefault(lr, {})[seed] = scores
        lr = max(by_lr, key=lambda k: (statistics.mean(c for c, _ in by_lr[k].values()), -k))
        reported = {seed: r for seed, (_, r) in by_lr[lr].items()}
        picked[arm] = (lr, statistics.mean(reported.values()), reported)
    return picked


def compare(name: str, recipe: Recipe, args) -> dict:
    """Run (or, with --from_runs, read) one comparison; its row of the table."""
    run_dir, cpu = Path(args.runs) / name, 0.0
    argv = [f"{name}.py", *recipe.main(args.minutes), "--out_dir", str(run_dir / "main")]
    if not args.from_runs:
        cpu += run(argv, args.threads, run_dir / "main.log")
    claim = claim_of(run_dir / "main")
    row = {"script": f"{name}.py", "figure": recipe.figure, "metric": claim["metric"], "with": claim["with"],
           "without": claim["without"], "gaps": [claim["with"] - claim["without"]], "lrs": "",
           "command": f"python bench/claims.py --only {name} --minutes {args.minutes:g}" +
                      (f" --seeds {args.seeds}" if recipe.arms else "")}
    if recipe.arms and recipe.lrs:
        results = {}
        for arm, make in recipe.arms.items():
            for lr in recipe.lrs:
                for seed in range(args.seeds):
                    out = run_dir / f"{arm}-lr{lr:g}-seed{seed}"
                    if not args.from_runs:
                        cpu += run([f"{name}.py", *make(run_dir / "main", lr, seed, out)], args.threads,
                                   out.with_suffix(".log"))
                    results[arm, lr, seed] = (final_of(out, recipe.metric),
                                              final_of(out, recipe.metric, recipe.report) * recipe.scale)
        picked = sweep(results)
        (lr_w, row["with"], by_w), (lr_wo, row["without"], by_wo) = picked["with"], picked["without"]
        row["gaps"] = [by_w[s] - by_wo[s] for s in sorted(by_w)]
        row["lrs"] = f"{lr_w:g} / {lr_wo:g}"
    row["gap"], row["cpu_minutes"] = row["with"] - row["without"], None if args.from_runs else cpu / 60
    print(f"{name}: {row['metric']} {row['with']:.1f} vs {row['without']:.1f} ({row['gap']:+.1f})", flush=True)
    return row


def save_row(saved: Path, name: str, row: dict) -> None:
    """Put `row` into the rows saved so far, read just now: two claims.py runs side by side (--threads 1 each) share
    the file. A row rebuilt with --from_runs keeps the CPU-minutes its run measured."""
    rows = json.loads(saved.read_text()) if saved.is_file() else {}
    if row["cpu_minutes"] is None:
        row = dict(row, cpu_minutes=rows.get(name, {}).get("cpu_minutes"))
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({**rows, name: row}, indent=1))


def table(rows: list[dict]) -> str:
    lines = ["| script | the paper's figure | with | without | gap | gap per seed | lr (with / without) | "
             "CPU-minutes | command |", "|---|---|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        cpu = "" if r["cpu_minutes"] is None else f"{r['cpu_minutes']:.0f}"
        lines.append(f"| {r['script']} | {r['figure']} | {r['with']:.1f} | {r['without']:.1f} | {r['gap']:+.1f} | "
                     f"{', '.join(f'{g:+.1f}' for g in r['gaps'])} | {r['lrs']} | {cpu} | `{r['command']}` |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """RESULTS.md with the Claims block replaced (or, the first time, a Claims section appended)."""
    block = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        return text[:text.index(START)] + block + text[text.index(END) + len(END):]
    return text.rstrip("\n") + "\n\n## Claims: each paper's comparison at about 30 CPU-minutes\n\n" + block + "\n"


def picture(rows: list[dict], path: Path, minutes: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["with"] for r in rows], 0.4, label="with (the paper's method)")
    ax.bar([x + 0.2 for x in xs], [r["without"] for r in rows], 0.4, label="without (its baseline)")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["with"], r["without"]) + 1, f"{r['gap']:+.1f}", ha="center")
    ax.set_xticks(list(xs), [f"{r['script']}\n{r['metric']}" for r in rows])
    ax.set_ylabel("accuracy %, F1 or BLEU")
    ax.set_title(f"Each paper's comparison at about {minutes:g} CPU-minutes (bench/claims.py)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(RECIPES), help="comma-separated scripts (default: all six)")
    p.add_argument("--minutes", type=float, default=30.0, help="CPU-minutes of each comparison's main job")
    p.add_argument("--seeds", type=int, default=2, help="seeds of each arm's fine-tuning in the sweep")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(ROOT / "out" / "claims"), help="where the runs go")
    p.add_argument("--from_runs", action="store_true", help="only rebuild the table and picture from the runs")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="- : print the table only")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if unknown := [n for n in names if n not in RECIPES]:
        p.error(f"no recipe for {', '.join(unknown)}; use {', '.join(RECIPES)}")
    if args.minutes <= 0 or args.seeds < 1 or args.threads < 1:
        p.error("--minutes, --seeds and --threads must be positive")
    if not DATA.is_dir():
        p.error(f"{DATA} is not there; claims.py reads the real datasets from it")
    saved = Path(args.runs) / "rows.json"  # every comparison run so far: the table shows them all
    for name in names:
        save_row(saved, name, compare(name, RECIPES[name], args))
    rows = json.loads(saved.read_text()) if saved.is_file() else {}
    rows = [rows[n] for n in RECIPES if n in rows]
    print(table(rows))
    if args.results != "-":
        results = Path(args.results)
        results.write_text(replace_block(results.read_text() if results.exists() else "", table(rows) +
                                         "\n\n![Each paper's comparison](claims.png)"))
        picture(rows, results.with_name("claims.png"), args.minutes)


if __name__ == "__main__":
    main()
