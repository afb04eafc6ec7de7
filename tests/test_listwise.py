import torch

from recsys.llm.backbone import build_tiny
from recsys.rerank.listwise import ListwiseReranker
from recsys.rerank.parse import parse_ranking


def reranker(**kw):
    return ListwiseReranker(build_tiny(n_items=60, hidden_size=32, num_heads=2), bf16=False, **kw)


def test_first_scores_equal_logits_of_a_full_forward_pass():
    """Batched (left-padded) FIRST scores equal the identifier logits read off an unpadded forward pass."""
    rr = reranker()
    hist, cands = [[1, 2, 3], list(range(4, 30))], [[40, 41, 42], [50, 51, 52, 53, 54]]
    batched = rr.first_scores(hist, cands)
    for h, c, s in zip(hist, cands, batched):
        ids = rr.bb.tokenizer(rr.prompts([h], [c]), return_tensors="pt", add_special_tokens=False)["input_ids"]
        logits = rr.bb.model(ids).logits[0, -1]
        torch.testing.assert_close(s, logits[rr.bb.identifier_ids(len(c))], atol=1e-4, rtol=1e-4)


def test_sliding_window_visits_windows_back_to_front():
    rr = reranker(window=4, stride=2)
    seen = []
    rr.first_scores = lambda hs, cs: (seen.append(list(cs[0])), [torch.zeros(len(cs[0]))])[1]
    out = rr.rerank([1], list(range(10, 18)))
    assert seen[0] == [14, 15, 16, 17] and len(seen) == 3 and sorted(out) == list(range(10, 18))


def test_constrained_generation_is_always_a_valid_permutation():
    rr = reranker()
    g = torch.Generator().manual_seed(0)
    cands = [[5, 6, 7, 8], [9, 10, 11]]
    texts = rr.generate([[1, 2], [3]], cands, constrained=True, temperature=1.5, generator=g)
    for text, c in zip(texts, cands):
        parsed = parse_ranking(text, len(c))
        assert parsed.valid and sorted(parsed.order) == list(range(len(c)))
    order, parsed = rr.rerank_generate([1, 2], [20, 21, 22])
    assert sorted(order) == [20, 21, 22] and parsed.valid


def test_unconstrained_generation_is_measured_not_trusted():
    """An untrained model writes anything; the parser still returns a complete order and flags it."""
    rr = reranker()
    text = rr.generate([[1]], [[5, 6, 7]], constrained=False)[0]
    parsed = parse_ranking(text, 3)
    assert sorted(parsed.order) == [0, 1, 2]


def test_item_identifiers_name_candidates_by_their_own_tokens():
    """Prompt, answer and parser of the ``items`` identifiers; text backbones refuse them."""
    from types import SimpleNamespace

    import pytest

    from recsys.errors import RecsysError
    from recsys.portable.prompts import answer_text, items_as_letters, listwise_prompt

    rr = reranker(identifiers="items")
    prompt = rr.prompts([[1, 2]], [[7, 3, 9]])[0]
    assert prompt == "history: <i1> <i2> candidates: <i7> <i3> <i9> answer: "
    assert answer_text([2, 0, 1], [7, 3, 9]) == "<i9>\n<i7>\n<i3>\n<eor>"
    assert items_as_letters("<i9>\n<i7>\n<i3>\n<eor>", [7, 3, 9]) == "C\nA\nB\n<eor>"
    parsed = rr.parse("<i9>\n<i50>\n<i9>\n<eor>", [7, 3, 9])            # <i50> is no candidate; <i9> twice
    assert parsed.generated == [2] and parsed.out_of_window == 1 and parsed.duplicate == 1 and parsed.order == [2, 0, 1]
    with pytest.raises(RecsysError, match="tiny"):
        listwise_prompt(SimpleNamespace(name="smollm2-135m"), [1], [2], {1: "a", 2: "b"}, identifiers="items")


