import json

import pytest
import torch

from pipelines.config import load_config
from pipelines.jobs import evaluate_model
from pipelines.train import SASRecTrainConfig, train_popularity, train_sasrec
from recsys.errors import RecsysError
from recsys.models import SASRec, SASRecConfig

# A tiny-model recipe for the synthetic ring data (tests only).
TINY = {"model": SASRecConfig(max_len=20, hidden_size=32, num_layers=1, num_heads=1, dropout=0.1), "batch_size": 16,
            "lr": 5e-3, "precision": "32-true", "num_threads": 1}


def test_sasrec_learns_what_popularity_cannot(tiny_dataset, tmp_path):
    """On the ring data the next item is usually the successor of the last one: a sequence model
    finds it, popularity cannot (all items are about equally popular)."""
    train_popularity(tiny_dataset, tmp_path / "pop")
    train_sasrec(tiny_dataset, tmp_path / "sas", SASRecTrainConfig(**TINY, max_epochs=40, patience=40), progress=False)
    pop = evaluate_model(tiny_dataset, tmp_path / "pop", "test", ["hr@5"], progress=False)
    sas = evaluate_model(tiny_dataset, tmp_path / "sas", "test", ["hr@5"], progress=False)
    assert pop["hr@5"] < 0.35 and sas["hr@5"] > 0.6, (pop, sas)
    summary = json.loads((tmp_path / "sas" / "train.json").read_text())
    assert summary["best_val_ndcg@10"] > 0.3 and (tmp_path / "sas" / "checkpoints" / "last.ckpt").exists()


def test_resume_is_exact(tiny_dataset, tmp_path):
    """Training 3 epochs straight equals training 2, stopping, and resuming for the third."""
    cfg = dict(TINY, patience=10)
    train_sasrec(tiny_dataset, tmp_path / "straight", SASRecTrainConfig(**cfg, max_epochs=3), progress=False)
    train_sasrec(tiny_dataset, tmp_path / "resumed", SASRecTrainConfig(**cfg, max_epochs=2), progress=False)
    first_seconds = json.loads((tmp_path / "resumed" / "train.json").read_text())["seconds"]
    train_sasrec(tiny_dataset, tmp_path / "resumed", SASRecTrainConfig(**cfg, max_epochs=3), progress=False)
    # the reported training time spans both invocations (the Timer's elapsed time is checkpointed)
    assert json.loads((tmp_path / "resumed" / "train.json").read_text())["seconds"] > first_seconds > 0
    ca = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    cb = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ca["epoch"] == cb["epoch"] == 2                    # last.ckpt is the final epoch, not the best one
    a, b = ca["state_dict"], cb["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_run(tiny_dataset, tmp_path):
    train_sasrec(tiny_dataset, tmp_path / "r", SASRecTrainConfig(**TINY, max_epochs=2), progress=False)
    with pytest.raises(RecsysError, match="different config or dataset"):
        train_sasrec(tiny_dataset, tmp_path / "r", SASRecTrainConfig(**{**TINY, "lr": 1e-4}, max_epochs=1),
                     progress=False)
    # resume="auto" (pipelines whose stage settings changed): the other run is started over, not continued
    train_sasrec(tiny_dataset, tmp_path / "r", SASRecTrainConfig(**{**TINY, "lr": 1e-4}, max_epochs=1),
                 progress=False, resume="auto")
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["lr"] == 1e-4
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0   # not 1


def test_a_run_started_over_never_resumes_the_other_runs_checkpoint(tmp_path):
    """Started over (``resume="auto"``) and interrupted before its first checkpoint: the next resume must not
    take the replaced run's last.ckpt as this run's."""
    from pipelines.callbacks import resume_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"the other run")
    a, b = {"config": {"lr": 1e-3}}, {"config": {"lr": 1e-4}}
    assert resume_checkpoint(tmp_path, a, resume=False) is None                  # run a starts, checkpoints
    assert resume_checkpoint(tmp_path, a) == tmp_path / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(tmp_path, b, "auto") is None
    assert resume_checkpoint(tmp_path, b) is None                 # run.json now says b; a's checkpoint is gone


