"""Generative recommender: trie, constrained decoding vs exhaustive enumeration, tree attention vs full
passes, VED budget accounting, V-STAR maths by hand, SFT learning + exact resume, RL steps, CLI."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from recsys.errors import RecsysError
from recsys.generative.decoding import (
    ItemPrefixScorer,
    PrefixScorer,
    decode,
    generate_list,
    prefix_scorer,
    recommend_batch,
)
from recsys.generative.model import (
    GenerativeConfig,
    GenerativeRecommender,
    ItemGenerativeRecommender,
)
from recsys.generative.trie import CodeTrie
from recsys.generative.ved import VEDConfig, ved
from recsys.rl.vstar import (
    level_rewards,
    prefix_reward,
    sibling_advantages,
    sibling_loss,
    td_targets,
)

SMALL = GenerativeConfig(hidden_size=32, num_layers=1, num_heads=2, max_items=6, value_layers=1, value_heads=2)


def catalog(n=30, seed=0):
    """Random 2-level codes (4 x 3) plus a de-duplication level: every item a unique code."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n)], 1)
    dedup, seen = np.zeros(n, np.int64), {}
    for i, row in enumerate(map(tuple, codes.tolist())):
        dedup[i] = seen.get(row, 0)
        seen[row] = dedup[i] + 1
    return np.concatenate([codes, dedup[:, None]], 1)


@pytest.fixture(params=["token", "item", "item+ids"])
def model(request):
    codes = catalog()
    config = dataclasses.replace(SMALL, layout=request.param.removesuffix("+ids"),
                                 item_embeddings=request.param.endswith("+ids"))
    return GenerativeRecommender.build(codes, np.arange(1, len(codes) + 1), config, seed=0).eval()


def next_code_logits(model, history, prefix) -> torch.Tensor:
    """(K,) logits of the code after ``history`` + ``prefix``, computed alone and unbatched: a full
    forward pass of the token sequence, or (item layout) the unpadded history's state plus the prefix's
    code embeddings added one by one."""
    level = len(prefix)
    with torch.no_grad():
        if model.config.layout == "token":
            ids, mask = model.batch([history], [list(prefix)])
            return model.vocab_to_codes(model(ids, mask).logits[0, -1], level)
        items = torch.tensor(history, dtype=torch.long)[None]                              # (1, T)
        q = model.encode(items, torch.ones_like(items))[0, -1]
        for j, c in enumerate(prefix):
            q = q + model.lm.get_input_embeddings().weight[model.code_token[j, int(c)]]
        return model.code_logits(q, level)


def exhaustive(model, history):
    """Constrained log-prob of every item's code, one pass per prefix (the slow reference)."""
    out = []
    for row in model.codes_np:
        total = 0.0
        for level in range(model.depth):
            logits = next_code_logits(model, history, row[:level].tolist())[None]
            node = torch.tensor([model.trie.node_of(row[:level].tolist())])
            total += float(model.level_log_probs(logits, level, node)[0, row[level]])
        out.append(total)
    return np.array(out)


def test_trie_transitions_and_errors():
    codes = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0]])
    trie = CodeTrie(codes)
    assert trie.valid(torch.tensor([0])).tolist() == [[True, False, True]]
    n01 = trie.node_of([0, 1])
    assert trie.valid(torch.tensor([n01])).tolist() == [[True, True, False]]
    assert int(trie.item[trie.node_of([0, 1, 1])]) == 1 and trie.node_of([1]) == -1
    assert trie.advance(torch.tensor([0, -1]), torch.tensor([1, 0])).tolist() == [-1, -1]
    with pytest.raises(RecsysError, match="share a full code"):
        CodeTrie(np.array([[0, 1], [0, 1]]))


@pytest.mark.parametrize("seed", range(4))
def test_open_children_matches_leaf_enumeration(seed):
    """A code is open after a prefix iff some unbanned item extends prefix + code (brute force over items)."""
    codes = catalog(n=40, seed=seed)
    trie = CodeTrie(codes)
    rng = np.random.default_rng(seed)
    prefixes = [()] + [tuple(codes[i, :d]) for i in rng.integers(0, 40, 12) for d in (1, 2)]
    nodes = torch.tensor([trie.node_of(p) for p in prefixes])
    banned = torch.from_numpy(rng.random((len(prefixes), 40)) < 0.6)
    banned[1] = True                                                    # everything banned: nothing open
    got = trie.open_children(nodes, banned)
    for r, p in enumerate(prefixes):
        want = [any(tuple(codes[i, :len(p) + 1]) == p + (c,) and not banned[r, i] for i in range(40))
                for c in range(trie.n_codes)]
        assert got[r].tolist() == want, p
    assert not got[1].any()
    assert trie.open_children(nodes, torch.zeros_like(banned)).equal(trie.valid(nodes))


