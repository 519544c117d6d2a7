"""GPU benchmark at real shapes with random weights: time and peak GPU memory of align, transfer, the data-aware
transfer (each also with a device map that holds only half of the larger base on the GPU), a finetune step and an
eval pass, per base pair. No downloads: each model is built from its config (the
public shapes below), saved, and run through the stage commands, one process per stage (so each manifest's peak
GPU memory is that stage's alone). Speed and memory do not depend on the weights' values; quality means nothing here.

Both bases of a pair share one word-level tokenizer (1,000 words), so the shared-token embedding fit sees 1,000 rows
and the data-aware transfer runs (real pairs with different tokenizers, as Llama-2 → Llama-3, cannot use it).

Run:
  python scripts/bench_gpu.py --pairs qwen,llama --out gpu-bench      # on a GPU (bf16); < 6 min on one H200
  python scripts/bench_gpu.py --pairs tiny --device cpu               # the same code path on tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# public shapes (config.json of each model): hidden, layers, heads, kv heads, intermediate, vocab, rope theta, tied
SHAPES = {
    "tiny-old": dict(family="qwen2", hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=1100, theta=1e4, tied=True),
    "tiny-new": dict(family="qwen2", hidden=96, layers=3, heads=6, kv=2, inter=192, vocab=1100, theta=1e4, tied=True),
    "qwen2.5-coder-0.5b": dict(family="qwen2", hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936,
                               theta=1e6, tied=True),
    "qwen2.5-coder-1.5b": dict(family="qwen2", hidden=1536, layers=28, heads=12, kv=2, inter=8960, vocab=151936,
                               theta=1e6, tied=True),
    "llama-2-7b": dict(family="llama", hidden=4096, layers=32, heads=32, kv=32, inter=11008, vocab=32000, theta=1e4,
                       tied=False),
    "llama-3-8b": dict(family="llama", hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, theta=5e5,
                       tied=False),
}
PAIRS = {"tiny": ("tiny-old", "tiny-new"), "qwen": ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"),
         "llama": ("llama-2-7b", "llama-3-8b")}
WORDS = [f"w{i}" for i in range(1000)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(name: str):
    import transformers

    s = SHAPES[name]
    cls = transformers.Qwen2Config if s["family"] == "qwen2" else transformers.LlamaConfig
    return cls(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
               num_key_value_heads=s["kv"], intermediate_size=s["inter"], vocab_size=s["vocab"],
               rope_theta=s["theta"], tie_word_embeddings=s["tied"], max_position_embeddings=4096)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]")


def build(name: str, path: Path, device: str, dtype: torch.dtype, seed: int) -> Path:
    """A random model of ``name``'s shape, initialised on ``device`` (minutes on a CPU for 8B), saved to ``path``."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config(name), dtype=dtype)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    del model
    return path


def random_lora(base: Path, out: Path, device: str, dtype: torch.dtype, rank: int = 16) -> Path:
    import transformers
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(out)
    return out


def task_files(root: Path, n: int = 64) -> dict[str, Path]:
    rng = random.Random(0)
    files = {}
    for split in ("train", "val", "test"):
        rows = [{"prompt": " ".join(rng.choices(WORDS, k=24)), "completion": " " + rng.choice(WORDS)} for _ in range(n)]
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["calib"] = root / "calib.txt"
    files["calib"].write_text("\n\n".join(" ".join(rng.choices(WORDS, k=120)) for _ in range(40)))
    return files


def half_budget(device: str, *models: Path) -> str:
    """A --max-memory that holds half of the larger base on the device (the GPU, or CPU memory on a CPU run): the
    device map then puts the rest in CPU memory (GPU run) or on disk (CPU run), as for a pair that does not fit."""
    half_mib = max(sum(f.stat().st_size for f in m.glob("*.safetensors")) for m in models) // 2 // 2**20
    return f"0={half_mib}MiB,cpu=200GiB" if device == "cuda" else f"cpu={max(half_mib, 1)}MiB"


