"""The serving benchmark's load generator, a process of its own beside the server it loads:

    python -m pipelines.benchmarks.loadgen '{"url": "http://127.0.0.1:8000", "users": ["1", "2"],
        "connections": 8, "requests": 5000, "endpoint": "recommend", "candidates": 50}'

CONFIG (JSON): ``url``, ``users`` (ids drawn at random per request), or ``histories_file`` (a JSON file of
item-id lists: each request sends one, drawn at random, as its ``history`` instead of a ``user_id``),
``connections`` (kept busy at once),
``requests`` (timed, split over the connections: 10 over 3 is 4 + 3 + 3), ``endpoint`` (``recommend``:
``POST /v1/recommend`` with ``k`` 10 and ``candidates``; ``generate``: ``POST /v1/generate`` with ``k`` 10
and ``beam`` 20), and optionally ``warmup`` (untimed requests per connection first, default 20),
``timeout_s`` (per request, default 30) and ``server_pid`` (whose CPU time is read over the timed requests
only, so the warm-up does not count).

Prints one JSON line: ``seconds`` of the timed part, ``lat`` (milliseconds of each timed request),
``errors`` (a status other than 200, or no answer in time), ``fallbacks`` (200 answers whose reranker failed
or missed its deadline, so the retrieval order came back: latency of a fallback is not latency of the
reranker), ``warmup_errors`` / ``warmup_fallbacks``, and ``server_cpu_s`` (None without a readable pid).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds so far of a process and of every live process below it (a server's worker
    processes; Linux ``/proc``; None elsewhere or without a pid)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in _children(int(pid)):
        total += cpu_seconds(child) or 0.0
    return total


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (``/proc/PID/task/*/children``)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def body(config: dict, rng: random.Random) -> dict:
    """One request body for ``config["endpoint"]``: a known user's, or with ``histories`` (loaded from
    ``histories_file``) an explicit history's."""
    extra = {"candidates": config["candidates"]} if config["endpoint"] == "recommend" else {"beam": 20}
    who = {"history": rng.choice(config["histories"])} if config.get("histories") else \
        {"user_id": rng.choice(config["users"])}
    return who | {"k": 10} | extra


async def run(config: dict) -> dict:
    import aiohttp

    if config.get("histories_file"):
        config = config | {"histories": json.loads(Path(config["histories_file"]).read_text())}
    url = f"{config['url']}/v1/{config['endpoint']}"
    conc, total, rng = config["connections"], config["requests"], random.Random(0)
    tally = {"lat": [], "errors": 0, "fallbacks": 0}

    async def worker(session, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            ok, fallback = False, False
            try:
                async with session.post(url, json=body(config, rng)) as r:
                    payload = await r.read()
                    ok = r.status == 200
                fallback = ok and json.loads(payload).get("fallback") is not None
            except (TimeoutError, aiohttp.ClientError, ValueError):
                pass
            tally["lat"].append((time.perf_counter() - t) * 1000)
            tally["errors"] += not ok
            tally["fallbacks"] += fallback

    connector = aiohttp.TCPConnector(limit=conc)
    timeout = aiohttp.ClientTimeout(total=config.get("timeout_s", 30))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*[worker(session, config.get("warmup", 20)) for _ in range(conc)])
        warmup = {"warmup_errors": tally["errors"], "warmup_fallbacks": tally["fallbacks"]}
        tally = {"lat": [], "errors": 0, "fallbacks": 0}
        cpu, t = cpu_seconds(config.get("server_pid")), time.perf_counter()
        await asyncio.gather(*[worker(session, total // conc + (i < total % conc)) for i in range(conc)])
        seconds, after = time.perf_counter() - t, cpu_seconds(config.get("server_pid"))
    return {"seconds": seconds, **tally, **warmup,
            "server_cpu_s": None if cpu is None or after is None else after - cpu}


def main(argv: list[str]) -> int:
    """``CONFIG`` as the one argument; ``--help`` (or no argument) prints the module's documentation."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        config = json.loads(argv[0])
    except json.JSONDecodeError as e:
        print(f"error: CONFIG is not JSON ({e}); see --help", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(run(config))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