def test_banned_beam_search_is_exhaustive_over_unbanned_items(model):
    """With bans propagated up the trie, a full-width beam returns every unbanned item (and no banned
    one), best first, each scored by the model's own log-likelihood: exhaustive enumeration's score,
    not one renormalised over the unbanned items (which would lift items that share a prefix with banned ones).
    The sampling policy, by contrast, renormalises: its list log-probs sum to 1 (test below)."""
    history = [3, 7, 1]
    exclude = torch.zeros(1, len(model.idx_codes), dtype=torch.bool)
    banned = [2, 5, 6, 11, 12, 13, 20, 21, 22, 23, 24, 25]
    exclude[0, banned] = True
    with torch.no_grad():
        out = decode(model, [history], len(model.trie), exclude=exclude)
    finite = torch.isfinite(out.scores[0])
    alive = out.items[0][finite].tolist()
    assert sorted(alive) == sorted(set(range(1, 31)) - set(banned))
    want = exhaustive(model, history)[np.array(alive) - 1]
    np.testing.assert_allclose(out.scores[0][finite].numpy(), want, atol=1e-4)
    assert np.all(np.diff(out.scores[0][finite].numpy()) <= 1e-6)


def test_beam_search_matches_exhaustive_enumeration(model):
    history = [3, 7, 1]
    scores = exhaustive(model, history)
    best = np.argsort(-scores, kind="stable")[:5]
    with torch.no_grad():
        out = decode(model, [history], len(scores))                     # width = catalog: exact top-K
    assert out.items[0, :5].tolist() == (best + 1).tolist()
    np.testing.assert_allclose(out.scores[0, :5].numpy(), scores[best], atol=1e-4)


def test_tree_attention_equals_independent_forward_passes(model):
    if model.config.layout == "item":
        pytest.skip("token layout only (the item layout's scorer: next test)")
    histories = [[1, 2, 3, 4], [5]]                                     # different lengths: left padding
    scorer = PrefixScorer(model, histories, values=True)
    prefixes = torch.tensor([[[0, 1], [2, 0]], [[1, 2], [3, 0]]])
    lengths = torch.tensor([[2, 1], [0, 2]])
    logits, values = scorer(prefixes, lengths)
    for b, h in enumerate(histories):
        for w in range(2):
            p = prefixes[b, w, :lengths[b, w]].tolist()
            ids, mask = model.batch([h], [p])
            out = model(ids, mask, output_hidden_states=True)
            want = model.vocab_to_codes(out.logits[0, -1], min(len(p), model.depth - 1))
            torch.testing.assert_close(logits[b, w], want, atol=1e-4, rtol=1e-4)
            v = model.value_head(out.hidden_states[-1], mask)[0, -1]
            torch.testing.assert_close(values[b, w], v, atol=1e-4, rtol=1e-4)


def test_value_of_a_prefix_is_the_same_in_td_training_and_in_decoding(model):
    """V(prefix) read by TD training (teacher forcing, a window ending at the full code) equals V(prefix) read
    by value-guided decoding (a window ending at the prefix), also when the history is longer than the value
    head's context."""
    if model.config.layout == "item":
        pytest.skip("token layout only (the item layout's value reads one query per prefix)")
    model.eval()
    D = model.depth
    history = list(range(1, model.config.max_items + 1))               # max_items * D tokens: past the context
    assert len(history) * D > model.config.value_context
    code = torch.tensor([[1, 0, 2][:D]])
    with torch.no_grad():
        _, trained = model.teacher_forced([history], code, values=True)          # (1, D + 1): V(s_0..s_D)
        scorer = PrefixScorer(model, [history], values=True)
        decoded = [scorer(code[:, None, :max(level, 1)], torch.tensor([[level]]))[1][0, 0] for level in range(D)]
    torch.testing.assert_close(trained[0, :D], torch.stack(decoded), atol=1e-4, rtol=1e-4)


def test_item_prefix_scorer_equals_unbatched_computation(model):
    """Item layout: padded batches of histories, mixed prefix lengths (full depth included) give the
    logits and values of each history and prefix computed alone."""
    if model.config.layout == "token":
        pytest.skip("item layout only")
    histories = [[1, 2, 3, 4], [5], []]
    scorer = prefix_scorer(model, histories, values=True)
    assert isinstance(scorer, ItemPrefixScorer)
    prefixes = torch.tensor([[[0, 1, 0], [2, 0, 0]], [[1, 2, 0], [3, 0, 1]], [[0, 0, 0], [1, 1, 0]]])
    lengths = torch.tensor([[2, 1], [0, 3], [0, 2]])
    with torch.no_grad():
        logits, values = scorer(prefixes, lengths)
        for b, h in enumerate(histories):
            for w in range(2):
                p = prefixes[b, w, :lengths[b, w]].tolist()
                level = min(len(p), model.depth - 1)
                want = next_code_logits(model, h, p[:level])
                if len(p) == level:                                   # a full-depth prefix has no next code
                    torch.testing.assert_close(logits[b, w], want, atol=1e-4, rtol=1e-4)
                q = model.queries(model.user_state([h])[0], torch.tensor(p, dtype=torch.long))[-1]
                torch.testing.assert_close(values[b, w], model.values(q), atol=1e-5, rtol=1e-5)


def test_item_sft_loss_is_next_item_cross_entropy_at_every_position():
    """Item layout: the batched SFT loss (left padding, <bos> before each row's first item) equals the
    mean over every real item and level of -log p(code | earlier items, earlier codes), each computed
    alone from the unpadded prefix of its sequence."""
    codes = catalog()
    model = GenerativeRecommender.build(codes, np.arange(1, 31), dataclasses.replace(SMALL, layout="item")).eval()
    seqs = [[4, 9, 2, 7], [12, 3]]
    with torch.no_grad():
        got = model.sft_loss(**model.train_batch(seqs))
        terms = []
        for s in seqs:
            for t, item in enumerate(s):
                row = model.codes_np[item - 1]
                for level in range(model.depth):
                    logp = next_code_logits(model, s[:t], row[:level]).log_softmax(-1)
                    terms.append(-float(logp[row[level]]))
    assert float(got) == pytest.approx(np.mean(terms), abs=1e-5)