def test_a_finished_run_moved_elsewhere_fails_clearly_on_resume(tiny_dataset, tmp_path):
    """Lightning restores the best checkpoint's score only into the directory it was written to: a run
    directory moved and run again must say so, not crash on ``float(None)``."""
    train_sasrec(tiny_dataset, tmp_path / "r", SASRecTrainConfig(**TINY, max_epochs=1), progress=False)
    (tmp_path / "r").rename(tmp_path / "moved")
    with pytest.raises(RecsysError, match="moved"):
        train_sasrec(tiny_dataset, tmp_path / "moved", SASRecTrainConfig(**TINY, max_epochs=1), progress=False)


def test_evaluate_refuses_a_model_of_other_data(tiny_dataset, tmp_path):
    model = SASRec(SASRecConfig(n_items=tiny_dataset.n_items, max_len=8, hidden_size=8), dataset_fingerprint="0000")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(RecsysError, match="trained on dataset 0000"):
        evaluate_model(tiny_dataset, tmp_path / "m")


def test_recipes_load_into_the_config(tmp_path):
    from pathlib import Path

    from pipelines.fusion import FusionTrainConfig
    from pipelines.generative import GenerativeTrainConfig
    from pipelines.hybrid import HybridTrainConfig
    from pipelines.reranker import RerankerSFTConfig
    from pipelines.rl import RLConfig

    kinds = {"sasrec": SASRecTrainConfig, "listwise": RerankerSFTConfig, "groupwise": RerankerSFTConfig,
             "rl": RLConfig, "generative": GenerativeTrainConfig, "fusion": FusionTrainConfig,
             "hybrid": HybridTrainConfig}  # recipe name prefix -> config
    recipes = sorted((Path(__file__).resolve().parents[1] / "pipelines" / "configs").glob("*.yaml"))
    assert len(recipes) >= 2, "no recipes shipped"
    for recipe in recipes:
        first = recipe.read_text().splitlines()[0]
        assert first.startswith(("# Measured 20", "# Not measured yet (20")) and "`" in recipe.read_text()[:400], recipe
        cls = kinds[recipe.name.split("_")[0]]
        assert isinstance(load_config(cls, recipe), cls)
    recipes = [r for r in recipes if r.name.startswith("sasrec")]
    (tmp_path / "bad.yaml").write_text("lr: 0.001\nlearning_rate: 3\n")
    with pytest.raises(RecsysError, match=r"bad.yaml: unknown key\(s\) \['learning_rate'\]"):
        load_config(SASRecTrainConfig, tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  hidden: 3\n")
    with pytest.raises(RecsysError, match=r"bad.yaml: model: unknown key\(s\) \['hidden'\]"):
        load_config(SASRecTrainConfig, tmp_path / "bad.yaml")
    with pytest.raises(RecsysError, match="'max_epochs' = 'many' is not a valid int"):
        load_config(SASRecTrainConfig, None, {"max_epochs": "many"})
    cfg = load_config(SASRecTrainConfig, recipes[0], {"max_minutes": "2.5", "model.hidden_size": "32"})
    assert cfg.max_minutes == 2.5 and cfg.model.hidden_size == 32 and cfg.model.num_layers == 2


def test_quickstart_small_preset_end_to_end_on_the_fixture(tmp_path):
    """The main job on the synthetic data, every stage: data, baselines, candidates, reranker SFT + Rank-GRPO,
    generative SFT, evaluation, ONNX export; a second run skips every stage."""
    import json

    from pipelines.quickstart import quickstart
    from tests.conftest import FIXTURES

    lines = []
    summary = quickstart(tmp_path / "art", FIXTURES / "tiny", "small", log=lines.append)
    assert list(summary["seconds"]) == ["data", "popularity", "sasrec", "candidates", "fusion", "reranker", "generative",
                                        "evaluate", "export"]
    names = list(summary["results"])
    assert names[:2] == ["popularity", "sasrec"] and any("listwise" in n for n in names) and any(
        "generative" in n for n in names)
    for metrics in summary["results"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0
    serve = tmp_path / "art" / "runs" / "small-seed0" / "serve"
    manifest = json.loads((serve / "manifest.json").read_text())
    assert set(manifest["models"]) == {"sasrec", "first", "generative", "fusion"} and summary["serve"] == f"recsys serve {serve}"
    assert any(line.startswith("serve it:") for line in "\n".join(lines).splitlines())
    lines.clear()
    quickstart(tmp_path / "art", FIXTURES / "tiny", "small", log=lines.append)
    assert sum("up to date" in line for line in lines) == 9

    from pipelines.report import write_report

    report = write_report(tmp_path / "art", latency_requests=20)
    text = report.read_text()
    assert "| sasrec |" in text and "0.1603" in text and "p99" in text and "### reranker-rank-grpo" in text
    for png in ("metrics_at_k.png", "rl_reward.png", "latency.png", "stages.png"):
        assert (report.parent / png).stat().st_size > 1000
    assert "<table>" in (report.parent / "report.html").read_text()


def test_warmup_cosine_hand_example():
    """total 10, warmup 2, floor 0: 0.5, 1.0 during warmup; 1.0 at step 2; cos(pi/2) -> 0.5 at step 6
    (half of the 8 decay steps); 0 at step 10 and after. floor 0.1 lifts the middle to 0.1 + 0.9 * 0.5."""
    from pipelines.optim import warmup_cosine

    got = [warmup_cosine(s, 10, 2) for s in (0, 1, 2, 6, 10, 12)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert warmup_cosine(6, 10, 2, floor=0.1) == pytest.approx(0.55)
    assert warmup_cosine(0, 10) == 1.0                      # no warmup starts at the peak


def test_cosine_schedule_drives_the_optimiser_and_pins_max_epochs(tiny_dataset, tmp_path):
    """The logged learning rate follows warmup then decay within the run; resuming a cosine run with a
    different max_epochs is refused (the schedule spans max_epochs), unlike a constant-rate run."""
    cfg = SASRecTrainConfig(**TINY, max_epochs=2, patience=5, lr_schedule="cosine", warmup_steps=3)
    train_sasrec(tiny_dataset, tmp_path / "c", cfg, progress=False)
    ckpt = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=False)
    steps = ckpt["global_step"]
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert steps > 3 and lr == pytest.approx(0.0, abs=1e-12), (steps, lr)   # annealed to the floor at the end
    assert ckpt["lr_schedulers"][0]["last_epoch"] == steps
    with pytest.raises(RecsysError, match="different config"):
        train_sasrec(tiny_dataset, tmp_path / "c", SASRecTrainConfig(**{**cfg.__dict__, "max_epochs": 3}),
                     progress=False)
    with pytest.raises(RecsysError, match="lr_schedule"):
        SASRecTrainConfig(lr_schedule="linear")


def test_tensorboard_logger_writes_alongside_csv(tiny_dataset, tmp_path):
    """--logger tensorboard adds OUT/tb event files; the CSV log the reports read is still written."""
    from pipelines.trainer import Runtime

    train_sasrec(tiny_dataset, tmp_path / "r", SASRecTrainConfig(**TINY, max_epochs=1), progress=False,
                 runtime=Runtime(loggers=("tensorboard",), accelerator="cpu"))
    events = list((tmp_path / "r" / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "val/ndcg@10" in (tmp_path / "r" / "logs" / "version_0" / "metrics.csv").read_text()


def test_runtime_errors_are_clear(tmp_path, monkeypatch):
    import importlib.util

    from pipelines.trainer import Runtime, make_loggers

    with pytest.raises(RecsysError, match="unknown logger"):
        Runtime(loggers=("wandb",))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RecsysError, match="pip install mlflow"):
        make_loggers(tmp_path, ("mlflow",))


def test_a_run_saved_before_a_config_field_existed_resumes_only_with_its_default():
    from pipelines.callbacks import same_run

    saved = {"config": {"lr": 1e-3}, "dataset_fingerprint": "abc"}
    defaults = {"lr": 1e-3, "identifiers": "letters"}
    assert same_run(saved, {"config": {"lr": 1e-3, "identifiers": "letters"}, "dataset_fingerprint": "abc"}, defaults)
    assert not same_run(saved, {"config": {"lr": 1e-3, "identifiers": "items"}, "dataset_fingerprint": "abc"}, defaults)
    assert not same_run(saved, {"config": {"lr": 1e-3, "other": 1}, "dataset_fingerprint": "abc"}, defaults)
    assert not same_run(saved, {"config": {"lr": 2e-3, "identifiers": "letters"}, "dataset_fingerprint": "abc"}, defaults)
    assert not same_run(saved, {"config": {"lr": 1e-3, "identifiers": "letters"}, "dataset_fingerprint": "xyz"}, defaults)
    assert not same_run({"config": {"lr": 1e-3, "gone": 0}}, {"config": {"lr": 1e-3}}, defaults)


def test_a_pipeline_stage_stays_up_to_date_when_a_setting_added_since_is_off(tmp_path):
    from pipelines.quickstart import Stages, same_settings

    stored = {"fingerprint": "abc", "config": {"lr": 1e-3, "window": 20}}
    assert same_settings(stored, {"fingerprint": "abc", "config": {"lr": 1e-3, "window": 20, "domain": None}})
    assert not same_settings(stored, {"fingerprint": "abc", "config": {"lr": 1e-3, "window": 20, "domain": "books"}})
    assert not same_settings(stored, {"fingerprint": "abc", "config": {"lr": 1e-3}})            # a setting gone
    assert not same_settings(stored, {"fingerprint": "abc", "config": {"lr": 1e-3, "window": None}})
    assert not same_settings(stored, {"fingerprint": "xyz", "config": {"lr": 1e-3, "window": 20}})
    calls, stages = [], Stages(tmp_path, log=lambda _: None)
    for settings in (stored, {**stored, "extra": None}, {**stored, "extra": 1}):
        stages.run("stage", settings, lambda: calls.append(1) or len(calls))
    assert calls == [1, 1]                                   # run, up to date, run again once a new setting is on


def test_a_recipe_names_its_prompt_domain_and_an_unknown_one_is_refused_before_training():
    from pipelines.hybrid import HybridTrainConfig
    from pipelines.reranker import RerankerSFTConfig
    from recsys.errors import RecsysError

    assert RerankerSFTConfig(domain="books").domain == "books" and RerankerSFTConfig().domain is None
    for config in (RerankerSFTConfig, HybridTrainConfig):
        with pytest.raises(RecsysError, match="unknown prompt domain 'podcasts'; known: items, movies"):
            config(domain="podcasts")


def cli_in(directory):
    """``recsys ARGS`` in a subprocess with ``directory`` as its working directory; its stdout, once it exited 0
    (each process of a data-parallel run is a process of its own, as on a cluster)."""
    import subprocess
    import sys

    def recsys(*args) -> str:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                              check=False, cwd=directory, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return recsys


def test_two_process_sasrec_validates_on_all_users_writes_once_and_resumes_exactly(tmp_path):
    """Data parallelism for real: ``recsys train retriever --devices 2 --strategy ddp`` on CPU (gloo). Each
    process trains on its own batches and validates its own users; the gathered validation NDCG@10 equals
    one process's evaluation of the saved weights; one model and one set of checkpoints are written; a run
    stopped after 2 epochs and resumed to 3 ends with the weights of 3 epochs straight."""
    from tests.conftest import FIXTURES

    recsys = cli_in(tmp_path)
    recsys("data", "prepare", str(FIXTURES / "tiny"), "--out", "data")
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--set", "model.hidden_size=16",
           "--set", "model.max_len=20", "--set", "batch_size=8", "--set", "patience=10"]
    out = recsys("train", "retriever", "--data", "data", "--model", "sasrec", "--out", "straight", "--max-epochs", "3",
                 *ddp)
    assert out.count("saved sasrec") == 1                                   # the second process says nothing
    best = json.loads((tmp_path / "straight" / "train.json").read_text())["best_val_ndcg@10"]
    recsys("evaluate", "--data", "data", "--model", "straight", "--split", "valid", "--metrics", "ndcg@10")
    alone = json.loads((tmp_path / "straight" / "metrics_valid.json").read_text())
    assert alone["num_queries"] == 60 and abs(alone["ndcg@10"] - best) < 1e-6          # all 60 validation users
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    recsys("train", "retriever", "--data", "data", "--model", "sasrec", "--out", "resumed", "--max-epochs", "2", *ddp)
    recsys("train", "retriever", "--data", "data", "--model", "sasrec", "--out", "resumed", "--max-epochs", "3", *ddp)
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_two_process_reranker_sft_and_rl_validate_on_all_rows_and_write_once(tmp_path):
    """``recsys train reranker --devices 2 --strategy ddp`` (gloo): each process trains on its share of every
    epoch's batches and validates its share of the rows; the gathered candidate-set NDCG@10 equals one
    process's scoring of the saved (best) weights on all validation rows; one model is written. The same for
    RL from that model (``--algo rank-grpo``)."""
    import numpy as np

    from pipelines.rerank import make_scorer
    from recsys.data import PreparedDataset
    from recsys.data.candidates import read_candidate_lists
    from recsys.llm.backbone import load_backbone
    from recsys.metrics import compute_metrics, target_rank
    from recsys.retrieval.candidates import PopularityRetriever, generate_candidates
    from tests.conftest import FIXTURES

    recsys = cli_in(tmp_path)
    recsys("data", "prepare", str(FIXTURES / "tiny"), "--out", "data")
    ds = PreparedDataset.load(tmp_path / "data")
    generate_candidates(ds, PopularityRetriever(ds.item_popularity("train")), "popularity", tmp_path / "c", n=12,
                        progress=False)
    out = recsys("train", "reranker", "--data", "data", "--candidates", "c", "--out", "rr", "--backbone", "tiny",
                 "--max-epochs", "2", "--set", "window=12", "--set", "tiny_hidden_size=32", "--set", "val_users=25",
                 "--set", "precision=32-true", "--set", "retriever_prior=0", "--accelerator", "cpu", "--devices", "2",
                 "--strategy", "ddp")
    assert out.count("saved the listwise reranker") == 1                     # the second process says nothing
    best = json.loads((tmp_path / "rr" / "train.json").read_text())["best_val_cand_ndcg@10"]
    assert sorted(p.name for p in (tmp_path / "rr" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    backbone = load_backbone(tmp_path / "rr" / "model")
    scorer = make_scorer(backbone, "listwise", None, 12, max_history=20, bf16=False, identifiers="letters")
    rows = [r.top(12) for r in read_candidate_lists(ds, tmp_path / "c", "valid")[-25:]]
    rows = [r for r in rows if r.has_target]
    ranked = scorer.rank_windows([r.history for r in rows], [r.window for r in rows])
    ranks = np.array([target_rank(o, r.target) for o, r in zip(ranked, rows)], dtype=np.float64)[:, None]
    alone = compute_metrics(ranks, np.ones_like(ranks), ["ndcg@10"])["ndcg@10"]
    assert len(rows) > 4 and abs(alone - best) < 1e-6
    # RL from it, in 2 processes and in 1: the step-0 validation of the same weights agrees, one model is written
    rl = ["train", "reranker", "--algo", "rank-grpo", "--init", "rr/model", "--data", "data", "--candidates", "c",
          "--max-steps", "2", "--set", "window=12", "--set", "val_every=1", "--set", "group_size=2", "--set",
          "prompts_per_step=2", "--set", "val_users=25", "--set", "precision=32-true"]
    two = recsys(*rl, "--out", "rl2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")
    recsys(*rl, "--out", "rl1")
    assert two.count("saved the rank-grpo reranker") == 1
    start = [json.loads((tmp_path / run / "start.json").read_text())["val/cand_ndcg@10"] for run in ("rl2", "rl1")]
    assert abs(start[0] - start[1]) < 1e-6
    # an epoch (val_every 1) is one batch of 2 prompts: split, one prompt per process, 2 epochs = 2 steps
    assert json.loads((tmp_path / "rl2" / "train.json").read_text())["steps"] == 2
