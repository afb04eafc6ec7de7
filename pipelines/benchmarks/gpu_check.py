"""The GPU check: every CUDA path of the project, run once on one GPU in a few minutes, with a labelled result.

    python -m pipelines.benchmarks.gpu_check                 # writes results/gpu_check.json on a CUDA machine
    python -m pipelines.benchmarks.gpu_check --quick         # fewer timed steps (a smoke run)

Sections (each a row ``{name, metrics, seconds}``, or ``{name, skipped: reason}`` when what it needs is absent,
so a partial environment still yields a result that says what it did not check):

- ``cuda-tests``: the suite's ``cuda``-marked tests (``pytest -m cuda``), counts and failures.
- ``sasrec-train-{cpu,cuda-fp32,cuda-bf16}``: training samples/s of the ML-1M SASRec recipe's architecture
  (``pipelines/configs/sasrec_ml1m.yaml``: 3,706 items, d = 64, 2 blocks, 200 positions, full-softmax CE) on
  synthetic sequences of full length, batch 32 as in the recipe and 256 on the GPU; the CPU row is the same
  machine's CPU in the same run, so the ratio is a ratio of one run.
- ``retrieval-{faiss-cpu-flat,torch-cuda-exact,faiss-gpu-flat}``: exact inner-product top-100 over 1M vectors of
  d = 64 for 1,024 queries; recall@100 of each against FAISS's CPU Flat index (the reference), and queries/s.
- ``onnx-{sasrec,first-tiny}-{cpu,cuda}``: the exported graphs (``serving.export``) run by ONNX Runtime's CPU and
  CUDA providers: max abs difference from eager torch and ms per batch of 1 and 32.
- ``smollm2-sft-step-bf16``: one SFT step (forward, LM loss over the vocabulary, backward, AdamW) of the
  SmolLM2-135M architecture under bf16 autocast, 8 examples of 64 and of 600 tokens; the weights are the real
  ones when ``$RECSYS_HOME/models/smollm2-135m`` exists there, else random (the step costs the same; the row says
  which).

On a machine without CUDA it prints one line naming what it skipped and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, topk_overlap, write_result

SECTIONS = ("cuda-tests", "sasrec-train", "retrieval", "onnx", "smollm2-sft-step-bf16")
REPO = Path(__file__).resolve().parents[2]
# SmolLM2-135M's architecture (its config.json), for a step with random weights when the real ones are absent.
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def _timed(fn, warmup: int, repeats: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` (CUDA work synchronised)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _train_step(loss_fn, opt, device: str, bf16: bool) -> float:
    """One optimiser step on ``loss_fn()`` under bf16 autocast when ``bf16``; returns the loss."""
    import torch

    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def cuda_tests() -> list[dict]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_cuda.py"]
    t = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", "\n".join(tail))}
    return [{"name": "cuda-tests", "metrics": {"returncode": run.returncode, **counts}, "output_tail": tail,
             "command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t, 1)}]


def sasrec_train(quick: bool) -> list[dict]:
    import torch

    from recsys.models.sasrec import SASRec, SASRecConfig

    config = SASRecConfig(n_items=3706, max_len=200, hidden_size=64, num_layers=2, num_heads=1, dropout=0.2)
    rows = []
    setups = [("cpu", "fp32", 32), ("cuda", "fp32", 32), ("cuda", "bf16", 32), ("cuda", "fp32", 256),
              ("cuda", "bf16", 256)]
    for device, precision, batch in setups:
        t = time.perf_counter()
        torch.manual_seed(0)
        model = SASRec(config).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        seq = torch.randint(1, config.n_items + 1, (batch, config.max_len + 1), generator=g).to(device)
        step = partial(_train_step, partial(model.loss, seq[:, :-1], seq[:, 1:]), opt, device, precision == "bf16")
        cuda = device == "cuda"
        seconds = _timed(step, 3 if cuda else 1, (5 if quick else 30) if cuda else (3 if quick else 8), cuda)
        rows.append({"name": f"sasrec-train-{device}-{precision}-b{batch}",
                     "metrics": {"samples_per_s": round(batch / seconds, 1), "step_ms": round(1000 * seconds, 2),
                                 "batch": batch, "threads": torch.get_num_threads() if not cuda else None},
                     "seconds": round(time.perf_counter() - t, 1)})
    cpu = rows[0]["metrics"]["samples_per_s"]
    for row in rows[1:]:
        row["metrics"]["speedup_vs_cpu_b32"] = round(row["metrics"]["samples_per_s"] / cpu, 2)
    return rows


def retrieval(quick: bool) -> list[dict]:
    import torch

    n, d, q, k = (200_000 if quick else 1_000_000), 64, 1024, 100
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    rows = []
    try:
        import faiss
    except ImportError as e:
        return [{"name": "retrieval", "skipped": f"faiss is not importable ({e})"}]
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(vectors)
    seconds = _timed(lambda: flat.search(queries, k), 1, 3, False)
    reference = flat.search(queries, k)[1]
    rows.append({"name": "retrieval-faiss-cpu-flat", "metrics": {"recall@100": 1.0, "qps": round(q / seconds),
                 "n": n, "threads": faiss.omp_get_max_threads()}, "seconds": round(time.perf_counter() - t, 1)})

    t = time.perf_counter()
    x, qq = torch.from_numpy(vectors).cuda(), torch.from_numpy(queries).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False                  # exact fp32, comparable with FAISS's CPU scores
    seconds = _timed(lambda: torch.topk(qq @ x.T, k, dim=1), 2, 10, True)
    found = torch.topk(qq @ x.T, k, dim=1).indices.cpu().numpy()
    rows.append({"name": "retrieval-torch-cuda-exact", "metrics": {"recall@100": round(topk_overlap(found, reference), 4),
                 "qps": round(q / seconds), "qps_vs_faiss_cpu": round(seconds and (q / seconds) / rows[0]["metrics"]["qps"], 1)},
                 "seconds": round(time.perf_counter() - t, 1)})

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not gpus:
        rows.append({"name": "retrieval-faiss-gpu-flat", "skipped":
                     f"this faiss build ({faiss.__version__}) sees no GPU: faiss-gpu is not installed here"})
        return rows
    t = time.perf_counter()
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, flat)
    seconds = _timed(lambda: gpu.search(queries, k), 1, 5, False)
    found = gpu.search(queries, k)[1]
    rows.append({"name": "retrieval-faiss-gpu-flat", "metrics": {"recall@100": round(topk_overlap(found, reference), 4),
                 "qps": round(q / seconds), "qps_vs_faiss_cpu": round((q / seconds) / rows[0]["metrics"]["qps"], 1)},
                 "seconds": round(time.perf_counter() - t, 1)})
    return rows


def _export_models(root: Path) -> dict[str, tuple[Path, dict]]:
    """A SASRec of the ML-1M recipe's shape and a tiny FIRST reranker, random weights, exported with the
    project's exporter; returns name -> (graph, feeds of batch 32)."""
    import torch

    from recsys.llm.backbone import build_tiny
    from recsys.models.sasrec import SASRec, SASRecConfig
    from serving.export import export_first, export_sasrec

    torch.manual_seed(0)
    SASRec(SASRecConfig(n_items=3706, max_len=200, hidden_size=64), "synthetic").save_pretrained(root / "sas")
    bb = build_tiny(n_items=3706, hidden_size=128, num_layers=2)
    bb.model.save_pretrained(root / "rr")
    bb.tokenizer.save_pretrained(root / "rr")
    (root / "rr" / "reranker.json").write_text(json.dumps({
        "kind": "listwise", "prompt": "tiny", "window": 20, "group_size": 20, "max_history": 50,
        "dataset_fingerprint": "synthetic"}))
    out = root / "serve"
    out.mkdir()
    export_sasrec(root / "sas", out)
    export_first(root / "rr", out)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 3707, (32, 200)).astype(np.int64)
    prompt = rng.integers(50, len(bb.tokenizer), (32, 80)).astype(np.int64)
    mask = np.ones_like(prompt)
    return {"sasrec": (out / "sasrec.onnx", {"input_ids": ids}),
            "first-tiny": (out / "first.onnx", {"input_ids": prompt, "attention_mask": mask,
                                               "position_ids": np.tile(np.arange(80), (32, 1))})}


def onnx(quick: bool) -> list[dict]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = _export_models(Path(tmp))
        for name, (path, feeds) in graphs.items():
            outputs = {}
            for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
                label = f"onnx-{name}-{'cuda' if provider.startswith('CUDA') else 'cpu'}"
                if provider not in available:
                    rows.append({"name": label, "skipped": f"onnxruntime {ort.__version__} has no {provider} "
                                 f"(available: {', '.join(available)}); onnxruntime-gpu is the package that has it"})
                    continue
                t = time.perf_counter()
                sess = ort.InferenceSession(str(path), providers=[provider])
                one = {k: v[:1] for k, v in feeds.items()}
                ms1 = 1000 * _timed(partial(sess.run, None, one), 3, 10 if quick else 50, False)
                ms32 = 1000 * _timed(partial(sess.run, None, feeds), 2, 5 if quick else 20, False)
                outputs[provider] = sess.run(None, feeds)[0]
                rows.append({"name": label, "metrics": {"ms_batch1": round(ms1, 3), "ms_batch32": round(ms32, 3),
                             "providers": sess.get_providers()}, "seconds": round(time.perf_counter() - t, 1)})
            if len(outputs) == 2:
                rows[-1]["metrics"]["max_abs_diff_vs_cpu"] = float(np.abs(
                    outputs["CUDAExecutionProvider"] - outputs["CPUExecutionProvider"]).max())
                rows[-1]["metrics"]["speedup_vs_cpu_b32"] = round(rows[-2]["metrics"]["ms_batch32"]
                                                                  / rows[-1]["metrics"]["ms_batch32"], 2)
    return rows


