"""SASRec training throughput against this machine's fp32 matrix-multiply roofline, measured in one run.

    python -m pipelines.benchmarks.sasrec_throughput                      # ML-1M, the ml1m recipe
    python -m pipelines.benchmarks.sasrec_throughput --data artifacts/data/ml-1m --threads 1 2

For each thread count: the roofline (GFLOP/s of a 2048^3 fp32 matrix product, the best of torch and ONNX
Runtime, :func:`common.fp32_gemm_gflop_per_s`), then ``--steps`` optimiser steps of the recipe's SASRec
(``pipelines/configs/sasrec_ml1m.yaml``: AdamW, batch 32, the training loop's length-bucketed batches of the
real data) with the loss computed two ways: ``plain`` (``cross_entropy`` over the whole positions x items
logit matrix) and ``chunked`` (:func:`recsys.models.sasrec.chunked_softmax_ce`, the recipe's default). Both
start from the same weights and see the same batches and dropout masks.

Rows ``sasrec-train-{plain,chunked}-t{threads}``: samples/s, ms per step, model GFLOP/s (the matrix
products of a step, counted from its batch shapes: output logits 6 P d N, each block 36 B T d^2 for its
projections and feed-forward and 12 B T^2 d for attention, forward and backward) and that as a fraction of
the roofline; ``ratios`` gives chunked / plain samples/s per thread count.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from pipelines.benchmarks.common import Provenance, fp32_gemm_gflop_per_s, write_result

ROOT = Path(__file__).resolve().parents[2]


def step_gflop(batch: dict, d: int, n_items: int, layers: int) -> float:
    """Matrix-product GFLOP of one training step (forward + backward = 3x forward) of a SASRec batch."""
    B, T = batch["input_ids"].shape
    P = int((batch["labels"] != 0).sum())
    return (6 * P * d * n_items + layers * (36 * B * T * d * d + 12 * B * T * T * d)) / 1e9


def measure(dataset, config: dict, chunk: int, threads: int, steps: int, seed: int = 0) -> dict:
    import torch

    from pipelines.sasrec import SequenceDataModule
    from recsys.models.sasrec import SASRec, SASRecConfig

    torch.set_num_threads(threads)
    model_config = SASRecConfig(n_items=dataset.n_items, ce_chunk=chunk, **config["model"])
    torch.manual_seed(seed)
    model = SASRec(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.98))
    data = SequenceDataModule(dataset, model_config.max_len, config["batch_size"], seed)
    batches = list(itertools.islice(iter(data.train_dataloader()), steps + 3))
    torch.manual_seed(seed + 1)                                       # the same dropout masks in every variant

    def step(batch):
        loss = model.loss(batch["input_ids"], batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in batches[:3]:                                         # warm-up: allocator, threads
        step(batch)
    t = time.perf_counter()
    for batch in batches[3:]:
        step(batch)
    seconds = time.perf_counter() - t
    gflop = sum(step_gflop(b, model_config.hidden_size, dataset.n_items, model_config.num_layers) for b in batches[3:])
    samples = sum(len(b["input_ids"]) for b in batches[3:])
    return {"samples_per_s": round(samples / seconds, 1), "step_ms": round(1000 * seconds / steps, 1),
            "gflop_per_s": round(gflop / seconds, 1), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="a prepared dataset (default: ML-1M, fetched and prepared under "
                                       "artifacts/data/ml-1m)")
    parser.add_argument("--config", default=str(ROOT / "pipelines" / "configs" / "sasrec_ml1m.yaml"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60, help="timed optimiser steps per row")
    parser.add_argument("--result", default="sasrec_throughput", help="name of the result file under results/")
    args = parser.parse_args(argv)
    provenance = Provenance("pipelines.benchmarks.sasrec_throughput")
    import yaml

    from recsys.data import PrepareConfig, PreparedDataset, load_dataset, prepare

    data_dir = Path(args.data or "artifacts/data/ml-1m")
    dataset = (PreparedDataset.load(data_dir) if (data_dir / "manifest.json").exists()
               else prepare(load_dataset("ml-1m"), data_dir, PrepareConfig()))
    config = yaml.safe_load(Path(args.config).read_text())
    rows, ratios = [], {}
    for threads in args.threads:
        roof = fp32_gemm_gflop_per_s(threads)
        roofline = max(roof["torch"], roof["onnx"])
        for name, chunk in (("plain", 0), ("chunked", 256)):
            t = time.perf_counter()
            m = measure(dataset, config, chunk, threads, args.steps)
            m |= {"roofline_gflop_per_s": round(roofline, 1), "roofline_fraction": round(m["gflop_per_s"] / roofline, 3)}
            rows.append({"name": f"sasrec-train-{name}-t{threads}", "metrics": m,
                         "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
        ratios[f"chunked/plain t{threads}"] = round(rows[-1]["metrics"]["samples_per_s"]
                                                    / rows[-2]["metrics"]["samples_per_s"], 2)
    path = write_result(args.result, provenance, {"dataset": str(data_dir), "recipe": Path(args.config).name,
                                                  "rows": rows, "ratios": ratios})
    print(f"sasrec_throughput: wrote {path}; ratios {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
