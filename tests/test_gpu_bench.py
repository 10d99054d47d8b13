"""bench/gpu.py without a GPU: it refuses in one line and writes nothing; its CPU dry run writes a table with a row
per script into the GPU section of a markdown file, and a second run replaces that section instead of adding one."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "gpu.py"
RESULTS = ROOT / "bench" / "RESULTS.md"
SCRIPTS = ("gpt", "bert", "transformer", "elmo", "ulmfit", "taglm")


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def section(text: str, bench) -> str:
    """What lies between the GPU markers; there must be exactly one pair."""
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    return text.split(bench.BEGIN)[1].split(bench.END)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_exits_2_with_one_line_and_writes_nothing():
    before, listing = RESULTS.read_bytes(), sorted(p.name for p in RESULTS.parent.iterdir())
    r = run_bench(timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and "CUDA" in r.stderr
    assert r.stdout == ""
    assert RESULTS.read_bytes() == before and sorted(p.name for p in RESULTS.parent.iterdir()) == listing


@pytest.mark.parametrize("argv, says", [(["--device", "tpu"], "--device"), (["--budget", "-1"], "--budget"),
                                        (["--frobnicate"], "--frobnicate"),
                                        (["--device", "cpu", "--out", "/no/such/folder/r.md"], "--out")])
def test_command_line_errors_are_one_line_and_status_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        load_bench().main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and says in err


def test_the_section_in_results_md_is_replaced_and_the_rest_kept(tmp_path):
    bench, copy = load_bench(), tmp_path / "RESULTS.md"
    copy.write_text(RESULTS.read_text())
    head, tail = RESULTS.read_text().split(bench.BEGIN)[0], RESULTS.read_text().split(bench.END)[1]
    for table in ("| first | table |\n", "| second | table |\n"):
        bench.write_section(copy, table)
        text = copy.read_text()
        assert section(text, bench).strip() == table.strip()
        assert text.startswith(head + bench.BEGIN) and text.endswith(bench.END + tail)


@pytest.mark.slow
def test_cpu_dry_run_writes_a_row_per_script_and_a_rerun_replaces_it(tmp_path):
    """The dry run (1-2 minutes on 2 cores), then a run with no budget, which skips every part: the section it
    writes replaces the first one."""
    bench, out = load_bench(), tmp_path / "results.md"
    out.write_text("# Benchmarks\n\nEarlier figures.\n")
    r = run_bench("--device", "cpu", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nEarlier figures.\n\n## GPUs\n")
    first = section(text, bench)
    for name in SCRIPTS:
        rows = [line for line in first.splitlines() if line.startswith(f"| {name}.py |")]
        assert len(rows) == 2, rows  # the tiny run's and the throughput's
        tiny, step = rows
        assert tiny.endswith("| pass |") or "(budget)" in tiny, tiny  # a failing script fails the dry run too
        cells = [cell.strip() for cell in step.split("|")]
        assert float(cells[5].replace(",", "")) > 0 and cells[7] == "skipped (no CUDA)"  # tok/s; memory needs CUDA
    assert "skipped (no CUDA)" in first.split("**Data parallel**")[1]
    assert first in r.stdout  # the same table is printed

    r = run_bench("--device", "cpu", "--budget", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    second = section(text, bench)
    assert text.startswith("# Benchmarks\n\nEarlier figures.\n\n## GPUs\n") and text.count("## GPUs") == 1
    assert second != first and "| pass |" not in second
    assert all(f"| {name}.py |" in second for name in SCRIPTS) and "skipped (budget)" in second