def test_item_layout_saves_and_loads_its_heads(tmp_path):
    codes = catalog()
    config = dataclasses.replace(SMALL, layout="item", item_embeddings=True)
    model = GenerativeRecommender.build(codes, np.arange(1, 31), config).eval()
    with torch.no_grad():
        for p in [*model.code_head.parameters(), model.item_embedding.weight]:
            p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "m")
    loaded = GenerativeRecommender.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, ItemGenerativeRecommender)
    with torch.no_grad():
        a, b = decode(model, [[1, 2, 3]], 5), decode(loaded, [[1, 2, 3]], 5)
    assert a.items.equal(b.items)
    torch.testing.assert_close(a.scores, b.scores)
    with pytest.raises(RecsysError, match="model.layout"):
        GenerativeConfig(layout="tokens")


@pytest.mark.parametrize("layout", ["token", "item"])
@pytest.mark.parametrize("seed", range(3))
def test_random_logits_never_leave_the_catalog(seed, layout):
    """Property: any weights, beam or sampled, every output is a catalog item whose code is the output code."""
    codes = catalog(n=25, seed=seed)
    m = GenerativeRecommender.build(codes, np.arange(1, 26), dataclasses.replace(SMALL, layout=layout), seed=seed).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 3.0, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    for out in (decode(m, [[1, 2], [3]], 12), decode(m, [[1, 2], [3]], 12, sample=True, generator=gen, temperature=2.0)):
        assert (out.items > 0).all()
        for item, code in zip(out.items.view(-1).tolist(), out.codes.view(-1, m.depth).tolist()):
            assert codes[item - 1].tolist() == code
    beams = decode(m, [[1, 2]], 12).items[0].tolist()
    assert len(set(beams)) == 12                                        # beams are distinct items


def test_recommend_excludes_history_and_lists_are_distinct(model):
    history = list(range(1, 11))
    out = recommend_batch(model, [history], 5, 10)
    assert not set(out.items[0].tolist()) & set(history)
    lists = generate_list(model, [history, [2]], 6, beam=3)
    for lst, h in zip(lists, [history, [2]]):
        assert len(lst) == 6 and len(set(lst)) == 6 and not set(lst) & set(h)
    with torch.no_grad():                           # make <eor> the likeliest token: lists stop at once
        eor = model.tokenizer.convert_tokens_to_ids("<eor>")
        if model.config.layout == "token":
            h = model(*model.batch([history]), output_hidden_states=True).hidden_states[-1][0, -1]  # after the norm
        else:
            h = model.code_head(model.user_state([history])[0], 0)       # the level-0 code head's output
        model.lm.get_input_embeddings().weight[eor] = 100 * h / h.norm()  # tied: logit 100 |h|, above any other
    assert generate_list(model, [history], 6, beam=3, end_token="<eor>") == [[]]
    assert len(generate_list(model, [history], 6, beam=3)[0]) == 6          # without end_token: never read


def test_ved_spends_exactly_its_budget_and_returns_valid_candidates(model):
    cfg = VEDConfig(n_candidates=6, init_beam=3, budget_multiplier=2.0)
    budget = cfg.budget(model.depth)
    assert budget == round((1 + 2 * 3) * 2.0) == 14
    exclude = torch.zeros(2, 31, dtype=torch.bool)
    exclude[0, [1, 2, 3]] = True
    out, calls = ved(model, [[1, 2, 3], [4]], cfg, exclude=exclude)
    assert calls.tolist() == [budget, budget]
    assert out.items.shape == (2, 6) and (out.items > 0).all()
    assert not set(out.items[0].tolist()) & {1, 2, 3}
    for item, code in zip(out.items.view(-1).tolist(), out.codes.view(-1, model.depth).tolist()):
        assert model.codes_np[item - 1].tolist() == code
    _, init_only = ved(model, [[1]], cfg, budget=1 + 2 * 3)               # the initial beam alone
    assert init_only.tolist() == [7]


def test_ved_completion_turns_the_calls_of_an_expansion_into_full_candidates(model):
    """widen="complete": a gated expansion is extended by the likeliest valid code until it is a full semantic ID,
    so at a budget past the initial beam VED returns more distinct items than the paper's gated widening, within
    the same calls, every one a valid item outside the history; at the initial beam's budget both are the beam."""
    cfg = VEDConfig(n_candidates=30, init_beam=3, budget_multiplier=2.0)
    histories = [[1, 2, 3], [4], [5, 9]]
    exclude = torch.zeros(3, 31, dtype=torch.bool)
    for i, h in enumerate(histories):
        exclude[i, h] = True
    distinct = {}
    for widen in ("gated", "complete"):
        out, calls = ved(model, histories, dataclasses.replace(cfg, widen=widen), exclude=exclude, seed=1)
        assert (calls <= cfg.budget(model.depth)).all()
        for i, h in enumerate(histories):
            got = set(out.items[i].tolist())
            assert 0 not in got and not got & set(h)
        for item, code in zip(out.items.view(-1).tolist(), out.codes.view(-1, model.depth).tolist()):
            assert model.codes_np[item - 1].tolist() == code
        distinct[widen] = [len(set(r.tolist())) for r in out.items]
    assert all(c >= g for c, g in zip(distinct["complete"], distinct["gated"]))
    assert sum(distinct["complete"]) > sum(distinct["gated"]), distinct
    init = 1 + (model.depth - 1) * 3
    beam_only = [ved(model, histories, dataclasses.replace(cfg, widen=w), exclude=exclude, budget=init)[0].items
                 for w in ("gated", "complete")]
    assert torch.equal(*beam_only)
    with pytest.raises(ValueError, match="widen"):
        VEDConfig(widen="wide")
    # rank_by="logp": the same tree, its leaves returned likeliest first
    out, _ = ved(model, histories, dataclasses.replace(cfg, widen="complete", rank_by="logp"), exclude=exclude, seed=1)
    assert set(out.items[0].tolist()) == set(ved(model, histories, dataclasses.replace(cfg, widen="complete"),
                                                 exclude=exclude, seed=1)[0].items[0].tolist())


