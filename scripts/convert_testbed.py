"""Convert the testbed's raw downloads into HF model directories and JSONL task files, once.

Called by scripts/fetch_testbed.sh (which downloads the wheels); each step is skipped when its
output exists, the task files when ``data/FORMAT`` names the current row format.
Run by hand:  python scripts/convert_testbed.py --cache ~/.cache/loramigrate [--qwen]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tarfile
from pathlib import Path

import torch


def onnx_bert_state(onnx_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """HF BERT state dict from a sentence-transformers BERT ONNX graph (TESTBED §7.1, §7.2).

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


def onnx_bert_to_hf(onnx_path: Path, prefix: str, tokenizer_dir: Path, out: Path) -> None:
    """Save the ONNX BERT as an HF BertModel directory with the (shared) MiniLM tokenizer."""
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
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, out / f)


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as HF safetensors (TESTBED §7.3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # otherwise save_pretrained refuses a "quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


# Bump when the rows or the task set change: cached task files in another format are re-extracted.
TASK_FORMAT = "qa-cue-2"
TASKS = {"arithmetic/3_digit_addition/task.json": "arith3",
         "arithmetic/2_digit_multiplication/task.json": "arith2mul",
         "multiemo/all_sentence_en/task.json": "multiemo"}


def generation_row(question: str, answer: str) -> dict:
    """A generation row as users train adapters (TESTBED §5.1): ``"Question: …\\nAnswer:"`` → ``" 812"``.

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


def bigbench_tasks(sdist: Path, data: Path, seed: int = 0) -> bool:
    """Extract ``TASKS`` as seeded 80/10/10 train/val/test JSONL under ``data/<name>/``, unless
    ``data/FORMAT`` already says ``TASK_FORMAT``; then write it. Returns whether it extracted."""
    marker = data / "FORMAT"
    if marker.is_file() and marker.read_text().strip() == TASK_FORMAT:
        return False
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
        raise FileNotFoundError(f"{sdist} lacks {sorted(set(TASKS) - found)}")
    marker.write_text(TASK_FORMAT + "\n")  # last, so an interrupted run extracts again
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--qwen", action="store_true", help="also convert the Qwen2.5-Coder 0.5B/1.5B GGUFs")
    args = ap.parse_args()
    raw, models, data = args.cache / "raw", args.cache / "models", args.cache / "data"
    models.mkdir(parents=True, exist_ok=True)
    steps = [
        (models / "minilm-l3",
         lambda o: onnx_bert_to_hf(raw / "paraphrase-MiniLM-L3-v2.onnx", "model.0.auto_model.", models / "minilm-l6", o)),
        (models / "minilm-l6-int8",
         lambda o: onnx_bert_to_hf(raw / "minilm-l6-int8.onnx", "inner.", models / "minilm-l6", o)),
        (models / "smollm2-135m", lambda o: gguf_to_hf(raw / "smollm2.gguf", o)),
    ]
    if args.qwen:
        steps += [(models / "qwen2.5-coder-0.5b", lambda o: gguf_to_hf(raw / "qwen05.gguf", o)),
                  (models / "qwen2.5-coder-1.5b", lambda o: gguf_to_hf(raw / "qwen15.gguf", o))]
    for out, step in steps:
        if (out / "config.json").is_file():
            continue
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        step(tmp)
        tmp.rename(out)
        print(f"converted {out}")
    if bigbench_tasks(raw / "bigbench-1.0.0.tar.gz", data):
        print(f"extracted tasks ({TASK_FORMAT}) into {data}")


if __name__ == "__main__":
    main()
