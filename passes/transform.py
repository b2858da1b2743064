"""The passes that find, measure, select, compensate and rewrite channel groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from grail_graph.core import (
    SELECTORS,
    HeldOutMoments,
    compensation_gain,
    averaging_matrix,
    cluster_channels,
    fold_features,
    fold_map,
    affine_cross_map,
    affine_prune_map,
    cross_map,
    kept_width,
    prune_map,
    relative_reconstruction_error,
    select_channels,
    slice_map,
)
from grail_graph.core.selectors import select_units
from grail_graph.errors import GrailError
from grail_graph.frontend import GroupPlan
from grail_graph.groups import BIAS, BN_ROLES
from grail_graph.passes.base import CompressionState, NoOptions, Pass, PassResult, register

logger = logging.getLogger(__name__)

COMPENSATIONS = ("ridge", "none")
# Head removal modes. "kv" removes whole key/value heads together with the query heads
# that read them. "query" removes the same number of query heads from every key/value
# group and keeps all keys and values. "auto" (the default) takes query for grouped-query
# and multi-query attention and kv for multi-head attention, where each group has one
# query head. On SmolLM2-135M (9 query, 3 key/value heads) removing 3 heads with ridge
# compensation gave WikiText-2 perplexity 34.85 in query mode against 50.77 in kv mode
# (docs/results-smollm2.md).
HEAD_MODES = ("auto", "kv", "query")
FOLD_METHODS = ("fold-kmeans", "fold-pca")
# Folding merges the pre-activations of a producer -> [BatchNorm] chain, so it needs every
# narrowed tensor to be a producer bias or a BatchNorm tensor.
FOLDABLE_ROLES = frozenset({BIAS, *BN_ROLES})


@register
class FindGroups(Pass):
    name = "find-groups"
    summary = "Match compressible channel groups; record a reason for every declined candidate."
    Options = NoOptions

    def run(self, state: CompressionState) -> PassResult:
        state.groups, state.declined = state.frontend.find_groups()
        for declined in state.declined:
            state.verdicts[declined.candidate] = f"skipped: {declined.reason}"
            logger.info("declined %s: %s", declined.candidate, declined.reason)
        width = sum(group.width for group in state.groups)
        return PassResult(False, {"groups": len(state.groups), "declined": len(state.declined), "channels": width})


STATISTICS = ("oneshot", "sequential", "cross")


@dataclass(frozen=True)
class CalibrateOptions:
    batch_size: int = field(default=64, metadata={"help": "samples per ONNX Runtime run"})
    samples: int = field(default=0, metadata={"help": "calibration samples to use; 0 uses all"})
    statistics: str = field(
        default="oneshot",
        metadata={
            "help": "oneshot: all Grams from the original model; sequential: each group from the model "
            "with the groups before it compressed; cross: like sequential, regressing the original "
            "model's hidden values on the compressed model's"
        },
    )

    holdout: float = field(
        default=0.0,
        metadata={
            "help": "fraction of the calibration samples, taken from the end, whose statistics are kept apart "
            "to judge compensation (compensate{fallback=true}); 0 keeps none"
        },
    )

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics {self.statistics!r} is not one of {', '.join(STATISTICS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must lie in [0, 1), got {self.holdout}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")


@register
class Calibrate(Pass):
    name = "calibrate"
    summary = "Record the Gram matrix of every group's consumer input on unlabeled data."
    Options = CalibrateOptions

    def run(self, state: CompressionState) -> PassResult:
        state.require("calibration data", state.calibration is not None, self.name, "Pass --calib FILE_OR_FOLDER.")
        data = state.calibration
        if self.options.samples:
            data = data.subset(0, self.options.samples)
        # Groups the pipeline keeps whole (attention heads at head sparsity 0) need no statistics.
        groups = [group for group in state.current_groups if group.name not in state.kept_whole]
        held_out = int(len(data) * self.options.holdout)
        if self.options.holdout and not 0 < held_out < len(data):
            raise GrailError(
                f"calibrate{{holdout={self.options.holdout}}} splits {len(data)} samples into "
                f"{len(data) - held_out} to fit and {held_out} held out",
                "Both parts need samples: pass more calibration samples or change the holdout fraction.",
            )
        fit = data.subset(0, len(data) - held_out) if held_out else data
        with tqdm(total=len(data), unit="sample", desc="calibrate", disable=not state.show_progress) as bar:
            self._record(state, groups, fit, state.stats, state.crosses, bar.update)
            if held_out:
                held = data.subset(len(data) - held_out)
                self._record(state, groups, held, state.heldout_stats, state.heldout_crosses, bar.update)
        statistics = {"samples": len(fit), "groups": len(groups), "statistics": self.options.statistics}
        if len(groups) < len(state.current_groups):
            statistics["groups_kept_whole"] = len(state.current_groups) - len(groups)
        if held_out:
            statistics["held_out_samples"] = len(data) - len(fit)
        return PassResult(False, statistics)

    def _record(self, state: CompressionState, groups, data, stats: dict, crosses: dict, progress) -> None:
        """Record the statistics of `groups` on `data`.

        One-shot and sequential statistics are Grams of the front end's current model; they
        differ only in when this runs (see the pipeline's group-wise segment). Cross
        statistics also run the original model on each batch.
        """
        if not groups:
            progress(len(data))
            return
        batches = data.batches(self.options.batch_size)
        if self.options.statistics != "cross":
            stats.update(state.frontend.calibrate(groups, batches, progress))
            return
        recorded, recorded_crosses = state.frontend.calibrate_with_reference(groups, batches, progress)
        stats.update(recorded)
        crosses.update(recorded_crosses)


@dataclass(frozen=True)
class SelectOptions:
    method: str = field(
        default="wanda", metadata={"help": f"channel selector: {', '.join(SELECTORS)}; or folding: {', '.join(FOLD_METHODS)}"}
    )
    sparsity: float = field(default=0.5, metadata={"help": "fraction of each group's channels removed, in [0, 1)"})
    multiple: int = field(default=1, metadata={"help": "round kept widths to a multiple of this"})
    seed: int = field(default=0, metadata={"help": "seed of the random selector"})
    head_sparsity: float = field(
        default=0.0,
        metadata={"help": "fraction of the heads removed in each attention-head group, in [0, 1); 0 keeps every head"},
    )
    heads: str = field(
        default="auto",
        metadata={
            "help": "attention heads: kv removes whole key/value heads with their query heads; query removes "
            "query heads inside every key/value group, keeping all keys and values; auto takes query when "
            "key/value heads are shared and kv otherwise"
        },
    )

    def __post_init__(self) -> None:
        if self.heads not in HEAD_MODES:
            raise ValueError(f"heads {self.heads!r} is not one of {', '.join(HEAD_MODES)}")
        if self.method not in SELECTORS + FOLD_METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(SELECTORS + FOLD_METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.head_sparsity < 1.0:
            raise ValueError(f"head-sparsity must lie in [0, 1), got {self.head_sparsity}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")


@register
class Select(Pass):
    name = "select"
    summary = "Choose the channels each group keeps."
    Options = SelectOptions

    def keeps_whole(self, group, pipeline) -> bool:
        """Attention-head groups stay whole at head sparsity 0 unless an allocation gives them a width."""
        allocated = any(instance.name == "allocate" for instance in pipeline)
        return bool(group.kv_heads) and self.options.head_sparsity == 0.0 and not allocated

    def run(self, state: CompressionState) -> PassResult:
        options = self.options
        needs_gram = options.method in ("wanda", "gram", *FOLD_METHODS)
        measured = [group for group in state.current_groups if not self.keeps_whole(group, state.pipeline)]
        state.require(
            "Gram statistics", not needs_gram or bool(state.stats) or not measured, self.name,
            "Run 'calibrate' before 'select', or use select{method=magnitude}.",
        )  # fmt: skip
        for group in state.current_groups:
            k = state.widths.get(group.name) or kept_width(group.width, options.sparsity, options.multiple)
            stats = state.stats.get(group.name)
            method = options.method
            if self.keeps_whole(group, state.pipeline):
                state.keeps[group.name] = np.arange(group.width)
                continue
            if group.kv_heads:
                state.keeps[group.name] = self._select_heads(state, group, stats)
                continue
            if method in FOLD_METHODS:
                reason = _fold_blocker(group)
                if reason is None:
                    state.folds[group.name] = _cluster(state, group, k, method, options.seed)
                    state.keeps[group.name] = np.arange(k)
                    continue
                state.notes[group.name] = f"pruned with wanda instead of folded: {reason}"
                method = "wanda"
            state.keeps[group.name] = select_channels(
                method,
                k,
                gram=None if stats is None else stats.gram,
                producers=state.frontend.producer_weights(group),
                consumers=state.frontend.consumer_weights(group),
                seed=options.seed,
            )
        removed = sum(g.width - len(state.keeps[g.name]) for g in state.groups if g.name in state.keeps)
        return PassResult(False, {"channels_removed": removed})

    def _select_heads(self, state: CompressionState, group, stats) -> np.ndarray:
        """Keep whole heads of an attention-head group, in the layout the `heads` option names.

        With heads=kv a unit is one key/value head with its query heads; with heads=query a
        unit is one query head and every key/value group keeps the same number of them.
        An allocated width is rounded to the nearest whole number of units per group.
        """
        options = self.options
        query_heads = group.width // group.unit
        group_size = query_heads // group.kv_heads
        mode = options.heads
        if mode == "auto":
            mode = "query" if group_size > 1 else "kv"
        if mode == "kv":
            unit, blocks, per_block = group.unit * group_size, 1, group.kv_heads
        else:
            unit, blocks, per_block = group.unit, group.kv_heads, group_size
        width = state.widths.get(group.name)
        if width is None:
            kept = kept_width(per_block, options.head_sparsity)
        else:
            kept = min(max(round(width / (unit * blocks)), 1), per_block)
        if mode == "kv" and group.kv_heads == 1 and options.head_sparsity > 0:
            state.notes[group.name] = "one key/value head, so heads=kv keeps every head; select{heads=query} removes query heads"
        method = options.method
        if method in FOLD_METHODS:
            state.notes[group.name] = "pruned with wanda instead of folded: folding would mix channels across heads"
            method = "wanda"
        return select_units(
            method,
            kept,
            unit,
            blocks=blocks,
            gram=None if stats is None else stats.gram,
            producers=state.frontend.producer_weights(group),
            consumers=state.frontend.consumer_weights(group),
            seed=options.seed,
        )


def _fold_blocker(group) -> str | None:
    """Return why `group` cannot be folded, else None."""
    roles = {ref.role for ref in group.narrowed}
    if not roles <= FOLDABLE_ROLES:
        names = sorted(ref.node for ref in group.narrowed if ref.role not in FOLDABLE_ROLES)
        return f"folding supports only producer biases and BatchNorm, not {', '.join(names)}"
    if sum(ref.role == BN_ROLES[0] for ref in group.narrowed) > 1:
        return "folding supports at most one BatchNorm"
    return None


def _cluster(state: CompressionState, group, k: int, method: str, seed: int) -> np.ndarray:
    """Return the averaging matrix R (K, H) from k-means on the group's channel features."""
    producers = state.frontend.producer_weights(group)
    if method == "fold-kmeans":
        features = fold_features(producers)
    else:
        consumers = state.frontend.consumer_weights(group)
        extra = [state.frontend.narrowed_tensor(group, ref) for ref in group.narrowed if ref.role in BN_ROLES]
        features = fold_features(producers, consumers, extra)
    return averaging_matrix(cluster_channels(features, k, seed), k)


@dataclass(frozen=True)
class CompensateOptions:
    method: str = field(default="ridge", metadata={"help": "ridge (GRAIL closed form) or none (plain slicing)"})
    alpha: float = field(default=1e-3, metadata={"help": "ridge strength relative to mean(diag(G[P, P]))"})
    affine: bool = field(
        default=False, metadata={"help": "also fit a constant, absorbed into the consumer bias"}
    )
    fallback: bool = field(
        default=False,
        metadata={
            "help": "slice a group without compensation when compensation does not lower its output error on "
            "the held-out calibration statistics (needs calibrate{holdout})"
        },
    )

    def __post_init__(self) -> None:
        if self.method not in COMPENSATIONS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(COMPENSATIONS)}")
        if not (self.alpha >= 0.0 and np.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")


@register
class Compensate(Pass):
    name = "compensate"
    summary = "Solve each group's consumer map B (ridge) or use plain slicing."
    Options = CompensateOptions

    def run(self, state: CompressionState) -> PassResult:
        options = self.options
        ridge = options.method == "ridge"
        state.require("a selection", bool(state.keeps) or not state.groups, self.name, "Run 'select' first.")
        narrowed = [g for g in state.current_groups if len(state.keeps.get(g.name, range(g.width))) < g.width]
        state.require(
            "Gram statistics", not ridge or bool(state.stats) or not narrowed, self.name,
            "Run 'calibrate' before 'compensate', or use compensate{method=none}.",
        )  # fmt: skip
        if options.fallback:
            state.require(
                "held-out statistics", bool(state.heldout_stats) or not narrowed, self.name,
                "Use calibrate{holdout=0.1} (any fraction above 0) before compensate{fallback=true}.",
            )  # fmt: skip
        errors_sliced, errors_final = [], []
        fallbacks = planned = 0
        for group in state.current_groups:
            keep = state.keeps[group.name]
            if len(keep) == group.width:
                continue  # nothing removed, so the group stays exactly as it is
            plan = self._plan(state, group, keep)
            if options.fallback and ridge and group.name not in state.folds and self._falls_back(state, group, plan):
                plan = GroupPlan(group, keep, slice_map(group.width, keep))
                fallbacks += 1
            stats = state.stats.get(group.name)
            plain = plan.consumer_bias is None and plan.producer_map is None
            if stats is not None and group.name not in state.crosses and plain:
                consumers = state.frontend.consumer_weights(group)
                sliced = relative_reconstruction_error(stats.gram, consumers, slice_map(group.width, keep), keep)
                final = relative_reconstruction_error(stats.gram, consumers, plan.consumer_map, keep)
                plan.statistics = {"relative_error_sliced": sliced, "relative_error": final}
                errors_sliced.append(sliced)
                errors_final.append(final)
            state.plans[group.name] = plan
            planned += 1
        statistics = {"groups": planned, "method": options.method}
        if options.fallback:
            statistics["fallbacks"] = fallbacks
        if errors_final:
            statistics["mean_relative_error_sliced"] = float(np.mean(errors_sliced))
            statistics["mean_relative_error"] = float(np.mean(errors_final))
        return PassResult(False, statistics)

    def _falls_back(self, state: CompressionState, group, plan: GroupPlan) -> bool:
        """Return True (and note why) when the plan does not beat slicing on the held-out statistics."""
        keep = plan.keep
        cross = state.heldout_crosses.get(group.name)
        if cross is not None:
            moments = HeldOutMoments(
                cross.cross[:, keep], cross.source_gram[np.ix_(keep, keep)], cross.target_sums,
                cross.source_sums[keep], cross.count,
            )  # fmt: skip
        else:
            stats = state.heldout_stats[group.name]
            gram = stats.gram
            moments = HeldOutMoments(gram[:, keep], gram[np.ix_(keep, keep)], stats.sums, stats.sums[keep], stats.count)
        consumers = state.frontend.consumer_weights(group)
        gain = compensation_gain(consumers, moments, plan.consumer_map, plan.consumer_bias, slice_map(group.width, keep))
        if gain > 0.0:
            return False
        note = "compensation fell back to slicing: it did not lower the held-out output error"
        state.notes[group.name] = "; ".join(filter(None, [state.notes.get(group.name), note]))
        logger.info("%s: compensation raised the held-out output error by %.4g; slicing instead", group.name, -gain)
        return True

    def _plan(self, state: CompressionState, group, keep: np.ndarray) -> GroupPlan:
        """Solve B (and the constant c with `affine`) from one-shot or cross statistics."""
        options = self.options
        folding = state.folds.get(group.name)
        if folding is not None:
            # NOTE: folded groups use the Gram of the model they are applied to and no
            # constant, even when cross statistics or affine compensation are requested.
            if options.method == "none":
                return GroupPlan(group, keep, (folding > 0).T.astype(np.float64), producer_map=folding)
            gram = state.stats[group.name].gram
            return GroupPlan(group, keep, fold_map(gram, folding, options.alpha), producer_map=folding)
        if options.method == "none":
            return GroupPlan(group, keep, slice_map(group.width, keep))
        stats = state.stats[group.name]
        cross = state.crosses.get(group.name)
        if cross is None:
            if options.affine:
                b, c = affine_prune_map(stats.gram, stats.sums, stats.count, keep, options.alpha)
                return GroupPlan(group, keep, b, consumer_bias=c)
            return GroupPlan(group, keep, prune_map(stats.gram, keep, options.alpha))
        cross_kept = cross.cross[:, keep]
        source_gram = stats.gram[np.ix_(keep, keep)]
        if options.affine:
            b, c = affine_cross_map(
                cross_kept, source_gram, cross.target_sums, stats.sums[keep], stats.count, options.alpha
            )
            return GroupPlan(group, keep, b, consumer_bias=c)
        return GroupPlan(group, keep, cross_map(cross_kept, source_gram, options.alpha))


@register
class Rewrite(Pass):
    name = "rewrite"
    summary = "Narrow producers and absorb B into consumers: a physically smaller graph."
    Options = NoOptions

    def run(self, state: CompressionState) -> PassResult:
        active = {group.name for group in state.current_groups}
        plans = [plan for name, plan in state.plans.items() if name in active]
        for group in state.current_groups:
            plan = state.plans.get(group.name)
            if plan is None:
                state.verdicts[group.name] = f"unchanged: all {group.width} channels kept"
            else:
                how = "folded" if plan.producer_map is not None else "compressed"
                note = f" ({state.notes[group.name]})" if group.name in state.notes else ""
                state.verdicts[group.name] = f"{how}: {group.width} -> {len(plan.keep)} channels{note}"
        if plans:
            state.frontend.apply(plans)
        state.rewritten.update(plan.group.name for plan in plans)
        done = [state.plans[name] for name in state.rewritten]
        removed = sum(plan.group.width - len(plan.keep) for plan in done)
        return PassResult(bool(plans), {"groups_rewritten": len(done), "channels_removed": removed})