def test_item_identifier_first_scores_are_item_logits_minus_the_retriever_prior():
    """FIRST with item identifiers reads each window's own item tokens; the prior subtracts
    beta * ln(1 + position), so a huge beta gives back the retriever's order."""
    import math

    rr = reranker(identifiers="items", retriever_prior=0.7)
    hist, cands = [[1, 2, 3], list(range(4, 30))], [[40, 41, 42], [50, 51, 52, 53, 54]]
    for h, c, s in zip(hist, cands, rr.first_scores(hist, cands)):
        ids = rr.bb.tokenizer(rr.prompts([h], [c]), return_tensors="pt", add_special_tokens=False)["input_ids"]
        logits = rr.bb.model(ids).logits[0, -1]
        want = logits[[rr.bb.token_id(f"<i{i}>") for i in c]] - 0.7 * torch.tensor([math.log1p(j) for j in range(len(c))])
        torch.testing.assert_close(s, want, atol=1e-4, rtol=1e-4)
    rr.retriever_prior = 1e6
    assert rr.rank_windows(hist, cands) == cands


def test_item_identifier_generation_is_a_valid_permutation_of_each_window():
    rr = reranker(identifiers="items")
    g = torch.Generator().manual_seed(0)
    cands = [[5, 6, 7, 8], [9, 10, 11]]                   # different tokens per row, different lengths
    texts = rr.generate([[1, 2], [3]], cands, constrained=True, temperature=1.5, generator=g)
    for text, c in zip(texts, cands):
        parsed = rr.parse(text, c)
        assert parsed.valid and sorted(parsed.order) == list(range(len(c)))
    order, parsed = rr.rerank_generate([1, 2], [20, 21, 22])
    assert sorted(order) == [20, 21, 22] and parsed.valid


def test_generation_follows_the_retriever_prior_like_first():
    """Greedy generation adds the prior at every step: a huge beta writes the retriever's order, and
    with beta 0.7 the first written item is FIRST's top item (the same scores at the first position)."""
    rr = reranker(identifiers="items", retriever_prior=1e6)
    hist, cands = [[1, 2, 3], [4, 5]], [[40, 41, 42, 43], [50, 51, 52]]
    written = []
    assert rr.rank_windows(hist, cands, mode="generate", written=written) == cands
    texts = rr.generate(hist, cands, constrained=True)                # greedy: the same answers
    assert written == [len(rr.parse(t, c).generated) for t, c in zip(texts, cands)]     # items before the end token
    rr.retriever_prior = 0.7
    firsts = [c[int(s.argmax())] for s, c in zip(rr.first_scores(hist, cands), cands)]
    assert [o[0] for o in rr.rank_windows(hist, cands, mode="generate")] == firsts


def test_text_prompts_speak_the_catalogues_domain_and_movielens_keeps_its_words(tiny_dataset):
    from types import SimpleNamespace

    import pytest

    from recsys.errors import RecsysError
    from recsys.portable.prompts import (
        Titles,
        groupwise_prompt,
        item_titles,
        listwise_prompt,
    )

    text_bb = SimpleNamespace(name="smollm2-135m", tokenizer=SimpleNamespace(chat_template=None))
    titles = item_titles(tiny_dataset)                      # the fixture is MovieLens-shaped (RecBole files)
    assert tiny_dataset.domain == "movies" and titles.domain == "movies"
    movie = listwise_prompt(text_bb, [1, 2], [3, 4], titles)
    assert movie.startswith("Movies the user watched, oldest first:\n- ")
    neutral = listwise_prompt(text_bb, [1, 2], [3, 4], dict(titles))
    assert neutral.startswith("Items the user chose, oldest first:") and neutral.split("\n")[1:] == movie.split("\n")[1:]
    shop = groupwise_prompt(text_bb, [1], [3, 4], Titles(titles, "products"))
    assert shop.startswith("Products the user bought, oldest first:")
    with pytest.raises(RecsysError, match="unknown prompt domain 'cars'; known: items, movies, products"):
        Titles(titles, "cars")


def test_the_retriever_prior_by_hand():
    import numpy as np

    from recsys.portable.window import retriever_prior

    assert np.allclose(retriever_prior(3, 1.0), [0.0, -0.6931472, -1.0986123])
    assert retriever_prior(4, 0.0).tolist() == [0.0] * 4 and retriever_prior(2, 2.0).dtype == np.float32
