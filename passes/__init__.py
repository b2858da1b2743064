"""Compression passes, registered by name for textual pipelines.

Installed as `grail_graph.passes`. Importing this package registers every pass.
"""

from __future__ import annotations

from grail_graph.passes import allocate, transform, validate
from grail_graph.passes.base import PASSES, CompressionState, Pass, PassResult, register
from grail_graph.passes.pipeline import (
    describe_passes,
    parse_pipeline,
    print_pipeline,
    run_pipeline,
)

__all__ = [
    "PASSES",
    "allocate",
    "CompressionState",
    "Pass",
    "PassResult",
    "describe_passes",
    "parse_pipeline",
    "print_pipeline",
    "register",
    "run_pipeline",
    "transform",
    "validate",
]
