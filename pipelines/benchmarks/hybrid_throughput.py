"""Training throughput of the hybrid-token FIRST reranker (:mod:`recsys.rerank.hybrid`): what a pretrained LM
costs per example on this machine, by depth and prompt length.

    python -m pipelines.benchmarks.hybrid_throughput --data artifacts/data/ml-1m          # SmolLM2-135M
    python -m pipelines.benchmarks.hybrid_throughput --backbone tiny --keep-layers 2      # the tiny Llama

For each ``--keep-layers`` x ``--title-words`` x ``--prompts`` setting: ``--steps`` timed SFT steps (after one warm-up) of
``--batch`` windows: the hybrid prompt of a 20-item history and a 20-candidate window (the ML-1M titles when
``--data`` is given, cut to ``title_words`` words, 0 = soft tokens alone), FIRST scores from the last hidden
state (against the identifier letters with the ``listwise`` prompt, against the candidates' own soft tokens with
``compact``), the cross-entropy of the held-out candidate, backward through LoRA (r 16 on every linear
layer) and the projector, one AdamW step. The retriever vectors are random (d 64): their values do not change
the cost. Rows ``hybrid-<backbone>-L<layers>-w<title_words>`` (``-compact`` for that prompt): examples/s, seconds per step, prompt tokens,
trainable parameters; the machine and threads are in the result.
"""

from __future__ import annotations

import argparse
import time

from pipelines.benchmarks.common import Provenance, write_result


def measure(backbone_name: str, keep_layers: int, title_words: int, titles, n_items: int, batch: int,
            steps: int, seed: int = 0, prompt: str = "listwise") -> dict:
    import torch
    import torch.nn.functional as F

    from recsys.llm.backbone import Backbone, load_backbone
    from recsys.rerank.hybrid import HybridFirst, encode

    bb = load_backbone(backbone_name, n_items=n_items)
    if bb.name == "tiny":                                   # the text prompt format, as a pretrained LM reads it
        bb = Backbone(bb.model, bb.tokenizer, "tiny-text")
    torch.manual_seed(seed)
    model = HybridFirst(bb, torch.randn(n_items + 1, 64), keep_layers=keep_layers, n_items=n_items).lora()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    ids = bb.identifier_ids(20)

    def step() -> int:
        histories = [torch.randint(1, n_items + 1, (20,), generator=g).tolist() for _ in range(batch)]
        windows = [torch.randperm(n_items, generator=g)[:20].add(1).tolist() for _ in range(batch)]
        enc = encode(bb, histories, windows, titles, max_history=20, title_words=title_words, prompt=prompt)
        scores = (model.item_scores(enc, torch.tensor(windows)) if prompt == "compact"
                  else model.first_scores(enc, ids))
        loss = F.cross_entropy(scores, torch.zeros(batch, dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return int(enc.attention_mask.sum()) // batch

    step()
    t = time.perf_counter()
    tokens = [step() for _ in range(steps)]
    seconds = (time.perf_counter() - t) / steps
    return {"examples_per_s": round(batch / seconds, 2), "step_s": round(seconds, 3),
            "tokens_per_prompt": round(sum(tokens) / len(tokens)), "trainable_params": sum(p.numel() for p in params),
            "layers": len(model._decoder().layers), "batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m", help="smollm2-135m, tiny or a local checkpoint")
    parser.add_argument("--data", help="a prepared dataset whose titles fill the prompts (default: no titles)")
    parser.add_argument("--keep-layers", type=int, nargs="+", default=[30, 12, 4])
    parser.add_argument("--title-words", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--prompts", nargs="+", default=["listwise"], choices=["listwise", "compact"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--result", default="hybrid_throughput", help="name of the result file under results/")
    args = parser.parse_args(argv)
    provenance = Provenance("pipelines.benchmarks.hybrid_throughput")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    titles, n_items = None, 3706
    if args.data:
        from recsys.data import PreparedDataset
        from recsys.portable.prompts import item_titles

        dataset = PreparedDataset.load(args.data)
        titles, n_items = item_titles(dataset), dataset.n_items
    rows = []
    for layers in args.keep_layers:
        for words in args.title_words:
            for prompt in args.prompts:
                t = time.perf_counter()
                metrics = measure(args.backbone, layers, words, titles, n_items, args.batch, args.steps, prompt=prompt)
                suffix = "-compact" if prompt == "compact" else ""
                rows.append({"name": f"hybrid-{args.backbone}-L{layers}-w{words}{suffix}", "metrics": metrics,
                             "seconds": round(time.perf_counter() - t, 1)})
                print(rows[-1], flush=True)
    path = write_result(args.result, provenance, {"threads": torch.get_num_threads(), "rows": rows})
    print(f"hybrid_throughput: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