def ved_tree(c0_visits: int):
    """A hand-built VED tree of depth 2 over 4 codes: the root (V 0, next codes 0.5 / 0.3 / 0.2 / 0, visited 4
    times) with two evaluated children, c0 (V 0.2, H 1.0) and c1 (V 0.5, H 0.0, next codes 0 / 0.6 / 0.4 / 0)."""
    from recsys.generative.ved import Node, Tree

    root = Node((), None, 0.0, 0.0, 0.0, evaluated=True, visits=4, probs=np.array([0.5, 0.3, 0.2, 0.0]))
    root.entropy = float(-(root.probs[:3] * np.log(root.probs[:3])).sum())           # 1.0297
    c0 = Node((0,), root, math.log(0.5), 0.2, 1.0, evaluated=True, visits=c0_visits, probs=np.array([1.0, 0, 0, 0]))
    c1 = Node((1,), root, math.log(0.3), 0.5, 0.0, evaluated=True, visits=1, probs=np.array([0.0, 0.6, 0.4, 0.0]))
    root.children = {0: c0, 1: c1}
    tree = Tree(np.array([1]), root, None)
    # sums of G = V + lam * H per depth over the evaluated nodes (lam 0.1): depth 0 the root, depth 1: 0.3 + 0.5
    tree.depth_sum = {0: [0.1 * root.entropy, 1], 1: [0.3 + 0.5, 2]}
    return tree, c0, c1


def test_ved_selection_by_hand_worked_ucb_scores_and_gates():
    """eq. 13: U(c) = G(c) + beta * sqrt(ln(N_root + 1) / (N(c) + 1)), the new-child option at G(s) with 0 visits,
    offered only when G(s) >= the mean G of the evaluated nodes at s's depth (eq. 14); lam 0.1, beta 1."""
    from recsys.generative.ved import select_node

    cfg = VEDConfig(lam=0.1, beta=1.0)
    ln5 = math.log(5)                                                    # N_root = 4
    # c0 visited 3 times: U(c0) = 0.3 + sqrt(ln5 / 4) = 0.934, U(c1) = 0.5 + sqrt(ln5 / 2) = 1.397, a new root
    # child 0.103 + sqrt(ln5) = 1.372 (the root's gate holds: it is its depth's only node) -> c1. At c1: no
    # children, its G 0.5 >= the depth-1 mean 0.4 -> the gate holds: a new child, code 1 or 2 from the policy
    tree, c0, c1 = ved_tree(c0_visits=3)
    assert 0.3 + math.sqrt(ln5 / 4) < 0.1 * tree.root.entropy + math.sqrt(ln5) < 0.5 + math.sqrt(ln5 / 2)
    node, path = select_node(tree, cfg, 2, np.random.default_rng(0))
    assert path[:2] == [tree.root, c1] and node is path[2] and node.parent is c1 and not node.evaluated
    assert node.prefix in ((1, 1), (1, 2)) and node.logp == pytest.approx(math.log(0.3) + math.log(c1.probs[node.prefix[1]]))
    assert node.value == c1.value and node.entropy == c1.entropy               # inherited until evaluated
    picks = [select_node(ved_tree(3)[0], cfg, 2, np.random.default_rng(s))[0].prefix[1] for s in range(400)]
    assert abs(np.mean(np.array(picks) == 1) - 0.6) < 0.08                     # sampled from the policy (0.6 / 0.4)
    # c0 never visited: U(c0) = 0.3 + sqrt(ln5) = 1.569 wins; at c0, G 0.3 < the depth-1 mean 0.4: the gate
    # refuses a new child and c0 has none to descend to -> nothing to evaluate this round
    tree, c0, _ = ved_tree(c0_visits=0)
    node, path = select_node(tree, cfg, 2, np.random.default_rng(0))
    assert node is None and path == [tree.root, c0] and not c0.children
    # an unevaluated node on the way is the one evaluated
    c0.evaluated = False
    assert select_node(tree, cfg, 2, np.random.default_rng(0))[0] is c0


