"""`loramigrate fleet` on a local Ray cluster and on the local engine, with the debug recipe's tiny models.

    pytest -q tests/test_fleet.py
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import ray
import torch

from loramigrate.cli.main import app
from tests.helpers import make_lora
from tests.test_run import RECIPE, TARGETS, build_debug, factors, run, runner

ADAPTERS = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The debug recipe's files with four adapters, a corrupt one, and one trained on the new base."""
    root = build_debug(tmp_path_factory.mktemp("fleet"), adapters=ADAPTERS)
    bad = shutil.copytree(root / "adapters" / "a", root / "adapters" / "corrupt")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    make_lora(root / "new", root / "adapters" / "other-base", targets=TARGETS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAMIGRATE_DEBUG_MODELS", str(root))
        yield root


@pytest.fixture(scope="module")
def cluster(models):
    """One local Ray cluster for the module; its workers see the debug models' variable and this checkout."""
    path = os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "LORAMIGRATE_DEBUG_MODELS": str(models)}})
    yield
    ray.shutdown()


def fleet(out, adapters, *extra):
    return runner.invoke(app, ["-q", "fleet", str(RECIPE), "--adapters", str(adapters), "-o", str(out),
                               *map(str, extra)])


@pytest.fixture(scope="module")
def ray_fleet(models, cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "run"
    result = fleet(out, models / "adapters", "--engine", "ray")
    return result, out


def report(out) -> dict:
    data = json.loads((out / "fleet.json").read_text())
    return {**data, "rows": {r["adapter"]: r for r in data["adapters"]}}


def manifests(out) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(out.rglob("manifest.json"))}


def same_adapter(one: Path, other: Path) -> None:
    mine, theirs = factors(one), factors(other)
    assert mine.keys() == theirs.keys()
    for name, (b, a) in mine.items():
        assert torch.allclose(b, theirs[name][0], atol=1e-5) and torch.allclose(a, theirs[name][1], atol=1e-5), name


def scores(eval_dir: Path) -> dict[str, float]:
    results = json.loads((eval_dir / "results.json").read_text())
    return {x["arm"]: x["score"] for x in [results["reference"], *results["results"]] if "score" in x}


def test_a_ray_fleet_migrates_every_adapter_on_one_alignment_and_the_bad_ones_fail_alone(models, ray_fleet):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, out = ray_fleet
    assert result.exit_code == 1, result.output
    assert result.stdout.strip() == str(out / "fleet.md")
    data = report(out)
    assert data["totals"] | {"wall_s": 0, "align_s": 0, "stage_s": 0, "amortised_s": 0, "wall_per_adapter_s": 0} == {
        "adapters": 6, "migrated": 4, "kept": 0, "failed": 2, "align_ran": True, "wall_s": 0, "align_s": 0,
        "stage_s": 0, "amortised_s": 0, "wall_per_adapter_s": 0}
    corrupt, other = data["rows"]["corrupt"], data["rows"]["other-base"]
    assert corrupt["failed_in"] == "inputs" and "cannot read adapter" in corrupt["error"]
    assert other["failed_in"] == "transfer" and other["error"] in result.stderr
    assert "\n" not in other["error"] and "Traceback" not in result.output
    md = (out / "fleet.md").read_text()
    assert corrupt["error"] in md and other["error"] in md and "failed in transfer" in md
    stages = [m for m in manifests(out).values() if m["stage"] == "align"]
    assert len(stages) == 1  # one alignment, which every transfer used
    transfers = [m for m in manifests(out).values() if m["stage"] == "transfer"]
    assert len(transfers) == 4 and {m["inputs"]["align"]["path"] for m in transfers} == {str(out / "align")}
    for name in ADAPTERS:
        row = data["rows"][name]
        assert row["status"] == "migrated" and row["final"] == str(out / name / "finetune")
        assert set(row["stage_s"]) == {"transfer", "search", "finetune", "eval"} and row["after"] is not None
        assert all(" node " in where for where in row["where"].values())  # the Ray node it ran on
        new = AutoModelForCausalLM.from_pretrained(models / "new")
        model = PeftModel.from_pretrained(new, row["final"])  # stock PEFT, nothing of ours
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_the_fleet_equals_loramigrate_run_adapter_by_adapter(ray_fleet, models, tmp_path):
    _, out = ray_fleet
    for name in ("a", "d"):
        result = run(tmp_path / name, "--adapter", models / "adapters" / name)
        assert result.exit_code == 0, result.output
        same_adapter(out / name / "finetune", tmp_path / name / name / "finetune")
        assert scores(out / name / "eval") == scores(tmp_path / name / name / "eval")


