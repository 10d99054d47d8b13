"""The harness's guarantees, in every script (DESIGN.md: the training loop, errors; issue 12): exact resume
whatever moment Ctrl-C lands, clean one-line exits, no checkpoint of non-finite numbers, checkpoints and
out_dirs checked before anything is read or written, every documented bad input answered in one line, and a
--help that explains the flags. Each script enters through main(argv) on its `tiny` preset and built-in data.
"""
import importlib
import json
import math
import os
import signal
import typing

import pytest
import torch

FP32 = ["--device", "cpu", "--dtype", "float32"]
# For each script: a short training stage (12 steps, evaluated every 4), another stage that starts from a
# checkpoint with --init_from, and the flags naming a size, a dropout (with a value out of its range), the data.
SHORT = ["--preset", "tiny", "--data", "builtin", "--total_steps", "12", "--eval_interval", "4", "--log_interval", "2"]
SCRIPTS = {
    "elmo": dict(train=["pretrain", *SHORT], later=["task", "--preset", "tiny", "--task_data", "builtin"],
                 size="--lstm_dim", dropout=("--dropout", "1.0"), data="--data"),
    "gpt": dict(train=["pretrain", *SHORT], later=["finetune", "--preset", "tiny", "--finetune_data", "builtin"],
                size="--n_layer", dropout=("--dropout", "1.0"), data="--data"),
    "bert": dict(train=["pretrain", *SHORT], later=["finetune", "--preset", "tiny", "--finetune_data", "builtin"],
                 size="--n_layer", dropout=("--dropout", "1.0"), data="--data"),
    "transformer": dict(train=["train", *SHORT], later=["translate", "--preset", "tiny"],
                        size="--n_layer", dropout=("--dropout", "1.0"), data="--data"),
    "taglm": dict(train=["pretrain-lm", *SHORT[:4], "--lm_total_steps", "12", *SHORT[6:]],
                  later=["tag", "--preset", "tiny", "--tag_data", "builtin"],
                  size="--lm_hidden", dropout=("--lm_dropout", "1.0"), data="--data"),
    "ulmfit": dict(train=["pretrain", *SHORT], later=["finetune-lm", "--preset", "tiny", "--task_data", "builtin"],
                   size="--n_hid", dropout=("--drop_mult", "2.0"), data="--data"),
}
PARAMS = pytest.mark.parametrize("name", sorted(SCRIPTS))


def train(name, out, *more):
    return importlib.import_module(name).main([*SCRIPTS[name]["train"], *FP32, "--out_dir", str(out), *more])


