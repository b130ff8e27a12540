"""The eval report: one JSON document for machines and a Markdown rendering for people.

Kept apart from the CLI so that notebooks and the benchmark scripts can write the same
report from their own results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HUMANEVAL_PROBLEMS = 164


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict) -> str:
    """A short Markdown summary: metrics table, latency, model and settings, sandbox."""
    lines = ["# Spark eval report", ""]
    rows: list[tuple[str, str]] = []
    he = report.get("humaneval")
    if he:
        for key in sorted((k for k in he if k.startswith("pass@")), key=lambda k: int(k[5:])):
            rows.append((f"HumanEval {key}", _fmt(he[key])))
        rows.append(("HumanEval samples per problem (n)", _fmt(he.get("n"))))
        rows.append(("HumanEval problems", _fmt(he.get("problems"))))
    if report.get("bpb") is not None:
        detail = report.get("bpb_details") or {}
        rows.append(("bits per byte", _fmt(report["bpb"])))
        rows.append(("bpb files / bytes", f"{detail.get('files', 'n/a')} / "
                                          f"{detail.get('bytes', 'n/a')}"))
        xz = report.get("bpb_xz")
        if xz:
            rows.append(("bits per byte of `xz -9e` (each file alone)", _fmt(xz["bits_per_byte"])))
    fill = report.get("infill")
    if fill:
        rows.append((f"single-line infilling pass@1 ({fill['mode']} mode)", _fmt(fill["pass@1"])))
        rows.append(("infilling exact match", _fmt(fill["exact_match"])))
        rows.append(("infilling tasks / problems", f"{fill['tasks']} / {fill['problems']}"))
    line = report.get("line") or {}
    for name, s in (line.get("sources") or {}).items():
        rows.append((f"line completion exact match ({name})", _fmt(s["exact_match"])))
        rows.append((f"line completion edit similarity ({name})", _fmt(s["edit_similarity"])))
    if report.get("ttft_s") is not None or he:
        rows.append(("time to first token (s)", _fmt(report.get("ttft_s"))))
        rows.append(("tokens per second", _fmt(report.get("tokens_per_s"), 1)))
    gen = report.get("generation") or {}
    if gen.get("chars_per_s") is not None:
        rows.append(("generated characters per second", _fmt(gen["chars_per_s"], 1)))
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    lines += _context_section(report.get("context"))
    lines += _retrieval_section(report.get("retrieval"))
    if he:
        if he.get("problems", HUMANEVAL_PROBLEMS) < HUMANEVAL_PROBLEMS:
            lines.append(f"Note: {he['problems']} of {HUMANEVAL_PROBLEMS} HumanEval problems "
                         "were evaluated; this is not the full-benchmark score.")
        if he.get("k_not_reported"):
            lines.append("pass@k not reported for k = "
                         + ", ".join(map(str, he["k_not_reported"]))
                         + " (some problems have fewer than k samples).")
        if he.get("status_counts"):
            lines.append("Outcomes: " + ", ".join(f"{k} {v}"
                                                  for k, v in he["status_counts"].items()))
        lines.append("")
    lines += ["## Model and settings", ""]
    model = report.get("model") or {}
    lines.append(f"- model: {model.get('checkpoint') or 'none (pre-generated samples)'}")
    for key, value in (report.get("settings") or {}).items():
        lines.append(f"- {key}: {'n/a' if value is None else value}")
    lines.append("")
    sandbox = report.get("sandbox") or {}
    if sandbox:
        lines += ["## Sandbox", ""]
        for key in ("available", "privileges_dropped", "network_isolated", "pid_namespace",
                    "mount_namespace", "private_tmp"):
            lines.append(f"- {key}: {_fmt(sandbox.get(key))}")
        for note in sandbox.get("notes") or []:
            lines.append(f"- note: {note}")
        if sandbox.get("error"):
            lines.append(f"- error: {sandbox['error']}")
        lines.append("")
    return "\n".join(lines)


def _context_section(ctx: dict | None) -> list[str]:
    """Bits per byte of the same target per context length, one row per source."""
    if not ctx:
        return []
    lengths = [str(n) for n in ctx["lengths"]]
    out = ["## Bits per byte against context length", "",
           "Each row scores the same final bytes of one sequence given more preceding "
           "tokens; a model that uses its context gets lower to the right.", "",
           "| source | " + " | ".join(lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for name, curve in list(ctx["sources"].items()) + [("mean", ctx["mean"])]:
        out.append(f"| {name} | " + " | ".join(_fmt(curve[n], 3) for n in lengths) + " |")
    if ctx.get("plot"):
        out += ["", f"![context curve]({Path(ctx['plot']).name})"]
    return out + [""]


def _retrieval_section(ret: dict | None) -> list[str]:
    """Call-completion accuracy per context length (rows) and depth (columns)."""
    if not ret:
        return []
    depths = [f"{d:g}" for d in ret["depths"]]
    out = ["## Code retrieval over long context", "",
           f"Accuracy of completing a call to a function defined at a depth of the context "
           f"({ret['trials_per_cell']} trials per cell; mean {ret['mean_accuracy']:.3f}).", "",
           "| context | " + " | ".join(f"{float(d):.0%}" for d in depths) + " |",
           "|---|" + "---|" * len(depths)]
    for n, row in ret["accuracy"].items():
        out.append(f"| {n} | " + " | ".join(_fmt(row[d], 2) for d in depths) + " |")
    if ret.get("plot"):
        out += ["", f"![retrieval grid]({Path(ret['plot']).name})"]
    return out + [""]


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.md into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path
