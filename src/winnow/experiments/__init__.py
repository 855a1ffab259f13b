"""Experiments: one run store for all (docs/architecture.md, "Experiments").

The machinery every ``winnow experiment ...`` command shares:

- A *configuration* is a frozen dataclass. :func:`config_id` hashes its non-default fields,
  so adding an option with a default keeps old runs valid; :func:`config_to_dict` and
  :func:`config_from_dict` convert it to and from JSON data.
- A :class:`RunStore` holds the runs of every experiment under one results root: each run's
  files in ``<root>/<experiment>/<config_id>/`` (its ``config.json``, masks, weights), and the
  run statuses and metric records in one SQLite database, ``<root>/winnow.sqlite`` (WAL mode;
  several processes can write at once without losing a row).
- A :class:`Run` is what a run function receives: its configuration, its directory, and
  methods to record metrics (``record``; ``completed`` to resume) and to write files
  atomically (``save_json``, ``save_tensors``: checksummed safetensors, never pickles).
- A control is a branch of the run it follows, and a shared artefact (pretrained weights,
  learned gates) a run of its own: :meth:`RunStore.require`, :meth:`RunStore.ensure` and
  :meth:`Run.link`.
- An experiment is described once (:class:`Experiment`: configuration, swept axes, ``sweep``,
  ``execute``, ``report``) and registered in :data:`EXPERIMENTS`; ``at_init``, ``lottery``
  and ``scratch`` are, and the command line is generated from them.
- :func:`run_sweep` runs a list of configurations in-process, skips those already done,
  records failures and goes on; a run killed halfway resumes from its last recorded step.
  Runs are independent, so the same list can later go to a process pool or a cluster.
- Reports are rebuilt from the store, never from memory: :func:`aggregate` (mean and sample
  std over seeds), :func:`markdown_table` / :func:`write_table` (markdown and CSV) and
  :func:`line_plot` / :func:`bar_plot` (PNG; needs ``pip install winnow[plots]``).

Every file is written to a temporary name and renamed, so a crash never leaves half a file.

Example::

    @dataclass(frozen=True)
    class Config:
        method: str
        density: float
        seed: int = 0

    def one_run(run: Run) -> None:
        acc = prune_and_train(run.config)
        run.record("final", 0, {"test_acc": acc})

    store = RunStore("results")
    run_sweep(store, "pai", [Config(m, d, s) for m in ("snip", "grasp") for d in (0.1, 0.02)
                             for s in range(3)], one_run)
    rows = aggregate(store.records("pai", kind="final"), by=["method", "density"],
                     values=["test_acc"])
    write_table(rows, ["method", "density", "n", "test_acc_mean", "test_acc_std"],
                Path("results/pai/summary"))
"""

from winnow.experiments import at_init, lottery, scratch, sparse_training  # noqa: E402, F401
from winnow.experiments.configs import config_from_dict, config_id, config_to_dict
from winnow.experiments.registry import EXPERIMENTS, Axis, Experiment, register
from winnow.experiments.report import aggregate, bar_plot, line_plot, markdown_table, write_table
from winnow.experiments.runner import SweepSummary, run_sweep
from winnow.experiments.store import (
    STATUSES,
    Run,
    RunStore,
    StoreError,
    check_store,
    repair_store,
)
from winnow.io import load_tensors, save_tensors, tensor_metadata

__all__ = [
    "EXPERIMENTS",
    "STATUSES",
    "Axis",
    "Experiment",
    "Run",
    "RunStore",
    "StoreError",
    "SweepSummary",
    "aggregate",
    "bar_plot",
    "check_store",
    "config_from_dict",
    "config_id",
    "config_to_dict",
    "at_init",
    "line_plot",
    "lottery",
    "load_tensors",
    "markdown_table",
    "run_sweep",
    "register",
    "repair_store",
    "save_tensors",
    "scratch",
    "tensor_metadata",
    "write_table",
]
