"""A causal LM whose final decoder layer computes the last position only.

A FIRST, groupwise or generative scoring step reads the logits at the last position of a left-padded
prompt. Every layer but the last must still compute all positions (the last layer's keys and values
come from them), but in the last layer only the last query matters: its attention is one query over
the T keys instead of T queries, and its output projection and MLP run on one position instead of T.
For the 2-layer rerankers built in code that is close to half the work of a scoring call; for a
4-layer SmolLM2 reranker, about a quarter.

Applies to Llama-family decoder layers (Llama, SmolLM2, Qwen2, Mistral: ``input_layernorm`` ->
attention with rotary ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` -> residual ->
``post_attention_layernorm`` -> MLP -> residual). Any other layout keeps its full layer
(:func:`last_query_only` reports whether it applied); the answer is the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LLAMA_LAYER = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
LLAMA_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LastQueryLayer(nn.Module):
    """A Llama-family decoder layer that returns the last position's output only: (B, T, H) -> (B, 1, H).

    ``attention_mask`` is what the model hands its layers: None (no padding: the last query sees every
    key), a (B, 1, T, T) boolean mask (True = may attend) or additive float mask; its last query row is used.
    ``position_embeddings``: the model's rotary ``(cos, sin)``, each (B, T, head_dim)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_kwargs) -> torch.Tensor:
        layer, attn = self.layer, self.layer.self_attn
        B, T, _ = hidden_states.shape
        x = layer.input_layernorm(hidden_states)
        q = attn.q_proj(x[:, -1:]).view(B, 1, -1, attn.head_dim).transpose(1, 2)            # (B, heads, 1, hd)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)                     # (B, kv, T, hd)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        cos, sin = (e.unsqueeze(1) for e in position_embeddings)                             # (B, 1, T, hd)
        q = q * cos[:, :, -1:] + _rotate_half(q) * sin[:, :, -1:]
        k = k * cos + _rotate_half(k) * sin
        groups = q.shape[1] // k.shape[1]                                                    # grouped-query attention
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        mask = None if attention_mask is None else attention_mask[:, :, -1:, :T]             # (B, 1, 1, T)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)      # (B, heads, 1, hd)
        h = hidden_states[:, -1:] + attn.o_proj(a.transpose(1, 2).reshape(B, 1, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))


def supports_last_query(layer: nn.Module) -> bool:
    """Whether ``layer`` has the Llama-family layout that :class:`LastQueryLayer` computes."""
    attn = getattr(layer, "self_attn", None)
    return (set(layer._modules) == LLAMA_LAYER and attn is not None and set(attn._modules) == LLAMA_ATTENTION
            and hasattr(attn, "head_dim") and hasattr(attn, "scaling")
            and getattr(attn.config, "sliding_window", None) is None)


def last_query_only(model: nn.Module) -> bool:
    """Replace, in place, the final decoder layer of a Hugging Face causal LM (``model.model.layers``) by
    :class:`LastQueryLayer`, so that a forward pass returns the last position's logits only (call it with
    ``logits_to_keep=1`` and read ``logits[:, -1]``). For scoring graphs that own their model (an export);
    the model can no longer give the other positions. Returns False, changing nothing, where the layer has
    another layout."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        return False
    if isinstance(layers[-1], LastQueryLayer):
        return True
    if not supports_last_query(layers[-1]):
        return False
    layers[-1] = LastQueryLayer(layers[-1])
    return True
