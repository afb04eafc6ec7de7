"""SCASRec's stepwise corrective reward and EOR supervision (recsys.rl.scasrec), by hand-worked numbers."""

import math

import pytest
import torch

from recsys.rl.objectives import OBJECTIVES, Rollouts, Settings
from recsys.rl.rank_grpo import END, PAD
from recsys.rl.scasrec import (
    auto_stop_length,
    completed_rank,
    completed_utilities,
    step_returns,
)


def dcg(rank: int) -> float:
    return 1.0 / math.log2(1 + rank)


def test_completed_rank_fills_the_rest_in_the_given_order():
    assert [completed_rank(w, 3) for w in ([], [1], [4], [3], [4, 3], [0, 1, 2])] == [4, 4, 5, 1, 2, 4]
    assert completed_rank([2, 0], None) is None and completed_rank([], -1) is None


def test_utilities_and_returns_by_hand():
    assert completed_utilities([4, 3], 3) == pytest.approx([dcg(4), dcg(5), dcg(2)])
    assert completed_utilities([0, 1], None) == [0.0, 0.0, 0.0]
    got = step_returns([[4, 3], [4], [3], [], [0, 1, 2, 3, 4]], [3, 3, 3, 3, 0], 5)
    want = torch.tensor([[dcg(2) - dcg(4), dcg(2) - dcg(5), 0, 0, 0],   # rank 1 pays: the list goes on to the hit
                         [dcg(5) - dcg(4), 0, 0, 0, 0],                   # pushed the item down, then stopped
                         [dcg(1) - dcg(4), 0, 0, 0, 0],                   # the hit at once
                         [0, 0, 0, 0, 0],                                 # stopped at once: the retriever's order
                         [0, 0, 0, 0, 0]])                                # the retriever's own order rewritten
    assert torch.allclose(got, want, atol=1e-6)


def test_auto_stop_keeps_the_teacher_list_while_it_improves_the_completed_list():
    assert auto_stop_length([3, 0, 1, 2, 4], 3) == 1          # the held-out item, then EOR
    assert auto_stop_length([0, 1, 2, 3, 4], 0) == 0          # already first: EOR at once
    assert auto_stop_length([1, 0, 2], None) == 0             # not in the window: nothing to gain
    assert auto_stop_length([2, 4, 0, 1, 3], 4) == 2          # 2 was above 4 anyway (no change), then the hit
    assert auto_stop_length([0, 1, 2, 3, 4], 2) == 2          # the given order: 2 is next after two items
    assert auto_stop_length([4, 0, 1], 1) == 2                # 4 pushes 1 to rank 3; 0 brings it next: stop


def test_scasrec_objective_teaches_the_end_token_against_the_groups_continuations():
    """N = 3, G = 2, target at window position 2. Rollout 0 stops at once ("<eor>": return 0 at rank 1);
    rollout 1 writes C (position 2) first (return dcg(1) - dcg(3) = 0.5 at rank 1). Per rank normalised: rank 1
    advantages -0.7071 / +0.7071, so the end token of rollout 0 gets -0.7071 and C's tokens +0.7071; rollout 1's
    end token at rank 2 hands over a rank where both returns are 0: advantage 0."""
    returns = step_returns([[], [2]], [2, 2], 3)
    assert returns[1, 0].item() == pytest.approx(dcg(1) - dcg(3)) and returns[0].abs().sum() == 0
    bins = torch.tensor([[END, PAD, PAD], [0, 0, END]])
    mask = bins != PAD
    r = Rollouts(2, mask, torch.zeros(2), torch.zeros(2, 3), ref_logp=torch.zeros(2, 3), returns=returns, bins=bins)
    shaping = {"early_stop_penalty": 0.0, "end_of_list_reward": 0.0, "end_takes_next_rank": True}
    adv = OBJECTIVES["scasrec"].advantages(r, Settings(shaping=shaping))
    assert torch.allclose(adv.token, torch.tensor([[-0.7071, 0, 0], [0.7071, 0.7071, 0.0]]), atol=1e-3)
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = OBJECTIVES["scasrec"].loss(logp, r, adv, Settings(shaping=shaping))
    loss.backward()
    assert logp.grad[0, 0] > 0 and logp.grad[1, 0] < 0        # descent lowers the early stop, raises the hit
