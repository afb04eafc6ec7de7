import numpy as np
import pytest
import torch

from recsys.errors import RecsysError
from recsys.retrieval.text import TextEncoder

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "toy", "story", "(1995)", "|", "animation", "comedy", "drama", "heat"]


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer BERT with a word-level tokenizer, built in code (a stand-in for MiniLM)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("encoder")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(d)
    return d


def test_encode_is_normalised_and_ignores_padding(tiny_encoder_dir):
    enc = TextEncoder(tiny_encoder_dir)
    short = "toy story"
    alone = enc.encode([short], progress=False)
    batched = enc.encode([short, "toy story (1995) | animation comedy drama heat"], progress=False)
    assert alone.shape == (1, 16) and np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)      # padding does not move the mean
    fast = TextEncoder(tiny_encoder_dir, bf16=True).encode([short], progress=False)   # close to fp32
    np.testing.assert_allclose(fast, alone, atol=0.05)


def test_cache_hits_and_keys_on_text(tiny_encoder_dir, monkeypatch):
    enc = TextEncoder(tiny_encoder_dir)
    first = enc.encode_cached(["toy story", "heat"], progress=False)
    calls = []
    monkeypatch.setattr(enc, "encode", lambda *a, **k: calls.append(1) or np.zeros((2, 16), np.float32))
    np.testing.assert_array_equal(enc.encode_cached(["toy story", "heat"], progress=False), first)
    assert not calls                                                 # served from the cache
    enc.encode_cached(["toy story", "drama"], progress=False)
    assert calls == [1]                                              # other texts: encoded again


def test_not_a_model_directory(tmp_path):
    with pytest.raises(RecsysError, match="not a model directory"):
        TextEncoder(tmp_path)
