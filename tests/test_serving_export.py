"""ONNX export: parity with eager torch, manifest, and the torch-free runtime reading it."""

import json

import numpy as np
import pytest
import torch


def sasrec_and_tiny_reranker(dataset, tmp_path, name: str, seed: int, **meta):
    """A 1-layer SASRec at ``tmp_path/sas`` and a random tiny reranker at ``tmp_path/name`` with a
    ``reranker.json`` of window / group size 6 (``meta`` overrides); returns the reranker's backbone."""
    from recsys.llm.backbone import build_tiny
    from recsys.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    SASRec(SASRecConfig(n_items=dataset.n_items, max_len=12, hidden_size=16, num_layers=1),
           dataset.fingerprint).save_pretrained(tmp_path / "sas")
    bb = build_tiny(n_items=dataset.n_items, hidden_size=32, num_layers=1, seed=seed)
    bb.model.save_pretrained(tmp_path / name)
    bb.tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / name / "reranker.json").write_text(json.dumps({
        "kind": "listwise", "prompt": "tiny", "window": 6, "group_size": 6, "max_history": 10,
        "dataset_fingerprint": dataset.fingerprint} | meta))
    return bb


def test_export_writes_a_manifest_with_hashes_and_parity(exported):
    from serving.export import TOLERANCE, sha256

    out, _, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("sasrec", "first"):
        entry = manifest["models"][name]
        assert entry["sha256"] == sha256(out / entry["file"]) and entry["parity_max_abs"] <= TOLERANCE
        assert (out / entry["int8"]["file"]).exists() and entry["int8"]["max_abs_change"] >= 0
    assert manifest["opset"] >= 17 and (out / "catalog.parquet").exists()
    # attention became ONNX Runtime's fused MultiHeadAttention in both graphs (parity above holds after it)
    assert manifest["models"]["sasrec"]["ort_fusions"].get("sdpa_via_mha", 0) == 2, manifest["models"]["sasrec"]
    assert manifest["models"]["first"]["ort_fusions"], manifest["models"]["first"]


