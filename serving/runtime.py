"""Torch-free scorers over a serving directory written by ``recsys export``.

    >>> rec = Recommender.load("artifacts/serve")                         # doctest: +SKIP
    >>> rec.recommend_batch([RecommendQuery(history=[12, 40], k=10)])     # doctest: +SKIP

ONNX Runtime sessions use the CUDA provider when it is available and the CPU provider otherwise;
numpy does the pre- and post-processing, ``tokenizers`` the tokenisation, FAISS the retrieval.
The online API and the batch re-scoring job both call :meth:`Recommender.recommend_batch` and
:meth:`Recommender.rerank_batch`, so they rank identically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys.errors import RecsysError
from recsys.portable.window import retriever_prior
from recsys.types import ExportManifest


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers())


def run_options():
    """A fresh ``onnxruntime.RunOptions`` for one scoring call: setting its ``terminate`` from another
    thread stops every ``run`` that uses it at its next graph node, with an error (how the API abandons a
    reranker past its deadline instead of letting it hold a core)."""
    import onnxruntime as ort

    return ort.RunOptions()


def read_manifest(directory) -> ExportManifest:
    """The export directory's ``manifest.json``, validated (:class:`recsys.types.ExportManifest`)."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise RecsysError(f"{directory}: no manifest.json; create the directory with `recsys export`")
    try:
        return ExportManifest.from_dict(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise RecsysError(f"{path}: not valid JSON ({e}); re-create the directory with `recsys export`") from None
    except (ValueError, TypeError) as e:
        raise RecsysError(f"{e}; re-create the directory with `recsys export`") from None


def verify_files(directory, manifest: ExportManifest) -> int:
    """Check every file the manifest lists (``files``: relative path -> SHA-256, written by ``recsys export``)
    against its hash; returns how many were checked. A missing or changed file is a RecsysError naming it:
    a deployment whose weights changed after export must not serve under the old ``model_version``."""
    from recsys.assets import sha256

    directory = Path(directory)
    for name, want in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise RecsysError(f"{path}: listed in manifest.json but missing; re-create the directory with `recsys export`")
        got = sha256(path)
        if got != want:
            raise RecsysError(f"{path}: SHA-256 {got[:16]}... differs from manifest.json's {want[:16]}...: the file "
                              "changed after `recsys export`; restore it or export again")
    return len(manifest.files)


class SASRecRuntime:
    """User vectors from histories (item idx) with the exported SASRec encoder."""

    def __init__(self, directory, threads: int | None = None, int8: bool = False):
        directory = Path(directory)
        self.meta = read_manifest(directory).models.get("sasrec")
        if self.meta is None:
            raise RecsysError(f"{directory}: manifest.json lists no sasrec model; create the directory with "
                              "`recsys export`")
        self.session = session(directory / self.meta.graph(int8), threads)
        self.items = np.load(directory / self.meta.items)                                 # (n_items + 1, d)
        self.max_len = self.meta.max_len

    def pad(self, histories) -> np.ndarray:
        """(B, T) int64: the last ``max_len`` items of each history, left-padded with 0 to the batch's
        longest (T >= 2, the export's smallest sequence length; padding does not change the output)."""
        tails = [np.asarray(h, dtype=np.int64)[-self.max_len:] for h in histories]
        T = max(2, max((len(t) for t in tails), default=0))
        out = np.zeros((len(tails), T), dtype=np.int64)
        for row, tail in zip(out, tails):
            if len(tail):
                row[T - len(tail):] = tail
        return out

    def user_vectors(self, histories) -> np.ndarray:
        """(B, d) float32. A batch runs in groups of similar length, each history at least 2/3 as long as its
        group's longest (of the last ``max_len`` items): SASRec's cost grows with the padded length, so a short
        history is not padded to a long one's."""
        lengths = [min(len(h), self.max_len) for h in histories]
        order = sorted(range(len(histories)), key=lambda i: -lengths[i])
        out = np.empty((len(histories), self.items.shape[1]), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and 3 * lengths[order[end]] >= 2 * lengths[order[start]]:
                end += 1
            group = order[start:end]
            out[group] = self.session.run(None, {"input_ids": self.pad([histories[i] for i in group])})[0]
            start = end
        return out


class ChatTemplate:
    """A saved tokenizer's chat template, rendered with jinja2 as Hugging Face's ``apply_chat_template`` does (sandboxed,
    ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` and ``strftime_now`` available, the special
    tokens as variables), so the runtime builds the training prompts without that library (tested equal).
    ``chat_template`` is None when the tokenizer has none: prompts are then plain text."""

    def __init__(self, template: str | None, special_tokens: dict[str, str]):
        self.chat_template, self.special_tokens = template, special_tokens
        self._compiled = None
        if template:
            import datetime

            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise RecsysError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._compiled = env.from_string(template)

    @classmethod
    def load(cls, directory: Path) -> ChatTemplate:
        """From ``tokenizer_config.json`` (its ``chat_template``, or ``chat_template.jinja`` beside it)."""
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):                      # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()
                   if k.endswith("_token") and isinstance(v, (str, dict))}
        return cls(template, special)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize or self._compiled is None:
            raise RecsysError("ChatTemplate renders text only, and needs a template")
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, **self.special_tokens)


