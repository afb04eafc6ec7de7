import numpy as np
import pytest
import torch

from recsys.errors import RecsysError
from recsys.models import Popularity, SASRec, SASRecConfig, load_model, recommend


def tiny_model(**kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=30, max_len=8, hidden_size=16, num_layers=2, num_heads=2, **kw)).eval()


def test_shapes_and_padding_column():
    m = tiny_model()
    ids = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    assert m(ids).shape == (2, 4, 16)
    scores = m.score([np.array([3, 4]), np.array([1, 2, 3, 4])])
    assert scores.shape == (2, 31) and torch.isinf(scores[:, 0]).all()


def test_scores_do_not_depend_on_batch_padding():
    """The same history alone or next to a longer one (more left padding) scores the same."""
    m = tiny_model()
    alone = m.score([np.array([5, 6, 7])])
    padded = m.score([np.array([5, 6, 7]), np.array([1, 2, 3, 4, 5, 6, 7, 8])])[:1]
    torch.testing.assert_close(alone, padded, rtol=0, atol=1e-5)


def test_causal_future_does_not_change_the_past():
    m = tiny_model()
    a = m(torch.tensor([[1, 2, 3, 4]]))
    b = m(torch.tensor([[1, 2, 3, 9]]))
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_long_history_keeps_the_most_recent_items():
    m = tiny_model()
    long = np.arange(1, 21)                                   # 20 items, max_len 8
    torch.testing.assert_close(m.score([long]), m.score([long[-8:]]))
    with pytest.raises(RecsysError, match="exceeds max_len"):
        m(torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize("loss", ["ce", "sampled"])
def test_loss_decreases_on_a_fixed_batch(loss):
    m = tiny_model(loss=loss, num_negatives=8).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ids, labels = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    first = m.loss(ids, labels).item()
    for _ in range(30):
        opt.zero_grad()
        m.loss(ids, labels).backward()
        opt.step()
    assert m.loss(ids, labels).item() < 0.5 * first


def test_padding_targets_give_no_gradient_to_unseen_items():
    """Only real targets enter the loss: item 30, never a target or input, gets no gradient (CE aside)."""
    m = tiny_model(loss="sampled", num_negatives=1, dropout=0.0).train()
    torch.manual_seed(1)
    m.loss(torch.tensor([[0, 0, 1, 2]]), torch.tensor([[0, 0, 2, 3]])).backward()
    assert m.item_emb.weight.grad[0].abs().sum() == 0         # the padding row never learns


def test_save_and_load_round_trip(tmp_path):
    m = tiny_model()
    m.dataset_fingerprint = "abc"
    m.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, SASRec) and loaded.dataset_fingerprint == "abc" and loaded.config == m.config
    hist = [np.array([1, 2, 3])]
    torch.testing.assert_close(loaded.score(hist), m.score(hist))


