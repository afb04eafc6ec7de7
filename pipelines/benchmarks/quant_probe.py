"""Which weight quantisation of an exported FIRST scorer is faster than fp32 here, and what it moves.

    python -m pipelines.benchmarks.quant_probe --serve artifacts/serve-bench2/serve-smollm2 \\
        --data artifacts/quickstart-s11/data/ml-1m --users 12 \\
        --model-config artifacts/serve-bench2/smollm2-zero-shot/model/config.json

Takes a serving directory written by ``recsys export`` (``first.onnx``, fp32) and writes quantised copies
into ``--out``: ONNX Runtime's dynamic int8 (per tensor, per channel, and with the MLP down-projections
and optionally the attention output projections left in fp32, where SmolLM2's activation outliers sit) and
``MatMulNBits`` block-wise 8- and 4-bit weights with int8 compute (``accuracy_level`` 4). Each variant
scores the same prompts (the first ``--users`` test users, their SASRec top-``window`` from the exported
encoder), one prompt per call with ``--threads`` intra-op threads, after one warm-up call. Reported per
variant: milliseconds per prompt (fp32 timed in the same run), the largest and mean absolute change of the
window's scores, how often the top-1 candidate agrees with fp32, the mean Spearman correlation of the
scores, and what it does to the ranking: NDCG@10 of the held-out item in the reordered window, with the
paired change from fp32 on the same users and its standard error (and SASRec's own window order for
reference). The windows exclude each user's history, as the library's evaluation does. Also the dense FLOPs of one prompt for a Llama-architecture model (from its ``config.json`` in the
``--model-config``) and the rate fp32 achieved: a scorer at most of the CPU's peak cannot be
made much faster in fp32 by any runtime. Writes ``results/quant_probe.json`` (``--result`` names another).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipelines.benchmarks.common import Provenance, llama_gflop, write_result

VARIANTS = ("int8", "int8-per-channel", "int8-fp32-down", "int8-fp32-down-o", "nbits8", "nbits4")


def excluded_matmuls(names: list[str], keep_fp32: tuple[str, ...]) -> list[str]:
    """MatMul node names to leave in fp32: per decoder layer the exporter names its seven projections
    ``node_linear_{7l + j}`` in the order q, k, v, o, gate, up, down (j = 0..6)."""
    slot = {"o": 3, "down": 6}
    wanted = {slot[k] for k in keep_fp32}

    def index(name: str) -> int:
        return 0 if name == "node_linear" else int(name.removeprefix("node_linear_"))

    return [n for n in names if n.startswith("node_linear") and index(n) % 7 in wanted]


def quantise(src: Path, dst: Path, variant: str) -> None:
    """Write the ``variant`` of the fp32 graph ``src`` to ``dst``."""
    import onnx

    if variant.startswith("int8"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
        keep = ("down", "o") if variant.endswith("down-o") else ("down",) if variant.endswith("down") else ()
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=variant == "int8-per-channel",
                         nodes_to_exclude=excluded_matmuls(names, keep), extra_options={"MatMulConstBOnly": True})
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=int(variant[-1]), block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def window_ndcg10(windows: np.ndarray, scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(U,) NDCG@10 of each user's held-out item when the (U, W) candidate ``windows`` are ordered by
    ``scores`` (descending, ties in window order); a target outside the window or below rank 10 scores 0.
    One relevant item, so NDCG@10 = 1 / log2(rank + 2) for a 0-based rank < 10."""
    ranked = np.take_along_axis(windows, np.argsort(-scores, 1, kind="stable"), 1)[:, :10]
    hit = ranked == targets[:, None]
    rank = hit.argmax(1)
    return np.where(hit.any(1), 1.0 / np.log2(rank + 2.0), 0.0)


def ndcg_change(ndcg: np.ndarray, ref: np.ndarray) -> dict:
    """A variant's mean NDCG@10 and its paired change from fp32 on the same users, with the change's
    standard error (std of the per-user differences / sqrt(U))."""
    diff = ndcg - ref
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"ndcg@10": float(ndcg.mean()), "ndcg@10_change": float(diff.mean()), "ndcg@10_change_se": se}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", required=True, help="a serving directory with first.onnx (recsys export)")
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--model-config", help="the exported model's config.json (RUN/model/config.json): adds its FLOPs")
    p.add_argument("--out", default="artifacts/quant-probe")
    p.add_argument("--result", default="quant_probe", help="results/<name>.json (quant_probe or quant_probe_*)")
    a = p.parse_args()
    if a.result != "quant_probe" and not a.result.startswith("quant_probe_"):
        raise SystemExit(f"--result {a.result!r}: expected quant_probe or quant_probe_<name>")
    provenance = Provenance("pipelines.benchmarks.quant_probe")

    import onnxruntime as ort

    from recsys.data import PreparedDataset
    from serving.runtime import FirstRuntime, SASRecRuntime

    serve, out = Path(a.serve), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    first, sas = FirstRuntime(serve), SASRecRuntime(serve)
    test = PreparedDataset.load(a.data).eval_examples("test")
    hists, targets = test.histories[:a.users], np.array([int(t[0]) for t in test.targets[:a.users]])
    scores = sas.user_vectors(hists) @ sas.items.T
    for row, (h, t) in enumerate(zip(hists, targets)):
        h = np.asarray(h, dtype=np.int64)
        scores[row, h[h != t]] = -np.inf                  # history excluded, never the target (the library's rule)
    scores[:, 0] = -np.inf
    windows = np.argsort(-scores, 1, kind="stable")[:, :first.window]
    feeds = [first.encode([h], [w]) for h, w in zip(hists, windows)]
    tokens = float(np.mean([f["input_ids"].shape[1] for f in feeds]))

    def run(path: Path) -> tuple[np.ndarray, float]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds[0])
        t = time.perf_counter()
        got = np.concatenate([sess.run(None, f)[0][:, :first.window] for f in feeds])
        return got, (time.perf_counter() - t) / len(feeds) * 1000

    ref, fp32_ms = run(serve / first.meta["file"])
    ref_ndcg = window_ndcg10(windows, ref, targets)
    rows = [{"variant": "fp32", "ms_per_prompt": fp32_ms, "ndcg@10": float(ref_ndcg.mean())}]
    for variant in a.variants:
        path = out / f"first.{variant}.onnx"
        t = time.perf_counter()
        quantise(serve / first.meta["file"], path, variant)
        got, ms = run(path)
        change = np.abs(got - ref)
        rows.append({"variant": variant, "quantise_s": time.perf_counter() - t, "ms_per_prompt": ms,
                     "speedup_vs_fp32": fp32_ms / ms, "max_abs_change": float(change.max()),
                     "mean_abs_change": float(change.mean()),
                     "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                     "spearman": float(np.mean([spearman(x, y) for x, y in zip(got, ref)]))}
                    | ndcg_change(window_ndcg10(windows, got, targets), ref_ndcg))
        print(json.dumps(rows[-1]), flush=True)
    flops = None
    if a.model_config:
        gflop = llama_gflop(json.loads(Path(a.model_config).read_text()), tokens)
        flops = {"gflop_per_prompt": gflop, "fp32_gflop_per_s": gflop / (fp32_ms / 1000)}
    write_result(a.result, provenance, {
        "serve": str(serve), "prompts": len(feeds), "mean_prompt_tokens": tokens, "threads": a.threads,
        "sasrec_window_ndcg@10": float(window_ndcg10(windows, -np.arange(windows.shape[1])[None].repeat(len(windows), 0),
                                                     targets).mean()),
        "fp32_flops": flops, "rows": rows})


if __name__ == "__main__":
    main()