def test_an_interrupted_local_fleet_reruns_only_what_was_left_to_the_ray_fleets_adapters(ray_fleet, models, tmp_path):
    """The local engine (in this process) gives the Ray fleet's artifacts, also after a fault in one task and a
    process killed while it wrote."""
    _, ray_out = ray_fleet
    listed = tmp_path / "adapters.txt"
    listed.write_text(f"# two of them\n{models / 'adapters' / 'c'}\n\n{models / 'adapters' / 'd'}\n")
    out = tmp_path / "run"
    (out / "d").mkdir(parents=True)
    (out / "d" / "finetune").write_text("in the way")  # d's finetune fails, after its transfer and search
    result = fleet(out, listed)
    assert result.exit_code == 1 and "d: output path" in result.stderr, result.output
    assert report(out)["rows"]["d"]["failed_in"] == "finetune" and not (out / "d" / "eval").exists()
    (out / "d" / "finetune").unlink()
    (out / "d" / "finetune.tmp-999999999").mkdir()  # what a killed process leaves: no manifest, removed on rerun
    before = {p: m["finished"] for p, m in manifests(out).items()}
    result = fleet(out, listed, "--engine", "local")
    assert result.exit_code == 0, result.output
    rows = report(out)["rows"]
    assert rows["c"]["status"] == "kept" and rows["d"]["ran"] == {"transfer": False, "search": False,
                                                                  "finetune": True, "eval": True}
    assert {p: m["finished"] for p, m in manifests(out).items() if p in before} == before
    assert not (out / "d" / "finetune.tmp-999999999").exists()
    for name in ("c", "d"):
        same_adapter(out / name / "finetune", ray_out / name / "finetune")
        assert scores(out / name / "eval") == scores(ray_out / name / "eval")


def test_a_finished_fleet_reruns_without_work(ray_fleet, models):
    result, out = ray_fleet
    before = {p: m["finished"] for p, m in manifests(out).items()}
    again = fleet(out, models / "adapters", "--engine", "ray")
    assert again.exit_code == 1  # the bad adapters fail again, with the same reasons
    data = report(out)
    assert data["totals"]["kept"] == 4 and data["totals"]["align_ran"] is False
    assert {p: m["finished"] for p, m in manifests(out).items()} == before


def test_search_workers_share_one_study_of_the_adapter(models, cluster, tmp_path):
    import optuna

    listed = tmp_path / "one.txt"
    listed.write_text(str(models / "adapters" / "b"))
    out = tmp_path / "run"
    result = fleet(out, listed, "--engine", "ray", "--search-workers", "2", "--set", "search.n_trials=4")
    assert result.exit_code == 0, result.output
    journal = out / "b" / "search-study.log"
    search = json.loads((out / "b" / "search" / "manifest.json").read_text())
    study = optuna.load_study(study_name="b", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    states = optuna.trial.TrialState
    done = study.get_trials(states=(states.COMPLETE,))
    pruned = study.get_trials(states=(states.PRUNED,))
    assert search["config"]["storage"] == str(journal)
    assert (search["search"]["trials"], search["search"]["pruned"]) == (len(done), len(pruned)) and done
    # 4 together, not 4 each: the median pruner may stop one of them, and a worker late for the last trial
    # prunes its extra one, so the two workers' 4 counted trials appear as at most 5
    assert 4 <= len(done) + len(pruned) <= 5
    assert all((out / "b" / "search-workers" / w / "manifest.json").is_file() for w in ("1", "2"))
    where = report(out)["rows"]["b"]["where"]
    assert set(where) == {"transfer", "search-worker-1", "search-worker-2", "search", "finetune", "eval"}
    workers = {where[f"search-worker-{w}"].split()[0] for w in (1, 2)}
    assert {t.user_attrs["loramigrate_worker"] for t in done} <= workers  # the search task ran no trial


def test_the_ray_engine_without_ray_says_how_to_install_it(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray then fails as where it is not installed
    result = fleet(tmp_path / "run", models / "adapters", "--engine", "ray")
    assert result.exit_code == 1 and "pip install loramigrate[fleet]" in result.stderr, result.output
