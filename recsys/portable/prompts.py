"""Listwise prompts and answers, from the templates in ``templates.yaml``.

A prompt holds the user's recent history and the candidates, each labelled with a single-token
identifier (``A``..``T``). Text backbones see titles and, when their tokenizer has a chat template,
the prompt is wrapped in it (system + user turn, generation prompt). The ``tiny`` backbone sees item
tokens ``<i{idx}>``. The answer is one identifier per line, then the end token.

Identifiers are ``letters`` (the default, FIRST's ``A``..``T``) or, for the ``tiny`` backbone only,
``items``: each candidate's own item token is its identifier (departure from FIRST, documented in
:class:`pipelines.reranker.RerankerSFTConfig`). A letter only means "the candidate written next to
me", so answering one is a two-hop pointer (find the candidate, read its label) that a tiny model
trained from scratch did not learn in 400k examples (``pipelines/benchmarks/pointer_probe.py``); an
item token's logit is a direct score of that item, learned from the first steps.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import yaml

from recsys.errors import RecsysError
from recsys.portable.vocab import END, LETTERS

IDENTIFIERS = ("letters", "items")


class Backbone(Protocol):
    """What a prompt needs of a backbone (:class:`recsys.llm.backbone.Backbone`, or the serving runtime's
    tokenizer spec): its ``name`` (``tiny`` picks the item-token format) and its ``tokenizer`` (a chat
    template, if any). A protocol, so that this module stays torch-free for the serving runtime."""

    name: str
    tokenizer: Any


@lru_cache
def templates() -> dict:
    return yaml.safe_load((Path(__file__).parent / "templates.yaml").read_text())


class Titles(dict):
    """item idx -> the text a text backbone reads for it, and what the items are: ``domain``, a key of
    ``domains`` in ``templates.yaml`` whose words the text prompts use ("Movies the user watched", "Items
    the user chose"). A plain dict of titles is read as the neutral ``items``."""

    def __init__(self, titles: dict[int, str], domain: str = "items"):
        super().__init__(titles)
        domain_words(domain)
        self.domain = domain


def domain_words(domain: str) -> dict[str, str]:
    """The words of a domain (``role``, ``items``, ``Items``, ``consume``, ``consumed``); unknown: an error
    listing the known ones."""
    known = templates()["domains"]
    if domain not in known:
        raise RecsysError(f"unknown prompt domain {domain!r}; known: {', '.join(known)}")
    return known[domain]


def item_titles(dataset, domain: str | None = None) -> Titles:
    """item idx -> ``Title (year)`` (or the title alone) of a prepared dataset, in ``domain`` (a recipe's
    override; None: the dataset's own)."""
    cat = dataset.catalog
    return Titles({int(i): f"{t} ({y})" if y is not None else t for i, t, y in cat.select("idx", "title", "year").iter_rows()},
                  domain or dataset.domain)


def check_identifiers(backbone: Backbone, identifiers: str) -> None:
    if identifiers not in IDENTIFIERS:
        raise RecsysError(f"identifiers must be one of {IDENTIFIERS}, got {identifiers!r}")
    if identifiers == "items" and backbone.name != "tiny":
        raise RecsysError(f"{backbone.name}: item identifiers need the tiny backbone's item tokens; use letters")


def listwise_prompt(backbone: Backbone, history: list[int], candidates: list[int], titles: dict[int, str] | None = None,
                    max_history: int = 20, identifiers: str = "letters") -> str:
    """The prompt text for one window. ``history`` / ``candidates``: item idx; ``titles``: idx -> text."""
    check_identifiers(backbone, identifiers)
    kind = "tiny" if backbone.name == "tiny" else "text"
    t = templates()["tiny_items" if identifiers == "items" else kind]
    if kind == "text" and titles is None:
        raise ValueError("a text backbone needs item titles")

    def fields(idx: int) -> dict:
        return {"token": f"<i{idx}>", "title": titles[idx] if titles else f"<i{idx}>"}

    sep = " " if kind == "tiny" else "\n"
    hist = sep.join(t["history_item"].format(**fields(i)) for i in history[-max_history:])
    cands = sep.join(t["candidate"].format(id=LETTERS[j], **fields(i)) for j, i in enumerate(candidates))
    words = domain_words(getattr(titles, "domain", "items")) if kind == "text" else {}
    user = t["user"].format(history=hist, candidates=cands, end=END, **words)
    if kind == "text" and getattr(backbone.tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": t["system"].format(**words)}, {"role": "user", "content": user}]
        return backbone.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user + ("\n" if kind == "text" else " ")


def answer_text(order: list[int], candidates: list[int] | None = None) -> str:
    """The target answer for a ranking (candidate positions, best first): ``C\\nA\\nB\\n<eor>``; with
    ``candidates`` (item identifiers) the items' tokens instead: ``<i7>\\n<i3>\\n<i9>\\n<eor>``."""
    words = [LETTERS[i] for i in order] if candidates is None else [f"<i{candidates[i]}>" for i in order]
    return "".join(f"{w}\n" for w in words) + END


def items_as_letters(text: str, candidates: list[int]) -> str:
    """An item-identifier answer rewritten with letters (``<i7>`` -> the letter of item 7's position), so
    :func:`recsys.rerank.parse.parse_ranking` and its validity flags apply unchanged; an item token
    that is not a candidate becomes the last letter ``Z`` (``out_of_window`` for windows under 26)."""
    letter = {f"<i{int(c)}>": LETTERS[j] for j, c in enumerate(candidates)}
    end = text.find(END)
    body, tail = (text, "") if end < 0 else (text[:end], text[end:])
    return "\n".join(letter.get(w.strip(), LETTERS[-1] if w.strip().startswith("<i") else w) for w in body.split("\n")) + tail


def groupwise_prompt(backbone: Backbone, history: list[int], group: list[int], titles=None, max_history: int = 20) -> str:
    """The GroupRank prompt of one group (``groupwise_tiny`` or ``groupwise_text`` template), in the
    backbone's chat template when it has one; torch-free, shared by training and the serving runtime."""
    kind = "tiny" if backbone.name == "tiny" else "text"
    t = templates()[f"groupwise_{kind}"]

    def fields(idx: int) -> dict:
        return {"token": f"<i{idx}>", "title": titles[idx] if titles else f"<i{idx}>"}

    sep = " " if kind == "tiny" else "\n"
    hist = sep.join(t["history_item"].format(**fields(i)) for i in history[-max_history:])
    cands = sep.join(t["candidate"].format(id=LETTERS[j], **fields(i)) for j, i in enumerate(group))
    words = domain_words(getattr(titles, "domain", "items")) if kind == "text" else {}
    user = t["user"].format(history=hist, candidates=cands, **words)
    if kind == "text" and getattr(backbone.tokenizer, "chat_template", None):
        return backbone.tokenizer.apply_chat_template([{"role": "system", "content": t["system"].format(**words)},
                                                       {"role": "user", "content": user}],
                                                      tokenize=False, add_generation_prompt=True)
    return user + ("\n" if kind == "text" else " ")
