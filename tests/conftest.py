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
os.environ.setdefault("NLP_LINEAGE_CACHE", str(Path(__file__).resolve().parent / ".no-cache"))

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA
