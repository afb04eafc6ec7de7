import pytest

from recsys.llm.backbone import build_tiny
from recsys.rerank.groupwise import answer_ids
from recsys.rerank.parse import parse_ranking
from recsys.rerank.sft import (
    collate,
    encode_example,
    encode_group_examples,
    first_ranks,
    history_labels,
    reorder_teacher,
    teacher_example,
    teacher_scores,
)


def test_teacher_list_by_hand():
    """Candidates [7, 3, 9, 5], target 9, no shuffle: teacher = [9, 7, 3, 5] -> positions [2, 0, 1, 3];
    FIRST ranks of the presented items 7, 3, 9, 5 are 2, 3, 1, 4."""
    ex = teacher_example([1, 2], [7, 3, 9, 5], target=9, shuffle=False)
    assert ex.presented == [7, 3, 9, 5] and ex.teacher_order == [2, 0, 1, 3]
    assert first_ranks(ex) == [2, 3, 1, 4]


def test_teacher_reranker_order_by_hand():
    """Presented [7, 3, 9, 5], target 9, a teacher ranks [5, 9, 7, 3]: teacher list [9, 5, 7, 3] = positions
    [2, 3, 0, 1]; FIRST ranks of 7, 3, 9, 5 are 3, 4, 1, 2. Without a target the teacher's order is kept."""
    ex = reorder_teacher(teacher_example([1, 2], [7, 3, 9, 5], target=9, shuffle=False), [5, 9, 7, 3])
    assert ex.teacher_order == [2, 3, 0, 1] and first_ranks(ex) == [3, 4, 1, 2]
    pure = reorder_teacher(teacher_example([1, 2], [7, 3, 9, 5], target=9, shuffle=False), [5, 9, 7, 3], "teacher")
    assert pure.teacher_order == [3, 2, 0, 1]
    keep = teacher_example([1], [7, 3, 5], target=9, window=3, shuffle=False, target_missing="keep")
    assert reorder_teacher(keep, [5, 7, 3]).teacher_order == [2, 0, 1]
    with pytest.raises(ValueError, match="not an order"):
        reorder_teacher(ex, [5, 9, 7])


def test_missing_target_inserted_or_skipped_and_shuffle_is_seeded():
    ex = teacher_example([1], [7, 3, 5], target=9, window=3, shuffle=False)
    assert sorted(ex.presented) == [3, 7, 9] and ex.presented[ex.teacher_order[0]] == 9   # at a seeded slot
    assert [c for c in ex.presented if c != 9] == [7, 3] and ex.target == 9
    assert teacher_example([1], [7, 3, 5], target=9, target_missing="skip") is None
    a = teacher_example([1], list(range(10, 30)), target=15, seed=4)
    b = teacher_example([1], list(range(10, 30)), target=15, seed=4)
    assert a == b and a.presented != list(range(10, 30)) and a.presented[a.teacher_order[0]] == 15


def test_labels_cover_exactly_the_answer():
    bb = build_tiny(n_items=30)
    ex = teacher_example([1, 2, 3], [7, 3, 9, 5], target=9, seed=1)
    enc = encode_example(bb, ex)
    answer = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    text = bb.tokenizer.decode(answer)
    assert parse_ranking(text, 4).generated == ex.teacher_order
    short = encode_example(bb, teacher_example([1], [4, 5], target=4))
    batch = collate([enc, short], bb.tokenizer.pad_token_id)
    row = batch["input_ids"][0]
    assert batch["labels"][0, batch["first_pos"][0] + 1] == row[batch["first_pos"][0] + 1]     # first answer token
    assert batch["labels"][0, batch["first_pos"][0]] == -100                                     # last prompt token
    assert batch["ranks"][1].tolist() == [1, 2, 0, 0]                                           # padded ranks
    pad = batch["input_ids"].shape[1] - len(short["input_ids"])
    assert batch["attention_mask"][1, :pad].sum() == 0 and batch["attention_mask"][1, pad:].all()


