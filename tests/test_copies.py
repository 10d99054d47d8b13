"""The harness block is the same to the byte in all six scripts, and marked copies between scripts stay
identical to their source (DESIGN.md, The house).

`python tests/test_copies.py --fix` rewrites every drifted copy from its source (as Hugging Face's
`make fix-copies`). A block in one script marked

    # Copied from gpt.py: NAME
    # Copied from gpt.py: NAME with A->B, C->D

directly above a top-level `def`, `class` or `NAME = ...` must equal the top-level NAME of that script after
the replacements A->B, C->D (plain text, applied in order). This is Hugging Face's check_copies, for files.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [s for s in ["gpt.py", "transformer.py", "bert.py", "elmo.py", "ulmfit.py", "taglm.py"]
           if (ROOT / s).exists()]
MARK = re.compile(r"^# Copied from (\w+\.py): (\w+)(?: with (.+))?$")
HARNESS_START = "# ==== harness: the same in all six scripts (tests/test_copies.py checks) ===="
HARNESS_END = "# ==== end of harness ===="


def harness(path: Path) -> str | None:
    """The harness block of a script, from its first marker line to its last, or None without one."""
    lines = path.read_text().splitlines()
    if lines.count(HARNESS_START) != 1 or lines.count(HARNESS_END) != 1:
        return None
    start, end = lines.index(HARNESS_START), lines.index(HARNESS_END)
    return "\n".join(lines[start:end + 1]) if start < end else None


def check_harness(paths: list[Path]) -> list[str]:
    """Problems: a script without exactly one harness block, or whose block differs from the first script's."""
    blocks = {p.name: harness(p) for p in paths}
    problems = [f"{name}: no harness block between the marker lines" for name, b in blocks.items() if b is None]
    reference = next((b for b in blocks.values() if b is not None), None)
    for name, b in blocks.items():
        if b is not None and b != reference:
            first = next(i for i, (x, y) in enumerate(zip(b.splitlines() + [""], reference.splitlines() + [""])) if x != y)
            problems.append(f"{name}: harness line {first + 1} differs from {paths[0].name}'s")
    return problems


def definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """The top-level defs, classes and single-name assignments of a module, by name."""
    named = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
    return named | {n.targets[0].id: n for n in tree.body
                    if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}


def span(node: ast.AST) -> tuple[int, int]:
    """First and last line of a definition, decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node.end_lineno


def top_level(path: Path) -> dict[str, str]:
    """Source text of each top-level def, class and NAME = ... of a file, decorators included."""
    text = path.read_text()
    lines = text.splitlines()
    return {name: "\n".join(lines[span(node)[0] - 1:span(node)[1]])
            for name, node in definitions(ast.parse(text)).items()}


def check_copies(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the marked copies in path: a missing source, or a copy that drifted from it."""
    problems = []
    lines = path.read_text().splitlines()
    mine = None
    for n, line in enumerate(lines, 1):
        m = MARK.match(line)
        if not m:
            continue
        source_file, name, replacements = m.groups()
        mine = mine if mine is not None else top_level(path)
        source = root / source_file
        if not source.is_file() or name not in top_level(source):
            problems.append(f"{path.name}:{n}: no top-level {name} in {source_file}")
            continue
        expected = top_level(source)[name]
        for pair in (replacements or "").split(","):
            if pair.strip():
                old, new = (s.strip() for s in pair.split("->"))
                expected = expected.replace(old, new)
        following = next((l for l in lines[n:] if l.strip() and not l.startswith("#")), "")
        got_name = re.match(r"(?:class|def)\s+(\w+)|(\w+)\s*=|@", following)
        copy_name = got_name.group(1) or got_name.group(2) if got_name else None
        if copy_name is None:  # a decorator: the def/class comes after it
            copy_name = next((re.match(r"(?:class|def)\s+(\w+)", l).group(1) for l in lines[n:]
                              if re.match(r"(?:class|def)\s+\w+", l)), None)
        if copy_name not in mine or mine[copy_name] != expected:
            problems.append(f"{path.name}:{n}: copy of {source_file}:{name} differs from its source")
    return problems


def test_harness_is_identical_in_all_six_scripts():
    assert len(SCRIPTS) == 6
    assert check_harness([ROOT / s for s in SCRIPTS]) == []
    assert len(harness(ROOT / "gpt.py").splitlines()) <= 250


