import pytest

from pipelines.benchmarks.baselines_ml1m import validation_curve


def test_validation_curve_joins_resumed_invocations(tmp_path):
    """Two invocations (a resume): epochs 0-1 then 2; training-only rows have no validation value."""
    for version, rows in {0: "0,10,0.1,,\n0,12,,0.2,0.05\n1,24,,0.3,0.08\n", 1: "2,36,,0.35,0.09\n"}.items():
        d = tmp_path / "logs" / f"version_{version}"
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("epoch,step,train/loss,val/hr@10,val/ndcg@10\n" + rows)
    assert validation_curve(tmp_path) == [[1, 0.05], [2, 0.08], [3, 0.09]]
    assert validation_curve(tmp_path / "nothing") == []


def test_renderers_on_minimal_results(tmp_path, monkeypatch):
    from pipelines.benchmarks import render

    monkeypatch.setattr(render, "RESULTS", tmp_path)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    m = {k: 0.1 for k in ["hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"]}
    base = {"benchmark": "baselines_ml1m", "command": "c", "commit": "x", "date": "d", "machine": "m",
            "protocol": "p", "sasrec_mean": m,
            "rows": [{"name": "popularity", "seed": None, "metrics": m, "seconds": 1},
                     {"name": "sasrec", "seed": 0, "metrics": m, "seconds": 2, "epochs": 3, "val_curve": [[1, 0.1], [2, 0.2]]}]}
    text = "\n".join(render.render_baselines(base))
    assert "| sasrec | 0 | 0.1000" in text and (tmp_path / "baselines_ml1m_curves.png").exists()
    retrieval = {"benchmark": "retrieval", "command": "c", "commit": "x", "date": "d", "machine": "m", "protocol": "p",
                 "rows": [{"name": "Flat-ml1m", "metrics": {"recall@100": 1.0, "qps": 10.0}, "build_seconds": 0.1},
                          {"name": "sasrec", "metrics": {f"recall@{k}": 0.5 for k in (20, 50, 100, 200)}}],
                 "ratios": {"Flat-ml1m qps/Flat": 1.0},
                 "semantic_ids": {"source": "text", "config": {"levels": 3, "codebook_size": 32},
                                  "stats": {"collision_rate": 0.1, "max_collisions": 3, "code_usage": [1, 1, 1],
                                            "perplexity": [30.0, 31.0, 29.0]}}}
    text = "\n".join(render.render_retrieval(retrieval))
    assert "| Flat-ml1m | 1.0000 | 10 | 1.0 | 0.1 |" in text and "| sasrec | 0.5000" in text
    probe = {"benchmark": "quant_probe", "command": "c", "commit": "x", "date": "d", "machine": "m", "serve": "s",
             "prompts": 2, "mean_prompt_tokens": 500.0, "threads": 2,
             "fp32_flops": {"gflop_per_prompt": 148.0, "fp32_gflop_per_s": 120.0},
             "rows": [{"variant": "fp32", "ms_per_prompt": 1200.0},
                      {"variant": "int8", "ms_per_prompt": 900.0, "speedup_vs_fp32": 1.333, "max_abs_change": 3.6,
                       "mean_abs_change": 0.8, "top1_agreement": 0.75, "spearman": 0.78}]}
    text = "\n".join(render.render_quant_probe(probe))
    assert "| int8 | 900 | 1.33x | 3.60 / 0.800 | 0.75 | 0.780 | - | - |" in text and "148.0 GFLOP per prompt" in text
    probe["sasrec_window_ndcg@10"] = 0.15
    probe["rows"][0]["ndcg@10"] = 0.1531
    probe["rows"][1] |= {"ndcg@10": 0.1240, "ndcg@10_change": -0.0291, "ndcg@10_change_se": 0.0123}
    text = "\n".join(render.render_quant_probe(probe))
    assert "| fp32 | 1200 | 1.00x | | | | 0.1531 | |" in text and "| 0.780 | 0.1240 | -0.0291 +- 0.0123 |" in text
    assert "SASRec's own window order: 0.1500" in text


def test_serving_renderer_shows_speed_ups_and_what_int8_costs():
    from pipelines.benchmarks import render

    q = {"ndcg@10": 0.1234, "hr@10": 0.25}
    result = {"benchmark": "serving", "command": "c", "commit": "x", "date": "d", "machine": "m", "server": "s",
              "parity_max_abs": {"sasrec": 1e-6}, "int8_max_abs_change": {"sasrec": 0.1}, "ort_fusions": {},
              "onnx_vs_torch": {"threads": 2, "users": 4,
                                "sasrec_b1": {"torch_ms_per_user": 2.0, "onnx_ms_per_user": 1.0,
                                              "onnx_int8_ms_per_user": 0.5}},
              "int8_quality": {"tiny": {"users": 4, "sasrec": {"fp32": q, "int8": q | {"ndcg@10": 0.1111}}}},
              "rows": [{"name": "recommend-tiny-c8", "connections": 8, "micro_batching": "auto", "requests": 15000,
                        "repeats": 3, "p50_ms": 20.0, "p95_ms": 30.0, "p99_ms": 40.04, "rps": 300.0, "errors": 0,
                        "repeats_p99_ms": [38.0, 41.26, 40.0], "repeats_rps": [310.2, 290.0, 300.0],
                        "server_cpu_ms_per_request": 3.3}],
              "rescore": {"job_rows_per_s": 10, "rows": 5, "loop_rows_per_s": 5, "loop_rows": 5},
              "ratios": {"onnx_speedup_sasrec": 2.0, "rescore_job/loop rows_per_s": 2.0}}
    text = "\n".join(render.render_serving(result))
    assert "| recommend-tiny-c8 | 8 | auto | 50 | 15000 | 20.0 | 30.0 | 40.0 | 300.0 | 0 | - | 38.0 / 41.3 / 40.0 | 310 / 290 / 300 | 3.3 |" in text
    assert ("Targets: onnx_speedup_sasrec >= 1.5: met (2.00); recommend-tiny-c8 p99 <= 50 ms: met (40.0); "
            "0 errors at every level: met (0)") in text
    result["rows"].append(result["rows"][0] | {"name": "recommend-smollm2-c8", "p99_ms": 900.0, "errors": 2,
                                               "fallbacks": 1})
    result["ratios"] |= {"onnx_speedup_first_smollm2": 1.07, "onnx_speedup_first_smollm2_b32": 1.6,
                         "onnx_speedup_bound_first_smollm2": 1.31}
    result["fp32_roofline_first_smollm2"] = {
        "prompt_tokens": 586.0, "gflop_per_prompt": 136.0, "floor_ms_per_user": 751.4, "onnx_speedup_bound": 1.31,
        "gemm_gflop_per_s": {"n": 2048, "threads": 2, "torch": 181.0, "onnx": 173.0},
        "torch_gflop_per_s": 138.0, "onnx_gflop_per_s": 147.7}
    text = "\n".join(render.render_serving(result))
    assert "| 2 | 1 | 38.0 / 41.3 / 40.0 |" in text and "onnx_speedup_first_smollm2 >= 1.5: missed (1.07)" in text
    assert "0 errors at every level: missed (2)" in text and "b32" not in text.split("Targets")[1]
    assert "is 181 GFLOP/s (torch 181, ONNX Runtime 173; 2048^3, 2 threads), so a prompt takes at least 751 ms" in text
    assert "by more than **1.31x**" in text
    assert "| sasrec | 1 | 2.00 | 1.00 | 0.50 | 2.00 |" in text
    assert "| tiny | sasrec | 4 | 0.1234 | 0.1111 | 0.2500 | 0.2500 |" in text


def test_smollm2_reranker_renderer_compares_each_row_with_the_retriever_on_its_users():
    from pipelines.benchmarks import render

    m = {k: 0.2 for k in ["ndcg@10", "hr@10", "ndcg@5", "hr@5", "cand_ndcg@10"]}
    v = {"users": 20, "valid_rate": 0.1, "complete_rate": 0.0, "malformed_lines_per_answer": 3.0,
         "duplicates_per_answer": 1.0, "out_of_window_per_answer": 0.5}
    result = {"benchmark": "rerankers_smollm2", "command": "c", "commit": "x", "date": "d", "machine": "m",
              "device": "cpu", "candidates": "SASRec top-20", "protocol": "p",
              "rows": [{"name": "retriever-order (first 500 users)", "metrics": m, "num_users": 500},
                       {"name": "listwise-sft-smollm2", "metrics": {**m, "ndcg@10": 0.21}, "num_users": 500,
                        "retriever_prior": 2.0}],
              "validity_before_sft": v, "validity_after_sft": {**v, "valid_rate": 0.9},
              "listwise_smollm2_training": {"seconds": 3600, "epochs": 4, "best_val_cand_ndcg@10": 0.41,
                                            "train_examples": 6000},
              "stage_seconds": {"train": 1.0}, "ratios": {"listwise-sft-smollm2/retriever ndcg@10": 1.05}}
    text = "\n".join(render.RENDERERS["rerankers_smollm2"](result))
    assert "| listwise-sft-smollm2 |  | 0.2100 | 0.2000" in text and "| 500 | 2.0 |" in text
    assert "before SFT (20 test users): valid 0.10" in text and "after SFT (20 test users): valid 0.90" in text
    assert "listwise-sft-smollm2 training: 60 min" in text and "listwise-sft-smollm2 1.0500" in text


def test_quant_probe_picks_the_projections_and_counts_flops_by_hand():
    """Seven projections per layer (q k v o gate up down); the exporter names the first ``node_linear``.
    FLOPs: hidden 4, MLP 8, 1 layer, 2 heads with 1 KV head (kv width 2): weights 2*16 + 2*8 + 3*32 = 144;
    2 * 144 * 3 tokens + 4 * 9 * 4 = 864 + 144 = 1008 FLOP (causal: 864 + 72)."""
    from pipelines.benchmarks.common import llama_gflop
    from pipelines.benchmarks.quant_probe import excluded_matmuls

    names = ["node_linear"] + [f"node_linear_{i}" for i in range(1, 14)]
    assert excluded_matmuls(names, ("down",)) == ["node_linear_6", "node_linear_13"]
    assert excluded_matmuls(names, ("down", "o")) == ["node_linear_3", "node_linear_6", "node_linear_10", "node_linear_13"]
    assert excluded_matmuls(names, ()) == []
    cfg = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1}
    assert llama_gflop(cfg, 3) * 1e9 == pytest.approx(1008)
    assert llama_gflop(cfg, 3, causal=True) * 1e9 == pytest.approx(864 + 72)     # half the attention


@pytest.mark.parametrize(("status", "endpoint"), [(200, "recommend"), (503, "recommend"), (200, "generate")])
def test_load_generator_sends_exactly_the_requested_count(status, endpoint):
    """The serving benchmark's load generator: `total` timed requests split over the connections
    (10 over 3 is 4 + 3 + 3, not 3 x 3), warm-up requests and their errors kept apart; the body
    matches the endpoint's schema; answers in retrieval order (a `fallback`) are counted, here every
    second one; the server's CPU time is read over the timed part."""
    import json
    import os
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            answer = json.dumps({"fallback": "timeout" if len(seen) % 2 else None}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = {"url": f"http://127.0.0.1:{server.server_port}", "users": ["u1", "u2"], "connections": 3,
              "requests": 10, "endpoint": endpoint, "candidates": 7, "warmup": 4, "server_pid": os.getpid()}
    try:
        out = subprocess.run([sys.executable, "-m", "pipelines.benchmarks.loadgen", json.dumps(config)],
                             capture_output=True, text=True, check=True)
    finally:
        server.shutdown()
    r = json.loads(out.stdout)
    assert len(r["lat"]) == 10 and len(seen) == 10 + 3 * 4
    assert {p for p, _ in seen} == {f"/v1/{endpoint}"} and {b["user_id"] for _, b in seen} <= {"u1", "u2"}
    extra = {"candidates": 7} if endpoint == "recommend" else {"beam": 20}
    assert all(b == {"user_id": b["user_id"], "k": 10} | extra for _, b in seen)
    assert (r["errors"], r["warmup_errors"]) == ((0, 0) if status == 200 else (10, 12))
    assert (r["fallbacks"], r["warmup_fallbacks"]) == ((5, 6) if status == 200 else (0, 0))
    assert r["server_cpu_s"] >= 0


def test_every_rl_result_name_finds_the_rl_renderer():
    from pipelines.benchmarks import render

    assert render.renderer_for("rl_distill_lr3e-5") is render.render_rl is render.renderer_for("rl")
    assert render.renderer_for("rl_throughput") is render.render_rl_throughput
    assert render.renderer_for("nothing_known") is None
    assert render.renderer_for("quant_probe_ndcg") is render.render_quant_probe is render.renderer_for("quant_probe")


def test_cpu_seconds_of_a_process_grow_with_its_work():
    import os
    import time

    from pipelines.benchmarks.loadgen import cpu_seconds

    before, t = cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - t < 0.3:                # burn 0.3 s of CPU in this process
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.2
    assert cpu_seconds(2 ** 22 + 12345) is None        # no such process
    assert cpu_seconds(None) is None


def test_cpu_seconds_count_the_live_worker_processes_below_a_server():
    """A parent that only waits on a busy child: the child's CPU is counted in the parent's (a server's
    workers are its children)."""
    import subprocess
    import sys
    import time

    from pipelines.benchmarks.loadgen import cpu_seconds

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 5: pass"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and (cpu_seconds(parent.pid) or 0) < 0.5:
            time.sleep(0.1)
        assert cpu_seconds(parent.pid) >= 0.5           # the parent itself sleeps in wait()
    finally:
        parent.kill()


def test_per_user_ms_times_the_engines_in_turns_on_the_same_inputs():
    """Two engines, 4 users in batches of 2, 1 repeat: on the first slice a then b, on the second b then a
    (a warm-up call and a timed call each), every call on the same rows for both engines."""
    from pipelines.benchmarks.serving import per_user_ms

    calls = []
    fns = {name: (lambda rows, name=name: calls.append((name, tuple(rows)))) for name in ("a", "b")}
    out = per_user_ms(fns, ([10, 11, 12, 13],), repeats=1, batches=(2,))
    assert calls == [("a", (10, 11))] * 2 + [("b", (10, 11))] * 2 + [("b", (12, 13))] * 2 + [("a", (12, 13))] * 2
    assert set(out["b2"]) == {"a_ms_per_user", "b_ms_per_user"} and all(v >= 0 for v in out["b2"].values())


def test_moving_average_by_hand():
    from pipelines.benchmarks.render import moving_average

    assert moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    assert moving_average([2.0, 4.0], 10) == [2.0, 3.0]


def test_window_ndcg_and_its_paired_change_by_hand():
    """Windows of 3: user 0's target ranked first by its scores (NDCG 1), user 1's second (1/log2 3), user 2's
    target not in the window (0); ties keep window order. The change from a reference is paired per user."""
    import numpy as np

    from pipelines.benchmarks.quant_probe import ndcg_change, window_ndcg10

    windows = np.array([[5, 6, 7], [1, 2, 3], [4, 8, 9]])
    scores = np.array([[0.0, 0.0, 1.0], [2.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    got = window_ndcg10(windows, scores, np.array([7, 2, 11]))
    np.testing.assert_allclose(got, [1.0, 1 / np.log2(3), 0.0])
    ties = window_ndcg10(windows, np.zeros((3, 3)), np.array([6, 1, 9]))         # window order: ranks 1, 0, 2
    np.testing.assert_allclose(ties, [1 / np.log2(3), 1.0, 0.5])
    c = ndcg_change(np.array([1.0, 0.5, 0.0]), np.array([0.5, 0.5, 0.5]))
    assert c["ndcg@10"] == 0.5 and c["ndcg@10_change"] == 0.0
    assert c["ndcg@10_change_se"] == np.std([0.5, 0.0, -0.5], ddof=1) / np.sqrt(3)


def test_gpu_check_on_a_cpu_machine_says_what_it_skipped_and_writes_nothing(capsys, monkeypatch, tmp_path):
    from pipelines.benchmarks import common, gpu_check

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main(["--only", "retrieval", "onnx"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0] and "skipped retrieval, onnx" in out[0]
    assert not list(tmp_path.iterdir())


def test_row_results_render_every_metric_and_every_skip_with_its_reason():
    from pipelines.benchmarks.render import renderer_for

    result = {"benchmark": "gpu_check", "command": "python -m x", "commit": "abc", "date": "2026-12-04",
              "machine": "NVIDIA H200 (CUDA)", "environment": {"torch": "2.11"},
              "rows": [{"name": "sasrec-train-cuda-fp32-b32", "metrics": {"samples_per_s": 5843.6, "threads": None},
                        "seconds": 0.7},
                       {"name": "onnx-sasrec-cuda", "skipped": "no CUDAExecutionProvider"},
                       {"name": "smollm2-sft-step-bf16-8x64", "weights": "random", "metrics": {"step_ms": 123.4},
                        "seconds": 3.2}]}
    text = "\n".join(renderer_for("gpu_check")(result))
    assert "| sasrec-train-cuda-fp32-b32 | samples_per_s 5844 | 0.7 |" in text and "threads" not in text
    assert "| onnx-sasrec-cuda | skipped: no CUDAExecutionProvider |" in text
    assert "smollm2-sft-step-bf16-8x64 [weights: random] | step_ms 123.4" in text and "torch 2.11" in text


def test_loadgen_help_and_a_bad_config_answer_instead_of_crashing(capsys):
    from pipelines.benchmarks import loadgen

    assert loadgen.main(["--help"]) == 0 and "CONFIG (JSON)" in capsys.readouterr().out
    assert loadgen.main(["{not json"]) == 2 and "CONFIG is not JSON" in capsys.readouterr().err


def test_strong_reranker_renderer_shows_intervals_subsets_comparisons_and_a_plot(tmp_path, monkeypatch):
    from pipelines.benchmarks import render

    monkeypatch.setattr(render, "RESULTS", tmp_path)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    m = {k: 0.1 for k in ["ndcg@10", "hr@10", "ndcg@5", "hr@5", "ndcg@20", "hr@20", "mrr"]}
    later = {"users": 5, "ndcg@10": 0.12, "retriever_ndcg@10": 0.1}
    fusion = {"name": "fusion-mlp", "seed": 0, "features": ["retriever", "ease"], "metrics": {**m, "ndcg@10": 0.2},
              "paired": {"ndcg@10": [0.02, 0.04], "mean_diff": 0.03, "better": 3, "worse": 1},
              "later_than_history": {**later, "paired": {"ndcg@10": [0.01, 0.02]}}, "holdout_ndcg@10": 0.3, "seconds": 9}
    result = {"benchmark": "rerankers_strong", "command": "c", "commit": "x", "date": "d", "machine": "m",
              "dataset": "ml-1m", "protocol": "p", "labels": "tiny = built in code",
              "rows": [{"name": "retriever-order", "seed": 0, "metrics": m, "later_than_history": later, "seconds": 60},
                       fusion, {**fusion, "name": "end-to-end", "pipeline": "SASRec top-50 -> fusion-mlp (seed 0)"}],
              "comparisons": [{"row": "fusion-mlp-without-ease-seed0", "against": "fusion-mlp-seed0",
                               "ndcg@10": [-0.02, -0.01], "mean_diff": -0.015, "better": 1, "worse": 4}],
              "candidate_recall": {"test": {"recall@50": 0.55}}}
    text = "\n".join(render.render_rerankers_strong(result))
    assert "| fusion-mlp | 0 | retriever, ease | 0.2000 |" in text and "+0.0200 to +0.0400" in text
    assert "0.1200 vs 0.1000 (+0.0100 to +0.0200)" in text and "**end-to-end** (SASRec top-50 -> fusion-mlp" in text
    assert "fusion-mlp-without-ease-seed0 minus fusion-mlp-seed0 -0.0150 (-0.0200 to -0.0100)" in text
    assert "recall@50 0.5500" in text and (tmp_path / "rerankers_strong_paired.png").stat().st_size > 1000
    assert "- dataset: ml-1m" in text


def test_scale_index_part_builds_every_kind_and_finds_the_exact_answer_when_it_probes_everything(tmp_path):
    """The 10M-index code path on 4,000 vectors: Zipf-drawn copies of the anchors (the most popular anchor holds
    the most copies), inner-product and L2-reduced IVF, 2 shards and PQ; with every list probed a Flat store
    finds the exact top-100 and reports its own size."""
    import numpy as np
    from safetensors.numpy import save_file

    from pipelines.benchmarks.scale import index_rows, zipf_catalogue

    rng = np.random.default_rng(0)
    anchors = rng.standard_normal((50, 16)).astype(np.float32) * rng.uniform(0.5, 3, (50, 1)).astype(np.float32)
    x = zipf_catalogue(anchors, 20_000, 0.3, np.random.default_rng(1))
    nearest = np.argmin(((x[:, None] - anchors[None]) ** 2).sum(-1), 1)
    counts = np.bincount(nearest, minlength=50)
    assert counts.max() > 20 * np.median(counts) and counts.sum() == 20_000          # heavy-tailed sizes
    save_file({"item_emb.weight": np.vstack([np.zeros((1, 16), np.float32), anchors])},
              str(tmp_path / "model.safetensors"))
    every = {"nprobe": 16}
    rows = index_rows(tmp_path, 4000, 0.3, queries=50, indexes=[
        ("IVF16,Flat", every, False), ("IVF16,Flat", every, True), ("IVF16,Flat[2 shards]", every, True),
        ("IVF16,PQ8", every, True)])
    got = {r["name"]: r["metrics"] for r in rows}
    assert list(got) == ["Flat-4k", "IVF16,Flat-4k", "IVF16,Flat-mips-4k", "IVF16,Flat[2 shards]-mips-4k",
                         "IVF16,PQ8-mips-4k"]
    assert all(got[name]["recall@100"] == 1.0 for name in list(got)[:4])
    assert 0 < got["IVF16,PQ8-mips-4k"]["recall@100"] < 1
    assert got["Flat-4k"]["memory_mb"] == round(4000 * 16 * 4 / 2**20, 1) > got["IVF16,PQ8-mips-4k"]["memory_mb"]


def test_ved_budget_compares_each_multiplier_with_beam_search_at_the_same_calls():
    """Every multiplier gets both VED widenings and a beam as wide as its calls allow, at least the 16 candidates
    asked for, each width once; D = 4, init beam 8 (25 calls): x1 and x1.5 (38 calls) -> width 16 (49 calls), x2
    (50) -> 16 again, x3 (75) -> 24 (73 calls)."""
    from pipelines.benchmarks.ved_budget import MULTIPLIERS, decoders

    rows = decoders(depth=4, n=16)
    assert [name for name, _ in rows if name.startswith("beam")] == ["beam-49", "beam-73"]
    assert len(rows) == 3 * len(MULTIPLIERS) + 2
    rows = dict(rows)
    assert rows["beam-49"] == {"kind": "beam", "width": 16, "multiplier": 1.0}
    assert rows["beam-73"] == {"kind": "beam", "width": 24, "multiplier": 3.0}
    assert rows["ved-complete-x2"] == {"kind": "ved", "widen": "complete", "rank_by": "value", "multiplier": 2.0}
    assert rows["ved-complete-by-logp-x3"]["rank_by"] == "logp"
