import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.rerank.first import (
    constrain_logits,
    first_order,
    first_scores,
    weighted_ranknet_loss,
)


def test_first_scores_are_the_identifier_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 9.0]])       # identifier tokens are 1, 3, 2
    s = first_scores(logits, torch.tensor([1, 3, 2]))
    assert s.tolist() == [[5.0, 3.0, 1.0]] and first_order(s).tolist() == [[0, 1, 2]]
    assert first_order(torch.tensor([[1.0, 2.0, 2.0]])).tolist() == [[1, 2, 0]]   # ties: original order


def test_weighted_ranknet_by_hand():
    """s = [2, 0, 1], r = [1, 2, 3]: (1/3 log(1+e^-2) + 1/4 log(1+e^-1) + 1/5 log(1+e)) / 3 = 0.12776."""
    loss = weighted_ranknet_loss(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[1, 2, 3]]))
    expected = (math.log1p(math.exp(-2)) / 3 + math.log1p(math.exp(-1)) / 4 + math.log1p(math.e) / 5) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6) and abs(expected - 0.12776) < 1e-5


def test_ranknet_mask_and_gradient():
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    loss = weighted_ranknet_loss(s, torch.tensor([[1, 2, 3]]), torch.tensor([[True, True, False]]))
    loss.backward()
    assert s.grad[0, 2] == 0 and s.grad[0, 0] < 0 < s.grad[0, 1]    # push the best up, the worse down
    zero = torch.zeros(1, 3, requires_grad=True)
    weighted_ranknet_loss(zero, torch.tensor([[1, 2, 3]]), torch.zeros(1, 3, dtype=torch.bool)).backward()
    assert zero.grad.abs().sum() == 0


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_constrained_greedy_decoding_always_yields_a_valid_list(n, seed):
    """Random logits, greedy decoding under the constraint: identifiers never repeat, never leave the
    window, separators alternate with identifiers, and decoding ends."""
    g = torch.Generator().manual_seed(seed)
    V, sep, end = 40, 30, 31
    ids = torch.arange(n)                                     # identifier tokens 0..n-1; 32..39 are noise
    used = torch.zeros(1, n, dtype=torch.bool)
    after = torch.zeros(1, dtype=torch.bool)
    out = []
    for _ in range(3 * n + 2):
        tok = int(constrain_logits(torch.randn(1, V, generator=g), used, after, ids, sep, end).argmax())
        out.append(tok)
        if tok == end:
            break
        if tok < n:
            assert not used[0, tok]
            used[0, tok], after[0] = True, True
        else:
            assert tok == sep and after[0]
            after[0] = False
    assert out[-1] == end
    written = [t for t in out if t < n]
    assert len(written) == len(set(written))


def test_constrained_log_probs_by_hand():
    """V = 5, identifiers 0 and 1, separator 2, end 3, all logits 0; answer ``0 \\n 1 <eor>``:
    step 1 allows {0, 1, end} -> log 1/3; step 2 (after an identifier) {sep, end} -> log 1/2;
    step 3 {1, end} -> log 1/2; step 4 (all used, after an identifier) only end -> 0. Padding -> 0."""
    from recsys.rerank.first import constrained_log_probs

    tokens = torch.tensor([[0, 2, 1, 3, -1]])
    lp, ent = constrained_log_probs(torch.zeros(1, 5, 5), tokens, torch.tensor([0, 1]), 2, 3)
    expected = [math.log(1 / 3), math.log(1 / 2), math.log(1 / 2), 0.0, 0.0]
    assert torch.allclose(lp[0], torch.tensor(expected))
    assert torch.allclose(ent[0], torch.tensor([math.log(3), math.log(2), math.log(2), 0.0, 0.0]))


def test_replayed_log_probs_use_the_sampling_temperature_after_the_mask():
    """Same answer; step 1 logits 1 for identifier 0, else 0; T = 0.5: allowed {0, 1, end} with
    masked / T = [2, 0, 0] -> log(e^2 / (e^2 + 2)); the two-way steps stay log 1/2 at any T."""
    from recsys.rerank.first import ListConstraint, replay_log_probs

    logits = torch.zeros(1, 5, 5)
    logits[0, 0, 0] = 1.0
    tokens = torch.tensor([[0, 2, 1, 3, -1]])
    lp, _ = replay_log_probs(logits, tokens, ListConstraint(torch.tensor([2]), torch.tensor([0, 1]), 2, 3), 0.5)
    expected = [2 - math.log(math.exp(2) + 2), math.log(1 / 2), math.log(1 / 2), 0.0, 0.0]
    assert torch.allclose(lp[0], torch.tensor(expected))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_per_row_identifiers_with_padding_never_repeat_or_leave_the_row(seed):
    """(B, n) identifier tokens (item identifiers): row 1 is shorter and padded with its own first
    token, which must stay allowed until it is written once."""
    from recsys.rerank.first import ListConstraint

    g = torch.Generator().manual_seed(seed)
    V, sep, end = 40, 30, 31
    ids = torch.tensor([[3, 7, 1, 9], [12, 5, 12, 12]])
    constraint = ListConstraint(torch.tensor([4, 2]), ids, sep, end)
    out = [[], []]
    for _ in range(constraint.max_tokens):
        tok = constraint.mask(torch.randn(2, V, generator=g)).argmax(-1)
        for b in range(2):
            if not out[b] or out[b][-1] != end:
                out[b].append(int(tok[b]))
        constraint.update(torch.tensor([t if not o or o[-1] != end or t == end else -1 for t, o in zip(tok.tolist(), out)]))
    for b, allowed in ((0, {3, 7, 1, 9}), (1, {12, 5})):
        written = [t for t in out[b] if t not in (sep, end)]
        assert set(written) <= allowed and len(written) == len(set(written)) and out[b][-1] == end


def test_list_constraint_bias_shifts_each_identifier_and_spares_padding():
    """bias [0, -1, -2, -3] on row 0 (4 candidates) and row 1 (2 candidates, padded with its first id):
    identifier logits move by their position's bias, the separator / end do not, row 1's padding adds
    nothing to its first token."""
    from recsys.rerank.first import ListConstraint

    V, sep, end = 20, 18, 19
    ids = torch.tensor([[3, 7, 1, 9], [12, 5, 12, 12]])
    bias = torch.tensor([0.0, -1.0, -2.0, -3.0])
    logits = torch.zeros(2, V)
    masked = ListConstraint(torch.tensor([4, 2]), ids, sep, end, bias).mask(logits)
    assert masked[0, [3, 7, 1, 9]].tolist() == [0.0, -1.0, -2.0, -3.0] and masked[0, end] == 0.0
    assert masked[1, [12, 5]].tolist() == [0.0, -1.0] and masked[1, 9] == float("-inf")
    plain = ListConstraint(torch.tensor([4, 2]), ids, sep, end).mask(logits)
    assert torch.equal(torch.isinf(masked), torch.isinf(plain))          # the bias never changes what is allowed