def test_load_model_errors(tmp_path):
    with pytest.raises(RecsysError, match="not a saved model"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert4rec"}')
    with pytest.raises(RecsysError, match="unknown model_type 'bert4rec'; known: popularity, sasrec"):
        load_model(tmp_path)


def test_config_validation():
    with pytest.raises(RecsysError, match="loss must be"):
        SASRecConfig(n_items=3, loss="bpr")
    with pytest.raises(RecsysError, match="not divisible"):
        SASRecConfig(n_items=3, hidden_size=10, num_heads=3)


def test_recommend_excludes_history_and_returns_ids(tmp_path):
    pop = Popularity(np.array([0, 5, 9, 1, 7]))
    ids = ["a", "b", "c", "d"]
    out = recommend(pop, [2], k=10, item_ids=ids)
    assert out.item_ids == ["d", "a", "c"]                    # b (idx 2) was seen; only 3 items remain
    assert [i.score for i in out.items] == [7.0, 5.0, 1.0]
    pop.save_pretrained(tmp_path / "p")
    assert load_model(tmp_path / "p").counts.tolist() == [0, 5, 9, 1, 7]


def test_last_only_user_vector_equals_the_full_forward():
    """The fast path (final block queries only the last position) is the slow reference's last row."""
    torch.manual_seed(0)
    m = SASRec(SASRecConfig(n_items=30, max_len=12, hidden_size=16, num_layers=3, num_heads=2)).eval()
    ids = torch.randint(1, 31, (5, 12))
    ids[0, :9] = 0
    ids[1, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(m.user_embeddings(ids), m(ids)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 256, 10_000])
def test_chunked_softmax_ce_equals_cross_entropy_and_its_gradients(chunk):
    import torch.nn.functional as F

    from recsys.models.sasrec import chunked_softmax_ce

    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (50,), generator=g)
    want = F.cross_entropy(h @ w.T, y)
    want_grads = torch.autograd.grad(want * 3.0, (h, w))              # an upstream gradient other than 1
    got = chunked_softmax_ce(h, w, y, chunk)
    got_grads = torch.autograd.grad(got * 3.0, (h, w))
    assert torch.allclose(got, want, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_sasrec_training_loss_is_the_same_with_and_without_chunks():
    """The model's CE loss and every parameter gradient agree with ce_chunk on and off (same dropout masks)."""
    from recsys.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    fused = SASRec(SASRecConfig(n_items=40, max_len=12, hidden_size=16, ce_chunk=5)).train()
    plain = SASRec(SASRecConfig(n_items=40, max_len=12, hidden_size=16, ce_chunk=0)).train()
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(1, 41, (4, 12))
    ids[0, :6] = 0
    labels = torch.roll(ids, -1, 1) * (ids != 0)
    losses = []
    for model in (fused, plain):
        torch.manual_seed(1)
        loss = model.loss(ids, labels)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_data_parallel_shards_are_disjoint_complete_and_equally_long():
    from pipelines.callbacks import EpochShuffle, ShardedBatches, shard_batches
    from pipelines.sasrec import LengthBucketSampler

    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]                   # 5 batches over 2 processes
    assert shard_batches(batches, 0, 2) == [[0, 1], [4, 5], [8]]           # the 5th batch is split between them
    assert shard_batches(batches, 1, 2) == [[2, 3], [6, 7], [9]]
    assert shard_batches(batches, 0, 1) == batches
    # fewer leftover items than processes: one each onto the last batch of the first ranks, equal counts
    three = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert [shard_batches(three, r, 4) for r in range(4)] == [[[0, 1, 8]], [[2, 3]], [[4, 5]], [[6, 7]]]
    # fewer items than processes in all: some process would have no step while the others wait for it
    assert [shard_batches([[0, 1]], r, 2) for r in range(2)] == [[[0]], [[1]]]
    with pytest.raises(RecsysError, match="an epoch of 1 example.* cannot give each of 2 processes a step"):
        shard_batches([[0]], 1, 2)
    # the reranker's epochs of shuffled examples, cut into batches and shared the same way
    sampler = EpochShuffle(11, seed=0, per_epoch=11)
    parts = [ShardedBatches(sampler, 3, r, 2) for r in range(2)]
    assert sorted(i for p in parts for b in p for i in b) == list(range(11))          # disjoint and complete
    assert [len(p) for p in parts] == [len(list(p)) for p in parts] == [2, 2]
    lengths = np.random.default_rng(0).integers(2, 50, size=103)
    shards = [list(LengthBucketSampler(lengths, 8, seed=3, rank=r, world_size=3)) for r in range(3)]
    seen = [i for shard in shards for b in shard for i in b]
    assert sorted(seen) == list(range(103))                                # every sequence once
    assert {len(s) for s in shards} == {len(LengthBucketSampler(lengths, 8, 3, 0, 3))} == {5}   # 13 batches / 3


def test_lightning_sets_the_epoch_of_both_batch_samplers_and_the_batches_follow_it():
    """Lightning calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler`` before
    each epoch, possibly after it created the iterator (on resume): both batch samplers must be reached that way
    and draw their batches at the first one."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    from pipelines.callbacks import EpochShuffle, ShardedBatches
    from pipelines.sasrec import LengthBucketSampler

    for batches in (LengthBucketSampler(np.arange(2, 50), 4, seed=0), ShardedBatches(EpochShuffle(48, seed=0), 4)):
        loader = DataLoader(range(48), batch_sampler=batches)
        early = iter(loader)                                  # created before the epoch is set, as on resume
        _set_sampler_epoch(loader, 3)
        third = [b.tolist() for b in early]
        _set_sampler_epoch(loader, 0)
        first = [b.tolist() for b in loader]
        assert third != first and third == [b.tolist() for b in (_set_sampler_epoch(loader, 3) or loader)]
