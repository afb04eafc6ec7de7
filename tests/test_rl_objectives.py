"""RL objectives (recsys.rl): hand-worked examples from the docstrings, plus invariances.

Properties every objective must have: adding a constant to all rewards of a group leaves the
advantages unchanged; with old = current log-probs the ratio is exactly 1; a zero mask gives a zero
loss and a zero gradient.
"""

import math

import pytest
import torch

from recsys.rl.advantages import group_advantages
from recsys.rl.f_grpo import (
    coverage_reward,
    f_grpo_loss,
    joint_reward,
    phase_advantages,
    phase_masks,
)
from recsys.rl.grpo import aggregate, clipped_surrogate, kl_k3, policy_loss
from recsys.rl.lipo import (
    dpo_loss,
    group_preference_loss,
    lambda_weights,
    lipo_lambda_loss,
)
from recsys.rl.rank_grpo import (
    END,
    PAD,
    list_lengths,
    rank_advantages,
    rank_grpo_loss,
    rank_log_ratio,
    rank_rewards,
    segment_ranks,
    token_advantages,
)
from recsys.rl.rewards import (
    format_gate,
    grouprank_reward,
    hit_at_k,
    js_divergence,
    ndcg_at_k,
    recall_at_k,
    relevance,
)


# ---------------------------------------------------------------- advantages
def test_group_advantages_hand_example():
    """[1, 0 | 3, 3], G=2: means .5, 3; unbiased stds .7071, 0 -> [.5/.7072, -.5/.7072, 0, 0]."""
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), 2)
    assert torch.allclose(adv, torch.tensor([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4), 0, 0]))
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), 2, scale="none"),
                       torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_advantages_shift_invariant_and_per_column():
    r = torch.rand(12, 5)
    for scale in ("std", "none"):
        assert torch.allclose(group_advantages(r, 4, scale), group_advantages(r + 7.5, 4, scale), atol=1e-5)
    # per column: column 2 alone gives the same as column 2 of the matrix
    assert torch.allclose(group_advantages(r, 4)[:, 2], group_advantages(r[:, 2].contiguous(), 4))
    assert torch.allclose(group_advantages(r, 4).reshape(3, 4, 5).mean(1), torch.zeros(3, 5), atol=1e-6)


def test_group_advantages_bad_shapes():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="max")


# ---------------------------------------------------------------- grpo
def test_kl_k3_hand_example():
    """logp log .5, ref log .25: d = log .5; exp(d) - d - 1 = .5 + .6931 - 1 = .1931; equal -> 0."""
    kl = kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k3(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0


def test_clipped_surrogate_hand_examples():
    """w=1.5, A=1 -> -1.2 (clipped); w=.5, A=1 -> -.5; w=.5, A=-1 -> clip(.5)=.8, min(-.5, -.8) = -.8 -> .8."""
    loss, clipped = clipped_surrogate(torch.log(torch.tensor([1.5, 0.5, 0.5])), torch.tensor([1.0, 1.0, -1.0]))
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, True]
    loss, _ = clipped_surrogate(torch.log(torch.tensor([1.07])), torch.tensor([1.0]), eps_low=0.06, eps_high=0.08)
    assert loss.item() == pytest.approx(-1.07)                                  # inside the asymmetric band


