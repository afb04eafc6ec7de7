from pipelines.benchmarks.baselines_ml1m import validation_curve


def test_validation_curve_joins_resumed_invocations(tmp_path):
    """Two invocations (a resume): epochs 0-1 then 2; training-only rows have no validation value."""
    for version, rows in {0: "0,10,0.1,,\n0,12,,0.2,0.05\n1,24,,0.3,0.08\n", 1: "2,36,,0.35,0.09\n"}.items():
        d = tmp_path / "logs" / f"version_{version}"
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("epoch,step,train/loss,val/hr@10,val/ndcg@10\n" + rows)
    assert validation_curve(tmp_path) == [[1, 0.05], [2, 0.08], [3, 0.09]]
    assert validation_curve(tmp_path / "nothing") == []