def test_sibling_advantages_docstring_tree():
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 0]])
    a0, a1 = 0.25 / (0.25 + 1e-4), 0.5 / (0.5 + 1e-4)
    # visits (the default, V-STAR's code): every candidate through a node carries its advantage
    adv, carry = sibling_advantages(codes, torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(adv, torch.tensor([[a0, a1], [a0, -a1], [-a0, 0], [-a0, 0]]))
    assert carry.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    # first: the first candidate through a node only, each node once
    adv, carry = sibling_advantages(codes, torch.tensor([1.0, 0, 0, 0]), credit="first")
    torch.testing.assert_close(adv, torch.tensor([[a0, a1], [0, -a1], [-a0, 0], [0, 0]]))
    assert carry.tolist() == [[True, True], [False, True], [True, False], [False, False]]


def test_sibling_loss_weighs_a_node_by_its_visits_under_visit_credit():
    """Node 0 at depth 0 is visited by 3 candidates, node 1 by 1: under ``visits`` node 0's advantage enters
    the mean 3 times out of 4 (plus the depth-1 nodes), under ``first`` once, like node 1's."""
    codes = torch.tensor([[0, 0], [0, 1], [0, 1], [1, 0]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    logp = torch.zeros(4, 2, requires_grad=True)
    for credit, carried in (("visits", 4 + 3), ("first", 2 + 2)):
        adv, carry = sibling_advantages(codes, rewards, credit=credit)
        assert int(carry.sum()) == carried
        logp.grad = None
        sibling_loss(logp, adv, carry, beta=0.0).backward()
        torch.testing.assert_close(logp.grad[carry], -adv[carry] / carried)


def test_single_child_groups_give_no_signal():
    codes = torch.tensor([[2, 1], [2, 1], [2, 1]])                      # one path: every group has one child
    adv, carry = sibling_advantages(codes, torch.tensor([1.0, 0.0, 5.0]))
    assert not carry.any() and (adv == 0).all()
    logp = torch.zeros(3, 2, requires_grad=True)
    loss = sibling_loss(logp, adv, carry)
    loss.backward()
    assert loss.item() == 0 and (logp.grad == 0).all()


def test_sibling_loss_gradient_is_minus_advantage_over_carried_tokens():
    adv = torch.tensor([[1.0, 0.5], [0.0, -2.0]])
    carry = torch.tensor([[True, True], [False, True]])
    logp = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.1]])).requires_grad_()
    sibling_loss(logp, adv, carry, beta=0.0).backward()
    # d/dlogp of -exp(logp - sg(logp)) * A = -A at the current point; mean over 3 carried tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -0.5], [0.0, 2.0]]) / 3)


def test_level_rewards_and_td_targets_by_hand():
    codes = torch.tensor([[1, 0], [1, 1], [0, 0]])
    target = torch.tensor([1, 1])
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])         # item vectors of the candidates
    target_vec = torch.tensor([0.0, 1.0])
    r = level_rewards(codes, target, vectors, target_vec, weights=(0.3, 1.0))
    # level 0: candidates 0, 1 match prefix (1,) -> 0.3; candidate 2 (prefix (0,), mean vec [1,0], cos 0) -> -0.3
    # level 1: candidate 1 is the target -> 1.0; candidate 0 alone under (1,0), cos 0 -> -1.0; candidate 2 -> -1.0
    torch.testing.assert_close(r, torch.tensor([[0.3, -1.0], [0.3, 1.0], [-0.3, -1.0]]))
    values = torch.tensor([[0.5, 0.2, 0.1]])
    t = td_targets(values, torch.tensor([[0.3, 1.0]]), gamma=0.5)
    torch.testing.assert_close(t, torch.tensor([[0.0 + 0.5 * 0.2, 0.3 + 0.5 * 0.1, 1.0]]))


def test_prefix_reward_docstring_example():
    target = torch.tensor([1, 2, 3, 0])
    codes = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 0], [0, 2, 3, 0]])
    torch.testing.assert_close(prefix_reward(codes, target), torch.tensor([1.0, 0.05, 0.0]))


# ------------------------------------------------------------------------------------------ training
def test_sequence_windows_docstring_example_and_every_target_once():
    from pipelines.generative import sequence_windows

    assert [list(w) for w in sequence_windows([1, 2, 3, 4, 5, 6], 3)] == [[4, 5, 6], [2, 3, 4], [1, 2]]
    rng = np.random.default_rng(0)
    for _ in range(50):
        seq, n = list(rng.permutation(100)[:rng.integers(2, 40)]), int(rng.integers(2, 12))
        windows = sequence_windows(seq, n)
        targets = [t for w in windows for t in w[1:]]              # what next-token training predicts
        assert sorted(targets) == sorted(seq[1:]) and all(2 <= len(w) <= n for w in windows)
        assert list(windows[0]) == seq[-n:]                        # the newest window is the old default
    assert sequence_windows([7], 5) == []
    with pytest.raises(RecsysError, match="at least 2"):
        sequence_windows([1, 2, 3], 1)


@pytest.fixture
def sid_dir(tiny_dataset, tmp_path):
    from recsys.retrieval.semantic_ids import SemanticIDConfig, SemanticIDs

    emb = np.random.default_rng(0).normal(size=(tiny_dataset.n_items, 8)).astype(np.float32)
    sid = SemanticIDs.fit(np.arange(1, tiny_dataset.n_items + 1), emb, SemanticIDConfig(levels=2, codebook_size=4))
    return sid.save(tmp_path / "sid")