def test_aggregations_hand_example():
    """Losses [[1, 2, x], [3, x, x]] (x masked, may be inf): token 6/3 = 2, sequence (1.5 + 3)/2 = 2.25, constant 6/6."""
    per = torch.tensor([[1.0, 2.0, math.inf], [3.0, math.nan, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(per, mask, "token_mean").item() == 2.0
    assert aggregate(per, mask, "sequence_mean").item() == 2.25
    assert aggregate(per, mask, "constant").item() == 1.0
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per, mask, "sum")


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([[1.0], [-2.0], [0.5]])
    mask = torch.ones(3, 4)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clip_fraction"].item() == 0
    loss.backward()
    assert torch.allclose(logp.grad, -adv.expand(3, 4) / 12)


@pytest.mark.parametrize("how", ["token_mean", "sequence_mean", "constant"])
def test_zero_mask_zero_loss_and_gradient(how):
    logp = torch.randn(2, 5, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach() - 0.3, torch.ones(2, 1), torch.zeros(2, 5), ref_logp=torch.zeros(2, 5),
                          beta=0.1, aggregation=how)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logp.grad) == 0


def test_kl_term_adds_beta_times_k3():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, stats = policy_loss(logp, logp, torch.zeros(1, 1), torch.ones(1, 1), ref, beta=0.5)
    assert loss.item() == pytest.approx(0.5 * (0.5 + math.log(2) - 1), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)


# ---------------------------------------------------------------- rank-grpo
def test_rank_rewards_hand_examples():
    rel = torch.tensor([[1, 0, 1]])
    assert rank_rewards(rel, "exp_inf").tolist() == [[1.0, 0.0, 1.0]]
    assert rank_rewards(rel, "exp", gamma=2).tolist() == [[1.25, 0.5, 1.0]]
    assert torch.allclose(rank_rewards(rel, "log_decay"), torch.tensor([[1.5, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="kind"):
        rank_rewards(rel, "linear")


def test_log_decay_first_rank_is_the_list_dcg():
    rel = (torch.rand(6, 8) > 0.6).long()
    dcg = (rel.float() / torch.log2(torch.arange(2, 10).float())).sum(1)
    assert torch.allclose(rank_rewards(rel, "log_decay")[:, 0], dcg)


def test_rank_advantages_normalise_per_rank_across_the_group_not_across_ranks():
    """G=2, ranks 2: rewards [[1, 0], [0, 0]] -> rank 1 gets +-.707, rank 2 (all 0) gets 0 in both rollouts."""
    adv = rank_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 2)
    assert adv[:, 1].tolist() == [0.0, 0.0]
    assert adv[0, 0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))
    assert adv[1, 0].item() == pytest.approx(-adv[0, 0].item())


def test_segment_ranks_hand_example():
    """``A \\n B \\n C \\n <eor> <pad>`` with N=2 -> [0, 0, 1, 1, 2, 2, END, PAD]; 2 items, overflow, ended."""
    ids = torch.tensor([[5, 1, 6, 1, 7, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    bins = segment_ranks(ids, mask, separator_id=1, end_id=2, n_ranks=2)
    assert bins.tolist() == [[0, 0, 1, 1, 2, 2, END, PAD]]
    items, overflowed, ended = list_lengths(bins, 2)
    assert (items.item(), overflowed.item(), ended.item()) == (2, True, True)
    # tokens after the end token are padding
    assert segment_ranks(torch.tensor([[5, 2, 6]]), torch.ones(1, 3), 1, 2, 2).tolist() == [[0, END, PAD]]


def test_token_advantages_and_length_shaping():
    """N=2. Exactly 2 items then end: end +0.1; 1 item then end: end -0.1; overflow tokens -0.1, end 0."""
    adv = torch.tensor([[0.5, -0.5]] * 3)
    bins = torch.tensor([[0, 0, 1, 1, END, PAD, PAD],
                         [0, 0, END, PAD, PAD, PAD, PAD],
                         [0, 0, 1, 1, 2, 2, END]])
    out = token_advantages(adv, bins)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.1, 0, 0],
                                             [0.5, 0.5, -0.1, 0, 0, 0, 0],
                                             [0.5, 0.5, -0.5, -0.5, -0.1, -0.1, 0.0]]))


def test_end_token_of_a_completed_list_takes_the_next_rank():
    """N=3, rank advantages [0.5, -0.2, 0.3]. One item then end: the end token hands over rank 2 (-0.2);
    two items: rank 3 (0.3); a full list's end (the only allowed token) gets end_of_list_reward (0 here)."""
    adv = torch.tensor([[0.5, -0.2, 0.3]] * 3)
    bins = torch.tensor([[0, 0, END, PAD, PAD, PAD, PAD],
                         [0, 0, 1, 1, END, PAD, PAD],
                         [0, 0, 1, 1, 2, 2, END]])
    out = token_advantages(adv, bins, early_stop_penalty=0.0, end_of_list_reward=0.0, end_takes_next_rank=True)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, -0.2, 0, 0, 0, 0],
                                             [0.5, 0.5, -0.2, -0.2, 0.3, 0, 0],
                                             [0.5, 0.5, -0.2, -0.2, 0.3, 0.3, 0.0]]))