def smollm2_step(quick: bool) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from recsys.paths import recsys_home

    local = recsys_home() / "models" / "smollm2-135m"
    if (local / "config.json").exists():
        model, weights = LlamaForCausalLM.from_pretrained(local, dtype=torch.float32), "SmolLM2-135M-Instruct"
    else:
        torch.manual_seed(0)
        model, weights = LlamaForCausalLM(LlamaConfig(**SMOLLM2)), "random (SmolLM2-135M architecture)"
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    for tokens in (64, 600):
        t = time.perf_counter()
        ids = torch.randint(0, model.config.vocab_size, (8, tokens), device="cuda")
        step = partial(_train_step, partial(_lm_loss, model, ids), opt, "cuda", True)
        torch.cuda.reset_peak_memory_stats()
        seconds = _timed(step, 2, 3 if quick else 10, True)
        loss = float(step())
        rows.append({"name": f"smollm2-sft-step-bf16-8x{tokens}", "weights": weights,
                     "metrics": {"step_ms": round(1000 * seconds, 1), "examples_per_s": round(8 / seconds, 1),
                                 "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                 "loss_finite": bool(np.isfinite(loss))},
                     "seconds": round(time.perf_counter() - t, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions and a smaller index")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--result", default="gpu_check", help="name of the result file under results/")
    args = parser.parse_args(argv)
    provenance = Provenance("pipelines.benchmarks.gpu_check")
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); skipped {', '.join(args.only)}; "
              "nothing written")
        return 0
    run = {"cuda-tests": lambda: cuda_tests(), "sasrec-train": lambda: sasrec_train(args.quick),
           "retrieval": lambda: retrieval(args.quick), "onnx": lambda: onnx(args.quick),
           "smollm2-sft-step-bf16": lambda: smollm2_step(args.quick)}
    rows, t0 = [], time.perf_counter()
    for section in args.only:
        t = time.perf_counter()
        try:
            rows += run[section]()
        except Exception as e:                                   # noqa: BLE001 - one section's failure is a row
            rows.append({"name": section, "error": f"{type(e).__name__}: {e}"})
        print(f"gpu_check: {section} done in {time.perf_counter() - t:.0f} s", flush=True)
    import onnxruntime as ort

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
           "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
           "cpu_threads": torch.get_num_threads(), "quick": args.quick}
    try:
        import faiss

        env["faiss"] = f"{faiss.__version__}, GPUs seen: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}"
    except ImportError:
        env["faiss"] = None
    path = write_result(args.result, provenance, {"environment": env, "rows": rows,
                                                  "seconds": round(time.perf_counter() - t0, 1)})
    print(f"gpu_check: wrote {path} ({len(rows)} rows)")
    for row in rows:
        print(json.dumps(row)[:300])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