def test_runtime_user_vectors_and_first_scores_match_torch(exported, tiny_dataset):
    """Histories of different lengths (padded by the runtime) give torch's user vectors; FIRST scores from
    the ONNX graph equal the eager reranker's on the same prompts."""
    from recsys.llm.backbone import load_backbone
    from recsys.rerank.listwise import ListwiseReranker
    from serving.runtime import FirstRuntime, SASRecRuntime

    out, sas, rr_dir = exported
    histories = [np.array([3, 4, 5]), np.arange(1, 30) % tiny_dataset.n_items + 1, np.array([7])]
    sas.eval()
    got = SASRecRuntime(out).user_vectors(histories)
    with torch.no_grad():
        want = sas.user_embeddings(sas.pad_histories(histories)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    alone = np.stack([SASRecRuntime(out).user_vectors([h])[0] for h in histories])   # each padded to itself
    np.testing.assert_allclose(alone, want, atol=1e-4)

    windows = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [2, 4, 6, 8, 10, 12, 14, 16]]
    got = FirstRuntime(out).scores(histories, windows)
    eager = ListwiseReranker(load_backbone(rr_dir), None, 8, max_history=10, bf16=False)
    eager.bb.name = "tiny"
    want = torch.stack(eager.first_scores(histories, windows)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_batch_of_histories_runs_in_groups_of_similar_length_with_the_same_vectors(exported):
    """With m = max_len (12 here): histories of 3, m + 5 (its last m read), m / 2, 2, m - 1 and m items run as
    three graph calls padded to m, m / 2 and 3 (each history at least 2/3 of its group's longest), equal to
    each history run alone."""
    from serving.runtime import SASRecRuntime

    sas = SASRecRuntime(exported[0])
    m = sas.max_len
    assert m >= 10
    histories = [list(range(1, n + 1)) for n in (3, m + 5, m // 2, 2, m - 1, m)]
    widths, run = [], sas.session.run

    class Recording:
        def run(self, names, feeds):
            widths.append(feeds["input_ids"].shape[1])
            return run(names, feeds)

    alone = np.stack([sas.user_vectors([h])[0] for h in histories])
    sas.session = Recording()
    got = sas.user_vectors(histories)
    assert sorted(widths) == [3, m // 2, m]
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_known_users_read_their_precomputed_vector_and_any_other_history_runs_sasrec(exported):
    """Every stored history's table vector is the one the SASRec graph gives that history alone; a request
    for a known user ranks as the same history sent explicitly; a prefix of it (a replay) or a history
    under another user's id is not looked up."""
    from serving.runtime import Recommender, RecommendQuery

    out, _, _ = exported
    rec = Recommender(out)
    users = list(rec.users.histories)
    assert rec.users.table.shape == (len(users), rec.sasrec.items.shape[1]) and len(users) > 5
    for u in users:
        np.testing.assert_array_equal(rec.users.table[rec.users.vectors[u]],
                                      rec.sasrec.user_vectors([rec.users.histories[u]])[0])
    calls = []
    run = rec.sasrec.user_vectors
    rec.sasrec.user_vectors = lambda hs: calls.append(len(hs)) or run(hs)
    u, v = users[0], users[1]
    known = RecommendQuery(list(rec.users.histories[u]), k=5, user_id=u)
    assert rec.retrieve([known]) == rec.retrieve([RecommendQuery(list(rec.users.histories[u]), k=5)])
    assert calls == [1]                                         # only the explicit history ran the graph
    prefix = RecommendQuery(list(rec.users.histories[u][:-1]), k=5, user_id=u)
    other = RecommendQuery(list(rec.users.histories[v]), k=5, user_id=u)
    mixed = rec.user_vectors([known, prefix, other])
    assert calls == [1, 2]                                      # the prefix and the mismatched id, together
    np.testing.assert_array_equal(mixed[0], rec.users.table[rec.users.vectors[u]])
    np.testing.assert_array_equal(mixed[1:], run([prefix.history, other.history]))


def test_int8_quality_rows_score_both_graphs_like_the_library(exported, tiny_dataset):
    """The serving benchmark's int8 rows: fp32 SASRec matches the library's full-ranking evaluation."""
    from pipelines.benchmarks.serving import int8_quality
    from recsys.evaluation import evaluate_full_ranking

    out, sas, _ = exported
    q = int8_quality(tiny_dataset, out, users=10_000, first_batch=5)
    test = tiny_dataset.eval_examples("test")
    assert q["users"] == len(test.users) and set(q) == {"users", "sasrec", "first"}

    class FP32:                       # the library scores in bf16; the exported graph is fp32
        n_items = sas.n_items

        @staticmethod
        @torch.no_grad()
        def score(histories):
            s = sas.eval().user_embeddings(sas.pad_histories(histories)) @ sas.item_emb.weight.T
            return s.index_fill(1, torch.tensor([0]), -torch.inf)

    library = evaluate_full_ranking(FP32, test, ["ndcg@10", "hr@10", "hr@8"], progress=False)
    assert abs(q["sasrec"]["fp32"]["ndcg@10"] - library["ndcg@10"]) < 1e-6
    assert q["sasrec"]["fp32"]["hr@10"] == library["hr@10"]
    for scorer in ("sasrec", "first"):
        for graph in ("fp32", "int8"):
            assert 0 <= q[scorer][graph]["ndcg@10"] <= q[scorer][graph]["hr@10"] <= 1
    # FIRST only reorders SASRec's top window of 8: all of it lies in the top 10, so its HR@10 is SASRec's HR@8
    assert q["first"]["fp32"]["hr@10"] == q["first"]["int8"]["hr@10"] == library["hr@8"]


BLOCKER = """
import sys
for name in ('torch', 'transformers', 'lightning', 'pytorch_lightning'):
    sys.modules[name] = None     # as if not installed: importing raises ImportError, find_spec returns None
"""


def torch_free(code: str):
    """Run ``code`` in a fresh interpreter where importing torch, transformers or lightning fails; returns
    what it printed last, parsed as JSON."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_runtime_app_and_rescore_serve_without_torch(exported):
    """Where torch, transformers and lightning cannot be imported, the app, batch jobs and the CLI that starts
    them (``recsys serve`` / ``rescore``) import, and the exported SASRec + FIRST deployment answers (the serve
    image installs none of them)."""
    out, _, _ = exported
    got = torch_free(f"""
import json, serving.app, serving.rescore
from pipelines.cli import build_parser
build_parser()
from serving.runtime import Recommender, RecommendQuery
rec = Recommender({str(out)!r})
print(json.dumps(rec.recommend_batch([RecommendQuery([3, 4, 5], k=5, candidates=8)])[0]))""")
    assert got["reranked"] and len(got["items"]) == 5


def test_the_word_level_lookup_encodes_as_the_tokenizer_does_and_hands_it_what_it_cannot(exported, tmp_path):
    """The tiny reranker's prompts are encoded by dict lookup (:class:`serving.runtime.WordSplitVocab`) to
    the ids ``tokenizers`` gives; texts with newlines, tabs or added tokens inside words go to the
    tokenizer; a tokenizer of another shape (BPE) gets no lookup at all."""
    from tokenizers import Tokenizer, models

    from recsys.portable.prompts import listwise_prompt
    from serving.runtime import FirstRuntime, WordSplitVocab, _PromptSpec

    runtime = FirstRuntime(exported[0])
    assert runtime.words is not None
    rng = np.random.default_rng(0)
    prompts = [listwise_prompt(_PromptSpec("tiny"), rng.integers(1, 30, n).tolist(), rng.permutation(30)[:8] + 1,
                               max_history=10) for n in (1, 5, 40)]
    odd = ["A\n<i3>", "tab\tsep", "  two  spaces ", "x<eor>", "<eor> <pad>", "never-seen-word", "", "\u00a0<i3>"]
    want = [e.ids for e in runtime.tokenizer.encode_batch(prompts + odd, add_special_tokens=False)]
    assert runtime.token_ids(prompts + odd) == want
    assert all(runtime.words.encode(t) is not None for t in prompts + ["  two  spaces ", "never-seen-word"])
    assert [runtime.words.encode(t) for t in ("A\n<i3>", "tab\tsep", "x<eor>", "\u00a0<i3>")] == [None] * 4

    Tokenizer(models.BPE()).save(str(tmp_path / "bpe.json"))
    assert WordSplitVocab.from_file(tmp_path / "bpe.json") is None


def test_length_bucketed_sub_batches_rank_like_one_batch(exported):
    """recommend_batch / rerank_batch in sub-batches sorted by history length return, in input order,
    what one batch returns (scores to float tolerance: padding differs between the two)."""
    from serving.runtime import Recommender, RecommendQuery

    out, _, _ = exported
    rec = Recommender(out)
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, rec.n_items + 1, size=n).tolist() for n in (9, 1, 4, 12, 2, 7, 3)]
    queries = [RecommendQuery(h, k=5, candidates=8) for h in histories]
    whole, parts = rec.recommend_batch(queries, batch_size=100), rec.recommend_batch(queries, batch_size=2)
    for a, b in zip(whole, parts):
        assert a["items"] == b["items"] and a["reranked"] == b["reranked"]
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
    cands = [[c for c in range(1, 9)]] * len(histories)
    whole, parts = rec.rerank_batch(queries, cands, 5, batch_size=100), rec.rerank_batch(queries, cands, 5, 3)
    assert [a["items"] for a in whole] == [b["items"] for b in parts]


@pytest.mark.parametrize("layout", ["token", "item", "item+ids"])
def test_generative_export_beam_search_in_numpy_matches_torch(tmp_path, layout):
    """The exported next-token step passes its parity check, and the torch-free numpy beam search over it
    returns torch's items and scores: history excluded, extra bans propagated up the trie, and every item
    when the width covers the catalog (scores then a distribution over the unbanned items)."""
    from recsys.generative.decoding import decode
    from recsys.generative.model import GenerativeConfig, GenerativeRecommender
    from serving.export import TOLERANCE, export_generative
    from serving.runtime import GenerativeRuntime

    rng = np.random.default_rng(0)
    codes = np.stack([rng.permutation(30) // 8, rng.permutation(30) % 4, np.zeros(30, np.int64)], 1)
    codes[:, 2] = [sum((codes[:i, :2] == codes[i, :2]).all(1)) for i in range(30)]          # de-duplication level
    config = GenerativeConfig(hidden_size=32, num_layers=1, num_heads=2, max_items=6, value_layers=0,
                              layout=layout.removesuffix("+ids"), item_embeddings=layout.endswith("+ids"))
    model = GenerativeRecommender.build(codes, np.arange(1, 31), config, seed=0).eval()
    model.save_pretrained(tmp_path / "gen")
    out = tmp_path / "serve"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"version": "test", "files": {},
                                                   "models": {"generative": export_generative(tmp_path / "gen", out)}}))
    entry = json.loads((out / "manifest.json").read_text())["models"]["generative"]
    assert entry["parity_max_abs"] <= TOLERANCE
    if layout != "token":                          # item layout: encoder once per history + code-head graph
        assert entry["head"]["parity_max_abs"] <= TOLERANCE and (out / entry["head"]["file"]).exists()

    runtime = GenerativeRuntime(out)
    histories, extra = [[3, 7, 1], [12], list(range(1, 9))], [[2, 5], [], [20, 21, 22, 23, 24, 25]]
    exclude = torch.zeros(3, 31, dtype=torch.bool)
    for b, (h, e) in enumerate(zip(histories, extra)):
        exclude[b, h + e] = True
    items, scores = runtime.recommend(histories, k=5, beam=8, exclude=[h + e for h, e in zip(histories, extra)])
    with torch.no_grad():
        want = decode(model, histories, 8, exclude=exclude)
    assert items.tolist() == want.items[:, :5].tolist()
    np.testing.assert_allclose(scores, want.scores[:, :5].numpy(), atol=1e-4)
    for row, (h, e) in zip(items.tolist(), zip(histories, extra)):
        assert not set(row) & set(h + e)

    every, logp = runtime.recommend([[3, 7, 1]], k=30)                               # history excluded by default
    assert sorted(every[0][np.isfinite(logp[0])].tolist()) == sorted(set(range(1, 31)) - {1, 3, 7})
    # scores are the model's likelihoods, not renormalised over the unbanned items: with the history's
    # own mass (torch, nothing banned) they make up the whole distribution
    with torch.no_grad():
        full = decode(model, [[3, 7, 1]], 30)
    history_mass = sum(float(np.exp(s)) for i, s in zip(full.items[0].tolist(), full.scores[0].tolist()) if i in (1, 3, 7))
    total = np.exp(logp[0][np.isfinite(logp[0])].astype(np.float64)).sum() + history_mass
    assert abs(total - 1.0) < 1e-4 and history_mass > 0


def test_terminated_run_options_stop_the_reranker(exported):
    """RunOptions reach ONNX Runtime through Recommender.rerank_windows: with ``terminate`` set the call
    fails instead of scoring, and the same call with fresh options scores (how the API stops a late
    reranker, tests/test_serving_api.py)."""
    from serving.runtime import Recommender, run_options

    rec = Recommender(exported[0])
    histories, candidates = [[3, 4, 5]], [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    stop = run_options()
    stop.terminate = True
    with pytest.raises(Exception, match="(?i)terminat"):
        rec.rerank_windows(histories, candidates, stop)
    items, scores = rec.rerank_windows(histories, candidates, run_options())[0]
    assert sorted(items) == candidates[0] and scores == sorted(scores, reverse=True)


def test_groupwise_export_scores_match_the_eager_scorer_and_rerank_when_alone(tiny_dataset, tmp_path):
    """The exported digit step passes parity; the runtime's expected digits (greedy digits written for
    earlier candidates) equal GroupwiseReranker.sample at temperature 0; a deployment with only the
    groupwise model reranks with it."""
    from recsys.rerank.groupwise import GroupwiseReranker
    from serving.export import TOLERANCE, export
    from serving.runtime import GroupwiseRuntime, Recommender, RecommendQuery

    bb = sasrec_and_tiny_reranker(tiny_dataset, tmp_path, "gw", seed=3, kind="groupwise")
    out = export(tiny_dataset, tmp_path / "sas", tmp_path / "serve", groupwise_dir=tmp_path / "gw")
    entry = json.loads((out / "manifest.json").read_text())["models"]["groupwise"]
    assert entry["parity_max_abs"] <= TOLERANCE and entry["group_size"] == 6

    histories = [[3, 4, 5], [7], list(range(1, 14))]
    groups = [[1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14], [2, 4, 6, 8, 10, 12]]
    got = GroupwiseRuntime(out).scores(histories, groups)
    bb.model.eval()
    _, _, _, want = GroupwiseReranker(bb, None, 6, max_history=10).sample(histories, groups, temperature=0.0)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    assert got.std() > 0                                     # a random model does not score everything alike
    alone = torch_free(f"from serving.runtime import GroupwiseRuntime; import json; "
                       f"print(json.dumps(GroupwiseRuntime({str(out)!r}).scores({histories}, {groups}).tolist()))")
    np.testing.assert_allclose(alone, got, atol=1e-6)

    rec = Recommender(out)
    assert rec.first is None and rec.reranker is rec.groupwise
    result = rec.recommend_batch([RecommendQuery(histories[0], k=6, candidates=6)])[0]
    assert result["reranked"] and sorted(result["items"]) == sorted(rec.retrieve([RecommendQuery(histories[0], k=6,
                                                                                                 candidates=6)])[0][0])


def test_text_prompt_reranker_is_served_with_the_titles_it_was_trained_on(exported, tiny_dataset, tmp_path):
    """A text-prompt (SmolLM2-style) listwise reranker: the export freezes the item titles beside the
    scorer and the runtime's prompts and scores equal the eager reranker's with the dataset's titles
    (a tiny stand-in model with the text template; tests download nothing)."""
    import json

    from recsys.llm.backbone import load_backbone
    from recsys.portable.prompts import item_titles
    from recsys.rerank.listwise import ListwiseReranker
    from serving.export import export
    from serving.runtime import FirstRuntime

    _, _, rr_dir = exported
    meta = json.loads((rr_dir / "reranker.json").read_text()) | {"prompt": "text", "domain": "products"}
    (rr_dir / "reranker.json").write_text(json.dumps(meta))
    tokenizer_config = json.loads((rr_dir / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHATML                     # as SmolLM2's: the prompt is wrapped in it
    (rr_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    out = export(tiny_dataset, tmp_path / "sas", tmp_path / "serve-text", rr_dir)
    assert json.loads((out / "titles.json").read_text())["3"] == item_titles(tiny_dataset)[3]
    assert json.loads((out / "manifest.json").read_text())["models"]["first"]["domain"] == "products"
    histories, windows = [np.array([3, 4, 5]), np.array([7])], [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    runtime = FirstRuntime(out)
    # the trained model's domain (a recipe's override of MovieLens's "movies") is the one served
    eager = ListwiseReranker(load_backbone(rr_dir), item_titles(tiny_dataset, "products"), 8, max_history=10,
                             bf16=False)
    assert eager.bb.name != "tiny" and runtime.spec.name == "text"
    assert eager.bb.tokenizer.chat_template == CHATML and runtime.spec.tokenizer.chat_template == CHATML
    want = torch.stack(eager.first_scores(histories, windows)).numpy()
    np.testing.assert_allclose(runtime.scores(histories, windows), want, atol=1e-4)
    lists = [h.tolist() for h in histories]
    alone = torch_free(f"from serving.runtime import FirstRuntime; import json, numpy as np; print(json.dumps("
                       f"FirstRuntime({str(out)!r}).scores([np.array(h) for h in {lists}], {windows}).tolist()))")
    np.testing.assert_allclose(alone, want, atol=1e-4)


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_template_renders_as_transformers_does(tmp_path):
    """The runtime's jinja2 rendering of a saved tokenizer's chat template equals transformers'
    ``apply_chat_template``, with and without a system turn, with the special tokens in scope."""
    from transformers import AutoTokenizer

    from recsys.llm.backbone import build_tiny
    from serving.runtime import ChatTemplate

    tokenizer = build_tiny(n_items=5).tokenizer
    tokenizer.chat_template = "{{ bos_token }}" + CHATML
    tokenizer.save_pretrained(tmp_path)
    ours, theirs = ChatTemplate.load(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for messages in ([{"role": "user", "content": "rank A, B"}],
                     [{"role": "system", "content": "You rank."}, {"role": "user", "content": "A\nB"}]):
        for generation in (True, False):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation) == want
    assert tokenizer.bos_token in ours.apply_chat_template([{"role": "user", "content": "x"}])
    assert ChatTemplate.load(tmp_path / "nothing-here").chat_template is None


def test_item_identifier_reranker_is_served_with_its_retriever_prior(tiny_dataset, tmp_path):
    """An item-identifier FIRST scorer exports every token's logit; the runtime reads each window's
    own item tokens and subtracts the same retriever prior as the eager scorer."""
    from recsys.rerank.listwise import ListwiseReranker
    from serving.export import export
    from serving.runtime import FirstRuntime

    bb = sasrec_and_tiny_reranker(tiny_dataset, tmp_path, "rr", seed=5, identifiers="items", retriever_prior=0.3)
    out = export(tiny_dataset, tmp_path / "sas", tmp_path / "serve", tmp_path / "rr")
    entry = json.loads((out / "manifest.json").read_text())["models"]["first"]
    assert entry["identifiers"] == "items" and entry["retriever_prior"] == 0.3

    histories, windows = [[3, 4, 5], list(range(1, 14))], [[1, 2, 3, 4, 5, 6], [12, 4, 9, 7, 2, 11]]
    got = FirstRuntime(out).scores(histories, windows)
    bb.model.eval()
    want = ListwiseReranker(bb, None, 6, max_history=10, bf16=False, identifiers="items",
                            retriever_prior=0.3).first_scores(histories, windows)
    np.testing.assert_allclose(got, torch.stack(want).numpy(), atol=1e-4)


def test_a_changed_or_missing_artifact_stops_loading_and_names_the_file(exported):
    """Every exported file is in the manifest with its SHA-256 (the graphs' external weights too) and is checked
    at load: half of sasrec.onnx.data overwritten, or the catalog gone, is an error naming the file, not a
    server answering something else under the same model_version."""
    from recsys.errors import RecsysError
    from serving.runtime import Recommender, read_manifest, verify_files

    out, _, _ = exported
    files = read_manifest(out).files
    assert {"sasrec.onnx", "sasrec.onnx.data", "items.npy", "first.onnx", "catalog.parquet",
            "histories.parquet", "tokenizer/tokenizer.json"} <= set(files)
    assert verify_files(out, read_manifest(out)) == len(files)
    data = out / "sasrec.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:] = bytes(len(raw) - len(raw) // 2)
    data.write_bytes(bytes(raw))
    with pytest.raises(RecsysError, match=r"sasrec\.onnx\.data: SHA-256 .* differs from manifest\.json"):
        Recommender(out)
    (out / "catalog.parquet").unlink()
    with pytest.raises(RecsysError, match=r"catalog\.parquet: listed in manifest\.json but missing"):
        verify_files(out, read_manifest(out))
    (out / "manifest.json").write_text('{"truncated": ')
    with pytest.raises(RecsysError, match=r"manifest\.json: not valid JSON"):
        Recommender(out)


def test_a_manifest_with_a_missing_or_unknown_field_is_refused_naming_it(exported):
    """The runtime reads manifest.json as typed records: a field it needs, missing, or one it does not know,
    is an error naming the file and the field, before any graph is loaded; the JSON form round-trips."""
    from recsys.errors import RecsysError
    from recsys.types import ExportManifest
    from serving.runtime import Recommender

    out, _, _ = exported
    raw = json.loads((out / "manifest.json").read_text())
    manifest = ExportManifest.from_dict(raw)
    assert manifest.to_dict() == raw and manifest.models["first"].identifiers == raw["models"]["first"]["identifiers"]
    cases = [(lambda m: m["models"]["first"].pop("window"), r"models\.first lacks window"),
             (lambda m: m["models"]["sasrec"].update(colour="red"), r"models\.sasrec has unknown field\(s\) colour"),
             (lambda m: m.pop("files"), r"the manifest lacks files"),
             (lambda m: m.update(models=[]), r"models must be an object")]
    for damage, message in cases:
        broken = json.loads(json.dumps(raw))
        damage(broken)
        (out / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(RecsysError, match=rf"manifest\.json: {message}.*recsys export"):
            Recommender(out)


def test_the_serve_image_requirements_cover_every_library_the_runtime_imports(exported):
    """What the app, rescore and the CLI import while serving an exported deployment comes from distributions
    pinned in docker/requirements-serve.txt (the serve image installs the package itself with --no-deps)."""
    from importlib.metadata import packages_distributions
    from pathlib import Path

    out, _, _ = exported
    loaded = torch_free(f"""
import json, sys, serving.app, serving.rescore
from pipelines.cli import build_parser
build_parser()
from serving.runtime import Recommender, RecommendQuery
Recommender({str(out)!r}).recommend_batch([RecommendQuery([3, 4, 5], k=5, candidates=8)])
print(json.dumps(sorted({{m.split(".")[0] for m, v in sys.modules.items() if v is not None}})))""")
    requirements = Path(__file__).resolve().parents[1] / "docker" / "requirements-serve.txt"
    pinned = {line.split("==")[0].strip().lower().replace("_", "-") for line in requirements.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    owners = packages_distributions()
    needed = {d.lower().replace("_", "-") for m in loaded for d in owners.get(m, [])} - {"recsys"}
    # imported by the pinned libraries themselves (their own dependencies, installed with them)
    transitive = {"annotated-types", "anyio", "click", "h11", "idna", "markupsafe", "pydantic-core", "sniffio",
                  "starlette", "typing-extensions", "typing-inspection", "packaging", "flatbuffers", "protobuf",
                  "sympy", "mpmath", "coloredlogs", "humanfriendly", "huggingface-hub", "fsspec", "filelock",
                  "requests", "urllib3", "charset-normalizer", "certifi", "hf-xet", "annotated-doc", "setuptools",
                  "pyyaml", "ml-dtypes", "polars-runtime-32", "opentelemetry-api", "importlib-metadata", "zipp"}
    assert needed - pinned - transitive == set()


def test_the_benchmarks_are_neither_in_the_wheel_nor_in_the_image_context():
    """``python -m pipelines.benchmarks.NAME`` runs from a checkout; the wheel and the images leave it out."""
    import tomllib
    from pathlib import Path

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    found = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(root, include=found["include"], exclude=found.get("exclude", ())))
    assert {"recsys", "pipelines", "serving"} <= shipped and not any("benchmarks" in p for p in shipped)
    assert "pipelines/benchmarks" in (root / ".dockerignore").read_text().split()


def test_no_serving_module_but_export_reaches_torch_even_through_a_lazy_or_type_only_import():
    """Static: every import statement (top level, inside functions, under TYPE_CHECKING) of the serving modules
    and of the project modules they reach (with the packages whose ``__init__`` runs on the way), followed
    transitively; none names torch, transformers or lightning."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imported(module: str) -> list[str]:
        path = root.joinpath(*module.split("."))
        path = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
        if not path.exists():
            return []
        out = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append(node.module)                   # and each name, which may be a submodule
                out += [f"{node.module}.{a.name}" for a in node.names if node.module.split(".")[0] in ("recsys",
                                                                                                       "serving")]
        return out

    for start in ("serving.runtime", "serving.app", "serving.rescore", "serving.schemas"):
        seen, todo = set(), [(start, start)]
        while todo:
            module, via = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            for name in imported(module):
                assert name.split(".")[0] not in ("torch", "transformers", "lightning"), f"{via} -> {name}"
                if name.split(".")[0] in ("recsys", "serving") and name != "serving.export":
                    parts = name.split(".")          # importing a.b.c runs a/__init__ and a/b/__init__ first
                    todo += [(".".join(parts[:k]), f"{via} -> {name}") for k in range(1, len(parts) + 1)]