def test_under_exp_inf_the_end_token_of_a_completed_list_carries_every_rank_it_hands_over():
    """N=4, G=2: rollout 0 writes "A <eor>" and the completed ranking serves the target at rank 3; rollout 1
    hits at rank 1. Rank 3's advantage for rollout 0 is +0.707; it is an end-token decision, so the end token
    must carry it (the next rank alone, rank 2, has advantage 0)."""
    rel = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]])
    adv = rank_advantages(rank_rewards(rel, "exp_inf"), group_size=2)
    assert adv[0, 2].item() == pytest.approx(0.7071, abs=1e-3) and adv[0, 1].item() == 0.0
    bins = torch.tensor([[0, 0, END, PAD, PAD, PAD, PAD, PAD, PAD],
                         [0, 0, 1, 1, 2, 2, 3, 3, END]])
    shaping = {"early_stop_penalty": 0.0, "end_of_list_reward": 0.0, "end_takes_next_rank": True}
    summed = token_advantages(adv, bins, **shaping, end_sums_handed_ranks=True)
    assert summed[0, 2].item() == pytest.approx(adv[0, 1:].sum().item()) == pytest.approx(0.7071, abs=1e-3)
    assert summed[1, 8].item() == 0.0                            # a full list's end hands nothing over
    assert token_advantages(adv, bins, **shaping)[0, 2].item() == 0.0     # the next rank alone: the hit is lost
    # under log_decay rank 2's reward already holds rank 3's gain, so the next rank's advantage carries it
    adv_ld = rank_advantages(rank_rewards(rel, "log_decay"), group_size=2)
    assert token_advantages(adv_ld, bins, **shaping)[0, 2].item() > 0.5


def test_rank_log_ratio_is_the_mean_within_each_rank():
    bins = torch.tensor([[0, 0, 1, 1, 2, 2, END, PAD]])
    lr = torch.tensor([[0.2, 0.4, 0.0, 0.0, 1.0, 1.0, 0.7, 5.0]])
    assert torch.allclose(rank_log_ratio(lr, bins, 2), torch.tensor([[0.3, 0.3, 0, 0, 1, 1, 0.7, 0]]))


def test_rank_grpo_on_policy_equals_token_grpo_with_per_rank_advantages():
    """Rank-GRPO (arXiv 2510.20150), rank-level importance ratio: with old = current, the rank ratio is 1 and the gradient is token GRPO's."""
    torch.manual_seed(0)
    bins = torch.tensor([[0, 0, 1, 1, END], [0, 0, 1, 1, END]])
    rank_adv = torch.tensor([[1.0, -1.0], [-0.5, 0.5]])
    no_shaping = {"extra_token_penalty": 0.0, "end_of_list_reward": 0.0, "early_stop_penalty": 0.0}
    logp = torch.randn(2, 5, requires_grad=True)
    loss, stats = rank_grpo_loss(logp, logp.detach(), rank_adv, bins, beta=0.0, **no_shaping)
    loss.backward()
    logp2 = logp.detach().clone().requires_grad_(True)
    tok_adv = token_advantages(rank_adv, bins, **no_shaping)
    ref_loss, _ = policy_loss(logp2, logp2.detach(), tok_adv, bins != PAD)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item())
    assert torch.allclose(logp.grad, logp2.grad) and stats["clip_fraction"].item() == 0


