import json
import subprocess
import sys

import pytest

from pipelines.cli import main
from recsys.errors import RecsysError
from tests.conftest import FIXTURES


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_train_evaluate(tmp_path, capsys):
    data = tmp_path / "data"
    code, out, _ = run(capsys, "data", "prepare", FIXTURES / "tiny", "--out", data)
    assert code == 0 and json.loads(out)["users"] == 60
    code, out, _ = run(capsys, "train", "retriever", "--data", data, "--model", "popularity", "--out", tmp_path / "pop")
    assert code == 0 and "saved popularity" in out
    code, out, _ = run(capsys, "evaluate", "--data", data, "--model", tmp_path / "pop", "--metrics", "hr@10,ndcg@10",
                       "--out", tmp_path / "m.json")
    assert code == 0 and "hr@10" in out and "60 users" in out
    assert set(json.loads((tmp_path / "m.json").read_text())) >= {"hr@10", "ndcg@10", "num_queries"}
    code, out, err = run(capsys, "train", "retriever", "--data", data, "--out", tmp_path / "sas", "--max-epochs", "1",
                         "--set", "model.hidden_size=16", "--set", "model.max_len=10", "--set", "precision=32-true")
    assert code == 0 and (tmp_path / "sas" / "model" / "model.safetensors").exists()
    # not a terminal: a progress line per validation (and every 30 s) instead of a live bar; no library tips
    assert "epoch 0 step 2 validated: " in err and "val/ndcg@10=" in err and "Tip:" not in err


@pytest.mark.parametrize("argv, message", [
    (["data", "prepare", "/no/such/dir", "--out", "x"], "/no/such/dir: no such file or directory"),
    (["evaluate", "--data", "/nowhere", "--model", "m"], "not a prepared dataset"),
    (["evaluate-run", "run.txt", "qrels.txt"], "run.txt: file not found"),
])
def test_errors_are_one_line(capsys, argv, message):
    code, _out, err = run(capsys, *argv)
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unknown_user_and_bad_metric(tmp_path, capsys):
    data = tmp_path / "data"
    run(capsys, "data", "prepare", FIXTURES / "tiny", "--out", data)
    run(capsys, "train", "retriever", "--data", data, "--model", "popularity", "--out", tmp_path / "pop")
    code, _, err = run(capsys, "evaluate", "--data", data, "--model", tmp_path / "pop", "--users", "u1,ghost")
    assert code == 1 and "unknown user id(s) ['ghost']" in err
    with pytest.raises(SystemExit):                       # argparse rejects it before anything runs
        main(["evaluate", "--data", str(data), "--model", "x", "--metrics", "ndcg"])
    assert "needs a cut-off" in capsys.readouterr().err
    code, _, err = run(capsys, "train", "retriever", "--data", data, "--out", tmp_path / "s", "--set", "layers=3")
    assert code == 1 and "unknown key(s) ['layers']" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "retriever", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--preset" in out and "resumes" in out


def test_evaluate_writes_metrics_beside_the_model_by_default(tmp_path, capsys):
    data = tmp_path / "data"
    run(capsys, "data", "prepare", FIXTURES / "tiny", "--out", data)
    run(capsys, "train", "retriever", "--data", data, "--model", "popularity", "--out", tmp_path / "pop")
    code, _out, _ = run(capsys, "evaluate", "--data", data, "--model", tmp_path / "pop", "--split", "valid")
    written = json.loads((tmp_path / "pop" / "metrics_valid.json").read_text())
    assert code == 0 and written["split"] == "valid" and written["num_queries"] == 60 and "ndcg@10" in written


def test_index_candidates_semantic_ids(tmp_path, capsys):
    data, run_dir = tmp_path / "data", tmp_path / "sas"
    run(capsys, "data", "prepare", FIXTURES / "tiny", "--out", data)
    run(capsys, "train", "retriever", "--data", data, "--out", run_dir, "--max-epochs", "1",
        "--set", "model.hidden_size=16", "--set", "model.max_len=10")
    code, out, err = run(capsys, "index", "build", "--data", data, "--sasrec", run_dir, "--factory", "HNSW8,Flat",
                         "--out", tmp_path / "idx")
    assert code == 0 and json.loads(out)["count"] == 40, err
    code, out, err = run(capsys, "index", "build", "--data", data, "--sasrec", run_dir, "--factory", "IVF4,Flat",
                         "--mips", "on", "--out", tmp_path / "ivf")
    assert code == 0 and json.loads(out)["mips_norm"] > 0 and json.loads(out)["factory"] == "IVF4,Flat", err
    code, _, err = run(capsys, "candidates", "--data", data, "--sasrec", run_dir, "--n", "20", "--out", tmp_path / "c")
    assert code == 1 and "n=20 candidates, but user" in err and "leaving 19; lower n" in err
    code, out, err = run(capsys, "candidates", "--data", data, "--sasrec", run_dir, "--index", tmp_path / "idx",
                         "--n", "10", "--out", tmp_path / "cands")
    assert code == 0 and "recall@10" in out and (tmp_path / "cands" / "candidates_train.parquet").exists(), err
    code, out, err = run(capsys, "index", "semantic-ids", "--data", data, "--source", "cf", "--sasrec", run_dir,
                         "--levels", "2", "--codebook-size", "4", "--out", tmp_path / "sid")
    assert code == 0 and json.loads(out)["items"] == 40, err
    code, _, err = run(capsys, "candidates", "--data", data, "--retriever", "sasrec", "--out", tmp_path / "x")
    assert code == 1 and "needs a trained SASRec" in err