def stage(name: str, out: Path, *args) -> dict:
    """Run one stage command in its own process; its wall time and peak memory, from the manifest."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loramigrate", "-q", *map(str, args), "-o", str(out)], check=True)
    m = json.loads((out / "manifest.json").read_text())
    print(f"  {name}: {m['wall_s']:.1f} s, peak GPU {m['peak_gpu_mb']} MB, peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
    return {"stage": name, "wall_s": m["wall_s"], "process_s": round(time.perf_counter() - started, 1),
            "peak_gpu_mb": m["peak_gpu_mb"], "peak_rss_mb": m["peak_rss_mb"], "runtime": m["runtime"]}


def bench_pair(pair: str, root: Path, device: str, dtype: str) -> list[dict]:
    old_name, new_name = PAIRS[pair]
    torch_dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    old = build(old_name, root / "old", device, torch_dtype, seed=0)
    new = build(new_name, root / "new", device, torch_dtype, seed=1)
    adapter = random_lora(old, root / "adapter", device, torch_dtype)
    print(f"{pair}: built {old_name} → {new_name} and a rank-16 LoRA in {time.perf_counter() - t0:.0f} s", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    f = task_files(root)
    load = ["--dtype", dtype, "--device", device]
    placed = ["--device-map", "auto", "--max-memory", half_budget(device, old, new)]
    rows = [stage("align", root / "align", "align", "--old", old, "--new", new, "--calib", f["calib"],
                  "--max-tokens", 2048, *load),
            stage("transfer", root / "transfer", "transfer", "--align", root / "align", "--adapter", adapter, *load),
            stage("data-aware transfer", root / "transfer-data", "transfer", "--align", root / "align", "--adapter",
                  adapter, "--prompts", f["train"], "--prompt-limit", 64, "--fit-steps", 5, *load),
            stage("align, device map", root / "align-map", "align", "--old", old, "--new", new, "--calib", f["calib"],
                  "--max-tokens", 2048, *load, *placed),
            stage("data-aware transfer, device map", root / "transfer-data-map", "transfer", "--align", root / "align",
                  "--adapter", adapter, "--prompts", f["train"], "--prompt-limit", 64, "--fit-steps", 5, *load, *placed),
            stage("finetune (2 steps)", root / "finetune", "finetune", "--base", new, "--init", root / "transfer",
                  "--data", f["train"], "--val", f["val"], "--steps", 2, "--eval-every", 2, "--eval-limit", 8,
                  "--batch-size", 8, "--max-len", 64, *load),
            stage("eval (64 examples)", root / "eval", "eval", "--base", new, "--adapter", root / "transfer",
                  "--data", f["test"], "--batch-size", 16, *load)]
    step = [json.loads(line) for line in (root / "finetune" / "log.jsonl").read_text().splitlines()]
    next(r for r in rows if r["stage"].startswith("finetune"))["first_step_s"] = step[0]["s"]
    return [{"pair": f"{old_name} → {new_name}", **r} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="qwen,llama", help=f"comma-separated, of {', '.join(PAIRS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, dtype {dtype}, torch {torch.__version__}", flush=True)
    rows = []
    for pair in args.pairs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{pair}-") as tmp:
            rows += bench_pair(pair, Path(tmp), args.device, dtype)
    table = ["| pair | stage | wall s | peak GPU MB | peak RSS MB |", "|---|---|---|---|---|"]
    table += [f"| {r['pair']} | {r['stage']} | {r['wall_s']:.1f} | {r['peak_gpu_mb'] or '–'} | {r['peak_rss_mb']:.0f} |"
              for r in rows]
    print("\n".join([f"device: {name}", *table]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"device": name, "dtype": dtype, "rows": rows}, indent=2))
        (args.out / "results.md").write_text("\n".join([f"device: {name}, dtype {dtype}", "", *table, ""]))


if __name__ == "__main__":
    main()