def test_rank_grpo_zero_mask():
    logp = torch.randn(1, 4, requires_grad=True)
    loss, _ = rank_grpo_loss(logp, logp.detach() + 0.1, torch.ones(1, 2), torch.full((1, 4), PAD), ref_logp=logp.detach())
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logp.grad) == 0


def test_rank_ratio_off_policy_clips_per_rank():
    """Off-policy: rank 0 has token log-ratios .4/.4 (w = e^.4 > 1.08, clipped for A > 0), rank 1 has 0 (w = 1)."""
    bins = torch.tensor([[0, 0, 1, 1]])
    logp = torch.zeros(1, 4, requires_grad=True)
    old = torch.tensor([[-0.4, -0.4, 0.0, 0.0]])
    _, stats = rank_grpo_loss(logp, old, torch.tensor([[1.0, 1.0]]), bins, beta=0.0, ratio_level="rank")
    assert stats["clip_fraction"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- f-grpo
def test_phase_masks_hand_example():
    """``A C <rank> C A <eor> <pad>`` -> slate [1,1,1,0,0,0,0], rank [0,0,0,1,1,1,0]."""
    ids = torch.tensor([[5, 7, 9, 7, 5, 2, 0]])
    slate, rank = phase_masks(ids, torch.tensor([[1, 1, 1, 1, 1, 1, 0]]), marker_id=9)
    assert slate.long().tolist() == [[1, 1, 1, 0, 0, 0, 0]] and rank.long().tolist() == [[0, 0, 0, 1, 1, 1, 0]]
    slate, rank = phase_masks(torch.tensor([[5, 7, 2]]), torch.ones(1, 3), marker_id=9)       # no marker
    assert slate.all() and not rank.any()


def test_coverage_reward_is_order_invariant():
    assert coverage_reward([4, 2, 9], {2, 5}) == 0.5
    assert coverage_reward([9, 4, 2], {2, 5}) == 0.5
    assert coverage_reward([4, 2, 9], {2, 5}, "f1") == pytest.approx(0.4)
    assert coverage_reward([], {2}) == 0 and coverage_reward([1], set()) == 0


def test_f_grpo_phases_get_only_their_own_advantage():
    """Slate reward differs, rank reward equal across the group: rank tokens receive no gradient."""
    slate_adv, rank_adv = phase_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.7, 0.7]), group_size=2)
    assert slate_adv.tolist() == [0.5, -0.5] and rank_adv.tolist() == [0.0, 0.0]
    ids = torch.tensor([[5, 9, 5, 2], [6, 9, 6, 2]])
    slate, rank = phase_masks(ids, torch.ones(2, 4), marker_id=9)
    logp = torch.randn(2, 4, requires_grad=True)
    loss, _ = f_grpo_loss(logp, logp.detach(), slate_adv, rank_adv, slate, rank)
    loss.backward()
    assert torch.count_nonzero(logp.grad[:, 2:]) == 0 and torch.count_nonzero(logp.grad[:, :2]) == 4
    assert joint_reward(torch.tensor([1.0]), torch.tensor([0.5]), lam=2).item() == 2.0


def test_f_grpo_zero_mask():
    logp = torch.randn(2, 3, requires_grad=True)
    none = torch.zeros(2, 3, dtype=torch.bool)
    loss, _ = f_grpo_loss(logp, logp.detach(), torch.ones(2), torch.ones(2), none, none)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logp.grad) == 0


# ---------------------------------------------------------------- rewards
def test_relevance_matches_each_item_once_and_ignores_seen_and_invalid():
    assert relevance([7, 7, 3, None], {7, 3}, 5) == [1, 0, 1, 0, 0]
    assert relevance([7, 3], {7, 3}, 2, seen={7}) == [0, 1]
    assert relevance([1, 2, 3], {3}, 2) == [0, 0]                    # truncated to n


