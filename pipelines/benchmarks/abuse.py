"""What a hostile client can cost the API: a real ``uvicorn`` server process over a tiny deployment, probed
the way an attacker would, with the server's memory read from ``/proc`` throughout.

    python -m pipelines.benchmarks.abuse                 # -> results/abuse.json

Rows (``{name, metrics, seconds}``):

- ``idle``: resident memory (RSS) of the ready server.
- ``chunked-50mb-unkeyed`` / ``chunked-50mb-keyed``: ``clients`` connections at once, each streaming a 50 MB
  body with ``Transfer-Encoding: chunked`` (no content-length), without and with the API key: the statuses
  returned, the bytes each client got to send before the answer, and the server's peak and final RSS against
  idle (target: within 50 MB of idle).
- ``metrics-random-paths``: 2,000 requests to random paths, one of them a Prometheus-injection attempt: the
  size of ``/metrics`` before and after, and whether the injected line appears.
- ``non-finite-numbers``: requests with ``NaN``, ``Infinity`` and overflowing literals in every numeric field of
  every POST endpoint: how many got a 5xx.

The deployment is the test suite's (the ring fixture, a SASRec and a FIRST reranker built in code, exported
to ONNX): what is measured is the HTTP layer, not the models.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.benchmarks.common import Provenance, serve_process, write_result

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "fixtures" / "tiny"
KEY = "abuse-key"


def send_chunked(port: int, path: str, total: int, headers: dict | None = None, chunk: int = 65536) -> tuple[int, int]:
    """POST ``total`` bytes with ``Transfer-Encoding: chunked`` over a raw socket, stopping as soon as the
    server answers or closes; returns (status or 0 when closed without an answer, bytes of body sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "content-type: application/json",
            "transfer-encoding: chunked", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent, data = 0, b"[" + b"1," * (chunk // 2)
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            piece = data[:min(chunk, total - sent)]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")                                     # the last chunk
        sock.settimeout(30)
        answer = sock.recv(4096)
    except OSError:                                     # reset by the server after it answered and closed
        answer = b""
    finally:
        sock.close()
    return (int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0), sent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def deploy(root: Path, quantize: bool = False) -> Path:
    """The tiny deployment the test suite serves (built in code, exported to ONNX): ``root/prepared`` (the ring
    fixture), ``root/sas`` (SASRec), ``root/rr`` (a FIRST reranker) and ``root/serve``, which it returns."""
    import torch

    from recsys.data import prepare, read_dataset
    from recsys.llm.backbone import build_tiny
    from recsys.models.sasrec import SASRec, SASRecConfig
    from serving.export import export

    dataset = prepare(read_dataset(FIXTURE), root / "prepared")
    torch.manual_seed(0)
    SASRec(SASRecConfig(n_items=dataset.n_items, max_len=12, hidden_size=16), dataset.fingerprint).save_pretrained(
        root / "sas")
    bb = build_tiny(n_items=dataset.n_items, hidden_size=32, num_layers=1)
    bb.model.save_pretrained(root / "rr")
    bb.tokenizer.save_pretrained(root / "rr")
    (root / "rr" / "reranker.json").write_text(json.dumps({
        "kind": "listwise", "prompt": "tiny", "window": 8, "group_size": 8, "max_history": 10,
        "dataset_fingerprint": dataset.fingerprint}))
    return export(dataset, root / "sas", root / "serve", root / "rr", quantize=quantize)


def request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def flood(port: int, pid: int, clients: int, size: int, headers: dict) -> dict:
    """``clients`` chunked bodies of ``size`` bytes at once, RSS sampled every 20 ms meanwhile."""
    peak, stop = [rss_mb(pid)], threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda _: send_chunked(port, "/v1/recommend", size, headers), range(clients)))
    time.sleep(1.0)
    stop.set()
    sampler.join()
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"clients": clients, "body_mb": size / 1e6, "statuses": statuses,
            "max_bytes_sent_per_client": max(s for _, s in answers), "peak_rss_mb": round(max(peak), 1),
            "final_rss_mb": round(rss_mb(pid), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=100, help="concurrent chunked uploads")
    parser.add_argument("--body-mb", type=float, default=50.0, help="size of each chunked body")
    parser.add_argument("--result", default="abuse", help="name of the result file under results/")
    args = parser.parse_args(argv)
    provenance = Provenance("pipelines.benchmarks.abuse")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        serve = deploy(Path(tmp))
        with serve_process(serve, env={"RECSYS_API_KEY": KEY}) as (url, server):
            port = int(url.rsplit(":", 1)[1])
            for _ in range(50):                                          # warm: allocator pools in place
                request(url + "/v1/recommend", b'{"history": ["m1", "m2"], "k": 3}', {"x-api-key": KEY})
            idle = rss_mb(server.pid)
            rows.append({"name": "idle", "metrics": {"rss_mb": round(idle, 1)}, "seconds": 0})
            for name, headers in (("chunked-50mb-unkeyed", {}), ("chunked-50mb-keyed", {"x-api-key": KEY})):
                t = time.perf_counter()
                m = flood(port, server.pid, args.clients, int(args.body_mb * 1e6), headers)
                m |= {"peak_over_idle_mb": round(m["peak_rss_mb"] - idle, 1),
                      "final_over_idle_mb": round(m["final_rss_mb"] - idle, 1)}
                rows.append({"name": name.replace("50mb", f"{args.body_mb:g}mb"), "metrics": m,
                             "seconds": round(time.perf_counter() - t, 1)})
            t = time.perf_counter()
            before = len(request(url + "/metrics")[1])
            request(url + "/%22%7D%201%0Arecsys_errors_total%20999999%0A%23")
            for i in range(1999):
                request(f"{url}/random-{i}")
            after = request(url + "/metrics")[1]
            rows.append({"name": "metrics-random-paths", "metrics": {
                "requests": 2000, "metrics_bytes_before": before, "metrics_bytes_after": len(after),
                "injected_line_present": b"999999" in after}, "seconds": round(time.perf_counter() - t, 1)})
            t = time.perf_counter()
            codes = []
            for path in ("/v1/recommend", "/v1/rerank", "/v1/generate"):
                for field in ("k", "candidates", "beam"):
                    for number in ("NaN", "Infinity", "-Infinity", "1e400", "-1e999"):
                        body = f'{{"history": ["m1", "m2"], "candidates": ["m3"], "{field}": {number}}}'.encode()
                        codes.append(request(url + path, body, {"x-api-key": KEY})[0])
            rows.append({"name": "non-finite-numbers", "metrics": {
                "requests": len(codes), "server_errors": sum(c >= 500 for c in codes),
                "statuses": sorted(set(codes))}, "seconds": round(time.perf_counter() - t, 1)})
    path = write_result(args.result, provenance, {"rows": rows})
    print(f"abuse: wrote {path}")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
