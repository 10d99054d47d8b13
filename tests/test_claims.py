"""bench/claims.py: its recipes are valid command lines of their scripts, and its bookkeeping is right."""
import importlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import claims  # noqa: E402


def stages_of(module, monkeypatch) -> dict:
    """The stages a script's main() hands to run_main."""
    seen = {}
    monkeypatch.setattr(module, "run_main", lambda argv, stages: seen.update(stages))
    module.main([])
    return seen


@pytest.mark.parametrize("name", ["gpt", "bert", "elmo", "ulmfit", "taglm", "transformer"])
def test_every_script_has_a_recipe_whose_commands_parse(name, monkeypatch, tmp_path):
    """The main job's flags and every arm's stage command are fields the script knows, with valid values."""
    assert name in claims.RECIPES, f"bench/claims.py has no recipe for {name}.py"
    recipe, module = claims.RECIPES[name], importlib.import_module(name)
    stages = stages_of(module, monkeypatch)
    commands = [recipe.main(m) for m in (30.0, 3.0)]
    commands += [make(tmp_path / "main", lr, seed, tmp_path / "arm") for make in recipe.arms.values()
                 for lr in recipe.lrs for seed in (0, 1)]
    for argv in commands:
        stage, cfg = module.parse_config(argv + ["--out_dir", str(tmp_path / "x")], stages)
        module.validate(cfg)
        assert stage in stages
    assert not recipe.arms or set(recipe.arms) == {"with", "without"} and recipe.lrs


def test_scaled_steps_grow_with_the_budget():
    assert claims.steps(1000, 30, 10) == "3000" and claims.steps(1000, 1, 10) == "100"
    assert claims.steps(3, 0.01, 10) == "1"


@given(st.dictionaries(st.tuples(st.sampled_from(["with", "without"]), st.sampled_from([1e-4, 3e-4, 1e-3]),
                                 st.integers(0, 2)), st.tuples(st.floats(0, 1), st.floats(0, 100)), min_size=1))
def test_sweep_picks_each_arm_by_its_chosen_by_mean_and_reports_the_other(results):
    picked = claims.sweep(results)
    assert set(picked) == {arm for arm, _, _ in results}
    for arm, (lr, mean, by_seed) in picked.items():
        assert by_seed == {s: v[1] for (a, r, s), v in results.items() if a == arm and r == lr}
        assert mean == pytest.approx(sum(by_seed.values()) / len(by_seed))
        chosen = [v[0] for (a, r, _), v in results.items() if a == arm and r == lr]
        for other in {r for a, r, _ in results if a == arm}:
            scores = [v[0] for (a, r, _), v in results.items() if a == arm and r == other]
            assert sum(scores) / len(scores) <= sum(chosen) / len(chosen) + 1e-9


def test_claim_and_best_are_read_from_metrics_jsonl(tmp_path):
    lines = [{"step": 10, "split": "val", "acc": 0.6}, {"step": 20, "split": "val", "acc": 0.7},
             {"step": 30, "split": "val", "acc": 0.65}, {"split": "claim", "with": 70.0, "without": 60.0},
             {"step": 40, "split": "train", "acc": 0.99}, {"step": 40, "split": "test", "acc": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert claims.claim_of(tmp_path)["with"] == 70.0
    assert claims.final_of(tmp_path, "acc") == 0.65  # the last validation record, not the best of them
    assert claims.final_of(tmp_path, "acc", "test") == 0.5
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(SystemExit, match="no claim record"):
        claims.claim_of(tmp_path)


def test_the_claims_block_is_replaced_not_repeated():
    row = {"script": "gpt.py", "figure": "Table 5", "metric": "acc", "with": 70.0, "without": 62.5, "gap": 7.5,
           "gaps": [7.5, 6.0], "lrs": "0.0001 / 0.001", "cpu_minutes": 31.2, "command": "python bench/claims.py"}
    first = claims.replace_block("# Results\n\nearlier text\n", claims.table([row]))
    assert first.count(claims.START) == 1 and "| gpt.py | Table 5 | 70.0 | 62.5 | +7.5 | +7.5, +6.0 |" in first
    second = claims.replace_block(first + "\n## later section\n", claims.table([dict(row, **{"with": 71.0})]))
    assert second.count(claims.START) == 1 and "| 71.0 |" in second and "| 70.0 |" not in second
    assert second.startswith("# Results\n\nearlier text\n") and second.endswith("## later section\n")


def test_a_saved_row_keeps_the_rows_another_run_wrote_meanwhile(tmp_path):
    saved, row = tmp_path / "runs" / "rows.json", {"with": 70.0, "cpu_minutes": 31.0}
    claims.save_row(saved, "gpt", row)
    other = json.loads(saved.read_text())  # a second claims.py, side by side, adds its row
    saved.write_text(json.dumps({**other, "taglm": {"with": 81.0, "cpu_minutes": 60.0}}))
    claims.save_row(saved, "bert", {"with": 64.0, "cpu_minutes": None})  # rebuilt --from_runs: no CPU time of its own
    rows = json.loads(saved.read_text())
    assert sorted(rows) == ["bert", "gpt", "taglm"] and rows["taglm"]["with"] == 81.0
    assert rows["bert"]["cpu_minutes"] is None
    claims.save_row(saved, "gpt", {"with": 71.0, "cpu_minutes": None})  # rebuilt: keeps the measured minutes
    assert json.loads(saved.read_text())["gpt"] == {"with": 71.0, "cpu_minutes": 31.0}
