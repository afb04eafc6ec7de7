"""The project's special words, torch-free (the serving runtime formats prompts with them).

``END`` closes a generated list; ``LETTERS`` are the candidate identifiers (one token each);
``STRUCTURE`` and ``DIGITS`` complete the ``tiny`` backbone's vocabulary.
"""

END = "<eor>"
RANK = "<rank>"
"""Closes the slate of a slate-then-rank answer (F-GRPO); the ranking of the slate follows it."""
STRUCTURE = ["<pad>", "<unk>", "<bos>", "\n", END, "history:", "candidates:", "answer:", "score:", ":", RANK]
LETTERS = [chr(ord("A") + i) for i in range(26)]
DIGITS = [str(d) for d in range(10)]
