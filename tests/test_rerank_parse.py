import pytest

from recsys.portable.window import sliding_window_rerank, window_starts
from recsys.rerank.parse import identifiers, parse_ranking


def test_clean_answer():
    p = parse_ranking("C\nA\nB\n<eor>", 4)
    assert p.order == [2, 0, 1, 3] and p.generated == [2, 0, 1] and p.valid


def test_decorations_are_tolerated():
    p = parse_ranking("1. [C]\n2) B\n- (A)\n* D.\n", 4)
    assert p.generated == [2, 1, 0, 3] and p.valid


def test_malformed_duplicate_out_of_window_and_text_after_end():
    """Window of 3 (A..C): 'B', 'Z' (a letter outside the window), 'B' again (duplicate),
    'the best is A' (malformed), blank line, 'A'; the end token hides 'C'."""
    p = parse_ranking("B\nZ\nB\nthe best is A\n\nA\n<eor>\nC", 3)
    assert p.generated == [1, 0] and p.order == [1, 0, 2]
    assert (p.malformed, p.duplicate, p.out_of_window, p.blank) == (1, 1, 1, 1) and not p.valid


def test_empty_answer_keeps_retriever_order():
    assert parse_ranking("", 3).order == [0, 1, 2]


def test_identifiers():
    assert identifiers(3) == ["A", "B", "C"] and identifiers(20)[-1] == "T"
    with pytest.raises(ValueError):
        identifiers(27)


def test_window_starts():
    assert window_starts(100) == [80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert window_starts(25) == [5, 0] and window_starts(20) == [0] and window_starts(7) == [0]


def test_sliding_window_bubbles_the_best_to_the_top():
    """Items 0..7 scored by value, window 4, stride 2: windows [4, 8), [2, 6), [0, 4).
    Sorting each window descending moves 7 from the back to the front:
    [0..7] -> [0,1,2,3,7,6,5,4] -> [0,1,7,6,3,2,5,4] -> [7,6,1,0,3,2,5,4]."""
    calls = []

    def by_value(chunk):
        calls.append(list(chunk))
        return sorted(range(len(chunk)), key=lambda i: -chunk[i])

    out = sliding_window_rerank(list(range(8)), by_value, window=4, stride=2)
    assert calls == [[4, 5, 6, 7], [2, 3, 7, 6], [0, 1, 7, 6]]
    assert out == [7, 6, 1, 0, 3, 2, 5, 4]
    with pytest.raises(ValueError, match="permutation"):
        sliding_window_rerank([1, 2], lambda chunk: [0, 0])
