import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.rerank.first import replay_log_probs
from recsys.rerank.slate import (
    SlateRankConstraint,
    parse_slate_rank,
    slate_rank_positions,
)
from recsys.rl.f_grpo import phase_masks

V, SEP, MARKER, END = 40, 30, 31, 32          # identifier tokens 0..25; 33..39 are noise


def constraint(sizes, slate=3, rank=2):
    return SlateRankConstraint(torch.tensor(sizes), slate, rank, torch.arange(26), SEP, MARKER, END)


def sample(c: SlateRankConstraint, g: torch.Generator, B: int):
    """Sample every row under the constraint from random logits; returns tokens (B, T) and the
    log-probabilities of the sampled tokens, as the decoder computes them."""
    done = torch.zeros(B, dtype=torch.bool)
    tokens, logps, logits_seen = [], [], []
    for _ in range(c.max_tokens):
        logits = torch.randn(B, V, generator=g) * 3
        lp = torch.log_softmax(c.mask(logits), -1)
        tok = torch.multinomial(lp.exp(), 1, generator=g)[:, 0]
        tok = torch.where(done, torch.full_like(tok, -1), tok)
        logps.append(torch.where(tok >= 0, lp.gather(1, tok.clamp(min=0)[:, None])[:, 0], torch.zeros(B)))
        tokens.append(tok)
        logits_seen.append(logits)
        c.update(tok)
        done |= tok == END
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(logits_seen, 1)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), slate=st.integers(1, 6),
       rank=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_sampled_slate_then_rank_answers_are_always_well_formed(sizes, slate, rank, seed):
    rank = min(rank, slate)
    tokens, _, _ = sample(constraint(sizes, slate, rank), torch.Generator().manual_seed(seed), len(sizes))
    for row, size in zip(tokens.tolist(), sizes):
        row = [t for t in row if t >= 0]
        assert row.count(MARKER) == 1 and row[-1] == END and row.count(END) == 1
        cut = row.index(MARKER)
        first, second = row[:cut], row[cut + 1:-1]
        assert first[1::2] == [SEP] * (len(first) // 2) and second[1::2] == [SEP] * (len(second) // 2)
        chosen, ranked = first[0::2], second[0::2]
        assert len(chosen) == min(slate, size) == len(set(chosen)) and all(t < size for t in chosen)
        assert len(ranked) == min(rank, slate, size) == len(set(ranked)) and set(ranked) <= set(chosen)


def test_replayed_log_probs_equal_the_sampling_distribution_and_phases_split_at_the_marker():
    g = torch.Generator().manual_seed(0)
    tokens, logps, logits = sample(constraint([5, 2, 9]), g, 3)
    replayed, entropy = replay_log_probs(logits, tokens, constraint([5, 2, 9]))
    assert torch.allclose(replayed, logps, atol=1e-6) and (entropy >= 0).all()
    # forced tokens (the separator after an identifier, the marker, the end) carry log-prob 0
    forced = (tokens == SEP) | (tokens == MARKER) | (tokens == END)
    assert torch.all(replayed[forced] == 0)
    slate, rank = phase_masks(tokens, tokens >= 0, MARKER)
    for b in range(3):
        cut = tokens[b].tolist().index(MARKER)
        assert slate[b, :cut + 1].all() and not slate[b, cut + 1:].any()
        assert rank[b].sum() == (tokens[b] >= 0).sum() - cut - 1


def test_first_slate_step_by_hand():
    """Window of 2, slate 2, rank 1, all logits 0: step 1 chooses among {A, B} -> log 1/2; then the
    separator is forced; step 3 only the unused one -> 0 ... the rank phase again picks 1 of 2."""
    c = constraint([2], slate=2, rank=1)
    tokens = torch.tensor([[1, SEP, 0, SEP, MARKER, 0, SEP, END]])
    lp, _ = replay_log_probs(torch.zeros(1, 8, V), tokens, c)
    assert torch.allclose(lp[0], torch.tensor([math.log(0.5), 0, 0, 0, 0, math.log(0.5), 0, 0]))


def test_parse_slate_rank():
    parsed = parse_slate_rank("C\nA\nD\n<rank>A\nC\n<eor>", 5, "<rank>", "<eor>")
    assert parsed.slate == [2, 0, 3] and parsed.ranking == [0, 2] and parsed.valid
    assert not parse_slate_rank("C\nA\n<rank>B\n<eor>", 5, "<rank>", "<eor>").valid     # B not in the slate
    assert not parse_slate_rank("C\nA\n<eor>", 5, "<rank>", "<eor>").valid                # no marker


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 10_000))
def test_per_row_item_identifiers_stay_in_their_own_window(sizes, seed):
    """Item-token identifiers: each row names its candidates by its own tokens (ids 0..29 here, padded
    beyond a row's size with its first id, as ListwiseReranker.identifier_ids pads). Every sampled answer
    names only its row's candidates, and the token-level parse returns the positions it wrote."""
    g = torch.Generator().manual_seed(seed)
    n = max(sizes)
    ids = torch.stack([torch.cat([p := torch.randperm(30, generator=g)[:s], p[:1].expand(n - s)]) for s in sizes])
    c = SlateRankConstraint(torch.tensor(sizes), 3, 2, ids, SEP, MARKER, END)
    tokens, _, _ = sample(c, g, len(sizes))
    for row, size, own in zip(tokens, sizes, ids):
        slate, ranking = slate_rank_positions(row, own, MARKER)
        written = [t for t in row.tolist() if 0 <= t < 30]
        assert [int(own[j]) for j in slate + ranking] == written
        assert len(slate) == min(3, size) == len(set(slate)) and all(j < size for j in slate)
        assert len(ranking) == min(2, size) and set(ranking) <= set(slate)


def test_slate_rank_positions_by_hand():
    # window of 3 named by tokens 7, 5, 9, padded to 4 with 7; answer "9 5 <rank> 5 <eor>"
    answer = torch.tensor([9, SEP, 5, SEP, MARKER, 5, SEP, END, -1])
    assert slate_rank_positions(answer, torch.tensor([7, 5, 9, 7]), MARKER) == ([2, 1], [1])
