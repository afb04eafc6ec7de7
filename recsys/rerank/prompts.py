"""Listwise prompts and answers, from the templates in ``templates.yaml``.

A prompt holds the user's recent history and the candidates, each labelled with a single-token
identifier (``A``..``T``). Text backbones see titles and, when their tokenizer has a chat template,
the prompt is wrapped in it (system + user turn, generation prompt). The ``tiny`` backbone sees item
tokens ``<i{idx}>``. The answer is one identifier per line, then the end token.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from recsys.llm.vocab import END, LETTERS

if TYPE_CHECKING:
    from recsys.llm.backbone import Backbone


@lru_cache
def templates() -> dict:
    return yaml.safe_load((Path(__file__).parent / "templates.yaml").read_text())


def item_titles(dataset) -> dict[int, str]:
    """item idx -> the text a text backbone reads for it: ``Title (year)``, or the title alone."""
    cat = dataset.catalog
    return {int(i): f"{t} ({y})" if y is not None else t for i, t, y in cat.select("idx", "title", "year").iter_rows()}


def listwise_prompt(backbone: Backbone, history: list[int], candidates: list[int], titles: dict[int, str] | None = None,
                    max_history: int = 20) -> str:
    """The prompt text for one window. ``history`` / ``candidates``: item idx; ``titles``: idx -> text."""
    kind = "tiny" if backbone.name == "tiny" else "text"
    t = templates()[kind]
    if kind == "text" and titles is None:
        raise ValueError("a text backbone needs item titles")

    def fields(idx: int) -> dict:
        return {"token": f"<i{idx}>", "title": titles[idx] if titles else f"<i{idx}>"}

    sep = " " if kind == "tiny" else "\n"
    hist = sep.join(t["history_item"].format(**fields(i)) for i in history[-max_history:])
    cands = sep.join(t["candidate"].format(id=LETTERS[j], **fields(i)) for j, i in enumerate(candidates))
    user = t["user"].format(history=hist, candidates=cands, end=END)
    if kind == "text" and getattr(backbone.tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": t["system"]}, {"role": "user", "content": user}]
        return backbone.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user + ("\n" if kind == "text" else " ")


def answer_text(order: list[int]) -> str:
    """The target answer for a ranking (candidate positions, best first): ``C\\nA\\nB\\n<eor>``."""
    return "".join(f"{LETTERS[i]}\n" for i in order) + END