def test_auto_stop_answers_end_where_the_completed_list_stops_improving():
    """SCASRec's EOR supervision: presented [7, 3, 9, 5] (the given order), target 9 at position 2 -> answer
    "C\n<eor>"; target 7, already first -> "<eor>" alone; no target in the window -> "<eor>". FIRST's ranks
    stay the whole teacher order; every answer token is labelled."""
    bb = build_tiny(n_items=30)

    def answer(ex):
        enc = encode_example(bb, ex, supervise="auto_stop")
        return bb.tokenizer.decode([t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100]), enc

    text, enc = answer(teacher_example([1, 2], [7, 3, 9, 5], target=9, shuffle=False))
    assert text.split() == ["C", "<eor>"] and enc["ranks"] == [2, 3, 1, 4]
    assert answer(teacher_example([1, 2], [7, 3, 9, 5], target=7, shuffle=False))[0].split() == ["<eor>"]
    kept = teacher_example([1], [7, 3, 5], target=9, window=3, shuffle=False, target_missing="keep")
    assert answer(kept)[0].split() == ["<eor>"]


def test_target_supervision_labels_only_the_held_out_item():
    """Candidates [7, 3, 9, 5], target 9, no shuffle: the only label is the identifier of 9 (C, the
    third), and FIRST's ranks are [2, 2, 1, 2] (target vs the rest, the rest tied)."""
    import pytest

    bb = build_tiny(n_items=30)
    ex = teacher_example([1, 2], [7, 3, 9, 5], target=9, shuffle=False)
    enc = encode_example(bb, ex, supervise="target")
    assert [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100] == [bb.token_id("C")]
    assert enc["labels"][enc["answer_start"]] == bb.token_id("C") and enc["ranks"] == [2, 2, 1, 2]
    assert enc["input_ids"] == encode_example(bb, ex)["input_ids"]                 # same text, fewer labels
    with pytest.raises(ValueError, match="holds the target"):
        encode_example(bb, teacher_example([1], [7, 3], target=9, window=2, target_missing="keep"), supervise="target")


def test_history_labels_by_hand():
    """History [4, 9, 2] (max_history 2 keeps [9, 2]): ids [history:, <i9>, <i2>, candidates:, ...]; the
    only history label is <i2> at position 2 (predicted from <i9>); the answer labels are unchanged;
    collate left-pads them with -100 like the answer labels."""
    import pytest

    bb = build_tiny(n_items=30)
    ex = teacher_example([4, 9, 2], [7, 3], target=3, shuffle=False)
    enc = encode_example(bb, ex, max_history=2, history_lm=True)
    assert enc["input_ids"][:4] == [bb.token_id(t) for t in ("history:", "<i9>", "<i2>", "candidates:")]
    assert enc["history_labels"] == [-100, -100, bb.token_id("<i2>")] + [-100] * (len(enc["input_ids"]) - 3)
    assert enc["labels"] == encode_example(bb, ex, max_history=2)["labels"]
    short = encode_example(bb, teacher_example([5], [7, 3], target=3, shuffle=False), history_lm=True)
    batch = collate([enc, short], bb.tokenizer.pad_token_id)
    assert (batch["history_labels"] != -100).sum() == 1 and batch["history_labels"][0, 2] == bb.token_id("<i2>")
    with pytest.raises(ValueError, match="tiny-backbone prompt"):
        history_labels(bb, enc["input_ids"][1:], 2)                                 # not a tiny prompt's start


def test_missing_target_kept_teaches_the_retriever_order():
    ex = teacher_example([1], [7, 3, 5], target=9, window=3, shuffle=False, target_missing="keep")
    assert ex.presented == [7, 3, 5] and ex.teacher_order == [0, 1, 2] and ex.target is None


def test_groupwise_teacher_scores_by_hand():
    """Retriever order [4, 6, 2], target 6, prior_max 5: prior int(5 (1 - r/3)) -> 4: 5, 2: 1; target 9.
    Presented (seeded shuffle) in any order: each item keeps its score."""
    ex = teacher_example([1], [4, 6, 2], target=6, window=3, shuffle=True, seed=3)
    scores = dict(zip(ex.presented, teacher_scores(ex)))
    assert scores == {4: 5, 6: 9, 2: 1}


def test_group_examples_split_the_window_and_label_only_the_answer():
    bb = build_tiny(n_items=30, hidden_size=16, num_layers=1)
    ex = teacher_example([1, 2, 3], list(range(5, 15)), target=8, window=10, shuffle=False)
    rows = encode_group_examples(bb, ex, group_size=4)
    assert len(rows) == 3                                          # groups of 4, 4, 2
    for row, group in zip(rows, (ex.presented[0:4], ex.presented[4:8], ex.presented[8:])):
        answer = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert answer == answer_ids(bb, [dict(zip(ex.presented, teacher_scores(ex)))[c] for c in group])
        assert row["labels"][:row["answer_start"]] == [-100] * row["answer_start"]
