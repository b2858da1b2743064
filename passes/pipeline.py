"""Textual pipelines: parse, print and run a sequence of registered passes.

The text is `name{key=value key=value},name,...`, as in
`find-groups,calibrate{batch-size=64},select{method=wanda sparsity=0.5}`.
`print_pipeline` writes every option, so `print_pipeline(parse_pipeline(text))` returns
`text` for any text it printed itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from typing import Any

from grail_graph.errors import GrailError
from grail_graph.passes.base import PASSES, CompressionState, Pass, option_fields, option_name

logger = logging.getLogger(__name__)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise GrailError(
                    f"pipeline {text!r} has an unmatched '}}' at position {index}",
                    "Remove it or add the '{' it closes.",
                )
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise GrailError(f"pipeline {text!r} has an unclosed '{{'", "Close each pass's options with '}'.")
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _convert(raw: str, annotation: Any, where: str) -> Any:
    kind = annotation if isinstance(annotation, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(
        str(annotation), str
    )
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        return kind(raw)
    except ValueError:
        raise GrailError(f"{where}: {raw!r} is not a valid {kind.__name__}") from None


def _parse_pass(text: str) -> Pass:
    name, _, rest = text.partition("{")
    name = name.strip()
    if name not in PASSES:
        raise GrailError(f"unknown pass {name!r}", f"Known passes: {', '.join(PASSES)} (see --list-passes).")
    cls = PASSES[name]
    fields = {option_name(f.name): f for f in option_fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values = {}
    if rest:
        if not rest.endswith("}"):
            raise GrailError(f"pass text {text!r} must end with '}}'")
        for item in rest[:-1].split():
            key, equals, raw = item.partition("=")
            if key in fields and not equals:
                raise GrailError(f"option {key!r} of pass '{name}' has no value", f"Write it as {key}=VALUE.")
            if key not in fields:
                raise GrailError(
                    f"pass '{name}' has no option {key!r}", f"Its options: {', '.join(fields) or 'none'}."
                )
            values[fields[key].name] = _convert(raw, hints[fields[key].name], f"option {name}{{{key}}}")
    try:
        return cls(cls.Options(**values))
    except ValueError as error:
        raise GrailError(f"pass '{name}': {error}", "See --list-passes for its options and their ranges.") from error


def parse_pipeline(text: str) -> list[Pass]:
    """Parse pipeline text into pass instances, with errors that name the bad part."""
    if not text.strip():
        raise GrailError("the pipeline is empty", "Give pass names separated by commas.")
    return [_parse_pass(part) for part in _split_top_level(text)]


def print_pass(instance: Pass) -> str:
    items = [
        f"{option_name(f.name)}={_show(getattr(instance.options, f.name))}" for f in option_fields(type(instance.options))
    ]
    return instance.name + ("{" + " ".join(items) + "}" if items else "")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def print_pipeline(passes: list[Pass]) -> str:
    return ",".join(print_pass(instance) for instance in passes)


def describe_passes() -> str:
    """Return the `--list-passes` text: each pass, its summary and its options."""
    lines = []
    for name, cls in PASSES.items():
        lines.append(f"{name}: {cls.summary}")
        for f in option_fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = (f.metadata or {}).get("help", "")
            lines.append(f"    {option_name(f.name)}={_show(default)}  {doc}".rstrip())
    return "\n".join(lines)


def _groupwise_segment(passes: list[Pass]) -> tuple[int, int] | None:
    """Return the [start, stop) range of passes that run once per group, if any.

    A calibrate pass with sequential or cross statistics makes itself and every pass up
    to the next rewrite run group by group in graph order, so each group is measured on
    the model whose earlier groups are already compressed.
    """
    for start, instance in enumerate(passes):
        if getattr(instance.options, "statistics", "oneshot") != "oneshot":
            for stop in range(start + 1, len(passes)):
                if passes[stop].name == "rewrite":
                    return start, stop + 1
            raise GrailError(
                f"pass '{instance.name}' with statistics={instance.options.statistics} needs a later 'rewrite'",
                "Add select, compensate and rewrite after it.",
            )
    return None


SUMMED_STATISTICS = frozenset({"groups", "groups_kept_whole", "fallbacks"})


def _run_one(instance: Pass, state: CompressionState, verify_each: bool, record: dict[str, Any] | None) -> dict[str, Any]:
    start = time.perf_counter()
    logger.info("running pass %s", print_pass(instance))
    result = instance.run(state)
    if result.changed:
        state.exported = []
    if verify_each and result.changed:
        state.frontend.verify()
    if record is None:
        record = {"pass": instance.name, "options": dataclasses.asdict(instance.options), "changed": False, "seconds": 0.0, "runs": 0}
    record["changed"] = record["changed"] or result.changed
    record["seconds"] = round(record["seconds"] + time.perf_counter() - start, 4)
    record["runs"] += 1
    previous = record.get("statistics", {})
    record["statistics"] = dict(result.statistics)
    # Counts add up over the per-group runs of a group-wise segment; other values are the last run's.
    for key in SUMMED_STATISTICS & (previous.keys() | result.statistics.keys()):
        record["statistics"][key] = previous.get(key, 0) + result.statistics.get(key, 0)
    return record


def run_pipeline(passes: list[Pass], state: CompressionState, verify_each: bool = True) -> list[dict[str, Any]]:
    """Run the passes in order and return one statistics record per pass.

    With `verify_each`, the front end's verifier runs after every pass that changed the
    model, so a broken rewrite is reported by the pass that made it. Passes in a
    group-wise segment (see `_groupwise_segment`) run once per group; their record sums
    the time and keeps the statistics of the last run.
    """
    state.pipeline = list(passes)
    groupwise = _groupwise_segment(passes)
    segment = groupwise or (len(passes), len(passes))
    records = [_run_one(instance, state, verify_each, None) for instance in passes[: segment[0]]]
    grouped: list[dict[str, Any] | None] = [None] * (segment[1] - segment[0])
    for group in state.groups if groupwise else ():
        state.active = [group]
        for index, instance in enumerate(passes[segment[0] : segment[1]]):
            grouped[index] = _run_one(instance, state, verify_each, grouped[index])
        # The group is rewritten, so its statistics are no longer needed: freeing them
        # keeps one group's Gram (H x H float64) in memory instead of all of them.
        for statistics in (state.stats, state.crosses, state.heldout_stats, state.heldout_crosses):
            statistics.pop(group.name, None)
    state.active = None
    records.extend(record for record in grouped if record is not None)
    records.extend(_run_one(instance, state, verify_each, None) for instance in passes[segment[1] :])
    return records
