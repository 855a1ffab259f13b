"""The at-init experiment: runs are stored as they finish, resumed, and reported from the store."""

from dataclasses import replace

import pytest

from winnow import TrainConfig
from winnow.experiments import at_init
from winnow.experiments.store import RunStore


def tiny_sweep(**overrides):
    options = dict(
        model="lenet300",
        data="digits",
        methods=("magnitude", "snip"),
        densities=(0.2, 0.05),
        seeds=(0,),
        controls=("none", "shuffle"),
        train=TrainConfig(epochs=1),
        data_limit=300,
    )
    options.update(overrides)
    return at_init.sweep(**options)


def test_sweep_runs_resumes_and_reports(tmp_path, monkeypatch):
    configs = tiny_sweep()
    assert len(configs) == 1 + 2 * 2 * 2  # dense + methods x densities x controls

    calls, killed = [], []
    original = at_init.execute

    def flaky(run):
        calls.append(run.config)
        if len(calls) == 4 and not killed:
            killed.append(run.run_id)
            raise SystemExit(1)  # the sweep is killed during its fourth run
        original(run)

    monkeypatch.setattr(at_init, "EXPERIMENT_SPEC", replace(at_init.EXPERIMENT_SPEC, execute=flaky))
    with pytest.raises(SystemExit):
        at_init.run(tmp_path, configs, progress=False)
    store = RunStore(tmp_path)
    assert len([r for r in store.runs("at-init") if r["status"] == "done"]) == 3

    calls.clear()
    at_init.run(tmp_path, configs, progress=False)
    assert len(calls) == len(configs) - 3  # finished runs are not redone
    rows = store.records("at-init", kind="result")
    assert len(rows) == len(configs)
    for row in rows:
        assert 0 <= row["test_acc"] <= 1
        assert row["density_kept"] == pytest.approx(row["density"], abs=1e-3)

    calls.clear()
    at_init.run(tmp_path, configs, progress=False)
    assert calls == []

    paths = at_init.report(tmp_path)
    table = paths["table"].read_text()
    assert "snip" in table and "shuffle" in table and "dense" in table
    for key in ("accuracy", "layers"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shuffled_control_uses_same_per_layer_densities(tmp_path):
    configs = tiny_sweep(
        methods=("snip",), densities=(0.1,), controls=("none", "shuffle", "reinit")
    )
    at_init.run(tmp_path, configs, progress=False)
    prune = RunStore(tmp_path).records("at-init", kind="prune")
    densities = {r["control"]: r["layer_density"] for r in prune}
    assert densities["none"] == densities["shuffle"] == densities["reinit"]


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown method 'snap'"):
        at_init.AtInitConfig(method="snap")
    with pytest.raises(ValueError, match="density"):
        at_init.AtInitConfig(density=2.0)
    with pytest.raises(ValueError, match="unknown control"):
        at_init.AtInitConfig(control="mirror")


def test_a_sweep_with_failed_runs_exits_non_zero(tmp_path, monkeypatch, capsys):
    import winnow.cli
    from winnow.experiments import EXPERIMENTS

    spec = EXPERIMENTS["at-init"]

    def failing(run):
        if run.config.method == "snip":
            raise RuntimeError("a broken criterion")
        spec.execute(run)

    monkeypatch.setitem(EXPERIMENTS, "at-init", replace(spec, execute=failing))
    args = ["experiment", "at-init", "--model", "mlp", "--data", "synthetic", "--methods"]
    args += ["magnitude,snip", "--densities", "20%", "--seeds", "0", "--controls", "none"]
    args += ["--epochs", "1", "--data-limit", "100", "--results", str(tmp_path), "--no-progress"]
    assert winnow.cli.main(args) == 2
    captured = capsys.readouterr()
    assert "magnitude" in captured.out  # the report of what finished comes first
    assert "1 of 3 runs failed" in captured.err