def test_list_metrics_hand_examples():
    """rel [0,1,1], 2 relevant: NDCG@3 = (1/log2 3 + 1/log2 4) / (1 + 1/log2 3) = 1.1309 / 1.6309 = .6934."""
    rel = torch.tensor([[0, 1, 1], [0, 0, 0]])
    n_rel = torch.tensor([2, 0])
    assert ndcg_at_k(rel, n_rel, 3)[0].item() == pytest.approx(1.1309297 / 1.6309297)
    assert ndcg_at_k(rel, n_rel, 3)[1].item() == 0                     # no relevant item: 0, not NaN
    assert ndcg_at_k(rel, n_rel, 1)[0].item() == 0
    assert hit_at_k(rel, 2).tolist() == [1.0, 0.0] and recall_at_k(rel, n_rel, 2).tolist() == [0.5, 0.0]
    assert ndcg_at_k(rel, n_rel, 50)[0].item() == pytest.approx(1.1309297 / 1.6309297)   # k > list length


def test_format_gate():
    r = torch.tensor([0.9, 0.9, 0.9])
    out = format_gate(r, tags_ok=torch.tensor([1, 1, 0]), content_ok=torch.tensor([1, 0, 1]))
    assert torch.allclose(out, torch.tensor([0.9, -0.1, -0.5]))


def test_js_divergence_hand_examples():
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)
    assert js_divergence(torch.tensor([3.0, 1.0]), torch.tensor([6.0, 2.0])).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.3113, abs=1e-4)
    # all-zero scores prefer nothing: uniform, so the divergence depends on the target
    zero = torch.zeros(2)
    assert js_divergence(zero, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.3113, abs=1e-4)
    assert js_divergence(zero, torch.tensor([1.0, 1.0])).item() == pytest.approx(0.0, abs=1e-7)


def test_grouprank_reward_hand_example():
    """pred [2, 9, 0], target [9, 0, 0], relevant first: .6309 + .2 * 1 + .1 * (1 - .6340) = .8675."""
    r = grouprank_reward(torch.tensor([[2.0, 9.0, 0.0]]), torch.tensor([[9.0, 0.0, 0.0]]),
                         torch.tensor([[True, False, False]]))
    assert r.item() == pytest.approx(0.8675, abs=1e-4)
    perfect = grouprank_reward(torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([[9.0, 0.0, 0.0]]),
                               torch.tensor([[True, False, False]]))
    assert perfect.item() == pytest.approx(1.0 + 0.2 + 0.1)


def test_expected_ndcg_recall_under_random_ties_by_hand_and_by_enumeration():
    """Hand example of the docstring, then against the mean over every tie order (itertools.permutations
    of each row, stable sort of the permuted scores) on random integer scores with many ties."""
    import itertools

    from recsys.rl.rewards import expected_ndcg_recall_at_k

    s, rel = torch.tensor([[5.0, 5.0, 1.0]]), torch.tensor([[False, True, False]])
    assert [x.item() for x in expected_ndcg_recall_at_k(s, rel, 1)] == pytest.approx([0.5, 0.5])
    assert [x.item() for x in expected_ndcg_recall_at_k(s, rel, 2)] == pytest.approx([(1 + 1 / math.log2(3)) / 2, 1.0])
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (6, 5), generator=g).float()
    relevant = torch.rand(6, 5, generator=g) < 0.4
    for k in (1, 2, 4):
        ndcg, recall = expected_ndcg_recall_at_k(scores, relevant, k)
        for i in range(6):
            runs = []
            for perm in itertools.permutations(range(5)):
                p = torch.tensor(perm)
                order = p[torch.sort(scores[i, p], descending=True, stable=True).indices]
                r = relevant[i, order][None].float()
                n = relevant[i].float().sum()[None]
                runs.append((ndcg_at_k(r, n, k).item(), recall_at_k(r, n, k).item()))
            want = torch.tensor(runs).mean(0)
            assert [ndcg[i].item(), recall[i].item()] == pytest.approx(want.tolist(), abs=1e-5)


