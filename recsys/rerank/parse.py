"""Turn any generated text into a ranked candidate list plus validity flags.

The listwise answer format is one single-token identifier per line (``A`` .. ``T``), then the end
token. Models that were not trained on it (or sampled at high temperature) write other things, so
the parser is lenient about decoration and strict about meaning:

- a line is read as an identifier after stripping whitespace, bullets / numbering (``1.``, ``2)``,
  ``-``, ``*``, ``#``) and brackets (``[B]``, ``(B)``); anything else is ``malformed``;
- an identifier already given earlier in the list is a ``duplicate`` (it keeps its first position);
- a well-formed identifier outside the window (``U`` when the window is ``A``..``T``) is
  ``out_of_window``;
- text after the end token is ignored; blank lines are skipped (and counted).

The ranking keeps valid identifiers in order; candidates never mentioned are appended in their
original (retriever) order, as RankGPT does, so every candidate gets a rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DECORATION = re.compile(r"^\s*(?:[-*#•]+|\d+\s*[.):])?\s*[\[(]?\s*(?P<id>[^\s\]).,;:]+)\s*[\])]?\s*[.,;:]?\s*$")


@dataclass(frozen=True)
class ParsedList:
    """A parsed answer: ``order`` holds candidate positions (0-based, best first), complete."""

    order: list[int]
    generated: list[int] = field(default_factory=list)
    """Positions the model actually named, in its order (without fill-in)."""
    malformed: int = 0
    duplicate: int = 0
    out_of_window: int = 0
    blank: int = 0

    @property
    def valid(self) -> bool:
        return self.malformed == self.duplicate == self.out_of_window == 0


def identifiers(n: int) -> list[str]:
    """Single-token identifiers for a window of ``n`` candidates: ``A``, ``B``, ... (at most 26)."""
    if not 1 <= n <= 26:
        raise ValueError(f"a window holds 1 to 26 candidates, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def parse_ranking(text: str, n: int, end_token: str = "<eor>") -> ParsedList:
    """Parse ``text`` answering for a window of ``n`` candidates labelled ``identifiers(n)``."""
    ids = {c: i for i, c in enumerate(identifiers(n))}
    all_letters = set(identifiers(26))
    text = text.split(end_token, 1)[0]
    text = text.removesuffix("\n")
    generated, seen = [], set()
    malformed = duplicate = out_of_window = blank = 0
    for line in text.split("\n"):
        if not line.strip():
            blank += 1
            continue
        m = _DECORATION.match(line)
        token = m.group("id") if m else None
        if token in ids:
            if ids[token] in seen:
                duplicate += 1
            else:
                seen.add(ids[token])
                generated.append(ids[token])
        elif token in all_letters:
            out_of_window += 1
        else:
            malformed += 1
    order = generated + [i for i in range(n) if i not in seen]
    return ParsedList(order, generated, malformed, duplicate, out_of_window, blank)