def test_vstar_dense_reward_compares_items_by_the_vectors_their_codes_were_built_from(tiny_dataset, sid_dir,
                                                                                     tmp_path):
    from pipelines.generative import GenerativeTrainConfig, reward_vectors
    from recsys.generative.model import GenerativeRecommender
    from recsys.retrieval.semantic_ids import SemanticIDConfig, SemanticIDs

    sid = SemanticIDs.load(sid_dir)
    model = GenerativeRecommender.build(sid.codes, sid.item_ids, SMALL, seed=0)
    vstar = {"algo": "vstar", "init": "sft/model"}
    got = reward_vectors(model, GenerativeTrainConfig(**vstar, semantic_ids=str(sid_dir)))
    assert (got[0] == 0).all() and torch.equal(got[1:], torch.from_numpy(sid.vectors[np.argsort(sid.item_ids)]))
    onehot = reward_vectors(model, GenerativeTrainConfig(**vstar, dense_reward="codes"))
    a, b = onehot[1], onehot[2]            # cosine of one-hot codes = the share of code levels in common
    shared = float((model.idx_codes[1] == model.idx_codes[2]).float().mean())
    assert abs(float(a @ b / (a.norm() * b.norm())) - shared) < 1e-6
    with pytest.raises(RecsysError, match="set semantic_ids to that directory"):
        reward_vectors(model, GenerativeTrainConfig(**vstar))
    other = SemanticIDs.fit(sid.item_ids, np.random.default_rng(5).normal(size=(len(sid.item_ids), 8)),
                            SemanticIDConfig(levels=2, codebook_size=4)).save(tmp_path / "other")
    with pytest.raises(RecsysError, match="not the ones the model"):
        reward_vectors(model, GenerativeTrainConfig(**vstar, semantic_ids=str(other)))
    with pytest.raises(RecsysError, match="dense_reward must be one of"):
        GenerativeTrainConfig(**vstar, dense_reward="cosine")


def _sft(sid_dir, **kw):
    from pipelines.generative import GenerativeTrainConfig

    base = {"model": SMALL, "semantic_ids": str(sid_dir), "batch_size": 8, "lr": 3e-3, "val_beam": 10,
            "precision": "32-true", "patience": 100}
    return GenerativeTrainConfig(**(base | kw))


def test_sft_learns_the_ring_and_resumes_exactly(tiny_dataset, sid_dir, tmp_path):
    from pipelines.generative import evaluate_generative, load_for, train_generative

    straight = train_generative(tiny_dataset, tmp_path / "a", _sft(sid_dir, max_epochs=3), progress=False)
    train_generative(tiny_dataset, tmp_path / "b", _sft(sid_dir, max_epochs=2), progress=False)
    resumed = train_generative(tiny_dataset, tmp_path / "b", _sft(sid_dir, max_epochs=3), progress=False)
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight and resumed
    two_layers = dataclasses.replace(SMALL, num_layers=2)                 # one layer learns the ring slowly
    longer = train_generative(tiny_dataset, tmp_path / "c", _sft(sid_dir, max_epochs=25, model=two_layers),
                              progress=False)
    test = tiny_dataset.eval_examples("test")
    targets = [t[0] for t in test.targets]
    m = evaluate_generative(load_for(tiny_dataset, longer), test.histories, targets, beam=10, progress=False)
    untrained = GenerativeRecommender.build(load_for(tiny_dataset, longer).codes_np, np.arange(1, 41), SMALL, seed=1)
    chance = evaluate_generative(untrained, test.histories, targets, beam=10, progress=False)
    assert m["num_queries"] == len(test.users) and m["ndcg@10"] > chance["ndcg@10"] + 0.15
    with pytest.raises(RecsysError, match="different config"):
        train_generative(tiny_dataset, tmp_path / "c", _sft(sid_dir, max_epochs=1, lr=1e-2, model=two_layers),
                         progress=False)


def test_plateau_decay_cuts_the_rate_after_each_stalled_validation_and_resumes_exactly(tiny_dataset, sid_dir,
                                                                                       tmp_path):
    import polars as pl

    from pipelines.generative import train_generative

    cfg = _sft(sid_dir, max_epochs=5, lr_decay=0.5, lr_patience=0)
    train_generative(tiny_dataset, tmp_path / "a", cfg, progress=False)
    val = pl.read_csv(tmp_path / "a" / "logs" / "version_0" / "metrics.csv")["val/ndcg@10"].drop_nulls().to_list()
    best, stalls = -1.0, 0
    for v in val:                     # ReduceLROnPlateau, mode max, relative threshold 1e-4, patience 0
        if v > best * (1 + 1e-4):
            best = v
        else:
            stalls += 1
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(val) == 5
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3e-3 * 0.5 ** stalls)
    train_generative(tiny_dataset, tmp_path / "b", dataclasses.replace(cfg, max_epochs=2), progress=False)
    train_generative(tiny_dataset, tmp_path / "b", cfg, progress=False)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["plateau"] == last["plateau"] and last["plateau"]["last_epoch"] == 5
    assert all(torch.equal(last["state_dict"][k], resumed["state_dict"][k]) for k in last["state_dict"])