def test_grouprank_reward_does_not_pay_a_constant_score_the_retriever_order():
    """One digit everywhere: with stable ties the ranking is the candidates' order (the retriever's), so a
    target in first place earns NDCG 1; with random ties the target is anywhere among the c, as it should be."""
    pred, target = torch.full((1, 4), 5.0), torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    relevant = torch.tensor([[True, False, False, False]])
    stable = grouprank_reward(pred, target, relevant, k=1, ties="stable")
    random = grouprank_reward(pred, target, relevant, k=1)
    js = 0.1 * (1 - js_divergence(pred, target)).item()
    assert stable.item() == pytest.approx(1 + 0.2 + js) and random.item() == pytest.approx(0.25 + 0.2 * 0.25 + js)
    with pytest.raises(ValueError, match="ties"):
        grouprank_reward(pred, target, relevant, ties="first")


# ---------------------------------------------------------------- lipo / dpo
def test_lambda_weights_hand_example():
    """labels [1,0,0], scores [.1,.3,.2]: tau [3,1,2]; D01 = |1/2 - 1| = .5, D02 = |1/2 - 1/log2 3| = .1309."""
    d = lambda_weights(torch.tensor([[1, 0, 0]]), torch.tensor([[0.1, 0.3, 0.2]]))
    expected = torch.zeros(1, 3, 3)
    expected[0, 0, 1], expected[0, 0, 2] = 0.5, abs(0.5 - 1 / math.log2(3))
    assert torch.allclose(d, expected)


def test_lipo_two_items_without_lambda_is_dpo():
    pol = torch.randn(4, 2, requires_grad=True)
    ref = torch.randn(4, 2)
    lipo = lipo_lambda_loss(pol, ref, torch.tensor([[1, 0]] * 4), beta=0.1, weighting="none")
    dpo = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    assert lipo.item() == pytest.approx(dpo.item())


def test_lipo_gradient_raises_the_preferred_response():
    pol = torch.zeros(1, 3, requires_grad=True)
    lipo_lambda_loss(pol, torch.zeros(1, 3), torch.tensor([[2, 0, 1]]), beta=1.0).backward()
    assert pol.grad[0, 0] < 0 and pol.grad[0, 1] > 0          # descent raises item 0, lowers item 1
    equal = lipo_lambda_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert equal.item() == 0                                    # no preferred pair, no loss


def test_group_preference_loss_hand_examples():
    pol, ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]), torch.full((2, 3), -2.0)
    rewards = torch.tensor([[0.2, 1.0, 0.0], [0.5, 0.5, 0.5]])
    # dpo: prompt 0 prefers rollout 1 (s = 0) to rollout 2 (s = -1): log(1 + e^-1); prompt 1 ties: no pair
    loss, stats = group_preference_loss(pol, ref, rewards, beta=1.0, algo="dpo")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) / 2)
    assert stats["clip_fraction"] == 0
    # lipo: the rewards are the labels; only prompt 0 has ordered pairs
    lipo, _ = group_preference_loss(pol, ref, rewards, beta=1.0, algo="lipo")
    assert lipo.item() == pytest.approx(lipo_lambda_loss(pol[:1], ref[:1], rewards[:1], beta=1.0).item() / 2)
    with pytest.raises(ValueError, match="lipo"):
        group_preference_loss(pol, ref, rewards, algo="ipo")


