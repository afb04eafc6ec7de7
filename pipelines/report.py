"""``recsys report ARTIFACTS``: a Markdown + HTML report of a quickstart artifacts directory.

What it holds: the test metrics of every model against the popularity and SASRec baselines and the
published anchor, NDCG@K / HR@K curves, the RL reward curves read from the Lightning CSV logs, a
latency histogram measured now on the exported ONNX serving directory (single requests, this
machine), the seconds of every quickstart stage, and the configuration of every trained model.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from recsys.errors import RecsysError

ANCHORS = {"SASRec, ML-1M full ranking (generative-recommenders README)": {"hr@10": 0.2853, "ndcg@10": 0.1603}}
KS = (1, 5, 10, 20)


def _runs_dir(artifacts: Path, summary: dict) -> Path:
    return artifacts / "runs" / f"{summary['preset']}-seed{summary['seed']}"


def reward_curves(runs: Path) -> dict[str, list[tuple[int, float]]]:
    """Mean reward per step of every RL run under ``runs`` (from its CSV logs)."""
    import polars as pl

    curves = {}
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        frames = [pl.read_csv(f) for f in sorted(run.glob("logs/version_*/metrics.csv"))]
        frames = [f for f in frames if "train/reward" in f.columns]
        if frames:
            df = pl.concat(frames, how="diagonal_relaxed").filter(pl.col("train/reward").is_not_null())
            curves[run.name] = [(int(s), float(r)) for s, r in df.select("step", "train/reward").iter_rows()]
    return curves


def measure_latency(serve_dir: Path, data_dir: Path, requests: int = 200, seed: int = 0) -> list[float]:
    """Milliseconds of ``requests`` single recommend calls on the exported runtime (histories from test)."""
    from recsys.data import PreparedDataset
    from serving.runtime import Recommender, RecommendQuery

    rec = Recommender.load(serve_dir)
    examples = PreparedDataset.load(data_dir).eval_examples("test")
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(examples.users), requests):
        q = RecommendQuery(history=examples.histories[i].tolist(), k=10)
        start = time.perf_counter()
        rec.recommend_batch([q])
        out.append((time.perf_counter() - start) * 1000)
    return out


def _save(fig, out: Path, name: str, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    written.append(name)
    plt.close(fig)


def _plots(results: dict, curves: dict, latency: list[float], seconds: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in results.items():
        for ax, metric in zip(axes, ("ndcg", "hr")):
            ks = [k for k in KS if f"{metric}@{k}" in m]
            ax.plot(ks, [m[f"{metric}@{k}"] for k in ks], marker="o", label=name)
    for ax, metric in zip(axes, ("NDCG@K", "HR@K")):
        ax.set_xlabel("K"), ax.set_title(f"{metric}, test split"), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    _save(fig, out, "metrics_at_k.png", written)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in curves.items():
            ax.plot([s for s, _ in c], [r for _, r in c], label=name)
        ax.set_xlabel("step"), ax.set_ylabel("mean reward"), ax.set_title("RL reward"), ax.legend(fontsize=7)
        _save(fig, out, "rl_reward.png", written)
    if latency:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(latency, bins=40)
        ax.axvline(np.percentile(latency, 99), color="k", ls="--", label="p99")
        ax.set_xlabel("ms per request"), ax.set_title("recommend latency (ONNX runtime, single requests)"), ax.legend()
        _save(fig, out, "latency.png", written)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(seconds), list(seconds.values()))
    ax.set_xlabel("seconds"), ax.set_title("quickstart stages")
    _save(fig, out, "stages.png", written)
    return written


def _table(results: dict, metrics: list[str]) -> list[str]:
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in metrics) + " |"
              for n, m in results.items()]
    lines += [f"| *published: {n}* | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k in metrics) + " |"
              for n, m in ANCHORS.items()]
    return lines


def write_report(artifacts, out=None, latency_requests: int = 200) -> Path:
    """Write ``report.md``, ``report.html`` and PNG plots to ``out`` (default ARTIFACTS/report)."""
    artifacts = Path(artifacts)
    path = artifacts / "quickstart.json"
    if not path.exists():
        raise RecsysError(f"{artifacts}: no quickstart.json; run `recsys quickstart --out {artifacts}` first")
    summary = json.loads(path.read_text())
    out = Path(out) if out else artifacts / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = _runs_dir(artifacts, summary)
    results = summary["results"]
    curves = reward_curves(runs)
    serve = runs / "serve"
    data_dir = artifacts / "data" / Path(summary["dataset"]).name
    latency = measure_latency(serve, data_dir, latency_requests) if (serve / "manifest.json").exists() else []
    plots = _plots(results, curves, latency, summary["seconds"], out)
    base = results.get("sasrec", {}).get("ndcg@10")
    md = [f"# recsys report: {summary['dataset']} (preset {summary['preset']}, seed {summary['seed']})", "",
          f"Protocol: {summary['protocol']}.", "", "## Test metrics", ""]
    md += _table(results, ["hr@5", "hr@10", "ndcg@5", "ndcg@10", "hr@20", "ndcg@20"])
    if base:
        md += ["", "NDCG@10 relative to SASRec: " + ", ".join(
            f"{n} {m['ndcg@10'] / base:.3f}" for n, m in results.items() if n != "sasrec")]
    md += ["", "![metrics at K](metrics_at_k.png)", ""]
    if curves:
        md += ["## RL reward", "", "![RL reward](rl_reward.png)", ""]
    if latency:
        md += ["## Serving latency", "", (f"{len(latency)} single `recommend` calls on `{serve}` (ONNX Runtime, this "
               f"machine): p50 {np.percentile(latency, 50):.1f} ms, p95 {np.percentile(latency, 95):.1f} ms, "
               f"p99 {np.percentile(latency, 99):.1f} ms."), "", "![latency](latency.png)", ""]
    md += ["## Stages", "", " | ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
           + f" (total {summary['total_seconds'] / 60:.1f} min)", "", "![stages](stages.png)", "",
           "## Model configurations", ""]
    for train in sorted(runs.glob("*/train.json")):
        cfg = json.loads(train.read_text())
        md += [f"### {train.parent.name}", "", "```json", json.dumps(cfg.get("config", cfg), indent=2), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html("\n".join(md), plots))
    return out / "report.md"


def _html(markdown: str, plots: list[str]) -> str:
    """A small, dependency-free rendering of the report's Markdown (headings, tables, images, code)."""
    body, in_code, in_table = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<td>{html.escape(c.strip('*'))}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:960px;margin:auto}td{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
           + "\n".join(body) + "</body></html>"