def exit_of(name, argv, capsys):
    """(status, stderr) of main(argv), which must end the process."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(argv)
    return e.value.code, capsys.readouterr().err.strip()


def error_of(name, argv, capsys):
    code, err = exit_of(name, argv, capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, (code, err)
    return err


def final_state(out):
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    return ckpt["step"], ckpt["model"]


def assert_same_run(a, b):
    (step_a, model_a), (step_b, model_b) = final_state(a), final_state(b)
    assert step_a == step_b and model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "resumed weights differ"


def inject(mod, monkeypatch, at_step, point=None, loss_scale=None):
    """Wrap the script's train_loop: during 0-based step `at_step`, raise SIGINT at `point` (before the
    forward pass, after the backward pass, after the optimizer's update); from that step on, scale the loss
    by `loss_scale` (nan: a non-finite loss)."""
    real = mod.train_loop

    def wrapper(cfg, stage, model, opt, sched, batches, loss_fn, evaluate, ckpt=None, **kw):
        done, fired = [ckpt["step"] if ckpt else 0], []

        def fire(where):
            if where == point and done[0] == at_step and not fired:
                fired.append(signal.raise_signal(signal.SIGINT))

        def loss(m, b):
            fire("before_forward")
            value = loss_fn(m, b)
            return value * loss_scale if loss_scale is not None and done[0] >= at_step else value

        opt.register_step_pre_hook(lambda *_: fire("after_backward"))
        opt.register_step_post_hook(lambda *_: (fire("after_update"), done.__setitem__(0, done[0] + 1)))
        return real(cfg, stage, model, opt, sched, batches, loss, evaluate, ckpt, **kw)

    monkeypatch.setattr(mod, "train_loop", wrapper)


# --- resume ------------------------------------------------------------------------------------------------


@PARAMS
def test_resume_after_max_steps_equals_the_uninterrupted_run(name, tmp_path):
    train(name, tmp_path / "full")
    train(name, tmp_path / "cut", "--max_steps", "6")
    assert final_state(tmp_path / "cut")[0] == 6
    train(name, tmp_path / "cut", "--resume")
    assert_same_run(tmp_path / "full", tmp_path / "cut")


@PARAMS
@pytest.mark.parametrize("point", ["before_forward", "after_backward", "after_update"])
def test_ctrl_c_anywhere_in_a_step_saves_that_step_and_resume_is_exact(name, point, tmp_path, capsys, monkeypatch):
    """The signal lands inside step 6 (0-based 5): that step completes, is saved at step 6, the run exits
    with 130 and one line, and resuming it reaches the uninterrupted run's weights exactly."""
    train(name, tmp_path / "full")
    mod = importlib.import_module(name)
    with monkeypatch.context() as m:
        inject(mod, m, at_step=5, point=point)
        code, err = exit_of(name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path / "cut")], capsys)
    assert code == 130 and final_state(tmp_path / "cut")[0] == 6
    train(name, tmp_path / "cut", "--resume")
    assert_same_run(tmp_path / "full", tmp_path / "cut")


@PARAMS
def test_ctrl_c_before_the_first_step_is_one_line_and_writes_nothing(name, tmp_path, capsys, monkeypatch):
    mod = importlib.import_module(name)
    monkeypatch.setattr(mod, "setup", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = exit_of(name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path / "o")], capsys)
    assert code == 130 and err.startswith("interrupted") and "\n" not in err
    assert not (tmp_path / "o").exists()


@PARAMS
def test_a_second_ctrl_c_while_saving_keeps_the_last_checkpoint(name, tmp_path, capsys, monkeypatch):
    mod, real, calls = importlib.import_module(name), importlib.import_module(name).save_checkpoint, []

    def save(path, state):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: interrupted half-way through writing it
            with open(path.with_name(f".{path.name}.tmp"), "wb") as f:
                f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        real(path, state)

    monkeypatch.setattr(mod, "save_checkpoint", save)
    code, err = exit_of(name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path)], capsys)
    assert code == 130 and err.startswith("interrupted") and "\n" not in err
    assert final_state(tmp_path)[0] == 4  # the first evaluation's checkpoint, whole


# --- non-finite numbers ------------------------------------------------------------------------------------


@PARAMS
def test_a_non_finite_loss_stops_at_its_step_and_keeps_a_finite_checkpoint(name, tmp_path, capsys, monkeypatch):
    inject(importlib.import_module(name), monkeypatch, at_step=5, loss_scale=float("nan"))
    err = error_of(name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path)], capsys)
    assert "at step 6" in err and str(tmp_path / "ckpt.pt") in err
    step, model = final_state(tmp_path)
    assert step == 4 and all(v.isfinite().all() for v in model.values() if v.is_floating_point())


@PARAMS
def test_exploding_weights_are_never_checkpointed(name, tmp_path, capsys, monkeypatch):
    """Weights that overflow to inf in an update give a one-line error, never a checkpoint of them, and the
    checkpoint that stays loads and is finite."""
    mod, real = importlib.import_module(name), importlib.import_module(name).train_loop

    def wrapper(cfg, stage, model, opt, sched, *args, **kw):
        def blow_up(*_):
            if wrapper.steps == 5:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
            wrapper.steps += 1
        opt.register_step_post_hook(blow_up)
        return real(cfg, stage, model, opt, sched, *args, **kw)

    wrapper.steps = 0
    monkeypatch.setattr(mod, "train_loop", wrapper)
    err = error_of(name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path)], capsys)
    assert "step" in err
    step, model = final_state(tmp_path)
    assert step == 4 and all(v.isfinite().all() for v in model.values() if v.is_floating_point())


