"""Human-readable summaries of compression reports (the JSON report carries the rest)."""

from __future__ import annotations

from typing import Any


def _change(before: float, after: float, unit: str = "") -> str:
    if before == 0:
        return f"{before:,.0f}{unit} -> {after:,.0f}{unit}"
    return f"{before:,.0f}{unit} -> {after:,.0f}{unit} ({(after - before) / before:+.1%})"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_validation(validation: dict[str, Any]) -> list[str]:
    if not validation:
        return ["  validation: skipped, because the pipeline has no 'validate' pass (--no-validate, or a --pipeline "
                "without it); --eval data is used only by that pass"]
    lines = [f"  validation on {validation['samples']} held-out samples:"]
    if "accuracy_before" in validation:
        lines.append(
            f"    accuracy {_percent(validation['accuracy_before'])} -> {_percent(validation['accuracy_after'])}"
        )
    if "perplexity_before" in validation:
        lines.append(
            f"    perplexity {validation['perplexity_before']:.3f} -> {validation['perplexity_after']:.3f} "
            f"({validation['tokens_scored']:,} tokens)"
        )
    numerics = []
    if "cosine_similarity" in validation:
        numerics.append(f"cosine similarity {validation['cosine_similarity']:.4f}")
    if "embedding_cosine" in validation:
        numerics.append(f"mean-pooled embedding cosine {validation['embedding_cosine']:.4f}")
    if "top1_agreement" in validation:
        numerics.append(f"top-1 agreement {_percent(validation['top1_agreement'])}")
    numerics.append(f"max abs error {validation['max_abs_error']:.4g}")
    numerics.append(f"relative error {validation['relative_error']:.4g}")
    lines.append("    " + ", ".join(numerics))
    before, after = validation["before"], validation["after"]
    lines.append(f"    parameters {_change(before['parameters'], after['parameters'])}")
    lines.append(f"    MACs       {_change(before['macs'], after['macs'])}")
    lines.append(f"    file size  {_change(before['file_bytes'], after['file_bytes'], ' B')}")
    if "latency_ms" in before:
        ratio = after["latency_ms"] / before["latency_ms"]
        lines.append(
            f"    latency    {before['latency_ms']:.3f} ms -> {after['latency_ms']:.3f} ms "
            f"(time ratio {ratio:.2f}, batch 1, median)"
        )
    return lines


def format_summary(report: dict[str, Any]) -> str:
    """Return the multi-line stdout summary of one compressed model."""
    groups = report["groups"]
    compressed = sum(1 for group in groups if group["verdict"].startswith(("compressed", "folded")))
    lines = [
        f"{report['model']} -> {report['output']}",
        f"  pipeline: {report['pipeline']}",
        f"  groups: {compressed} compressed, {len(groups) - compressed} unchanged, "
        f"{len(report['declined'])} declined",
    ]
    for group in groups:
        errors = ""
        if "relative_error" in group:
            errors = f" (relative output error {group['relative_error_sliced']:.3g} sliced, {group['relative_error']:.3g} final)"
        lines.append(f"    {group['name']}: {group['verdict']}{errors}")
    for declined in report["declined"]:
        lines.append(f"    declined {declined['candidate']}: {declined['reason']}")
    for record in report["passes"]:
        lines.append(f"  pass {record['pass']}: {record['seconds']:.2f} s {record['statistics']}")
    lines.extend(format_validation(report["validation"]))
    return "\n".join(lines)


def format_batch_table(reports: list[dict[str, Any]]) -> str:
    """Return one row per model: status, groups, parameters and accuracy or error."""
    header = f"{'model':40} {'status':8} {'groups':>6} {'params before':>14} {'params after':>13} {'top-1 agree':>11}"
    rows = [header, "-" * len(header)]
    for report in reports:
        name = report["model"][-40:]
        if "error" in report:
            rows.append(f"{name:40} {'failed':8} {report['error']}")
            continue
        validation = report.get("validation") or {}
        compressed = sum(1 for group in report["groups"] if group["verdict"].startswith(("compressed", "folded")))
        before = validation.get("before", {}).get("parameters", "")
        after = validation.get("after", {}).get("parameters", "")
        agreement = validation.get("top1_agreement")
        shown = "" if agreement is None else _percent(agreement)
        rows.append(f"{name:40} {'ok':8} {compressed:>6} {before:>14} {after:>13} {shown:>11}")
    return "\n".join(rows)
