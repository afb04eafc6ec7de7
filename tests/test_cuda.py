"""CUDA paths against their CPU references (skipped without a GPU; ``python -m pipelines.benchmarks.gpu_check``
runs them on a lent GPU and records the counts)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matrix products in full fp32 (no TF32), so CUDA and CPU differ by reduction order only."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _sasrec():
    from recsys.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=500, max_len=50, hidden_size=32, num_layers=2, num_heads=2)).eval()


def _histories():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 501, (6, 50), generator=g)
    ids[0, :45] = 0                                                        # left padding, as the runtime pads
    ids[1, :20] = 0
    return ids


def test_sasrec_user_vectors_on_cuda_match_cpu():
    model, ids = _sasrec(), _histories()
    with torch.no_grad():
        cpu = model.user_embeddings(ids)
        gpu = model.cuda().user_embeddings(ids.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4), (cpu - gpu).abs().max()


def test_sasrec_bf16_training_step_on_cuda_is_finite_and_close_to_fp32():
    model, ids = _sasrec().train().cuda(), _histories().cuda()
    labels = torch.roll(ids, -1, dims=1) * (ids != 0)
    torch.manual_seed(0)
    fp32 = model.loss(ids, labels)
    torch.manual_seed(0)                                                   # the same dropout masks
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model.loss(ids, labels)
    bf16.backward()
    assert torch.isfinite(bf16) and abs(float(bf16) - float(fp32)) / float(fp32) < 0.02
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_is_fast_on_cuda_and_lightning_picks_it():
    from recsys.precision import bf16_is_fast, lightning_precision

    assert bf16_is_fast("cuda") == torch.cuda.is_bf16_supported()
    assert lightning_precision("auto", "cuda") == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")


def test_first_scores_of_the_tiny_reranker_on_cuda_match_cpu():
    from recsys.llm.backbone import build_tiny

    bb = build_tiny(n_items=40, hidden_size=32, num_layers=2)
    model = bb.model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(bb.tokenizer), (3, 30), generator=g)
    with torch.no_grad():
        cpu = model(input_ids=ids).logits[:, -1]
        gpu = model.cuda()(input_ids=ids.cuda()).logits[:, -1].cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4), (cpu - gpu).abs().max()


def test_exact_topk_on_cuda_matches_the_cpu_reference():
    from recsys.retrieval.index import brute_force_topk

    rng = np.random.default_rng(0)
    items, queries = rng.standard_normal((5000, 16), dtype=np.float32), rng.standard_normal((8, 16), dtype=np.float32)
    _, expected = brute_force_topk(queries, items, 20)
    scores = torch.from_numpy(queries).cuda() @ torch.from_numpy(items).cuda().T
    got = torch.topk(scores, 20, dim=1).indices.cpu().numpy()
    assert (got == expected).mean() > 0.99                                 # ties aside, the same items in order
