"""Benchmarks for taglm.py (results in bench/RESULTS.md).

  python bench/bench_taglm.py crf                    # CRF loss + Viterbi vs pytorch-crf, same batch, ratio
  python bench/bench_taglm.py quality [--lm_minutes 15] [--tag_minutes 20] [--shared ../shared/data]
      CoNLL-2003 test F1 of the tagger with the LM embeddings and of the same tagger without them (same
      seed), each within tag_minutes of CPU. The LMs are pretrained for lm_minutes of CPU on WikiText-2
      train plus the CoNLL-2003 training sentences (never dev or test). Times are wall and CPU seconds.
      The main job (`python taglm.py`) runs the same comparison in miniature and ends with its claim line; this is
      the version with a CPU budget per tagger (and LMs that also read WikiText-2).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import taglm  # noqa: E402


def bench_crf(repeats: int = 7, B: int = 32, T: int = 40, N: int = 17) -> None:
    """Loss (forward algorithm + path score) plus Viterbi decoding, eager fp32, both on the same batch of
    variable lengths (20..40), warm-up first, then the median of interleaved repeats."""
    from torchcrf import CRF as TorchCRF
    g = torch.Generator().manual_seed(0)
    ours, theirs = taglm.CRF(N), TorchCRF(N, batch_first=True)
    with torch.no_grad():
        theirs.transitions.copy_(ours.transitions)
        theirs.start_transitions.copy_(ours.start)
        theirs.end_transitions.copy_(ours.end)
    emissions = torch.randn(B, T, N, generator=g)
    tags = torch.randint(N, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.randint(20, T + 1, (B,), generator=g)[:, None]
    mask[0] = True

    def run_ours():
        loss = -ours(emissions, tags, mask).sum()
        loss.backward()
        return ours.viterbi(emissions, mask)[0]

    def run_theirs():
        loss = -theirs(emissions, tags, mask, reduction="sum")
        loss.backward()
        return theirs.decode(emissions, mask)

    times = {"ours": [], "pytorch-crf": []}
    for _ in range(2):
        run_ours(), run_theirs()
    for _ in range(repeats):
        for name, fn in (("ours", run_ours), ("pytorch-crf", run_theirs)):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            times[name].append((time.perf_counter() - t0) / 5)
    path = run_ours()
    agree = [row[:n] for row, n in zip(path.tolist(), mask.sum(1).tolist())] == run_theirs()
    m_ours, m_theirs = statistics.median(times["ours"]), statistics.median(times["pytorch-crf"])
    print(f"CRF loss+backward+Viterbi, batch {B}, length <= {T}, {N} tags, fp32 eager, {torch.get_num_threads()} "
          f"thread(s): ours {1e3 * m_ours:.2f} ms, pytorch-crf {1e3 * m_theirs:.2f} ms, speed-up "
          f"{m_theirs / m_ours:.2f}x (median of {repeats}); same Viterbi paths: {agree}")


def cpu_per_call(fn_owner, name: str, run) -> list[float]:
    """Process-time gaps between successive calls of fn_owner.name while run() executes."""
    real, stamps = getattr(fn_owner, name), []

    def timed(*a, **k):
        stamps.append(time.process_time())
        return real(*a, **k)

    setattr(fn_owner, name, timed)
    try:
        run()
    finally:
        setattr(fn_owner, name, real)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bench_quality(shared: Path, lm_minutes: float, tag_minutes: float, preset: str, out: Path, lm_from: str) -> None:
    """LMs for lm_minutes of CPU on WikiText-2 train + CoNLL-2003 train; then each tagger (with the LMs
    after layer 1, and without) for at most tag_minutes of CPU: a short probe run measures the CPU of a
    training step and of one dev evaluation, and the number of steps is chosen to fit (evaluating on
    dev once per epoch, early stopping keeping the best dev model, as the paper)."""
    wt2, conll = shared / "wikitext-2", shared / "conll2003"
    corpus = out / "lm-text"
    corpus.mkdir(parents=True, exist_ok=True)
    train = taglm.load_tagging(str(conll), 0)[1]["train"]
    conll_text = "\n".join(" ".join(s["words"]) for s in train)
    (corpus / "train.txt").write_text((wt2 / "train.txt").read_text() + "\n" + conll_text + "\n")
    (corpus / "valid.txt").write_text((wt2 / "valid.txt").read_text())
    lm_args = ["pretrain-lm", "--preset", preset, "--data", str(corpus), "--dtype", "float32"]
    results, lm_dir = {}, Path(lm_from) if lm_from else out / "lm"
    if lm_from:  # the LMs of an earlier run of this benchmark: evaluate them again (resume at the end)
        ckpt = torch.load(lm_dir / "ckpt.pt", weights_only=False)
        lm_steps = ckpt["config"]["lm_total_steps"]
        t0, c0 = time.time(), time.process_time()
        lm = taglm.main(lm_args + ["--out_dir", str(lm_dir), "--lm_total_steps", str(lm_steps), "--resume"])
    else:
        gaps = cpu_per_call(taglm, "pretrain_loss", lambda: taglm.main(
            lm_args + ["--out_dir", str(out / "probe-lm"), "--lm_total_steps", "12", "--eval_interval", "12"]))
        lm_steps = int(lm_minutes * 60 * 0.95 / statistics.median(gaps[2:]))
        t0, c0 = time.time(), time.process_time()
        lm = taglm.main(lm_args + ["--out_dir", str(lm_dir), "--lm_total_steps", str(lm_steps), "--eval_interval",
                                   str(lm_steps), "--log_interval", str(max(1, lm_steps // 10))])
    results["lm"] = (time.time() - t0, time.process_time() - c0, lm)
    per_epoch = len(train) // taglm.PRESETS[preset].batch_size
    for insert in ("layer1", "none"):
        args = ["tag", "--preset", preset, "--tag_data", str(conll), "--lm_insert", insert, "--dtype", "float32",
                "--init_from", str(lm_dir / "ckpt.pt"), "--epochs", "1000", "--patience", "0", "--labelled", "0"]
        t0, c0 = time.time(), time.process_time()
        evals = []
        step = cpu_per_call(taglm.Tagger, "forward", lambda: evals.extend(cpu_per_call(
            taglm, "evaluate_tagger", lambda: taglm.main(args + ["--out_dir", str(out / f"probe-{insert}"),
                                                                "--max_steps", "30", "--eval_interval", "30"]))))
        probe_cpu = time.process_time() - c0
        per_step = statistics.median(step[3:-1])
        fixed = probe_cpu - 30 * per_step  # data, LM cache, one dev and one test evaluation
        dev_eval = evals[0]  # from the dev evaluation's start to the test evaluation's: dev + checkpoint
        # budget = fixed + steps * per_step + (steps / per_epoch) * dev_eval, with 15% kept in reserve (an
        # 8% reserve once ended 1% over: a step's CPU time varies with what else runs on the machine)
        steps = int((tag_minutes * 60 * 0.85 - fixed) / (per_step + dev_eval / per_epoch))
        t0, c0 = time.time(), time.process_time()
        r = taglm.main(args + ["--out_dir", str(out / insert), "--max_steps", str(steps), "--eval_interval",
                               str(per_epoch), "--log_interval", str(per_epoch // 2)])
        results[insert] = (time.time() - t0, time.process_time() - c0, r, steps, per_step, probe_cpu)
    wall, cpu, lm = results["lm"]
    print(f"\nLMs ({preset}, {lm_steps} steps on WikiText-2 + CoNLL-2003 train, budget {lm_minutes} CPU-min): "
          f"ppl fwd {lm['ppl_fwd']:.1f} bwd {lm['ppl_bwd']:.1f} on WikiText-2 valid; {wall:.0f} s wall, {cpu:.0f} s CPU")
    for insert, label in (("layer1", "with LM embeddings (layer1)"), ("none", "without LMs (baseline)")):
        wall, cpu, r, steps, per_step, probe = results[insert]
        print(f"tagger {label}: {steps} steps ({steps / per_epoch:.1f} epochs, {per_step:.3f} CPU-s/step), "
              f"budget {tag_minutes} CPU-min: dev F1 {100 * r['best']:.2f}, test F1 {100 * r['test_f1']:.2f}; "
              f"{wall:.0f} s wall, {cpu:.0f} s CPU (probe before it: {probe:.0f} s CPU)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["crf", "quality"])
    p.add_argument("--shared", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    p.add_argument("--lm_minutes", type=float, default=15.0, help="CPU minutes for pretraining the two LMs")
    p.add_argument("--tag_minutes", type=float, default=20.0, help="CPU minutes for each tagger")
    p.add_argument("--preset", default="small")
    p.add_argument("--out_dir", default="")
    p.add_argument("--lm_from", default="", help="reuse the LMs in this folder (an earlier run's out_dir/lm)")
    args = p.parse_args()
    if args.what == "crf":
        bench_crf()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench_quality(Path(args.shared), args.lm_minutes, args.tag_minutes, args.preset, Path(args.out_dir or tmp),
                          args.lm_from)


if __name__ == "__main__":
    main()
