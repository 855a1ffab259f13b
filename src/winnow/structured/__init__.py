"""Structured pruning: channel groups, gates, FLOPs budgets, and surgery that removes channels.

A masked network is not faster; only a smaller one is. This package finds which channels to
remove and removes them:

- :func:`find_groups` (``dependency``): the channels that must go together (a convolution's
  output, its BatchNorm, the next layers' inputs, a flatten, residual additions), traced with
  ``torch.fx``; a group that cannot be pruned exactly says why.
- :func:`count` (``flops``): per-layer and total MACs (the literature's "FLOPs"), elementwise
  operations and parameters of any model (recurrent layers by formula, attention and anything
  else through ``torch.utils.flop_counter.FlopCounterMode``); what is not counted is named.
- :func:`add_gates`, :func:`apply_channel_masks` (``gates``): a scalar gate per channel after
  each BatchNorm, before the activation.
- :func:`learn_gates`, :func:`prune_from_scratch` (``scratch``): Pruning from Scratch (Wang et
  al. 2020, AAAI): gates learned on frozen random weights, then a global threshold meeting a
  FLOPs budget (:func:`threshold_for_budget`); train the widths from a fresh initialisation
  (:func:`scratch_b_epochs`, Liu et al. 2019).
- Baselines (``baselines``): network slimming (Liu et al. 2017; :func:`bn_l1`,
  :func:`slimming_structure`), L1-norm filter pruning (Li et al. 2017;
  :func:`l1_filter_structure`) and uniform width scaling (:func:`uniform_structure`).
- :func:`shrink`, :func:`rebuild`, :func:`save`, :func:`load` (``surgery``): the smaller dense
  network and the small JSON spec it is rebuilt from (no pickled module).
- :func:`structure_correlation`, :func:`correlation_heatmap` (``analysis``): how similar
  structures are across seeds and methods; :func:`measure_latency` (``latency``).
"""

from winnow.structured.analysis import correlation_heatmap, mean_correlation, structure_correlation
from winnow.structured.baselines import (
    bn_l1,
    bn_scores,
    l1_filter_scores,
    l1_filter_structure,
    network_slimming,
    slimming_structure,
)
from winnow.structured.budget import Structure, threshold_for_budget, uniform_structure
from winnow.structured.dependency import Analysis, ChannelGroup, analyse, find_groups
from winnow.structured.flops import Counts, LayerCount, count, count_analysis
from winnow.structured.gates import (
    ChannelGate,
    add_gates,
    apply_channel_masks,
    gate_modules,
    gate_values,
    set_gates,
)
from winnow.structured.latency import measure_latency
from winnow.structured.scratch import (
    GateResult,
    ScratchResult,
    learn_gates,
    prune_from_scratch,
    scratch_b_epochs,
)
from winnow.structured.surgery import (
    SPEC_FORMAT,
    describe,
    load,
    rebuild,
    save,
    shrink,
    spec_for,
    zoo_spec,
)

__all__ = [
    "SPEC_FORMAT",
    "Analysis",
    "ChannelGate",
    "ChannelGroup",
    "Counts",
    "GateResult",
    "LayerCount",
    "ScratchResult",
    "Structure",
    "add_gates",
    "analyse",
    "apply_channel_masks",
    "bn_l1",
    "bn_scores",
    "correlation_heatmap",
    "count",
    "count_analysis",
    "describe",
    "find_groups",
    "gate_values",
    "gate_modules",
    "l1_filter_scores",
    "l1_filter_structure",
    "learn_gates",
    "load",
    "mean_correlation",
    "measure_latency",
    "network_slimming",
    "prune_from_scratch",
    "rebuild",
    "save",
    "scratch_b_epochs",
    "set_gates",
    "shrink",
    "slimming_structure",
    "spec_for",
    "structure_correlation",
    "threshold_for_budget",
    "uniform_structure",
    "zoo_spec",
]