def test_a_resumed_run_stops_at_the_patience_configured_now(tiny_dataset, sid_dir, tmp_path):
    """Lightning restores EarlyStopping's saved patience; ours keeps the configured one (patience is a
    resumable change). lr 0: validation never improves after the first, so the run stops after
    1 + patience validations."""
    import polars as pl

    from pipelines.generative import train_generative

    def validations():
        return sum(pl.read_csv(f)["val/ndcg@10"].drop_nulls().len() for f in (tmp_path / "logs").glob("*/metrics.csv"))

    train_generative(tiny_dataset, tmp_path, _sft(sid_dir, max_epochs=20, lr=0.0, patience=1), progress=False)
    assert validations() == 2
    train_generative(tiny_dataset, tmp_path, _sft(sid_dir, max_epochs=20, lr=0.0, patience=3), progress=False)
    assert validations() == 4
    from lightning.pytorch.callbacks import EarlyStopping

    from pipelines.callbacks import early_stopping

    # the checkpoint key of Lightning's own class: runs saved before this callback existed resume with their counters
    assert early_stopping("val/ndcg@10", 3).state_key == EarlyStopping("val/ndcg@10", mode="max").state_key


@pytest.mark.parametrize("algo", ["grpo", "rank-grpo", "vstar"])
def test_rl_steps_write_a_model(tiny_dataset, sid_dir, tmp_path, algo):
    from pipelines.generative import GenerativeTrainConfig, load_for, train_generative

    init = train_generative(tiny_dataset, tmp_path / "sft", _sft(sid_dir, max_epochs=2), progress=False)
    cfg = GenerativeTrainConfig(algo=algo, model=SMALL, init=str(init), max_steps=2, val_every=1, prompts_per_step=3,
                                group_size=4, init_beam=2, val_beam=8, lr=1e-3, precision="32-true",
                                semantic_ids=str(sid_dir))
    path = train_generative(tiny_dataset, tmp_path / algo, cfg, progress=False)
    summary = json.loads((tmp_path / algo / "train.json").read_text())
    assert summary["steps"] == 2 and summary["start_val_ndcg@10"] is not None
    assert summary["best_val_ndcg@10"] >= summary["start_val_ndcg@10"] and isinstance(summary["kept_start"], bool)
    before = load_for(tiny_dataset, init)
    assert load_for(tiny_dataset, path).depth == before.depth                 # the saved model loads
    # the last step's weights moved (the saved model is the best by validation, which may be the start)
    last = torch.load(tmp_path / algo / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    moved = [not torch.equal(p, last[f"model.{k}"]) for k, p in before.state_dict().items() if f"model.{k}" in last]
    assert moved and any(moved)
    if algo == "vstar":                                               # the value head trained too
        assert not torch.equal(before.value_head.mlp[0].weight, last["model.value_head.mlp.0.weight"])
    with pytest.raises(RecsysError, match="starts from an SFT model"):
        train_generative(tiny_dataset, tmp_path / "x", GenerativeTrainConfig(algo=algo), progress=False)


@pytest.mark.parametrize("algo", ["grpo", "rank-grpo", "vstar"])
def test_off_policy_generative_rl_clips_its_later_updates_only(tiny_dataset, sid_dir, tmp_path, algo):
    """mu = 2: the second optimiser step on a rollout batch has a ratio off 1 and clips (tight eps, large lr);
    mu = 1 never clips. ``max_steps`` counts rollout batches; the trainer's step counter, optimiser steps."""
    import polars as pl

    from pipelines.generative import GenerativeTrainConfig, train_generative

    init = train_generative(tiny_dataset, tmp_path / "sft", _sft(sid_dir, max_epochs=2), progress=False)
    clipped = {}
    for mu in (1, 2):
        cfg = GenerativeTrainConfig(algo=algo, model=SMALL, init=str(init), max_steps=4, val_every=4,
                                    prompts_per_step=3, group_size=4, init_beam=2, val_beam=8, lr=2e-2, eps=0.01,
                                    mu=mu, precision="32-true", semantic_ids=str(sid_dir))
        train_generative(tiny_dataset, tmp_path / f"{algo}-mu{mu}", cfg, progress=False)
        logs = pl.read_csv(next((tmp_path / f"{algo}-mu{mu}" / "logs").glob("version_*/metrics.csv")))
        clipped[mu] = logs["train/clip_fraction"].drop_nulls()
        assert json.loads((tmp_path / f"{algo}-mu{mu}" / "train.json").read_text())["steps"] == 4 * mu
    assert clipped[1].len() == clipped[2].len() == 4
    assert clipped[1].max() == 0.0 and clipped[2].max() > 0.0
    with pytest.raises(RecsysError, match="mu"):
        GenerativeTrainConfig(algo=algo, mu=0)


def test_generative_rl_that_never_beats_its_start_keeps_the_start(tiny_dataset, sid_dir, tmp_path):
    """lr 0: every RL checkpoint scores what the SFT start scored, so ``model`` is the start bit for bit,
    ``train.json`` says ``kept_start``, and the final weights are written to ``last-model`` all the same."""
    from pipelines.generative import GenerativeTrainConfig, load_for, train_generative

    init = train_generative(tiny_dataset, tmp_path / "sft", _sft(sid_dir, max_epochs=2), progress=False)
    cfg = GenerativeTrainConfig(algo="grpo", model=SMALL, init=str(init), max_steps=2, val_every=1, prompts_per_step=3,
                                group_size=4, init_beam=2, val_beam=8, lr=0.0, precision="32-true")
    path = train_generative(tiny_dataset, tmp_path / "flat", cfg, progress=False)
    summary = json.loads((tmp_path / "flat" / "train.json").read_text())
    assert summary["kept_start"] is True and summary["best_val_ndcg@10"] == summary["start_val_ndcg@10"]
    start, saved = load_for(tiny_dataset, init).state_dict(), load_for(tiny_dataset, path).state_dict()
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)
    assert load_for(tiny_dataset, tmp_path / "flat" / "last-model").depth == load_for(tiny_dataset, init).depth
    train_generative(tiny_dataset, tmp_path / "flat", cfg, progress=False)      # a finished run, run again
    again = json.loads((tmp_path / "flat" / "train.json").read_text())
    assert {k: again[k] for k in ("kept_start", "best_val_ndcg@10", "steps")} == \
        {k: summary[k] for k in ("kept_start", "best_val_ndcg@10", "steps")}


