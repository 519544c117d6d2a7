"""Calibration windows and activation samples of the align stage. Run: pytest tests/test_activations.py"""

import torch

from loramigrate.align.activation_stats import NeuronSample
from loramigrate.align.activations import calibration_batches, windows
from tests.helpers import WORDS, make_tokenizer


def test_long_texts_are_cut_into_windows_that_keep_every_token():
    tok = make_tokenizer(WORDS)
    text = " ".join(WORDS[:50])
    got = list(windows([text, "water"], tok, seq_len=16))
    assert [len(tok(w)["input_ids"]) for w in got] == [16, 16, 16, 2, 1]
    assert " ".join(got) == text + " water"


def test_both_tokenizers_encode_the_same_windows():
    old_tok, new_tok = make_tokenizer(WORDS), make_tokenizer(WORDS[::-1])
    text = " ".join(WORDS[:50])
    batches = list(calibration_batches([text], old_tok, new_tok, seq_len=16, max_tokens=10_000, batch_size=3))
    assert [b["input_ids"].shape[0] for b, _ in batches] == [3, 1]
    for enc_old, enc_new in batches:
        assert decoded(old_tok, enc_old) == decoded(new_tok, enc_new)


def decoded(tok, enc) -> list[str]:
    return [tok.decode(ids[m.bool()]) for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]


def test_neuron_correlation_survives_a_massive_activation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g)
    z[3, 2] = 1e5  # a massive activation, beyond float16's 65504
    perm = torch.randperm(10, generator=g)
    sample = NeuronSample(cap=64)
    sample.update(z, z[:, perm])
    corr = sample.correlation()
    assert torch.isfinite(corr).all()
    assert torch.allclose(corr[torch.arange(10), perm], torch.ones(10), atol=1e-5)
