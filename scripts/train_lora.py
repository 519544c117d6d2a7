"""Train a plain LoRA on prompt/completion JSONL (loss on completion tokens): the "old adapter" of the
benchmarks, and the retrain baseline, until `loramigrate finetune` exists. Seeded and deterministic.

Run:
  python scripts/train_lora.py --base ~/.cache/loramigrate/models/qwen2.5-coder-0.5b \
      --data ~/.cache/loramigrate/data/arith3/train.jsonl --steps 60 --out runs/adapters/qwen05-arith3
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from loramigrate.evaluate import completion_batch, read_task
from loramigrate.models import load_model, load_tokenizer, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    ref = resolve_model(args.base)
    tok, model = load_tokenizer(ref), load_model(ref, device="cpu")
    rows = read_task(args.data).rows
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    log, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        _, _, (ids, mask, labels) = completion_batch(tok, rng.sample(rows, args.batch_size), max_len=128)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        log.append({"step": step, "loss": float(loss), "s": round(time.perf_counter() - start, 2)})
        if step % 10 == 0 or step == 1:
            print(json.dumps(log[-1]), flush=True)
    model.save_pretrained(args.out)
    (args.out / "train_log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main()