def test_every_trainer_algorithm_has_one_complete_objective_equal_to_its_parts():
    """The registry covers both trainers' algorithms; GRPO's entry is the clipped surrogate on group-relative
    advantages (the same numbers as calling the parts), Rank-GRPO's spreads per-rank advantages over tokens."""
    from pipelines.generative import ALGOS as GENERATIVE
    from pipelines.rl import ALGOS as RERANKER
    from recsys.rl.grpo import policy_loss
    from recsys.rl.objectives import OBJECTIVES, Rollouts, Settings
    from recsys.rl.rank_grpo import rank_grpo_loss

    assert (set(RERANKER) | set(GENERATIVE)) - {"sft"} <= set(OBJECTIVES)
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 3, generator=g).requires_grad_()
    old, ref = logp.detach() + 0.1 * torch.randn(4, 3, generator=g), logp.detach() - 0.05
    batch = Rollouts(2, torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]).bool(),
                     torch.tensor([1.0, 0.0, 0.3, 0.9]), old, ref)
    settings = Settings(beta=0.1, eps_low=0.05, eps_high=0.08)
    adv = OBJECTIVES["grpo"].advantages(batch, settings)
    assert adv.sequence[:, 0].tolist() == pytest.approx(group_advantages(batch.reward, 2).tolist())
    loss, _ = OBJECTIVES["grpo"].loss(logp, batch, adv, settings)
    want, _ = policy_loss(logp, old, adv.sequence, batch.mask, ref, 0.1, 0.05, 0.08)
    assert loss.item() == pytest.approx(want.item())
    batch.rel, batch.bins = torch.tensor([[1.0, 0], [0, 0], [0, 1], [0, 0]]), torch.tensor(
        [[0, 1, -1], [0, 1, -1], [0, 0, 1], [0, 1, -1]])
    adv = OBJECTIVES["rank-grpo"].advantages(batch, settings)
    assert adv.rank.shape == (4, 2) and adv.token[0, 0] == adv.rank[0, 0] and adv.token[2, 2] == adv.rank[2, 1]
    loss, _ = OBJECTIVES["rank-grpo"].loss(logp, batch, adv, settings)
    assert loss.item() == pytest.approx(rank_grpo_loss(logp, old, adv.rank, batch.bins, ref, 0.1, 0.05, 0.08)[0].item())


def test_vstar_objective_adds_the_td_value_loss_by_hand():
    """One prompt, G = 2 one-level codes, rewards (1, 0); values V(s0), V(s1) = (0.5, 0.2) and (0.1, 0.0), dense
    level rewards 1 and 0, gamma 0.5: TD targets (0 + 0.5 * 0.2, 1) = (0.1, 1.0) and (0, 0); squared errors
    0.16, 0.64, 0.01, 0 -> value loss 0.2025, added with value_weight 1 to GRPO's loss (Sibling-GRPO off)."""
    from recsys.rl.objectives import OBJECTIVES, Rollouts, Settings

    logp = torch.tensor([[-0.5], [-1.2]], requires_grad=True)
    batch = Rollouts(2, torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]), logp.detach(),
                     logp.detach(), codes=torch.tensor([[[0], [1]]]), dense=torch.tensor([[1.0], [0.0]]))
    values = torch.tensor([[0.5, 0.2], [0.1, 0.0]])
    vstar = OBJECTIVES["vstar"]
    alone = Settings(sibling_weight=0.0, value_weight=0.0, gamma=0.5)
    adv = vstar.advantages(batch, alone)
    grpo, _ = OBJECTIVES["grpo"].loss(logp, batch, adv, alone)
    assert vstar.loss(logp, batch, adv, alone, values)[0].item() == pytest.approx(grpo.item())
    with_value, stats = vstar.loss(logp, batch, adv, Settings(sibling_weight=0.0, value_weight=1.0, gamma=0.5), values)
    assert stats["value_loss"].item() == pytest.approx(0.2025)
    assert (with_value - grpo).item() == pytest.approx(0.2025)
    # on-policy both losses are 0 here (advantages sum to 0 over equal lengths); Sibling-GRPO adds its gradient
    with_sibling, _ = vstar.loss(logp, batch, adv, Settings(sibling_weight=1.0, value_weight=0.0, gamma=0.5), values)
    (g_grpo,) = torch.autograd.grad(grpo, logp)
    (g_both,) = torch.autograd.grad(with_sibling, logp)
    assert g_grpo[0, 0] < 0 < g_grpo[1, 0] and not torch.allclose(g_both, g_grpo)