@PARAMS
def test_non_finite_numbers_in_flags_are_refused_before_anything_is_written(name, tmp_path, capsys):
    mod = importlib.import_module(name)
    floats = [f for f, kind in typing.get_type_hints(mod.Config).items() if kind is float]
    assert floats
    for field in floats:
        for value in ("inf", "nan", "-inf"):
            err = error_of(name, [*SCRIPTS[name]["train"], f"--{field}", value, "--out_dir", str(tmp_path / "o")],
                           capsys)
            assert f"--{field}" in err and not (tmp_path / "o").exists()


# --- checkpoints and out_dir --------------------------------------------------------------------------------


@PARAMS
def test_checkpoints_of_another_script_stage_or_shape_are_one_line(name, tmp_path, capsys):
    train(name, tmp_path / "run", "--max_steps", "4")
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    argv = [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path / "run"), "--resume"]
    torch.save({**ckpt, "script": "other.py"}, tmp_path / "run" / "ckpt.pt")
    assert "written by other.py, not by" in error_of(name, argv, capsys)
    torch.save({**ckpt, "stage": "elsewhere"}, tmp_path / "run" / "ckpt.pt")
    assert "is a elsewhere checkpoint, not" in error_of(name, argv, capsys)
    torch.save(torch.zeros(3), tmp_path / "run" / "ckpt.pt")
    assert "written by another program, not by" in error_of(name, argv, capsys)
    (tmp_path / "run" / "ckpt.pt").write_text("junk")
    assert "not a readable checkpoint" in error_of(name, argv, capsys)
    later = [*SCRIPTS[name]["later"], *FP32, "--out_dir", str(tmp_path / "later")]
    torch.save(torch.zeros(3), tmp_path / "zeros.pt")
    assert "written by another program" in error_of(name, [*later, "--init_from", str(tmp_path / "zeros.pt")], capsys)


@PARAMS
def test_resume_needs_the_same_architecture_and_data(name, tmp_path, capsys):
    train(name, tmp_path, "--max_steps", "4")
    cfg = importlib.import_module(name).PRESETS["tiny"]
    size = SCRIPTS[name]["size"]
    bigger = str(getattr(cfg, size[2:]) + 1)
    assert f"trained with {size}" in error_of(name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path),
                                                     "--resume", size, bigger], capsys)
    data = tmp_path.parent / "other.txt"
    data.write_text("some other text\n" * 4000)
    assert f"trained with {SCRIPTS[name]['data']}" in error_of(
        name, [*SCRIPTS[name]["train"], *FP32, "--out_dir", str(tmp_path), "--resume", SCRIPTS[name]["data"], str(data)],
        capsys)


@PARAMS
def test_out_dir_is_checked_first(name, tmp_path, capsys, monkeypatch):
    argv = [*SCRIPTS[name]["train"], *FP32]
    (tmp_path / "file").write_text("x")
    assert "not a folder that can be written" in error_of(name, [*argv, "--out_dir", str(tmp_path / "file")], capsys)
    assert "not a folder that can be written" in error_of(name, [*argv, "--out_dir", str(tmp_path / "file" / "sub")],
                                                          capsys)
    mod = importlib.import_module(name)
    monkeypatch.setattr(mod.os, "access", lambda path, mode: False)  # root writes anywhere: pretend not
    assert "not a folder that can be written" in error_of(name, [*argv, "--out_dir", str(tmp_path / "new")], capsys)
    monkeypatch.undo()
    train(name, tmp_path / "run", "--max_steps", "2")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    err = error_of(name, [*argv, "--out_dir", str(tmp_path / "run")], capsys)
    assert "--resume" in err and "--out_dir" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


