"""Exact-function tests: a new base that computes the old function with another shape must receive an
adapter that reproduces the old pair's logits, through the real `align` and `transfer` commands.

Run: pytest tests/test_function_preserving.py
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import WORDS, build, make_lora, make_tokenizer, randomize_norms, save, tiny_config
from tests.reshapes import (
    append_silent_neurons,
    grow_head_dim,
    prepend_zero_heads,
    replicate_kv_heads,
    rotate_rotary_pairs,
    widen_hidden,
)
from tests.test_transfer import ALL, cli, logits

HEAD_DIM, KV_HEADS, HEADS = 8, 4, 8

CASES = {
    "gqa-to-mha": lambda m: (m, replicate_kv_heads(m, HEADS)),
    "mha-to-gqa": lambda m: (replicate_kv_heads(m, HEADS), m),
    "more-heads": lambda m: (m, prepend_zero_heads(m, KV_HEADS)),
    "head-dim-8-to-16": lambda m: (m, grow_head_dim(m, 2)),
    "hidden-64-to-96": lambda m: (m, widen_hidden(m, 96)),  # the norm ratio restores the stream scale c of o/down
    "rotary-pairs-rotated": lambda m: (m, rotate_rotary_pairs(m)[0]),
    # new units that compute but write nothing: the norm ratio counts only the units an update reaches
    "more-heads-computing": lambda m: (m, prepend_zero_heads(m, KV_HEADS, live=0.2)),
    "more-neurons-computing": lambda m: (m, append_silent_neurons(m, 32)),
}


def tie_duplicated_kv(adapter_dir, rep: int) -> None:
    """k/v updates equal within each run of ``rep`` duplicated kv heads, as GQA can only express."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key, w in tensors.items():
        if "lora_B" in key and ("k_proj" in key or "v_proj" in key):
            heads = w.view(-1, rep, HEAD_DIM, w.shape[-1])
            tensors[key] = heads[:, :1].expand_as(heads).reshape(w.shape).contiguous()
    save_file(tensors, str(path))


@pytest.mark.parametrize("case", list(CASES))
def test_function_preserving_reshape_gives_the_old_pairs_logits(tmp_path, case):
    base = build(tiny_config("llama", hidden=64, layers=2, heads=HEADS, kv_heads=KV_HEADS, intermediate=96, init=0.2))
    randomize_norms(base)
    old_model, new_model = CASES[case](base)
    tok = make_tokenizer(WORDS)
    old, new = save(old_model, tok, tmp_path / "old"), save(new_model, tok, tmp_path / "new")
    adapter = make_lora(old, tmp_path / "lora", targets=ALL)
    if case == "mha-to-gqa":
        tie_duplicated_kv(adapter, HEADS // KV_HEADS)
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "-o", tmp_path / "t")  # default options
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = old_model(ids).logits
    want, got = logits(old, adapter, ids), logits(new, tmp_path / "t", ids)
    assert (want - plain).abs().max() > 0.1  # the adapter changes the function measurably
    assert (want - got).abs().max() < 1e-4 * float(want.abs().max())
