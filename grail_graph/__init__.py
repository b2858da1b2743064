"""grail-opt: structured compression with post-hoc linear compensation (GRAIL).

The command line is `grail-opt`; `grail_graph.driver.compress_file` runs the same job
from Python.
"""

from __future__ import annotations

from grail_graph.driver import JobOptions, compress_file, default_pipeline
from grail_graph.errors import GrailError

__all__ = ["GrailError", "JobOptions", "compress_file", "default_pipeline"]
