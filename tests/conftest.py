"""Shared fixtures: tiny configs, seeds, and the path to ../shared/data when it is there."""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=20)
settings.load_profile("default")
# Tiny models run faster on one thread than on two fighting over a shared 2-core machine.
torch.set_num_threads(1)
# `--dtype auto` means bf16 autocast on CPUs with AVX-512 BF16 and fp32 elsewhere. In the suite it means bf16
# everywhere unless NLP_LINEAGE_AUTO_DTYPE says otherwise, so a test that compares numbers without naming
# its dtype fails on every machine, not only on some (CI runs the suite once more with float32).
os.environ.setdefault("NLP_LINEAGE_AUTO_DTYPE", "bfloat16")
os.environ.setdefault("NLP_LINEAGE_CACHE", str(Path(__file__).resolve().parent / ".no-cache"))

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA
