"""What every benchmark result records: the exact command, commit, machine and date."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def git_commit() -> str:
    """Short SHA of HEAD, with ``-dirty`` when tracked files differ from it; ``$RECSYS_COMMIT`` (suffixed
    ``(given)``) when set, for a copy of a tree whose own git directory does not describe it (a lent GPU
    machine receives the working tree with a stale ``.git``)."""
    if os.environ.get("RECSYS_COMMIT"):
        return os.environ["RECSYS_COMMIT"] + " (given)"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, check=False,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    simd = torch.backends.cpu.get_cpu_capability()          # "AVX2", "AVX512", ... (what torch's kernels use)
    amx = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX: fp32 is the fast path"
    return f"{os.cpu_count()}-core CPU ({cpu}, {simd}, {amx}), no GPU"


def llama_gflop(config: dict, tokens: float, causal: bool = False) -> float:
    """Dense GFLOP of one prefill of ``tokens`` tokens through a Llama-architecture decoder (``config``: its
    ``config.json``): 2 x (the projection and MLP weights of every layer) x tokens, plus the attention scores
    and values, 4 x tokens^2 x hidden per layer; ``causal`` counts half of the latter, the least a kernel
    that skips the masked triangle must do. The LM head at one position and the norms are left out (< 0.1%
    of a 500-token prompt through SmolLM2-135M)."""
    d, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = d // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    weights = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    return (2 * weights * tokens + (2 if causal else 4) * tokens ** 2 * d * L) / 1e9


def fp32_gemm_gflop_per_s(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    """The practical fp32 ceiling of this machine: GFLOP/s of an ``n`` x ``n`` by ``n`` x ``n`` matrix product
    with ``threads`` threads, in torch (its BLAS) and in ONNX Runtime (MLAS), the best of ``repeats`` after a
    warm-up. A scorer whose FLOPs, all run at this rate, would take T seconds cannot run faster than T in
    fp32, whatever the runtime."""
    import time

    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    a = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    flop = 2 * n ** 3 / 1e9

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flop / min(times)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = torch.from_numpy(a[0]), torch.from_numpy(a[1])
        rate_torch = best(lambda: x @ y)
    finally:
        torch.set_num_threads(before)
    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm", spec[:2], spec[2:])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                                sess_options=opts, providers=["CPUExecutionProvider"])
    rate_onnx = best(lambda: sess.run(None, {"A": a[0], "B": a[1]}))
    return {"n": n, "threads": threads, "torch": rate_torch, "onnx": rate_onnx}


class Provenance:
    """Command, commit and date captured when a benchmark starts (not when it ends an hour later)."""

    def __init__(self, module: str):
        self.command = " ".join(["python -m", module, *sys.argv[1:]])
        self.commit, self.date = git_commit(), dt.date.today().isoformat()


def process_cpu_seconds() -> float:
    """User + system CPU seconds this process has spent so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_result(name: str, provenance: Provenance, payload: dict) -> Path:
    """Write ``results/<name>.json`` with the provenance fields first."""
    result = {"benchmark": name, "command": provenance.command, "commit": provenance.commit,
              "date": provenance.date, "machine": machine(), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def per_user_slate_hits(eval_dir, k: int = 5, split: str = "test"):
    """(Q,) 1.0 where a user's held-out item is in the first ``k`` of the final ranking of a slate-then-rank
    answer (``slate_rank_<split>.parquet`` of :func:`pipelines.rerank.evaluate_slate_rank`), i.e. recall@k."""
    import numpy as np
    import polars as pl

    df = pl.read_parquet(Path(eval_dir) / f"slate_rank_{split}.parquet")
    return np.array([float(t in list(r)[:k]) for r, t in df.select("ranking", "target").iter_rows()])


def per_user_ndcg10(eval_dir, column: str = "reranked", depth: int | None = None, split: str = "test"):
    """(Q,) NDCG@10 of each user's held-out item in one list column of a ``rerank`` output
    (``reranked_<split>.parquet``: ``candidates`` is the retriever's order, ``reranked`` the reranker's),
    the first ``depth`` items only; a target outside the list scores 0. Users in file order."""
    import numpy as np
    import polars as pl

    from recsys.metrics import ndcg

    df = pl.read_parquet(Path(eval_dir) / f"reranked_{split}.parquet")
    ranks = np.array([[list(items[:depth]).index(t) if t in list(items[:depth]) else np.inf]
                      for items, t in df.select(column, "target").iter_rows()], dtype=np.float64)
    return ndcg(ranks, np.ones_like(ranks), 10)


def topk_overlap(found, reference) -> float:
    """Mean over queries of |found top-k & reference top-k| / k: the recall@k of an ANN (or another engine)
    against exact search. ``found``, ``reference``: (Q, k) item positions."""
    import numpy as np

    return float(np.mean([len(set(f) & set(r)) / len(r) for f, r in zip(np.asarray(found).tolist(),
                                                                       np.asarray(reference).tolist())]))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(serve_dir, *options: str, env: dict | None = None, timeout_s: float = 120.0, code: Path | None = None):
    """``recsys serve SERVE_DIR OPTIONS`` in a subprocess on a free port; yields ``(url, process)`` once
    ``/readyz`` answers 200, and stops the server on exit. ``env`` is added to this process's environment;
    ``code``: a checkout whose ``recsys``, ``serving`` and ``pipelines`` packages the server imports instead of
    this one's (another revision, measured side by side)."""
    import urllib.request

    port = free_port()
    if code is not None:
        env = {**(env or {}), "PYTHONPATH": str(code)}
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(Path(serve_dir).resolve()),
                               "--port", str(port), *options], env={**os.environ, **(env or {})}, cwd=code,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:                             # not listening yet, or 503 while loading
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server for {serve_dir} did not become ready (exit code {server.poll()})")
            time.sleep(0.2)
        yield url, server
    finally:
        server.terminate()
        server.wait(30)


class RayCluster:
    """A real Ray cluster on this machine (see :func:`ray_cluster`): ``address`` to join it, ``env`` for the
    processes that do, the worker nodes' raylet process ids."""

    def __init__(self, root: Path, address: str, env: dict):
        self.root, self.address, self.env = root, address, env
        self.worker_raylets: list[int] = []

    def processes(self, name: str = "") -> set[int]:
        """Process ids whose command line mentions this cluster's directory (and ``name``)."""
        import psutil

        found = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if str(self.root) in line and name in line:
                found.add(p.info["pid"])
        return found

    def add_node(self, cpus: int = 1) -> int:
        """``ray start --address ...``: one more node (its own raylet); returns its raylet's process id."""
        before = self.processes("raylet/raylet")
        subprocess.run(["ray", "start", "--address", self.address, "--num-cpus", str(cpus),
                        "--node-ip-address", "127.0.0.1"], env=self.env, check=True, capture_output=True, timeout=120)
        (pid,) = self.processes("raylet/raylet") - before
        self.worker_raylets.append(pid)
        return pid

    def kill_node(self, pid: int) -> None:
        """SIGKILL a worker node's raylet (its workers go with it), as a machine that dies."""
        import psutil

        os.kill(pid, 9)
        psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=30)
        self.worker_raylets.remove(pid)

    def stop(self) -> None:
        import psutil

        procs = [psutil.Process(pid) for pid in self.processes() if psutil.pid_exists(pid)]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=30)


@contextmanager
def ray_cluster(workers: int = 1, cpus: int = 1):
    """``ray start --head`` plus ``workers`` worker nodes on this machine, each its own raylet with ``cpus``
    CPUs, token authentication on (Ray's default for ``ray start``); every process of the cluster is killed on
    exit. The head has no CPUs, so that work runs on the worker nodes only."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))     # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    cluster = RayCluster(root, f"127.0.0.1:{free_port()}", env)
    try:
        subprocess.run(["ray", "start", "--head", "--port", cluster.address.split(":")[1], "--num-cpus", "0",
                        "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--temp-dir", str(root),
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        for _ in range(workers):
            cluster.add_node(cpus)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