# --- bad input and --help -----------------------------------------------------------------------------------


@PARAMS
def test_every_documented_bad_input_is_one_line(name, tmp_path, capsys):
    s = SCRIPTS[name]
    argv = [*s["train"], *FP32, "--out_dir", str(tmp_path / "o")]
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    cases = [([s["data"], str(tmp_path / "missing.txt")], "does not exist"),
             ([s["data"], str(tmp_path / "empty.txt")], "empty"),
             ([s["data"], str(tmp_path / "latin1.txt")], "UTF-8"),
             ([s["data"], "nosuchdataset"], "unknown dataset"),
             (["--preset", "huge"], "invalid choice"),
             ([s["size"], "0"], s["size"][2:]),
             ([s["size"], "-3"], s["size"][2:]),
             ([s["size"], "two"], "invalid"),
             ([*s["dropout"]], s["dropout"][0][2:]),
             (["--dtype", "float8"], "invalid choice"),
             (["--no_such_flag", "1"], "unrecognized"),
             (["--max_steps", "-1"], "max_steps")]
    for more, message in cases:
        assert message in error_of(name, [*argv, *more], capsys), more
    assert not (tmp_path / "o").exists()


@PARAMS
def test_help_lists_the_stages_and_explains_every_field(name, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "stages:" in out and "(none)" in out
    fields = typing.get_type_hints(mod.Config)
    for field in fields:
        assert f"--{field}" in out, field
    assert "run control" in out and "(default" not in out
    assert f"paper {getattr(mod.PRESETS['paper'], SCRIPTS[name]['size'][2:])}" in out  # each preset's value


@PARAMS
def test_auto_dtype_follows_the_environment(name, monkeypatch, capsys, tmp_path):
    mod = importlib.import_module(name)
    cfg = mod.PRESETS["tiny"]
    for value, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        monkeypatch.setenv("NLP_LINEAGE_AUTO_DTYPE", value)
        assert mod.setup(cfg)[1] == dtype
    assert mod.setup(type(cfg)(**{**cfg.__dict__, "dtype": "float32"}))[1] == torch.float32  # named: as named
    monkeypatch.setenv("NLP_LINEAGE_AUTO_DTYPE", "float64")
    assert "NLP_LINEAGE_AUTO_DTYPE" in error_of(name, [*SCRIPTS[name]["train"], "--out_dir", str(tmp_path)], capsys)


def test_the_suite_runs_with_auto_meaning_a_fixed_dtype():
    """tests/conftest.py fixes what --dtype auto means for the whole suite (bf16 unless CI says fp32), so a
    test that compares numbers without naming its dtype fails on every machine, not on some CPUs only."""
    assert os.environ.get("NLP_LINEAGE_AUTO_DTYPE") in ("bfloat16", "float32")


def test_metrics_lines_are_json_with_the_documented_keys(tmp_path):
    for name in SCRIPTS:
        train(name, tmp_path / name, "--max_steps", "4")
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert {"train", "val"} <= {r["split"] for r in records}
        assert all({"step", "split", "loss"} <= r.keys() and math.isfinite(r["loss"]) for r in records)


@PARAMS
def test_a_huge_but_finite_loss_never_overflows_a_perplexity(name, tmp_path, capsys, monkeypatch):
    """Weights scaled up 30000-fold after step 5 make the validation loss finite but far above 709, where
    math.exp overflows: the run ends normally or in one line, never in a traceback."""
    mod, real = importlib.import_module(name), importlib.import_module(name).train_loop

    def wrapper(cfg, stage, model, opt, sched, *args, **kw):
        def scale(*_):
            wrapper.steps += 1
            if wrapper.steps == 6:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(30000.0 if p.dim() > 1 else 1.0)
        opt.register_step_post_hook(scale)
        return real(cfg, stage, model, opt, sched, *args, **kw)

    wrapper.steps = 0
    monkeypatch.setattr(mod, "train_loop", wrapper)
    try:
        metrics = train(name, tmp_path)
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
