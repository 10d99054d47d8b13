"""pyflakes finds no undefined names, unused imports or redefinitions in any script or test."""
import io
from pathlib import Path

import pytest
from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_pyflakes_is_clean(path):
    out = io.StringIO()
    checkPath(str(path), Reporter(out, out))
    assert out.getvalue() == ""