def test_item_layout_learns_the_ring_and_runs_vstar(tiny_dataset, sid_dir, tmp_path):
    """The item layout end to end: SFT beats an untrained model by a margin on the ring's test users, and a
    V-STAR step (value-guided rollouts, Sibling-GRPO, TD value loss) moves the policy and the value head."""
    from pipelines.generative import (
        GenerativeTrainConfig,
        evaluate_generative,
        load_for,
        train_generative,
    )

    item = dataclasses.replace(SMALL, layout="item", num_layers=2)
    init = train_generative(tiny_dataset, tmp_path / "sft", _sft(sid_dir, max_epochs=15, model=item), progress=False)
    model = load_for(tiny_dataset, init)
    assert isinstance(model, ItemGenerativeRecommender)
    test = tiny_dataset.eval_examples("test")
    targets = [t[0] for t in test.targets]
    m = evaluate_generative(model, test.histories, targets, beam=10, progress=False)
    untrained = GenerativeRecommender.build(model.codes_np, np.arange(1, 41), item, seed=1)
    chance = evaluate_generative(untrained, test.histories, targets, beam=10, progress=False)
    assert m["ndcg@10"] > chance["ndcg@10"] + 0.15
    cfg = GenerativeTrainConfig(algo="vstar", model=item, init=str(init), max_steps=2, val_every=1, prompts_per_step=3,
                                group_size=4, init_beam=2, val_beam=8, lr=1e-3, precision="32-true",
                                semantic_ids=str(sid_dir))
    train_generative(tiny_dataset, tmp_path / "vstar", cfg, progress=False)
    last = torch.load(tmp_path / "vstar" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name in ("code_head.mlp.0.0.weight", "value_head.mlp.0.weight"):
        assert not torch.equal(model.state_dict()[name], last[f"model.{name}"]), name


def test_cli_train_generative_and_recommend(tiny_dataset, sid_dir, tmp_path, capsys):
    from pipelines.cli import main

    data = str(tiny_dataset.directory)
    code = main(["train", "generative", "--data", data, "--semantic-ids", str(sid_dir), "--out", str(tmp_path / "g"),
                 "--max-epochs", "1", "--set", "model.hidden_size=32", "--set", "model.num_layers=1",
                 "--set", "model.num_heads=2", "--set", "batch_size=8", "--set", "val_beam=10"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    user = tiny_dataset.users["user_id"][0]
    assert main(["recommend", "--data", data, "--model", str(tmp_path / "g"), "--users", user, "--k", "5"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["query"] == f"user {user}" and len(line["items"]) == 5
    assert main(["recommend", "--data", data, "--model", str(tmp_path / "g"), "--history", "nope"]) == 1
    assert "unknown item id(s) ['nope']" in capsys.readouterr().err


def test_list_log_probs_are_the_constrained_policy(tiny_dataset, sid_dir):
    """Rank-GRPO's list log-probs: with an empty history, item 1 is a distribution over the whole
    catalog (sums to 1); item 2 gives the already written item probability 0 and the other items
    exactly 1 in total: the ban is propagated up the trie, so no mass is lost on dead-end prefixes."""
    from pipelines.generative import (
        GenerativeRLModule,
        GenerativeTrainConfig,
        build_model,
    )

    torch.manual_seed(0)
    model = build_model(tiny_dataset, _sft(sid_dir)).eval()
    module = GenerativeRLModule(model, GenerativeTrainConfig(algo="rank-grpo", init="x", list_length=2))
    items, first, D = list(range(1, len(model.idx_codes))), 9, model.depth
    with torch.no_grad():
        lp = module.list_log_probs(model, [[]] * len(items), [[i, first if i != first else 10] for i in items])
        assert torch.logsumexp(lp[:, :D].sum(1), 0).item() == pytest.approx(0.0, abs=1e-4)
        lp2 = module.list_log_probs(model, [[]] * len(items), [[first, i] for i in items])
    second = lp2[:, D:].sum(1)
    assert second[items.index(first)].item() == -float("inf")
    assert torch.logsumexp(second, 0).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_sft_module_puts_a_model_read_in_eval_mode_into_train_mode(tmp_path):
    """A saved model comes back from from_pretrained in eval mode; Lightning keeps submodules in the mode
    it finds them, so the module must switch the whole model (the value head's dropout too) to train."""
    from pipelines.generative import GenerativeSFTModule, GenerativeTrainConfig

    codes = np.array([[a, b] for a in range(3) for b in range(3)])
    GenerativeRecommender.build(codes, np.arange(1, 10), SMALL, seed=0).save_pretrained(tmp_path / "m")
    loaded = GenerativeRecommender.from_pretrained(tmp_path / "m")
    assert not loaded.lm.training
    module = GenerativeSFTModule(loaded, GenerativeTrainConfig())
    assert all(m.training for m in module.model.modules())