@dataclass
class _PromptSpec:
    """What :func:`recsys.portable.prompts.listwise_prompt` needs from a backbone."""

    name: str
    tokenizer: object = None


WORD_SPLIT = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "[ \\t]+"}, "behavior": "Removed", "invert": False},
    {"type": "Split", "pattern": {"Regex": "\\n"}, "behavior": "Isolated", "invert": False}]}
"""The tiny backbone's pre-tokenizer in ``tokenizer.json``: words split at spaces and tabs, newlines kept."""


class WordSplitVocab:
    """The tiny backbone's word-level tokenizer (``tokenizers`` WordLevel over words split at spaces and
    tabs, newlines kept as tokens, no normaliser) as a dict lookup: a prompt of space-separated words is its
    words' ids, without building a ``tokenizers`` encoding per request. Built only
    for a ``tokenizer.json`` of exactly that shape (:meth:`from_file` returns None otherwise); texts with
    other whitespace go through the tokenizer (tested equal on both paths)."""

    def __init__(self, vocab: dict[str, int], unk_id: int, added: list[str] = ()):
        self.vocab, self.unk_id, self.added = vocab, unk_id, tuple(added)

    @classmethod
    def from_file(cls, path: Path) -> WordSplitVocab | None:
        spec = json.loads(Path(path).read_text())
        model = spec.get("model") or {}
        if model.get("type") != "WordLevel" or spec.get("normalizer") or spec.get("pre_tokenizer") != WORD_SPLIT:
            return None
        vocab = dict(model["vocab"])
        added = [a["content"] for a in spec.get("added_tokens", [])]
        vocab.update({a["content"]: a["id"] for a in spec.get("added_tokens", [])})
        return cls(vocab, vocab.get(model.get("unk_token"), 0), added)

    def encode(self, text: str) -> list[int] | None:
        """The ids of ``text`` (special tokens not added), or None when the tokenizer must do it: the text
        holds whitespace other than spaces, or an added token (which the tokenizer cuts out even inside a word)."""
        words = text.split()
        if sum(map(len, words)) + text.count(" ") != len(text) or any(a in text for a in self.added):
            return None
        get, unk = self.vocab.get, self.unk_id
        return [get(w, unk) for w in words]


