"""Pass infrastructure: a registry of named passes with typed options and statistics.

A pass is a class with a `name`, a one-line `summary` and an `Options` dataclass whose
fields are its options (defaults included). `run(state)` returns a `PassResult` that says
whether the model changed and carries the pass's statistics.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from grail_graph.core import CrossAccumulator, GramAccumulator
from grail_graph.data import Dataset
from grail_graph.errors import GrailError
from grail_graph.frontend import FrontEnd, GroupPlan
from grail_graph.groups import ChannelGroup, Declined


@dataclass
class CompressionState:
    """Everything the passes of one pipeline read and write."""

    frontend: FrontEnd
    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    reference_model: str | None = None
    """Path of the uncompressed ONNX model that `validate` compares against."""
    device: str = "auto"
    show_progress: bool = False
    groups: list[ChannelGroup] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    stats: dict[str, GramAccumulator] = field(default_factory=dict)
    crosses: dict[str, CrossAccumulator] = field(default_factory=dict)
    """Cross products of the original model's taps with the compressed model's, per group."""
    heldout_stats: dict[str, GramAccumulator] = field(default_factory=dict)
    heldout_crosses: dict[str, CrossAccumulator] = field(default_factory=dict)
    """Statistics of the held-out calibration samples (calibrate{holdout}), which only judge compensation."""
    active: list[ChannelGroup] | None = None
    """The groups the group-wise passes work on now; None means all of them."""
    widths: dict[str, int] = field(default_factory=dict)
    """Kept width per group chosen by `allocate`; groups without one use `select`'s sparsity."""
    keeps: dict[str, np.ndarray] = field(default_factory=dict)
    folds: dict[str, np.ndarray] = field(default_factory=dict)
    """Averaging matrix R (K, H) of each group that is folded instead of pruned."""
    notes: dict[str, str] = field(default_factory=dict)
    plans: dict[str, GroupPlan] = field(default_factory=dict)
    rewritten: set[str] = field(default_factory=set)
    verdicts: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    pipeline: list[Pass] = field(default_factory=list)
    """The passes `run_pipeline` runs on this state."""
    scratch: Path | None = None
    """A folder that outlives the pipeline, where `validate` keeps the model file it checked."""
    exported: list[Path] = field(default_factory=list)
    """Files of the current model written by a pass; emptied when a later pass changes the model."""

    @property
    def current_groups(self) -> list[ChannelGroup]:
        return self.groups if self.active is None else self.active

    @property
    def kept_whole(self) -> set[str]:
        """Names of the groups that a pass of the pipeline keeps whole whatever their statistics."""
        return {group.name for group in self.groups if any(p.keeps_whole(group, self.pipeline) for p in self.pipeline)}

    def require(self, what: str, present: bool, pass_name: str, fix: str) -> None:
        if not present:
            raise GrailError(f"pass '{pass_name}' needs {what}", fix)


@dataclass
class PassResult:
    """Whether a pass changed the model, and the numbers it reports."""

    changed: bool
    statistics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that has none."""


class Pass(ABC):
    """One named step of a compression pipeline."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def run(self, state: CompressionState) -> PassResult: ...

    def keeps_whole(self, group: ChannelGroup, pipeline: list[Pass]) -> bool:
        """Return True when this pass, run in `pipeline`, keeps every channel of `group`.

        Calibration skips such groups. The default is False: the pass may narrow any group.
        """
        return False

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator that makes a pass available by name in pipeline text."""
    if cls.name in PASSES:
        raise ValueError(f"pass name {cls.name!r} is registered twice")
    PASSES[cls.name] = cls
    return cls


def option_fields(options_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_cls))


def option_name(field_name: str) -> str:
    """Spell a dataclass field as a pipeline option: `batch_size` -> `batch-size`."""
    return field_name.replace("_", "-")
