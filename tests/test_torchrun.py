"""A main job of several stages runs under torchrun with two Gloo ranks on the CPU: each later stage
starts from the checkpoint the earlier one wrote (DESIGN.md: same code path for 1 rank and N)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = {
    "gpt": ["--preset", "tiny", "--data", "builtin", "--max_new_tokens", "5"],
    "bert": ["--preset", "tiny", "--data", "builtin", "--finetune_data", "builtin"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(JOBS))
def test_main_job_under_torchrun(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NLP_LINEAGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / f"{script}.py"), *JOBS[script], "--out_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" | val loss ") >= 1
    assert len(list((tmp_path / "out").glob("*/ckpt.pt"))) >= 1