def _left_pad(encoded: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded ``input_ids`` / ``attention_mask`` / ``position_ids`` of token id lists."""
    T = max(len(e) for e in encoded)
    ids = np.full((len(encoded), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), T), dtype=np.int64)
    for i, e in enumerate(encoded):
        ids[i, T - len(e):], mask[i, T - len(e):] = e, 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}


class _PromptScorer:
    """An exported last-position scorer (``first`` or ``groupwise``) with its tokenizer and prompt format."""

    name = ""

    def __init__(self, directory, threads: int | None = None, int8: bool = False):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.meta = read_manifest(directory).models.get(self.name)
        if self.meta is None:
            raise RecsysError(f"{directory}: no {self.name} reranker was exported (recsys export --{self.flag})")
        self.session = session(directory / self.meta.graph(int8), threads)
        side = directory / self.meta.files
        self.tokenizer = Tokenizer.from_file(str(side / "tokenizer" / "tokenizer.json"))
        self.words = WordSplitVocab.from_file(side / "tokenizer" / "tokenizer.json")
        self.pad_id = self.tokenizer.token_to_id("<pad>") or 0
        self.window, self.max_history = self.meta.window, self.meta.max_history
        self.spec = _PromptSpec("tiny") if self.meta.prompt == "tiny" else self._text_spec(side)
        self.titles = None
        if self.meta.prompt == "text":                  # item idx -> the text the model was trained on
            titles = side / "titles.json"
            if not titles.exists():
                raise RecsysError(f"{titles}: a text-prompt reranker needs its item titles; re-export it")
            from recsys.portable.prompts import Titles

            if self.meta.domain is None:
                raise RecsysError(f"{directory}: the {self.name} reranker's prompt domain is not recorded; re-export it")
            self.titles = Titles({int(k): v for k, v in json.loads(titles.read_text()).items()}, self.meta.domain)

    @staticmethod
    def _text_spec(directory: Path) -> _PromptSpec:
        return _PromptSpec("text", ChatTemplate.load(directory / "tokenizer"))

    def token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise RecsysError(f"{self.name}: {text!r} is {len(ids)} tokens in the exported tokenizer, expected one")
        return ids[0]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, by dict lookup where the tokenizer is word-level (:class:`WordSplitVocab`)."""
        fast = [self.words.encode(t) for t in texts] if self.words else [None] * len(texts)
        slow = [t for t, ids in zip(texts, fast) if ids is None]
        if slow:
            encoded = iter(self.tokenizer.encode_batch(slow, add_special_tokens=False))
            fast = [ids if ids is not None else next(encoded).ids for ids in fast]
        return fast


class FirstRuntime(_PromptScorer):
    """FIRST scores of candidate windows with the exported listwise reranker."""

    name, flag = "first", "reranker"

    def __init__(self, directory, threads: int | None = None, int8: bool = False):
        super().__init__(directory, threads, int8)
        self.identifiers = self.meta.identifiers
        self.retriever_prior = float(self.meta.retriever_prior)
        self.priors = {n: retriever_prior(n, self.retriever_prior) for n in range(1, self.window + 1)}
        """Window length -> the (n,) prior added to its scores, computed once."""

    def encode(self, histories, windows) -> dict[str, np.ndarray]:
        from recsys.portable.prompts import listwise_prompt

        texts = [listwise_prompt(self.spec, list(map(int, h)), list(map(int, w)), self.titles, self.max_history,
                                 self.identifiers) for h, w in zip(histories, windows)]
        return _left_pad(self.token_ids(texts), self.pad_id)

    def scores(self, histories, windows, run_options=None) -> np.ndarray:
        """(B, n) FIRST scores of windows of equal length n <= window: identifier logits minus the
        retriever prior (:func:`recsys.portable.window.retriever_prior`, as in training). ``run_options``: see :func:`run_options`."""
        n = len(windows[0])
        logits = self.session.run(None, self.encode(histories, windows), run_options)[0]
        if self.identifiers == "items":                    # (B, V) -> each window's own item tokens
            cols = np.array([self.token_ids([" ".join(f"<i{int(c)}>" for c in w)])[0] for w in windows])
            logits = np.take_along_axis(logits, cols, 1)
        return logits[:, :n] + self.priors[n] if self.retriever_prior else logits[:, :n]


class GroupwiseRuntime(_PromptScorer):
    """GroupRank scores of candidate groups with the exported groupwise reranker.

    For candidate j of a group the answer so far gets ``X :`` and the score is the expected digit
    under the model there; the greedy digit and a newline are written before the next candidate, as the
    training library's groupwise sampler does at temperature 0 (tested equal in ``tests/test_serving_export.py``).
    Without a KV cache in the graph, each candidate is one forward pass over the prompt and the
    answer so far: c passes per group.
    """

    name, flag = "groupwise", "groupwise"

    def __init__(self, directory, threads: int | None = None, int8: bool = False):
        from recsys.portable.vocab import DIGITS, LETTERS

        super().__init__(directory, threads, int8)
        self.window = self.meta.group_size
        self.letters = [self.token(c) for c in LETTERS[:self.window]]
        self.colon, self.separator = self.token(":"), self.token("\n")
        self.digits = np.array([self.token(d) for d in DIGITS])

    def scores(self, histories, windows, run_options=None) -> np.ndarray:
        """(B, n) expected 0-9 scores of groups of equal length n <= group size. ``run_options``: see
        :func:`run_options` (one terminate stops all n passes)."""
        from recsys.portable.prompts import groupwise_prompt

        texts = [groupwise_prompt(self.spec, list(map(int, h)), list(map(int, w)), self.titles, self.max_history)
                 for h, w in zip(histories, windows)]
        seqs = self.token_ids(texts)
        out = np.zeros((len(windows), len(windows[0])))
        for j in range(len(windows[0])):
            seqs = [s + [self.letters[j], self.colon] for s in seqs]
            logits = self.session.run(None, _left_pad(seqs, self.pad_id), run_options)[0].astype(np.float64)  # (B, 10)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, j] = p @ np.arange(10)
            seqs = [s + [int(self.digits[d]), self.separator] for s, d in zip(seqs, logits.argmax(-1))]
        return out


def _log_softmax(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the ``valid`` entries; -inf elsewhere (and everywhere in a row with none)."""
    x = np.where(valid, x, -np.inf)
    top = x.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
    return np.where(valid, out, -np.inf)


class GenerativeRuntime:
    """Trie-constrained beam search in numpy over the exported generative recommender's next-token step.

    The same search as the training library's beam search (tested equal in
    ``tests/test_serving_export.py``): per level, every beam's
    open codes (bans propagated up the trie, :class:`recsys.portable.trie_tables.TrieTables`) are
    renormalised, and the ``width`` best (beam score + code log-prob) continuations survive. Token layout:
    level 0 runs one row per user (all beams share the history), each later level B * width full rows.
    Item layout: the encoder runs once per user, then each level only the code heads on B * width states.
    """

    def __init__(self, directory, threads: int | None = None, int8: bool = False):
        from recsys.portable.trie_tables import TrieTables

        directory = Path(directory)
        self.meta = read_manifest(directory).models.get("generative")
        if self.meta is None:
            raise RecsysError(f"{directory}: no generative model was exported (recsys export --generative)")
        self.session = session(directory / self.meta.graph(int8), threads)
        z = np.load(directory / self.meta.tables)
        self.trie = TrieTables.build(z["codes"])
        self.item_idx, self.code_token = z["item_idx"], z["code_token"]                  # (N,), (D, K)
        self.bos, self.pad = (int(v) for v in z["special"])
        self.max_items = int(z["max_items"])
        self.layout = self.meta.layout
        if self.layout == "item":
            head = self.meta.head
            self.head = session(directory / (head["int8"]["file"] if int8 else head["file"]), threads)
        self.row_of = np.full(int(self.item_idx.max()) + 1, -1, dtype=np.int64)           # item idx -> trie row
        self.row_of[self.item_idx] = np.arange(len(self.item_idx))

    def _tokens(self, history, prefix) -> list[int]:
        rows = self.row_of[np.asarray(history, dtype=np.int64)[-self.max_items:]]
        if (rows < 0).any():
            raise RecsysError(f"history holds item indices without a semantic ID: {np.asarray(history)[rows < 0]}")
        levels = np.arange(self.trie.depth)
        hist = self.code_token[levels, self.trie.codes[rows]].reshape(-1)
        return [self.bos, *hist.tolist(), *(int(self.code_token[level, c]) for level, c in enumerate(prefix))]

    def states(self, histories) -> np.ndarray:
        """Item layout: the user state (B, H) after the last ``max_items`` items of each history."""
        rows = [np.asarray(h, dtype=np.int64)[-self.max_items:] for h in histories]
        for r in rows:
            known = (r >= 1) & (r < len(self.row_of))
            known[known] = self.row_of[r[known]] >= 0
            if not known.all():
                raise RecsysError(f"history holds item indices without a semantic ID: {r[~known].tolist()}")
        T = max(2, max(len(r) for r in rows))
        items = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            items[i, T - len(r):] = r
        return self.session.run(None, {"items": items, "attention_mask": (items > 0).astype(np.int64)})[0]

    def head_logits(self, states: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
        """Item layout: (R, D, K) code logits from states (R, H) and code prefixes (R, l), l < D."""
        prefix = np.zeros((len(states), self.trie.depth), dtype=np.int64)
        prefix[:, :prefixes.shape[1]] = prefixes
        return self.head.run(None, {"state": states, "prefix": prefix})[0]

    def code_logits(self, histories, prefixes) -> np.ndarray:
        """(R, D, K) float32 code logits after each history + code prefix (left-padded batch)."""
        if self.layout == "item":
            prefix = np.zeros((len(histories), self.trie.depth), dtype=np.int64)
            for i, p in enumerate(prefixes):
                prefix[i, :len(p)] = p
            return self.head_logits(self.states(histories), prefix)
        rows = [self._tokens(h, p) for h, p in zip(histories, prefixes)]
        T = max(2, max(len(r) for r in rows))
        ids = np.full((len(rows), T), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}
        return self.session.run(None, feeds)[0]

    def recommend(self, histories, k: int, beam: int = 20, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items (B, k) int64 and their log-probs (B, k) float32 by beam search of width
        ``max(beam, k)``; items in ``exclude[b]`` (default: the history) are never returned. Slots with
        no item left (a catalog smaller than k) hold item 0 and score -inf."""
        D, K, W, B = self.trie.depth, self.trie.n_codes, max(beam, k), len(histories)
        exclude = histories if exclude is None else exclude
        banned = np.zeros((B, len(self.item_idx)), dtype=bool)
        for b, items in enumerate(exclude):
            rows = self.row_of[np.asarray(list(items), dtype=np.int64)]
            banned[b, rows[rows >= 0]] = True
        banned = np.repeat(banned, W, 0)                                                 # (B*W, N)
        nodes = np.zeros(B * W, dtype=np.int64)
        codes = np.zeros((B * W, D), dtype=np.int64)
        score = np.zeros((B, W))
        score[:, 1:] = -np.inf                                   # beams start equal: keep one, so they stay distinct
        states = np.repeat(self.states(histories), W, 0) if self.layout == "item" else None   # once per request
        for level in range(D):
            if states is not None:
                logits = self.head_logits(states, codes[:, :level])[:, level]
            elif level == 0:
                logits = np.repeat(self.code_logits(histories, [()] * B)[:, 0], W, 0)
            else:
                hists = [histories[r // W] for r in range(B * W)]
                logits = self.code_logits(hists, codes[:, :level].tolist())[:, level]
            # the model's likelihood over the trie's children, then banned (dead) prefixes closed, as the
            # training library's beam search does without renormalising over the bans
            children = self.trie.child[np.maximum(nodes, 0)] >= 0
            children &= (nodes >= 0)[:, None]
            logp = np.where(self.trie.open_children(nodes, banned), _log_softmax(logits.astype(np.float64), children),
                            -np.inf)
            total = (score[:, :, None] + logp.reshape(B, W, K)).reshape(B, W * K)
            top = np.argsort(-total, axis=1, kind="stable")[:, :W]
            score = np.take_along_axis(total, top, 1)
            src = (np.arange(B)[:, None] * W + top // K).reshape(-1)
            code = (top % K).reshape(-1)
            nodes, codes = nodes[src], codes[src]
            nodes = np.where(nodes >= 0, self.trie.child[np.maximum(nodes, 0), code], -1)
            codes[:, level] = code
        rows = self.trie.item[np.maximum(nodes, 0)]
        ok = (nodes >= 0) & (rows >= 0) & np.isfinite(score.reshape(-1))
        items = np.where(ok, self.item_idx[np.maximum(rows, 0)], 0).reshape(B, W)
        return items[:, :k], np.where(ok.reshape(B, W), score, -np.inf)[:, :k].astype(np.float32)


@dataclass
class RecommendQuery:
    """One request, in item idx space (the API maps ids to idx). ``user_id``: the known user the history is
    (a prefix of), for the side features that know the user and their interaction times; ``time``: the
    request's Unix seconds (None: now), for those that read time."""

    history: list[int]
    k: int = 10
    exclude: list[int] = field(default_factory=list)
    candidates: int = 50
    rerank: bool = True
    user_id: str | None = None
    time: int | None = None


class KnownUsers:
    """The deployment's known users, from ``histories.parquet`` (written by ``recsys export``; read once per
    process, by :class:`Recommender`): what ``user_id`` requests rank from.

    ``histories``: user id -> whole history (item idx, oldest first); ``times``: user id -> (uidx, interaction
    times in Unix seconds), None for a directory exported without them (the fusion reranker needs them);
    ``vectors``: user id -> row of ``table``, the (n_users, d) SASRec user vectors of the stored histories,
    filled by :meth:`compute_vectors`."""

    FILE = "histories.parquet"

    def __init__(self, histories: dict[str, list[int]], times: dict[str, tuple[int, list[int]]] | None = None):
        self.histories, self.times = histories, times
        self.vectors: dict[str, int] = {}
        self.table = np.zeros((0, 0), dtype=np.float32)

    @classmethod
    def read(cls, directory) -> KnownUsers:
        """The users of ``directory``; none when it has no ``histories.parquet`` (history requests only)."""
        import polars as pl

        path = Path(directory) / cls.FILE
        if not path.exists():
            return cls({})
        try:
            df = pl.read_parquet(path)
        except Exception as e:                              # noqa: BLE001 - polars raises several kinds
            raise RecsysError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); re-create the "
                              "directory with `recsys export`") from None
        ids = df["user_id"].to_list()
        times = dict(zip(ids, zip(df["uidx"].to_list(), df["times"].to_list()))) \
            if {"uidx", "times"} <= set(df.columns) else None
        return cls(dict(zip(ids, df["history"].to_list())), times)

    def compute_vectors(self, sasrec: SASRecRuntime, batch_size: int = 256) -> None:
        """The user vector of every stored history, so that a request for a known user looks its vector up
        instead of running SASRec: (n_users, d) float32, n_users x d x 4 bytes (1.5 MB for MovieLens-1M's
        6,040 users at d = 64). Histories run in batches of one input length (the last ``max_len`` items),
        so no row is padded and each vector is the one a single-user call computes."""
        ids = list(self.histories)
        lengths = [min(len(self.histories[u]), sasrec.max_len) for u in ids]
        table = np.zeros((len(ids), sasrec.items.shape[1]), dtype=np.float32)
        by_len: dict[int, list[int]] = {}
        for row, n in enumerate(lengths):
            by_len.setdefault(n, []).append(row)
        for rows in by_len.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                table[chunk] = sasrec.user_vectors([self.histories[ids[r]] for r in chunk])
        self.table, self.vectors = table, {u: row for row, u in enumerate(ids)}

    def stored_vector(self, user_id: str | None, history: list[int]) -> np.ndarray | None:
        """The precomputed vector when ``history`` is ``user_id``'s stored history (what a ``user_id``
        request ranks from), else None (a replayed prefix, an explicit history, an unknown user)."""
        row = self.vectors.get(user_id) if user_id is not None else None
        if row is None or history != self.histories[user_id]:
            return None
        return self.table[row]


class FusionRuntime:
    """The fusion reranker: side features of each list's top ``depth`` candidates computed in numpy from the
    exported tables (:class:`recsys.portable.features.SideFeatures`, the code training used), scored by the
    exported scorer graph. ``users``: the deployment's known users, whose ``uidx`` and interaction times the
    user features read."""

    def __init__(self, directory, users: KnownUsers, threads: int | None = None):
        from recsys.portable.features import SideFeatures

        directory = Path(directory)
        self.meta = read_manifest(directory).models["fusion"]
        self.session = session(directory / self.meta.file, threads)
        self.side = SideFeatures.load(directory / self.meta.tables)
        if self.side.names != list(self.meta.features):
            raise RecsysError(f"{directory}: fusion tables give columns {self.side.names}, the scorer reads "
                              f"{self.meta.features}; re-export it")
        self.depth = self.meta.depth
        if users.times is None:
            raise RecsysError(f"{directory / KnownUsers.FILE}: no uidx / times columns, which the fusion "
                              "reranker reads; re-export the directory")
        self.users = users.times

    def requests(self, queries: list[RecommendQuery], retrieved: list[tuple[list[int], list[float]]]) -> list:
        """A :class:`recsys.portable.features.Request` per query: its top ``depth`` retrieved candidates; a
        query without a known user reads no user features and no interaction times."""
        from recsys.portable.features import Request

        now, out = int(time.time()), []
        for q, (items, scores) in zip(queries, retrieved):
            uidx, times = self.users.get(q.user_id, (-1, [])) if q.user_id is not None else (-1, [])
            n = min(self.depth, len(items))
            out.append(Request(int(uidx), np.asarray(q.history, dtype=np.int64),
                               np.asarray(times[:len(q.history)], dtype=np.int64), now if q.time is None else int(q.time),
                               np.asarray(items[:n], dtype=np.int64), np.asarray(scores[:n], dtype=np.float64)))
        return out

    def scores(self, requests: list, run_options=None) -> np.ndarray:
        """(B, L) scores of requests with L candidates each."""
        features = self.side.transform_many(requests)                                      # (B, L, F)
        return self.session.run(None, {"features": features}, run_options)[0]

    def rerank(self, queries: list[RecommendQuery], retrieved, run_options=None) -> list[tuple[list[int], list[float]]]:
        """Each retrieved list with its top ``depth`` in the scorer's order, the rest after them as retrieved."""
        requests = self.requests(queries, retrieved)
        return _rerank_heads([r.candidates.tolist() for r in requests], [items for items, _ in retrieved],
                             lambda members: self.scores([requests[i] for i in members], run_options))


class Recommender:
    """SASRec + FAISS retrieval, then reranking: the fusion reranker over the top ``depth`` when exported, else
    the top window by FIRST (or the groupwise scorer).

    ``threads``: ONNX Runtime intra-op threads of every session, and FAISS's OpenMP threads (a process-wide
    setting); None leaves both libraries' defaults."""

    def __init__(self, directory, threads: int | None = None, int8: bool = False):
        import faiss
        import polars as pl

        directory = Path(directory)
        self.manifest = read_manifest(directory)
        verify_files(directory, self.manifest)
        self.version = self.manifest.version
        self.sasrec = SASRecRuntime(directory, threads, int8)
        self.first = FirstRuntime(directory, threads, int8) if "first" in self.manifest.models else None
        self.groupwise = GroupwiseRuntime(directory, threads, int8) if "groupwise" in self.manifest.models else None
        self.reranker = self.first or self.groupwise
        """What reranks retrieval windows: FIRST when exported, else the groupwise scorer, else None."""
        self.generative = GenerativeRuntime(directory, threads, int8) if "generative" in self.manifest.models \
            else None
        self.users = KnownUsers.read(directory)
        """The known users: their stored histories, times and precomputed user vectors."""
        self.users.compute_vectors(self.sasrec)
        self.fusion = FusionRuntime(directory, self.users, threads) if "fusion" in self.manifest.models else None
        """Reranks ``/v1/recommend``'s retrieved lists when exported, instead of :attr:`reranker`."""
        catalog = pl.read_parquet(directory / "catalog.parquet")
        self.item_ids = dict(zip(catalog["idx"].to_list(), catalog["item_id"].to_list()))
        self.item_idx = {v: k for k, v in self.item_ids.items()}
        self.titles = dict(zip(catalog["idx"].to_list(), catalog["title"].to_list())) \
            if "title" in catalog.columns else {}
        """Item idx -> title, for responses."""
        vectors = np.ascontiguousarray(self.sasrec.items[1:], dtype=np.float32)
        if threads:            # FAISS's OpenMP pool is process-wide; spinning idle threads cost a server CPU
            faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.n_items = len(vectors)

    @classmethod
    def load(cls, directory, **kw) -> Recommender:
        return cls(directory, **kw)

    def user_vectors(self, queries: list[RecommendQuery]) -> np.ndarray:
        """(B, d) SASRec user vectors: a known user's stored history reads its precomputed vector
        (:meth:`KnownUsers.compute_vectors`), any other history runs the SASRec graph."""
        stored = [self.users.stored_vector(q.user_id, q.history) for q in queries]
        todo = [i for i, v in enumerate(stored) if v is None]
        if not todo:
            return np.stack(stored)
        computed = self.sasrec.user_vectors([queries[i].history for i in todo])
        if len(todo) == len(queries):
            return computed
        for i, v in zip(todo, computed):
            stored[i] = v
        return np.stack(stored)

    def retrieve(self, queries: list[RecommendQuery]) -> list[tuple[list[int], list[float]]]:
        """Top ``candidates`` items (idx) per query with SASRec scores, history and exclusions removed."""
        users = self.user_vectors(queries)
        depth = min(self.n_items, max(q.candidates + len(q.history) + len(q.exclude) for q in queries))
        scores, rows = self.index.search(np.ascontiguousarray(users, dtype=np.float32), depth)
        out = []
        for q, s, r in zip(queries, scores, rows):
            items = r + 1                                                    # FAISS row -> item idx (-1 -> 0)
            banned = np.zeros(self.n_items + 1, dtype=bool)
            banned[q.history] = True
            banned[q.exclude] = True
            keep = (r >= 0) & ~banned[items]
            items, s = items[keep][:q.candidates], s[keep][:q.candidates]
            out.append((items.tolist(), s.astype(np.float64).tolist()))
        return out

    @property
    def reranks(self) -> str | None:
        """What reranks ``/v1/recommend``'s retrieved lists: ``fusion``, the window reranker's name, or None."""
        return "fusion" if self.fusion is not None else self.reranker.name if self.reranker else None

    def rerank_retrieved(self, queries: list[RecommendQuery], retrieved, run_options=None) -> list[tuple[list[int], list[float]]]:
        """The served order of retrieved lists: the fusion reranker's when exported, else the window reranker's."""
        if self.fusion is not None:
            return self.fusion.rerank(queries, retrieved, run_options)
        return self.rerank_windows([q.history for q in queries], [items for items, _ in retrieved], run_options)

    def rerank_windows(self, histories, candidate_lists, run_options=None) -> list[tuple[list[int], list[float]]]:
        """Rerank the first ``window`` candidates of each list; the rest keep their order. Scores:
        reranked items get the reranker's scores (FIRST logits or expected digits), the tail items
        ranks below them. ``run_options`` (:func:`run_options`) lets another thread stop the scoring."""
        if self.reranker is None:
            raise RecsysError("this serving directory has no reranker")
        w = self.reranker.window
        heads = [c[:w] for c in candidate_lists]
        return _rerank_heads(heads, candidate_lists, lambda members: self.reranker.scores(
            [histories[i] for i in members], [heads[i] for i in members], run_options))

    def recommend_batch(self, queries: list[RecommendQuery], batch_size: int = 64) -> list[dict]:
        """Per query: ``items`` (idx), ``scores``, ``reranked`` (whether the reranker ordered them).

        Large inputs (batch re-scoring) run in sub-batches of ``batch_size`` queries of similar history
        length: on CPU a bigger ONNX batch is not cheaper per row, but padding to a long neighbour is.
        """
        return _length_bucketed(queries, [len(q.history) for q in queries], batch_size, self._recommend)

    def _recommend(self, queries: list[RecommendQuery]) -> list[dict]:
        retrieved = self.retrieve(queries)
        results = [{"items": items[:q.k], "scores": scores[:q.k], "reranked": False}
                   for q, (items, scores) in zip(queries, retrieved)]
        todo = [i for i, q in enumerate(queries) if q.rerank and self.reranks and retrieved[i][0]]
        if todo:
            reranked = self.rerank_retrieved([queries[i] for i in todo], [retrieved[i] for i in todo])
            for i, (items, scores) in zip(todo, reranked):
                results[i] = {"items": items[:queries[i].k], "scores": scores[:queries[i].k], "reranked": True}
        return results

    def retrieval_order(self, queries: list[RecommendQuery], candidate_lists) -> list[tuple[list[int], list[float]]]:
        """Given candidate lists (idx) in SASRec's order, with its scores: what retrieval would have made of
        them for each query's user vector (:meth:`user_vectors`)."""
        users = self.user_vectors(queries)                                                 # (B, d)
        out = []
        for user, cands in zip(users, candidate_lists):
            scores = self.sasrec.items[np.asarray(cands, dtype=np.int64)] @ user
            order = np.argsort(-scores, kind="stable")
            out.append(([cands[j] for j in order], scores[order].astype(np.float64).tolist()))
        return out

    def rerank_batch(self, queries: list[RecommendQuery], candidate_lists, k: int | None = None,
                     batch_size: int = 64) -> list[dict]:
        """Rerank given candidate lists (idx) with the reranker ``/v1/recommend`` uses: the fusion reranker over
        them in SASRec's order (its features read the retriever's scores, and the query's user and time), or
        the window reranker on the first window, the rest in the given order."""
        pairs = list(zip(queries, candidate_lists))

        def run(chunk):
            queries, lists = [q for q, _ in chunk], [c for _, c in chunk]
            if self.fusion is not None:
                out = self.fusion.rerank(queries, self.retrieval_order(queries, lists))
            else:
                out = self.rerank_windows([q.history for q in queries], lists)
            return [{"items": items[:k], "scores": scores[:k]} for items, scores in out]

        return _length_bucketed(pairs, [len(q.history) for q in queries], batch_size, run)


def _rerank_heads(heads: list[list[int]], lists: list[list[int]], score) -> list[tuple[list[int], list[float]]]:
    """Each list with its head (its first ``len(head)`` items) in the order of ``score(members) -> (B, n)``,
    called once per head length n on the indices of the heads that long; the tail keeps its order, each
    tail item scored 1 below the one before, starting 1 below the head's lowest score."""
    out: list = [None] * len(heads)
    by_len: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        by_len.setdefault(len(h), []).append(i)
    for n, members in by_len.items():
        if n == 0:
            for i in members:
                out[i] = ([], [])
            continue
        for i, row in zip(members, score(members)):
            order = np.argsort(-row, kind="stable")
            top = [float(row[j]) for j in order]
            floor = min(top) - 1.0
            out[i] = ([heads[i][j] for j in order] + list(lists[i][n:]),
                      top + [floor - t for t in range(len(lists[i]) - n)])
    return out


def _length_bucketed(rows: list, lengths: list[int], batch_size: int, fn) -> list:
    """``fn`` over sub-batches of at most ``batch_size`` rows sorted by length; results in input order."""
    if len(rows) <= batch_size:
        return fn(rows)
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    out = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        for i, result in zip(members, fn([rows[i] for i in members])):
            out[i] = result
    return out
