"""Hybrid item tokens (LLaRA-style soft tokens from the retriever) on a tiny Llama built in code."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.errors import RecsysError
from recsys.llm.backbone import Backbone, build_tiny
from recsys.rerank.hybrid import (
    ITEM_TOKEN,
    HybridFirst,
    compact_prompt,
    encode,
    hybrid_titles,
    text_states,
)

N_ITEMS, D_RETRIEVER = 30, 6


def text_backbone(seed: int = 0, layers: int = 2) -> Backbone:
    """The tiny Llama under the text prompt format (its name is not ``tiny``): titles and ``<item>`` tokens."""
    bb = build_tiny(n_items=N_ITEMS, hidden_size=32, num_layers=layers, seed=seed)
    return Backbone(bb.model, bb.tokenizer, "tiny-text")


def test_titles_are_capped_or_dropped_before_the_soft_token():
    titles = {1: "The Good, the Bad and the Ugly (1966)", 2: "Heat (1995)"}
    assert hybrid_titles(titles, [1, 2], 2) == {1: f"The Good, {ITEM_TOKEN}", 2: f"Heat (1995) {ITEM_TOKEN}"}
    assert hybrid_titles(titles, [1], 0) == {1: ITEM_TOKEN} == hybrid_titles(None, [1], None)


def test_each_soft_token_is_its_items_projected_vector_and_text_is_untouched():
    torch.manual_seed(0)
    vectors = torch.randn(N_ITEMS + 1, D_RETRIEVER)
    model = HybridFirst(text_backbone(), vectors)
    batch = encode(model.backbone, [[3, 4, 5], [9]], [[7, 8], [1, 2]], None, max_history=2)
    # the prompt shows history[-2:] then the window: row 0's placeholders stand for 4, 5, 7, 8 in that order
    slots = batch.input_ids == model.item_token_id
    assert batch.item_idx[0][slots[0]].tolist() == [4, 5, 7, 8] and batch.item_idx[1][slots[1]].tolist() == [9, 1, 2]
    assert (batch.item_idx[~slots] == 0).all() and (batch.attention_mask[:, -1] == 1).all()   # left padded
    emb = model.embed(batch.input_ids, batch.item_idx)
    want = model.projector.mlp(vectors[4])
    assert torch.allclose(emb[0][slots[0]][0], want, atol=1e-6)
    text = model.lm.get_input_embeddings()(batch.input_ids)
    assert torch.equal(emb[~slots], text[~slots])


def test_text_states_are_each_texts_mean_hidden_state_standardised_and_unit_length():
    bb = text_backbone(layers=3)
    texts = ["H E A T 1 9 9 5", "F A R G O", "B A B E 1 9 9 5 : C O M E D Y", "U P"]   # the tiny vocabulary
    got = text_states(bb, texts, layers=2, batch_size=3)       # two batches, padded differently
    raw = []
    with torch.no_grad():
        for t in texts:                                             # one text at a time: no padding at all
            ids = torch.tensor([bb.tokenizer.encode(t, add_special_tokens=False)])
            raw.append(bb.model.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0].mean(0))
    raw = torch.stack(raw)
    want = F.normalize((raw - raw.mean(0)) / (raw.std(0) + 1e-6), dim=-1)
    assert got.shape == (4, 32) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, text_states(bb, texts, layers=3))         # another depth reads differently
    with pytest.raises(RecsysError, match="layers must be in 1..3"):
        text_states(bb, texts, layers=4)


def test_text_states_join_the_retriever_vectors_at_the_projectors_input():
    torch.manual_seed(0)
    vectors = torch.randn(N_ITEMS + 1, D_RETRIEVER)
    texts = [" ".join(f"I T E M {i:02d}") for i in range(1, N_ITEMS + 1)]
    model = HybridFirst(text_backbone(layers=2), vectors, keep_layers=1, item_texts=texts, text_layers=2)
    table = model.projector.items
    assert table.shape == (N_ITEMS + 1, D_RETRIEVER + 32) and torch.equal(table[:, :D_RETRIEVER], vectors)
    assert (table[0, D_RETRIEVER:] == 0).all()                                  # padding row: no text
    # the text part is read with both layers (before keep_layers drops one), scaled to the retriever's norms
    assert torch.allclose(table[1:, D_RETRIEVER:].norm(dim=-1), vectors[1:].norm(dim=-1).mean().expand(N_ITEMS))
    assert len(model._decoder().layers) == 1
    with pytest.raises(RecsysError, match=f"{N_ITEMS} items, 2 texts"):
        HybridFirst(text_backbone(), vectors, item_texts=texts[:2], text_layers=1)


def test_content_soft_tokens_read_the_text_states_and_not_the_retriever():
    torch.manual_seed(0)
    vectors = torch.randn(N_ITEMS + 1, D_RETRIEVER)
    texts = [" ".join(f"I T E M {i:02d}") for i in range(1, N_ITEMS + 1)]
    both = HybridFirst(text_backbone(layers=2), vectors, keep_layers=1, item_texts=texts, text_layers=2)
    text = HybridFirst(text_backbone(layers=2), vectors, keep_layers=1, item_texts=texts, text_layers=2,
                       retriever_input=False)
    assert text.projector.items.shape == (N_ITEMS + 1, 32)
    assert torch.equal(text.projector.items, both.projector.items[:, D_RETRIEVER:])    # the same states, alone
    other = HybridFirst(text_backbone(layers=2), torch.randn(N_ITEMS + 1, D_RETRIEVER) * vectors.norm(dim=-1,
                        keepdim=True) / 1e3, keep_layers=1, item_texts=texts, text_layers=2, retriever_input=False)
    assert not torch.equal(other.projector.items[1:], text.projector.items[1:])  # only their scale is read
    assert torch.allclose(F.normalize(other.projector.items[1:], dim=-1), F.normalize(text.projector.items[1:], dim=-1))
    with pytest.raises(RecsysError, match="needs the items' text states"):
        HybridFirst(text_backbone(), vectors, retriever_input=False)


def test_content_recipe_needs_text_states():
    from pipelines.hybrid import HybridTrainConfig

    with pytest.raises(RecsysError, match="'text' .*needs text_layers.*got 'text' with text_layers None"):
        HybridTrainConfig(soft_token_input="text")
    with pytest.raises(RecsysError, match="soft_token_input must be"):
        HybridTrainConfig(soft_token_input="title", text_layers=2)
    assert HybridTrainConfig(soft_token_input="text", text_layers=2).soft_token_input == "text"


def test_first_scores_equal_the_full_models_last_logits_and_ignore_padding():
    torch.manual_seed(0)
    model = HybridFirst(text_backbone(), torch.randn(N_ITEMS + 1, D_RETRIEVER)).eval()
    ids = model.backbone.identifier_ids(3)
    both = encode(model.backbone, [[3, 4, 5, 6, 7, 8], [9]], [[1, 2, 10], [11, 12, 13]], None)
    alone = encode(model.backbone, [[9]], [[11, 12, 13]], None)
    with torch.no_grad():
        scores = model.first_scores(both, ids)
        full = model.lm(inputs_embeds=model.embed(both.input_ids, both.item_idx), attention_mask=both.attention_mask,
                        position_ids=both.position_ids).logits[:, -1, ids]
        single = model.first_scores(alone, ids)
    assert torch.allclose(scores, full, atol=1e-5)
    assert torch.allclose(scores[1], single[0], atol=1e-5)                    # padding changes nothing


def test_item_scores_read_each_candidates_own_soft_token_and_ignore_padding():
    torch.manual_seed(0)
    model = HybridFirst(text_backbone(), torch.randn(N_ITEMS + 1, D_RETRIEVER)).eval()
    both = encode(model.backbone, [[3, 4, 5, 6, 7, 8], [9]], [[1, 2, 10], [11, 12, 13]], None)
    alone = encode(model.backbone, [[9]], [[11, 12, 13]], None)
    items = torch.tensor([[1, 2, 10], [11, 12, 13]])
    with torch.no_grad():
        scores = model.item_scores(both, items)
        h = model.lm(inputs_embeds=model.embed(both.input_ids, both.item_idx), attention_mask=both.attention_mask,
                     position_ids=both.position_ids, output_hidden_states=True).hidden_states[-1][:, -1]
        want = torch.stack([h[b] @ model.projector(items[b]).T for b in range(2)])
        single = model.item_scores(alone, items[1:])
    assert torch.allclose(scores, want, atol=1e-5) and torch.allclose(scores[1], single[0], atol=1e-5)


def test_history_positions_predict_the_next_history_item_over_the_catalogue():
    torch.manual_seed(0)
    model = HybridFirst(text_backbone(), torch.randn(N_ITEMS + 1, D_RETRIEVER)).eval()
    batch = encode(model.backbone, [[3, 4, 5], [9]], [[7, 8], [1, 2]], None, max_history=3)
    slots = batch.input_ids == model.item_token_id
    # row 0 shows 3, 4, 5 then 7, 8: the slots of 3 and 4 predict 4 and 5; the last history item and the window
    # predict nothing; row 1 has one history item, so nothing
    assert batch.next_item[0][slots[0]].tolist() == [4, 5, 0, 0, 0] and (batch.next_item[1] == 0).all()
    items = torch.tensor([[7, 8], [1, 2]])
    with torch.no_grad():
        window, history = model.window_and_history_scores(batch, items)
        h = model.lm(inputs_embeds=model.embed(batch.input_ids, batch.item_idx), attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, output_hidden_states=True).hidden_states[-1]
        catalogue = model.projector(torch.arange(N_ITEMS + 1))
        at_3 = torch.nonzero(slots[0])[0, 0]
        want = h[0, at_3] @ catalogue[1:].T
    assert torch.allclose(window, model.item_scores(batch, items), atol=1e-5)
    assert history.shape == (2, N_ITEMS + 1) and torch.isinf(history[:, 0]).all()
    assert torch.allclose(history[0, 1:], want, atol=1e-5)
    loss = model.history_loss(history, batch)
    by_hand = -(torch.log_softmax(history[0, 1:], -1)[3] + torch.log_softmax(history[1, 1:], -1)[4]) / 2
    assert torch.allclose(loss, by_hand, atol=1e-5)


def test_compact_prompt_holds_the_same_items_in_a_fraction_of_the_tokens():
    from recsys.portable.prompts import Titles

    torch.manual_seed(0)
    model = HybridFirst(text_backbone(), torch.randn(N_ITEMS + 1, D_RETRIEVER)).eval()
    histories, windows = [[3, 4, 5], [9]], [[7, 8, 1], [1, 2, 6]]
    compact = encode(model.backbone, histories, windows, None, max_history=2, prompt="compact")
    listwise = encode(model.backbone, histories, windows, None, max_history=2)
    for a, b in zip((compact.item_idx, compact.next_item), (listwise.item_idx, listwise.next_item)):
        slots_a, slots_b = compact.input_ids == model.item_token_id, listwise.input_ids == model.item_token_id
        assert [r[m].tolist() for r, m in zip(a, slots_a)] == [r[m].tolist() for r, m in zip(b, slots_b)]
    assert compact.attention_mask.sum() * 2 < listwise.attention_mask.sum()
    # one position per soft token alone; title words sit before their item's soft token, in the domain's words
    text = compact_prompt([3, 4, 5], [7], Titles({4: "A <item>", 5: "<item>", 7: "B C <item>"}, "movies"), 2)
    assert text == "Movies the user watched: A <item><item>\nCandidates: B C <item>\nNext:"
    ids = model.backbone.tokenizer.encode(text.split("\n")[0].split(": ")[1][2:], add_special_tokens=False)
    assert ids == [model.item_token_id] * 2
    with pytest.raises(RecsysError, match="compact"):
        encode(model.backbone, histories, windows, None, prompt="short")
    from pipelines.hybrid import HybridTrainConfig

    with pytest.raises(RecsysError, match="compact.*letters"):
        HybridTrainConfig(prompt="compact", identifiers="letters")


def test_keep_layers_truncates_and_bad_shapes_are_named():
    model = HybridFirst(text_backbone(layers=3), torch.zeros(N_ITEMS + 1, 4), keep_layers=1)
    assert len(model.lm.model.layers) == 1 and model.lm.config.num_hidden_layers == 1
    with pytest.raises(RecsysError, match="keep_layers must be in 1..2"):
        HybridFirst(text_backbone(), torch.zeros(N_ITEMS + 1, 4), keep_layers=5)
    with pytest.raises(RecsysError, match=r"retriever item vectors have 20 rows; the catalog needs 31"):
        HybridFirst(text_backbone(), torch.zeros(20, 4), n_items=N_ITEMS)


def test_lora_trains_adapters_and_projector_only_and_the_soft_tokens_carry_the_answer():
    """Eight prompts whose text is identical (no titles, the same history): only their soft tokens differ, so
    fitting their different targets is possible only through the projected retriever vectors. With the LM
    frozen behind LoRA, FIRST-loss training fits them (chance is 1/4); the retriever's vectors stay frozen."""
    torch.manual_seed(0)
    vectors = torch.randn(N_ITEMS + 1, D_RETRIEVER)
    model = HybridFirst(text_backbone(), vectors).lora(r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.mlp") for n in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = model.backbone.identifier_ids(4)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randperm(N_ITEMS, generator=g)[:4].add(1).tolist() for _ in range(8)]
    targets = torch.randint(0, 4, (8,), generator=g)
    batch = encode(model.backbone, [[1, 2]] * 8, windows, None)
    text = batch.input_ids.clone()
    assert (text == text[0]).all()                                              # the same tokens in every row
    losses = []
    for _ in range(200):       # at lr 1e-2 the loss spikes on some CPU kinds and a row stays unfitted
        loss = F.cross_entropy(model.first_scores(batch, ids), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        scores = model.first_scores(batch, ids)
    fitted = (scores.argmax(-1) == targets).float().mean().item()
    # identical text can at best predict one letter for all rows (3 of 8 here); every row fitted, and the loss
    # well under chance (ln 4 = 1.386), means the soft tokens carried each row's answer
    assert fitted == 1.0 and F.cross_entropy(scores, targets).item() < 1.0, losses[::10]
    assert torch.equal(model.projector.items, vectors)


@pytest.fixture(scope="module")
def hybrid_setup(tmp_path_factory):
    """The fixture dataset, a SASRec retriever trained for one epoch, its candidates at each user's last 3
    training items, and a tiny Llama saved as a local checkpoint (the stand-in for a pretrained LM)."""
    from pipelines.retrieval import candidates
    from pipelines.train import SASRecTrainConfig, train_sasrec
    from recsys.data import prepare, read_dataset
    from recsys.models import SASRecConfig
    from tests.conftest import FIXTURES

    root = tmp_path_factory.mktemp("hybrid")
    ds = prepare(read_dataset(FIXTURES / "tiny"), root / "data")
    sasrec = train_sasrec(ds, root / "sasrec", SASRecTrainConfig(model=SASRecConfig(hidden_size=8, max_len=20),
                                                                 max_epochs=1), progress=False)
    candidates(ds, "sasrec", root / "cands", n=10, sasrec=root / "sasrec", train_targets_per_user=3)
    bb = build_tiny(n_items=ds.n_items, hidden_size=32, num_layers=2, seed=7)
    bb.model.save_pretrained(root / "lm")
    bb.tokenizer.save_pretrained(root / "lm")
    return ds, sasrec, root


def test_hybrid_job_trains_saves_and_reloads_the_same_scorer(hybrid_setup, tmp_path):
    from pipelines.fusion import lm_logits
    from pipelines.hybrid import (
        HybridTrainConfig,
        Window,
        load_hybrid,
        train_hybrid,
        window_scores,
    )
    from recsys.data.candidates import read_candidate_lists
    from recsys.portable.features import requests_from_candidates

    ds, sasrec, root = hybrid_setup
    config = HybridTrainConfig(retriever=str(sasrec), backbone=str(root / "lm"), keep_layers=1, window=10,
                               max_history=10, examples_per_epoch=32, batch_size=4, val_users=20, max_epochs=2,
                               max_minutes=None, history_lm_weight=1.0, text_layers=2)
    model_dir = train_hybrid(ds, root / "cands", tmp_path / "run", config, progress=False)
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    logged = next((tmp_path / "run" / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/history_lm_loss" in logged                        # the next-item loss trained alongside
    assert summary["epochs"] == 2 and 0.0 <= summary["best_val_cand_ndcg@10"] <= 1.0
    model, loaded_config = load_hybrid(model_dir, ds)
    assert loaded_config == config and len(model._decoder().layers) == 1
    requests = requests_from_candidates(ds, read_candidate_lists(ds, root / "cands", "test")[:3])
    with torch.no_grad():
        direct = window_scores(model, [Window(list(r.history[-10:]), [int(c) for c in r.candidates], -1)
                                       for r in requests], None, config).numpy()
    logits = lm_logits(ds, model_dir, requests, window=10)
    assert logits.shape == (3, 10) and np.allclose(logits, direct, atol=1e-5)
    assert not np.allclose(logits[:, 0], logits[:, 1])
    # Windows of 4 over the top 6 ([0, 4) then [2, 6)); the last 4 candidates are not shown to the LM.
    part = lm_logits(ds, model_dir, requests, window=4, depth=6)
    with torch.no_grad():
        second = window_scores(model, [Window(list(r.history[-10:]), [int(c) for c in r.candidates[2:6]], -1)
                                       for r in requests], None, config).numpy()
    assert np.allclose(part[:, 4:6], second[:, 2:], atol=1e-5)
    assert np.allclose(part[:, 6:], part[:, :6].min(1, keepdims=True))
    # ... and as the fusion reranker's LM feature, end to end: trained, saved, reloaded, evaluated
    from pipelines.fusion import (
        FusionTrainConfig,
        evaluate_fusion,
        train_fusion_reranker,
    )
    from recsys.rerank.fusion import FusionConfig, FusionRanker

    fusion = FusionTrainConfig(features=("retriever",), lm=str(model_dir), lm_depth=4, depth=10,
                               scorer=FusionConfig(epochs=2))
    train_fusion_reranker(ds, root / "cands", tmp_path / "fusion", fusion, log=lambda _: None)
    assert FusionRanker.from_pretrained(tmp_path / "fusion" / "model").names[-1] == "lm_logit"
    got = evaluate_fusion(ds, tmp_path / "fusion" / "model", root / "cands", "test", ["ndcg@10"])
    assert 0.0 <= got["reranked"]["ndcg@10"] <= 1.0


def test_scratch_control_has_the_architecture_but_not_the_weights(hybrid_setup):
    from pipelines.hybrid import HybridTrainConfig, build_model

    ds, sasrec, root = hybrid_setup
    base = {"retriever": str(sasrec), "backbone": str(root / "lm"), "keep_layers": 2}
    pretrained = build_model(HybridTrainConfig(**base), ds)
    scratch = build_model(HybridTrainConfig(**base, pretrained=False), ds)
    a, b = pretrained.lm.state_dict(), scratch.lm.state_dict()
    assert a.keys() == b.keys()
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert a[weight].shape == b[weight].shape and not torch.equal(a[weight], b[weight])


def test_hybrid_job_names_a_retriever_of_another_catalogue(hybrid_setup, tmp_path):
    from pipelines.hybrid import HybridTrainConfig, build_model
    from recsys.models import SASRec, SASRecConfig

    ds, _, root = hybrid_setup
    SASRec(SASRecConfig(n_items=ds.n_items + 5, hidden_size=8, max_len=20)).save_pretrained(tmp_path / "other")
    with pytest.raises(RecsysError, match=rf"{ds.n_items + 5} item embeddings, but dataset .* has {ds.n_items} items"):
        build_model(HybridTrainConfig(retriever=str(tmp_path / "other"), backbone=str(root / "lm")), ds)
    with pytest.raises(RecsysError, match="needs retriever"):
        build_model(HybridTrainConfig(backbone=str(root / "lm")), ds)


def test_a_window_without_its_held_out_item_gets_it_inserted_or_is_skipped():
    from pipelines.hybrid import HybridTrainConfig, windows
    from recsys.types import CandidateList

    rows = [CandidateList("a", 0, np.array([1, 2, 3]), np.array([5, 6, 7, 8]), np.zeros(4, np.float32), 6),
            CandidateList("b", 1, np.array([2, 3]), np.array([9, 10, 11, 12]), np.zeros(4, np.float32), 4)]
    inserted = windows(rows, HybridTrainConfig(window=4), 20, seed=0, random_share=0.0)
    assert [sorted(w.candidates) for w in inserted] == [[5, 6, 7, 8], [4, 9, 10, 11]]      # 4 replaces the last
    assert [w.candidates[w.target] for w in inserted] == [6, 4] and inserted[1].history == [2, 3]
    skipped = windows(rows, HybridTrainConfig(window=4, target_missing="skip"), 20, seed=0, random_share=0.0)
    assert [sorted(w.candidates) for w in skipped] == [[5, 6, 7, 8]]
    with pytest.raises(RecsysError, match="target_missing"):
        HybridTrainConfig(target_missing="drop")