def test_harness_checker_catches_a_drifted_copy(tmp_path):
    block = [HARNESS_START, "def f():", "    return 1", HARNESS_END]
    (tmp_path / "a.py").write_text("\n".join(["x = 1", *block, "main()"]))
    (tmp_path / "b.py").write_text("\n".join(["y = 2", *block]))
    (tmp_path / "c.py").write_text("\n".join([*block[:2], "    return 2", block[3]]))  # one line drifted
    (tmp_path / "d.py").write_text("\n".join(block[:3]))  # no end marker
    (tmp_path / "e.py").write_text("\n".join([*block, *block]))  # two blocks
    paths = [tmp_path / f"{n}.py" for n in "abcde"]
    assert check_harness(paths[:2]) == []
    assert check_harness(paths) == ["d.py: no harness block between the marker lines",
                                    "e.py: no harness block between the marker lines",
                                    "c.py: harness line 3 differs from a.py's"]


def test_each_script_is_short_and_meets_the_model_early():
    for script in SCRIPTS:
        lines = (ROOT / script).read_text().splitlines()
        assert len(lines) <= 900, f"{script} has {len(lines)} lines"
        first = next(n for n, line in enumerate(lines, 1) if re.match(r"class \w+\(nn\.Module\)", line))
        assert first <= 200, f"{script}: the first nn.Module class starts at line {first}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_marked_copies_match_their_source(script):
    assert check_copies(ROOT / script) == []


def test_checker_catches_a_drifted_copy_and_fixes_it(tmp_path):
    (tmp_path / "a.py").write_text("def helper(x):\n    return x + 1\n\n\nclass Thing:\n    size = 1\n\n"
                                   "LIMIT = 3  # a constant\n")
    good = "# Copied from a.py: helper\ndef helper(x):\n    return x + 1\n"
    renamed = "# Copied from a.py: Thing with Thing->Item, 1->2\nclass Item:\n    size = 2\n"
    constant = "x = 0\n# Copied from a.py: LIMIT\nLIMIT = 3  # a constant\n"
    drifted = "# Copied from a.py: helper\ndef helper(x):\n    return x + 2\n"
    drifted_constant = "x = 0\n# Copied from a.py: LIMIT\nLIMIT = (\n    4)\ny = 1\n"
    missing = "# Copied from a.py: nothing\ndef nothing():\n    pass\n"
    for name, text in [("good.py", good), ("renamed.py", renamed), ("constant.py", constant), ("drifted.py", drifted),
                       ("drifted_constant.py", drifted_constant), ("missing.py", missing)]:
        (tmp_path / name).write_text(text)
    assert check_copies(tmp_path / "good.py", tmp_path) == []
    assert check_copies(tmp_path / "renamed.py", tmp_path) == []
    assert check_copies(tmp_path / "constant.py", tmp_path) == []
    assert check_copies(tmp_path / "drifted.py", tmp_path) == ["drifted.py:1: copy of a.py:helper differs from its source"]
    assert check_copies(tmp_path / "drifted_constant.py", tmp_path) == [
        "drifted_constant.py:2: copy of a.py:LIMIT differs from its source"]
    assert check_copies(tmp_path / "missing.py", tmp_path) == ["missing.py:1: no top-level nothing in a.py"]
    assert fix_copies(tmp_path / "drifted.py", tmp_path) == 1
    assert (tmp_path / "drifted.py").read_text() == good
    assert fix_copies(tmp_path / "drifted_constant.py", tmp_path) == 1
    assert (tmp_path / "drifted_constant.py").read_text() == constant + "y = 1\n"
    assert fix_copies(tmp_path / "good.py", tmp_path) == 0


def fix_copies(path: Path, root: Path = ROOT) -> int:
    """Rewrite the marked copies in path from their sources; returns how many changed."""
    changed = 0
    while True:
        problems = [p for p in check_copies(path, root) if "differs" in p]
        if not problems:
            return changed
        n = int(problems[0].split(":")[1])
        lines = path.read_text().splitlines()
        source_file, name, replacements = MARK.match(lines[n - 1]).groups()
        expected = top_level(root / source_file)[name]
        for pair in (replacements or "").split(","):
            if pair.strip():
                old, new = (s.strip() for s in pair.split("->"))
                expected = expected.replace(old, new)
        first, last = min((span(x) for x in definitions(ast.parse(path.read_text())).values() if span(x)[0] > n))
        lines[first - 1:last] = expected.splitlines()
        path.write_text("\n".join(lines) + "\n")
        changed += 1


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--fix"]:
        for script in SCRIPTS:
            print(script, fix_copies(ROOT / script), "copies rewritten")
    else:
        for script in SCRIPTS:
            print("\n".join(check_copies(ROOT / script)) or f"{script}: copies match")
