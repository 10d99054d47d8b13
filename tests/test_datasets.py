"""Every script downloads its named datasets from the pinned sources that ../shared/data/URLS.md lists,
with the checksums recorded there: no URL or sha256 is made up."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [p.stem for p in sorted(ROOT.glob("*.py"))]
URLS_MD = ROOT.parent / "shared" / "data" / "URLS.md"


@pytest.mark.parametrize("script", SCRIPTS)
def test_dataset_sources_are_the_documented_ones(script, shared_data):
    listed = URLS_MD.read_text()
    datasets = importlib.import_module(script).DATASETS
    assert datasets
    for name, files in datasets.items():
        for fname, (url, sha) in files.items():
            commit = re.search(r"/([0-9a-f]{40})/", url)  # pinned: raw GitHub at a fixed commit
            documented = url in listed or (commit and commit.group(1) in listed and url.split("/")[-1] in listed)
            assert documented, f"{script}: {name}/{fname} comes from an undocumented URL {url}"
            assert sha and re.fullmatch(r"[0-9a-f]{64}", sha) and sha in listed, f"{script}: {name}/{fname}"