def test_train_reranker_and_rerank(tmp_path, capsys):
    data = tmp_path / "data"
    run(capsys, "data", "prepare", FIXTURES / "tiny", "--out", data)
    run(capsys, "train", "retriever", "--data", data, "--model", "popularity", "--out", tmp_path / "pop")
    from recsys.data import PreparedDataset
    from recsys.retrieval.candidates import PopularityRetriever, generate_candidates

    ds = PreparedDataset.load(data)
    generate_candidates(ds, PopularityRetriever(ds.item_popularity("train")), "popularity", tmp_path / "c", n=12,
                        progress=False)
    code, out, err = run(capsys, "train", "reranker", "--data", data, "--candidates", tmp_path / "c", "--out",
                         tmp_path / "rr", "--backbone", "tiny", "--max-epochs", "1", "--window", "12",
                         "--tiny-hidden-size", "32", "--set", "precision=32-true")
    assert code == 0 and "saved the listwise reranker" in out, err
    code, out, err = run(capsys, "rerank", "--data", data, "--model", tmp_path / "rr" / "model", "--candidates",
                         tmp_path / "c", "--out", tmp_path / "rr", "--window", "12", "--limit", "10")
    assert code == 0 and "reranked" in out and "cand_ndcg@10" in out, err
    metrics = json.loads((tmp_path / "rr" / "rerank_metrics_test.json").read_text())
    assert metrics["retriever"]["num_queries"] == 10 and {"retriever", "reranked", "seconds"} <= set(metrics)
    code, out, err = run(capsys, "train", "reranker", "--algo", "rank-grpo", "--init", tmp_path / "rr" / "model",
                         "--data", data, "--candidates", tmp_path / "c", "--out", tmp_path / "rl", "--max-steps", "2",
                         "--window", "12", "--val-every", "1", "--group-size", "2", "--prompts-per-step", "2",
                         "--set", "val_users=8", "--precision", "32-true")
    assert code == 0 and "saved the rank-grpo reranker" in out, err
    config = json.loads((tmp_path / "rl" / "train.json").read_text())["config"]
    assert (config["window"], config["group_size"], config["val_users"], config["val_every"]) == (12, 2, 8, 1)
    code, out, err = run(capsys, "rerank", "--data", data, "--model", tmp_path / "rl" / "model", "--candidates",
                         tmp_path / "c", "--out", tmp_path / "rl", "--window", "12", "--limit", "4", "--mode", "generate")
    assert code == 0 and "(generate)" in out, err
    code, _, err = run(capsys, "train", "reranker", "--data", data, "--candidates", tmp_path / "none", "--out", tmp_path / "x")
    assert code == 1 and "run `recsys candidates` first" in err
    code, _, err = run(capsys, "train", "reranker", "--algo", "grpo", "--data", data, "--candidates", tmp_path / "c",
                       "--out", tmp_path / "y")
    assert code == 1 and "needs a starting model" in err


def test_export_and_rescore_commands(exported, tiny_dataset, tmp_path, capsys):
    import polars as pl

    _, _, rr = exported
    code, out, err = run(capsys, "export", "--data", tiny_dataset.directory, "--sasrec", tmp_path / "sas",
                         "--reranker", rr, "--out", tmp_path / "serve2")
    assert code == 0 and "recsys serve" in out, err
    users = pl.read_parquet(tmp_path / "serve2" / "histories.parquet")["user_id"].to_list()[:5]
    pl.DataFrame({"request_id": [f"q{i}" for i in range(5)], "user_id": users}).write_parquet(tmp_path / "q.parquet")
    code, out, err = run(capsys, "rescore", "--serve-dir", tmp_path / "serve2", "--input", tmp_path / "q.parquet",
                         "--output", tmp_path / "scored")
    assert code == 0 and "5 rows scored, 0 rejected" in out, err


def test_version_flag(capsys):
    import pytest

    from pipelines.cli import main
    from recsys import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"recsys {__version__}"


def test_bundled_recipes_are_found_by_name_and_a_wrong_name_lists_them():
    from pipelines.config import find_recipe, load_config
    from pipelines.train import SASRecTrainConfig

    assert load_config(SASRecTrainConfig, "sasrec_ml1m") == load_config(SASRecTrainConfig,
                                                                       "pipelines/configs/sasrec_ml1m.yaml")
    with pytest.raises(RecsysError, match="sasrec_ml: recipe not found .*sasrec_ml1m"):
        find_recipe("sasrec_ml")


def test_training_commands_take_every_config_field_as_an_option_checked_like_a_recipe(tmp_path, capsys):
    """The options come from the config classes' fields and docstrings (read from source: the parser imports no
    training code); a wrong value names the field, a field of no config the command trains is refused."""
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "hybrid", "--help"], capture_output=True,
                         text=True, check=True).stdout
    text = " ".join(out.split())
    assert "--keep-layers INT|NONE Keep the first N decoder layers (None = all). (default: 4)" in text
    assert "--target-missing STR A retriever window without the held-out item" in text
    code, _, err = run(capsys, "train", "reranker", "--data", tmp_path, "--candidates", tmp_path, "--out", tmp_path,
                       "--window", "ten")
    assert code == 1 and "'window' = 'ten' is not a valid int" in err
    code, _, err = run(capsys, "train", "reranker", "--data", tmp_path, "--candidates", tmp_path, "--out", tmp_path,
                       "--group-size", "4", "--mu", "2")
    assert code == 1 and "unknown key(s) ['mu']" in err                   # an RL field, given to SFT


def test_every_option_default_is_shown_in_help():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "prepare", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "(default: loo)" in " ".join(out.split()) and "(default: user_id)" in " ".join(out.split())
    assert "(default: None)" not in out and "(default: False)" not in out
