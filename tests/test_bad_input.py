"""Bad input to every command, option values typer cannot parse included: one red line naming the problem, exit
code 1, nothing written and no input changed.

    pytest tests/test_bad_input.py
"""

import json
import shutil

import pytest
import transformers
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loramigrate.cli.main import app
from tests.helpers import WORDS, build, make_lora, make_tiny, make_tokenizer, save, tiny_config

runner = CliRunner()


def snapshot(*dirs):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*")) if p.is_file()
            } | {p: None for d in dirs for p in d.rglob("*") if not p.is_file()}


def refused(args: list[str], match: str, *watched):
    """Invoke the CLI and check the error contract; ``watched`` directories must be left as they were."""
    before = snapshot(*watched)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr  # after the INFO log of a stage that started
    assert match in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output
    assert snapshot(*watched) == before  # no output, no temp directory, no input touched
    assert result.stdout == ""
    return result


def fails(tmp_path, old, new, *extra, match: str):
    refused(["align", "--old", str(old), "--new", str(new), "-o", str(tmp_path / "out"), *extra], match, tmp_path)


def test_missing_model_dir(tiny_models, tmp_path):
    fails(tmp_path, tmp_path / "nope", tiny_models["llama"], match="not found")


def test_directory_that_is_not_a_model(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(tmp_path, tmp_path / "empty", tiny_models["llama"], match="no config.json")


def test_corrupt_safetensors(tiny_models, tmp_path):
    bad = save(build(tiny_config("llama")), make_tokenizer(WORDS), tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    fails(tmp_path, bad, tiny_models["llama"], match="cannot load model")


def test_unsupported_architecture(tiny_models, tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=112))
    d = save(gpt2, make_tokenizer(WORDS), tmp_path / "gpt2")
    fails(tmp_path, d, tiny_models["llama"], match="cannot infer the architecture")


def test_tokenizers_without_shared_tokens(tiny_models, tmp_path):
    words = [f"zz{w}" for w in WORDS]
    other = save(build(tiny_config("llama")), make_tokenizer(words, pad="<pad>", unk="<unk>"), tmp_path / "other")
    fails(tmp_path, tiny_models["llama"], other, match="share 0 tokens")


@pytest.mark.parametrize(("content", "match"), [("", "holds no text"), ("\n\n  \n", "holds no text")])
def test_empty_calibration_file(tiny_models, tmp_path, content, match):
    calib = tmp_path / "calib.txt"
    calib.write_text(content)
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--calib", str(calib), match=match)


def test_unreadable_calibration_file(tiny_models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(b"\xff\xfe\xfa not utf-8")
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--calib", str(calib), match="cannot read calibration")


def test_bad_jsonl_calibration_line(tiny_models, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "fine"}\n{"label": 3}\n')
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--calib", str(calib), match="calib.jsonl:2")


def test_output_path_is_a_file(tiny_models, tmp_path):
    target = tmp_path / "out"
    target.write_text("taken")
    result = runner.invoke(app, ["align", "--old", str(tiny_models["llama"]), "--new", str(tiny_models["llama"]),
                                 "-o", str(target)])
    assert result.exit_code == 1 and "is a file" in result.stderr
    assert target.read_text() == "taken" and list(tmp_path.iterdir()) == [target]


def test_invalid_option_value(tiny_models, tmp_path):
    """A bad choice is refused in one line listing the choices, given as an option or through --set."""
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--layer-map", "zigzag",
          match="'cka_dp', 'uniform', 'first', 'last'")
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--set", "layer_map=zigzag", match="layer_map")


def test_debug_env_shows_the_traceback(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIGRATE_DEBUG", "1")
    result = runner.invoke(app, ["align", "--old", str(tmp_path / "nope"), "--new", str(tiny_models["llama"]),
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and result.exception is not None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One of each input the commands read, in a directory the table checks is never changed."""
    root = tmp_path_factory.mktemp("inputs")
    model = make_tiny("llama", root / "model")
    adapter = make_lora(model, root / "adapter", targets=["q_proj", "v_proj"])
    nan = poisoned(make_lora(model, root / "nan", targets=["q_proj", "v_proj"]), float("nan"))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} {w}", "completion": " water"}) + "\n" for w in WORDS[:20]))
    for args in (["align", "--old", model, "--new", model, "--max-tokens", "64", "-o", root / "aligned"],
                 ["transfer", "--align", root / "aligned", "--adapter", adapter, "-o", root / "transfer"],
                 ["transfer", "--align", root / "aligned", "--adapter", adapter, "-o", root / "inf-transfer"]):
        result = runner.invoke(app, ["-q", *map(str, args)])
        assert result.exit_code == 0, result.output
    poisoned(root / "inf-transfer", float("inf"))  # its manifest still says it is a finished transfer
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bad", "old": str(model), "new": str(model),
                                      "adapters": [str(adapter)],
                                      "data": {"train": str(data), "val": str(data), "test": str(data)}}))
    shutil.copytree(adapter, root / "align")  # an adapter whose run folder would be the run's alignment
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "a dir").mkdir()
    return {"model": model, "adapter": adapter, "nan": nan, "data": data, "recipe": recipe, "root": root}


def poisoned(adapter, value: float):
    """The adapter with one entry of each tensor set to ``value``."""
    weights = load_file(adapter / "adapter_model.safetensors")
    for w in weights.values():
        w.view(-1)[0] = value
    save_file(weights, adapter / "adapter_model.safetensors")
    return adapter


def align(*extra):
    return ["align", "--old", "{model}", "--new", "{model}", "-o", "{out}", *extra]


def transfer(*extra):
    return ["transfer", "--align", "{root}/align", "--adapter", "{adapter}", "-o", "{out}", *extra]


def finetune(*extra):
    return ["finetune", "--base", "{model}", "--data", "{data}", "-o", "{out}", *extra]


def evaluate(*extra):
    return ["eval", "--base", "{model}", "--data", "{data}", *extra]


def search(*extra):
    return ["search", "--align", "{root}/aligned", "--transfer", "{root}/transfer", "--data", "{data}", "-o", "{out}",
            *extra]


def run(*extra):
    return ["run", "{recipe}", "-o", "{out}", *extra]


CASES = [  # (command line, a fragment of the one-line message)
    (align("--max-tokens", "0"), "max_tokens"),
    (align("--seq-len", "1"), "seq_len"),
    (align("--batch-size", "0"), "batch_size"),
    (align("--device-map", "auto", "--max-memory", "lots"), "DEVICE=SIZE pairs"),
    (align("--max-memory", "cpu=1GiB"), "give device_map too"),
    (align("--head-sketch", "2"), "head_sketch"),
    (align("--calib", "{root}/missing.txt"), "missing.txt"),
    (align("-o", "{root}/dangling"), "dangling symlink"),
    (align("-o", "{model}/align"), "overlaps the input"),
    (align("-o", "/proc/loramigrate/align"), "cannot write beside"),
    (transfer("--rank", "0"), "rank"),
    (transfer("--rank", "-2"), "rank"),
    (transfer("--rank", "abc"), "rank"),
    (transfer("--energy", "0"), "energy"),
    (transfer("--energy", "1.5"), "energy"),
    (transfer("--energy", "nan"), "energy"),
    (transfer("--prompt-limit", "0"), "prompt_limit"),
    (transfer("--max-len", "2"), "max_len"),
    (transfer("--batch-size", "0"), "batch_size"),
    (transfer("--fit-steps", "-1"), "fit_steps"),
    (transfer("--fit-lr", "0"), "fit_lr"),
    (transfer("--fit-lr", "inf"), "fit_lr"),
    (transfer("--align", "{root}/aligned", "--adapter", "{nan}"), "holds NaN or inf values"),
    (finetune("--rank", "0"), "rank"),
    (finetune("--alpha", "0"), "alpha"),
    (finetune("--alpha", "inf"), "alpha"),
    (finetune("--steps", "0"), "steps"),
    (finetune("--epochs", "0"), "epochs"),
    (finetune("--batch-size", "0"), "batch_size"),
    (finetune("--grad-accum", "0"), "grad_accum"),
    (finetune("--max-len", "4"), "max_len"),
    (finetune("--lr", "0"), "lr"),
    (finetune("--lr", "nan"), "lr"),
    (finetune("--lora-plus-ratio", "0.5"), "lora_plus_ratio"),
    (finetune("--warmup", "-1"), "warmup"),
    (finetune("--reg-lambda", "-1"), "reg_lambda"),
    (finetune("--reg-final", "inf"), "reg_final"),
    (finetune("--reg-switch", "1.5"), "reg_switch"),
    (finetune("--restart-every", "-1"), "restart_every"),
    (finetune("--restart-prune", "2"), "restart_prune"),
    (finetune("--restart-warmup", "-1"), "restart_warmup"),
    (finetune("--eval-every", "0"), "eval_every"),
    (finetune("--eval-limit", "0"), "eval_limit"),
    (finetune("--target", "accuracy"), "target"),
    (finetune("--target", "loss=inf"), "target"),
    (finetune("--teacher", "old"), "needs teacher_base and teacher_adapter"),
    (finetune("--distill-temperature", "0"), "distill_temperature"),
    (finetune("--distill-weight", "1.5"), "distill_weight"),
    (finetune("--teacher-new-tokens", "0"), "teacher_new_tokens"),
    (finetune("--restart-every", "5", "--reg-lambda", "1"), "cannot be combined"),
    (finetune("--init", "{root}/a dir"), "not a PEFT adapter directory"),
    (finetune("--init", "{nan}"), "holds NaN or inf values"),
    (finetune("--teacher", "old", "--teacher-base", "{model}", "--teacher-adapter", "{nan}"), "holds NaN or inf"),
    (finetune("--targets", "bogus_proj"), "bogus_proj"),
    (finetune("-o", "{model}/ft"), "overlaps the input"),
    (finetune("--init", "{adapter}", "-o", "{adapter}"), "overlaps the input"),
    (finetune("--data", "{root}/missing.jsonl"), "cannot read data file"),
    (evaluate("--batch-size", "0"), "batch_size"),
    (evaluate("--limit", "0"), "limit"),
    (evaluate("--limit", "-1"), "limit"),
    (evaluate("--json", "{root}/a dir"), "--json"),
    (evaluate("--json", "{root}/no/such/dir.json"), "--json"),
    (evaluate("--reference-base", "{model}"), "go together"),
    (evaluate("--adapter", "{root}/a dir"), "not a PEFT adapter directory"),
    (align("--set", "cka=exact"), "cka"),
    (transfer("--set", "load.device=tpu"), "device"),
    (transfer("--set", "bogus=1"), "bogus"),
    (finetune("--set", "targets=bogus_proj"), "bogus_proj"),
    (evaluate("--set", "limit=0"), "limit"),
    (evaluate("--adapter", "{nan}"), "holds NaN or inf values"),
    (evaluate("--adapter", "{root}/inf-transfer"), "holds NaN or inf values"),
    (evaluate("--reference-base", "{model}", "--reference-adapter", "{nan}"), "holds NaN or inf values"),
    (evaluate("--proxy-old-base", "{model}", "--proxy-old-adapter", "{nan}"), "holds NaN or inf values"),
    (search("--transfer", "{root}/inf-transfer"), "holds NaN or inf values"),
    (search("--objective", "distill", "--teacher-adapter", "{nan}"), "holds NaN or inf values"),
    (search("--n-trials", "0"), "n_trials"),
    (search("--timeout", "0"), "timeout"),
    (search("--limit", "0"), "limit"),
    (search("--alpha-max", "inf"), "alpha_max"),
    (search("--alpha-min", "2"), "alpha_min"),
    (search("--beta-max", "-1"), "beta_max"),
    (search("--gamma-max", "nan"), "gamma_max"),
    (search("--evolution-rank", "0"), "evolution_rank"),
    (search("--set", "space=layers"), "space"),
    (search("--objective", "distill"), "teacher_adapter"),
    (search("--fidelity-steps", "2"), "needs training data"),
    (search("--fidelity-lr", "0"), "fidelity_lr"),
    (search("--batch-size", "0"), "batch_size"),
    (search("--storage", "redis://localhost/0"), "expected an Optuna URL"),
    (search("--data", "{root}/missing.jsonl"), "cannot read data file"),
    (search("--transfer", "{root}/aligned"), "holds a 'align' stage"),
    (search("--align", "{root}/transfer"), "holds a 'transfer' stage"),
    (search("-o", "{root}/transfer/search"), "overlaps the input"),
    (search("-o", "{root}/aligned"), "overlaps the input"),
    (search("-o", "{root}/dangling"), "dangling symlink"),
    (search("-o", "/proc/loramigrate/search"), "cannot write beside"),
    (run("--set", "finetune.steps=0"), "steps"),
    (run("--set", "finetune.steps=[1"), "not valid YAML"),
    (run("--set", "finetune.lr=.inf"), "lr"),
    (run("--set", "nokey"), "expected STAGE.KEY=VALUE"),
    (run("--set", "align.bogus=1"), "bogus"),
    (run("--set", "align.max_tokens=1"), "max_tokens"),
    (run("--set", "load.dtype=float8"), "dtype"),
    (run("--set", "eval.load.device=tpu"), "device"),
    (run("--set", "transfer.energy=2"), "energy"),
    (run("--set", "transfer.rank=0"), "rank"),
    (run("--set", "eval.batch_size=0"), "batch_size"),
    (run("--set", "eval.limit=-1"), "limit"),
    (run("--from", "deploy"), "--from"),
    (run("--adapter", "{root}/align"), "overlaps the input"),
    (run("--adapter", "{root}/it's \"quoted\""), "not a PEFT adapter directory"),
    (run("--set", "new={root}/no-new"), "not found"),
    (["run", "{root}/missing.yaml", "-o", "{out}"], "cannot read recipe"),
]


@pytest.mark.parametrize(("args", "match"), CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_table(inputs, tmp_path, args, match):
    fields = {k: str(v) for k, v in inputs.items()} | {"out": str(tmp_path / "out")}
    refused([a.format(**fields) for a in args], match, tmp_path, inputs["root"])


USAGE = [  # option values typer cannot parse, unknown options and commands, missing options: one line too
    (align("--cka", "exact"), "Invalid value for '--cka'"),
    (align("--head-match", "greedy"), "Invalid value for '--head-match'"),
    (align("--head-similarity", "logits"), "Invalid value for '--head-similarity'"),
    (align("--mlp-match", "random"), "Invalid value for '--mlp-match'"),
    (align("--mlp-similarity", "logits"), "Invalid value for '--mlp-similarity'"),
    (align("--transfer", "svd"), "Invalid value for '--transfer'"),
    (align("--dtype", "float8"), "Invalid value for '--dtype'"),
    (align("--device", "tpu"), "Invalid value for '--device'"),
    (align("--max-tokens", "many"), "Invalid value for '--max-tokens'"),
    (align("--ridge", "small"), "Invalid value for '--ridge'"),
    (transfer("--fill", "everywhere"), "Invalid value for '--fill'"),
    (transfer("--device", "tpu"), "Invalid value for '--device'"),
    (transfer("--energy", "most"), "Invalid value for '--energy'"),
    (finetune("--lr-schedule", "step"), "Invalid value for '--lr-schedule'"),
    (finetune("--reg-schedule", "sawtooth"), "Invalid value for '--reg-schedule'"),
    (finetune("--reg-toward", "base"), "Invalid value for '--reg-toward'"),
    (finetune("--rebalance", "half"), "Invalid value for '--rebalance'"),
    (finetune("--teacher", "wise"), "Invalid value for '--teacher'"),
    (finetune("--dtype", "half"), "Invalid value for '--dtype'"),
    (finetune("--steps", "1e3"), "Invalid value for '--steps'"),
    (finetune("--lr", "fast"), "Invalid value for '--lr'"),
    (evaluate("--dtype", "float8"), "Invalid value for '--dtype'"),
    (evaluate("--limit", "all"), "Invalid value for '--limit'"),
    (run("--dtype", "float8"), "Invalid value for '--dtype'"),
    (["search", "--align", "a", "--transfer", "t", "--data", "d", "-o", "{out}", "--n-trials", "ten"],
     "Invalid value for '--n-trials'"),
    (search("--space", "layers"), "Invalid value for '--space'"),
    (search("--sampler", "cmaes"), "Invalid value for '--sampler'"),
    (search("--objective", "accuracy"), "Invalid value for '--objective'"),
    (align("--bogus"), "No such option: --bogus"),
    (align("--max-tokens"), "Option '--max-tokens' requires an argument"),
    (["align", "--old", "{model}", "-o", "{out}"], "Missing option '--new'"),
    (["transfer", "--adapter", "{adapter}", "-o", "{out}"], "Missing option '--align'"),
    (["run", "-o", "{out}"], "Missing argument 'recipe'"),
    (["migrate", "{model}"], "No such command 'migrate'"),
    (run("extra"), "unexpected extra argument(s) (extra)"),
]


@pytest.mark.parametrize(("args", "match"), USAGE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE])
def test_unparsable_option_is_refused_in_one_line(inputs, tmp_path, args, match):
    """Typer's own parsing errors keep the contract: no usage box, exit code 1."""
    fields = {k: str(v) for k, v in inputs.items()} | {"out": str(tmp_path / "out")}
    result = refused([a.format(**fields) for a in args], match, tmp_path, inputs["root"])
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_still_exits_0():
    for args in (["--help"], ["align", "--help"], []):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage:" in result.stdout and result.stderr == "", args
