"""The last-query final layer gives the full model's last-position logits (left padding, grouped-query
attention, both attention implementations), and leaves layers of other layouts alone."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from recsys.llm.last_query import LastQueryLayer, last_query_only


def llama(kv_heads: int, attn: str, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0                                                       # left padding
    mask[2, :1] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def last_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_last_query_matches_the_full_model(kv_heads, attn):
    full = llama(kv_heads, attn)
    fast = copy.deepcopy(full)
    assert last_query_only(fast) and isinstance(fast.model.layers[-1], LastQueryLayer)
    ids, mask, pos = batch()
    want = last_logits(full, ids, mask, pos)
    got = last_logits(fast, ids, mask, pos)
    assert got.shape == want.shape == (3, 50)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    no_pad = torch.ones_like(ids)                                          # no mask at all inside the model
    torch.testing.assert_close(last_logits(fast, ids, no_pad, None), last_logits(full, ids, no_pad, None),
                               atol=1e-5, rtol=1e-5)


def test_last_query_reads_the_earlier_positions():
    """Changing an earlier token changes the last logits through the keys and values (not a last-token model)."""
    fast = llama(4, "sdpa", layers=1)
    assert last_query_only(fast)
    ids, mask, pos = batch()
    other = ids.clone()
    other[:, 7] = (other[:, 7] % 49) + 1
    assert not torch.allclose(last_logits(fast, ids, mask, pos), last_logits(fast, other, mask, pos))


def test_other_layouts_keep_their_full_layer():
    model = llama(4, "sdpa")
    model.model.layers[-1].extra_norm = nn.LayerNorm(32)                 # a layout the fast layer does not know
    assert not last_query_only(model)
    assert not isinstance(model.model.layers[-1], LastQueryLayer)
