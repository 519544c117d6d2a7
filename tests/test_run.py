"""`loramigrate run` on the shipped debug recipe: all stages, the report, skipping, and resuming after a
kill in any stage to the same final adapter."""

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loramigrate.adapters import read_adapter
from loramigrate.cli.main import app
from tests.helpers import WORDS, make_lora, make_tiny, run_script

runner = CliRunner()
RECIPE = Path(__file__).parent.parent / "recipes" / "debug-tiny.yaml"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def build_debug(root: Path, adapters=("water",)) -> Path:
    """The files the debug recipe names, under ``root``."""
    old = make_tiny("llama", root / "old")
    make_tiny("llama", root / "new", seed=1, layers=3, intermediate=96)
    for i, name in enumerate(adapters):
        make_lora(old, root / "adapters" / name, targets=TARGETS, seed=i)
    rng = random.Random(0)
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        rows = [{"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " water"} for _ in range(n)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def debug_models(tmp_path_factory):
    return build_debug(tmp_path_factory.mktemp("debug"))


@pytest.fixture()
def debug(debug_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(debug_models))
    return tmp_path


@pytest.fixture(scope="module")
def whole_run(debug_models, tmp_path_factory):
    """One uninterrupted run, the reference for the resumed ones."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAMIGRATE_DEBUG_MODELS", str(debug_models))
        out = tmp_path_factory.mktemp("whole") / "run"
        assert run(out).exit_code == 0
    return out


def run(out, *extra):
    return runner.invoke(app, ["-q", "run", str(RECIPE), "-o", str(out), *map(str, extra)])


def factors(adapter_dir):
    return {n: (m.b, m.a) for n, m in read_adapter(adapter_dir).modules.items()}


def test_run_writes_every_stage_and_the_report_then_reruns_by_skipping(debug):
    result = run(debug / "run")
    assert result.exit_code == 0, result.output
    for stage in ("transfer", "search", "finetune", "eval"):
        assert (debug / "run" / "water" / stage / "manifest.json").is_file(), stage
    report = (debug / "run" / "report.md").read_text()
    for arm in ("old base + old adapter", "new base alone", "copy (old adapter as is)", "transfer only",
                "searched init", "final (finetuned)", "proxy ensemble"):  # the tiny pair shares a tokenizer
        assert arm in report, arm
    assert "| gap recovered |" in report  # – here: the random old adapter gains nothing on the test split
    assert "](align/cka.png)" in report and "](water/finetune/curve.png)" in report  # the plots, the CKA map too
    assert "exact_match" in result.stdout and "final adapter" in result.stdout
    stamps = {p: p.stat().st_mtime_ns for p in (debug / "run").rglob("manifest.json")}
    again = run(debug / "run")
    assert again.exit_code == 0 and "kept from earlier runs: align, transfer, search, finetune, eval" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in (debug / "run").rglob("manifest.json")}


def test_from_redoes_that_stage_and_the_later_ones(debug):
    assert run(debug / "run").exit_code == 0
    result = run(debug / "run", "--from", "finetune", "--set", "finetune.steps=3")
    assert result.exit_code == 0 and "kept from earlier runs: align, transfer, search)" in result.stdout
    assert len((debug / "run" / "water" / "finetune" / "log.jsonl").read_text().splitlines()) == 3


def test_the_eval_stage_loads_models_as_the_recipe_says(debug, monkeypatch):
    from loramigrate.config import ModelLoadConfig
    from loramigrate.eval import runner

    loads, real = [], runner.evaluate_pairs

    def evaluate_pairs(base, adapters, task, batch_size, load, *args, **kwargs):
        loads.append(load)
        return real(base, adapters, task, batch_size, load, *args, **kwargs)
    monkeypatch.setattr(runner, "evaluate_pairs", evaluate_pairs)
    result = run(debug / "run", "--set", "search=null", "--set", "finetune=null", "--set", "eval.load.dtype=float32",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert loads == [ModelLoadConfig(dtype="float32", device="cpu")] * 2
    manifest = json.loads((debug / "run" / "water" / "eval" / "manifest.json").read_text())
    assert manifest["config"]["load"] == {"dtype": "float32", "device": "cpu", "device_map": None, "max_memory": None}


BAD_INPUTS = {  # what breaks → (run options, a fragment of the one-line message)
    "adapter": (["--adapter", "{tmp}/empty"], "is not a PEFT adapter directory"),
    "training data": (["--set", "data.train={tmp}/missing.jsonl"], "cannot read data file"),
    "prompts": (["--set", "transfer.prompts={tmp}/bad.jsonl"], "not valid JSON"),
    "calibration": (["--set", "align.calib={tmp}/missing.txt"], "cannot read calibration file"),
    "teacher": (["--set", "finetune.teacher=old", "--set", "finetune.teacher_adapter={tmp}/empty"],
                "is not a PEFT adapter directory"),
}


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_run_checks_every_input_before_the_first_stage(debug, monkeypatch, what):
    def no_align(*args, **kwargs):
        pytest.fail("align ran before the inputs were checked")
    monkeypatch.setattr("loramigrate.pipeline.run_align", no_align)
    (debug / "empty").mkdir()
    (debug / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    options, message = BAD_INPUTS[what]
    result = run(debug / "run", *(o.format(tmp=debug) for o in options))
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert not (debug / "run").exists()


KILLS = {  # stage → (module attribute to break, which call raises)
    "align": ("loramigrate.align.runner.save_alignment", 1),
    "transfer": ("loramigrate.transfer.runner.verify_with_peft", 1),
    "search": ("loramigrate.search.core.apply_blend", 2),
    "finetune": ("loramigrate.finetune.loop._checkpoint", 2),
    "eval": ("loramigrate.eval.runner.evaluate_pairs", 2),
}


def kill_in(monkeypatch, stage: str):
    """Make the stage's call in KILLS raise KeyboardInterrupt (a kill) at its nth call; returns what undoes it."""
    target, nth = KILLS[stage]
    module, _, attr = target.rpartition(".")
    real, calls = getattr(__import__(module, fromlist=[attr]), attr), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(target, killed)
    return lambda: monkeypatch.setattr(target, real)


@pytest.mark.parametrize("stage", list(KILLS))
def test_a_run_killed_in_any_stage_resumes_to_the_same_final_adapter(debug, whole_run, monkeypatch, stage):
    revive = kill_in(monkeypatch, stage)
    assert run(debug / "killed").exit_code != 0
    revive()
    result = run(debug / "killed")
    assert result.exit_code == 0, result.output
    whole, resumed = factors(whole_run / "water" / "finetune"), factors(debug / "killed" / "water" / "finetune")
    for name, (b, a) in whole.items():
        assert torch.allclose(b @ a, resumed[name][0] @ resumed[name][1], atol=1e-5), name


def test_a_fleet_of_three_adapters_shares_one_alignment(tmp_path, monkeypatch):
    root = build_debug(tmp_path / "debug", adapters=("a", "b", "c"))
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(root))
    proc = run_script("migrate_many.sh", RECIPE, root / "adapters", tmp_path / "fleet", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    align = json.loads((tmp_path / "fleet" / "align" / "manifest.json").read_text())
    assert align["stage"] == "align"
    for name in ("a", "b", "c"):
        summary = json.loads((tmp_path / "fleet" / name / "summary.json").read_text())
        stages = {s["stage"]: s for s in summary["adapters"][name]["stages"]}
        assert stages["align"]["dir"] == str(tmp_path / "fleet" / "align")
    ran_align = [json.loads((tmp_path / "fleet" / n / "summary.json").read_text())["adapters"][n]["stages"][0]["ran"]
                 for n in ("a", "b", "c")]
    assert sum(ran_align) == 1


def test_an_adapter_named_like_a_stage_keeps_its_own_copy_row(tmp_path, monkeypatch):
    """Arms are matched to results by directory path, not by folder name (here both are 'finetune')."""
    from loramigrate.config import ModelLoadConfig
    from loramigrate.evaluate import evaluate_pairs, read_task

    root = build_debug(tmp_path / "debug", adapters=("finetune",))
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(root))
    source = root / "adapters" / "finetune"
    result = run(tmp_path / "run", "--adapter", source, "--set", "search=null")
    assert result.exit_code == 0, result.output
    rows = {r["arm"]: r for r in json.loads((tmp_path / "run" / "finetune" / "eval" / "results.json").read_text())
            ["results"]}
    copy = evaluate_pairs(str(root / "new"), [str(source)], read_task(root / "test.jsonl"), 16, ModelLoadConfig(),
                          include_base=False)
    assert copy == []  # the old adapter does not fit the wider new MLP as it is
    assert rows["copy (old adapter as is)"] == {"arm": "copy (old adapter as is)", "note": "does not load: shapes differ"}
    assert "score" in rows["final (finetuned)"]
