import math

import numpy as np
import pytest
import torch

from recsys.llm.backbone import build_tiny
from recsys.rerank.groupwise import (
    GroupwiseReranker,
    answer_ids,
    expected_digit,
    groupwise_prompt,
    make_groups,
    merge_scores,
)


def test_make_groups():
    assert [g.tolist() for g in make_groups(5, 2)] == [[0, 1], [2, 3], [4]]
    shuffled = make_groups(7, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(7)) and [len(g) for g in shuffled] == [3, 3, 1]


def test_expected_digit_by_hand():
    """All mass on 7 -> 7; uniform over 0..9 -> 4.5; logits log(1), log(3) on digits 0 and 1 only -> 0.75."""
    sharp = torch.full((10,), -1e9)
    sharp[7] = 0
    assert expected_digit(sharp).item() == pytest.approx(7)
    assert expected_digit(torch.zeros(10)).item() == pytest.approx(4.5)
    two = torch.full((10,), -1e9)
    two[0], two[1] = 0.0, math.log(3)
    assert expected_digit(two).item() == pytest.approx(0.75)


def test_merge_averages_over_reshuffles():
    """Grouping 1: [0,1] [2] scores (1, 3) (5); grouping 2: [2,0] [1] scores (7, 9) (11).
    Means: item 0 (1+9)/2 = 5, item 1 (3+11)/2 = 7, item 2 (5+7)/2 = 6."""
    g1, g2 = [np.array([0, 1]), np.array([2])], [np.array([2, 0]), np.array([1])]
    merged = merge_scores(3, [g1, g2], [[np.array([1, 3]), np.array([5])], [np.array([7, 9]), np.array([11])]])
    assert merged.tolist() == [5, 7, 6]


def test_groupwise_scores_match_teacher_forced_forward():
    """The cached step-by-step score of the second candidate equals the expected digit read off one full
    forward pass over prompt + 'A : <greedy digit>\\nB :'."""
    bb = build_tiny(n_items=20, hidden_size=32, num_heads=2)
    rr = GroupwiseReranker(bb, group_size=3)
    hist, group = [1, 2, 3], [7, 8, 9]
    scores = rr.score_group(hist, group)
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 9)).all()
    prompt_ids = bb.tokenizer(groupwise_prompt(bb, hist, group), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = bb.model(torch.tensor([prompt_ids + [bb.token_id("A"), bb.token_id(":")]])).logits[0, -1, rr.digit_ids]
        greedy = int(rr.digit_ids[int(first.argmax())])
        seq = prompt_ids + [bb.token_id("A"), bb.token_id(":"), greedy, bb.separator_id, bb.token_id("B"), bb.token_id(":")]
        second = bb.model(torch.tensor([seq])).logits[0, -1, rr.digit_ids]
    assert scores[0] == pytest.approx(expected_digit(first).item(), abs=1e-4)
    assert scores[1] == pytest.approx(expected_digit(second).item(), abs=1e-4)
    order = GroupwiseReranker(bb, group_size=2, reshuffles=3).rerank(hist, [7, 8, 9, 10, 11])
    assert sorted(order) == [7, 8, 9, 10, 11]


def test_answer_ids_are_the_scored_tokens():
    bb = build_tiny(n_items=3)
    ids = answer_ids(bb, [9, 0])
    assert bb.tokenizer.convert_ids_to_tokens(ids) == ["A", ":", "9", "\n", "B", ":", "0", "\n", "<eor>"]


def test_batched_greedy_sampling_matches_the_one_group_scorer():
    """sample(temperature=0) on a left-padded batch writes the same greedy digits as score_group does for
    each group alone (padding and position ids handled), and its answer is the teacher-forced format."""
    bb = build_tiny(n_items=20, hidden_size=32, num_heads=2, seed=3)
    rr = GroupwiseReranker(bb, group_size=3)
    hists, groups = [[1, 2, 3, 4, 5], [6]], [[7, 8, 9], [10, 11, 12]]
    _, answer, digits, expected = rr.sample(hists, groups, temperature=0.0)
    for h, g, d, a in zip(hists, groups, digits, answer):
        prompt_ids = bb.tokenizer(groupwise_prompt(bb, h, g), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = bb.model(torch.tensor([prompt_ids + a.tolist()])).logits[0, len(prompt_ids) - 1:-1]
        greedy = logits[2::4][:3, rr.digit_ids].argmax(-1)                   # digit positions of the answer
        assert torch.equal(d, greedy)
        assert a.tolist() == answer_ids(bb, d.tolist())
    for h, g, e in zip(hists, groups, expected):                                # expected digits = score_group
        assert np.allclose(e.numpy(), rr.score_group(h, g), atol=1e-4)
