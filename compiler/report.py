"""Inspection reports: pictures of the grid, a trace of one decode step, a Markdown summary.

`write_report(plan, dir)` writes
  plan.json        the plan (schema in serialize.py), loadable with serialize.load_json
  sram.png         SRAM in use per core, as a fraction of the core's SRAM (heat map)
  regions.png      which layer (or op kind) owns each core
  links.png        bytes per token through each core's links (heat map)
  trace.json       one simulated decode step as Chrome trace events (open in Perfetto:
                   a process per wafer, a thread per region, spans for compute,
                   communication and hand-offs)
  report.md        the summary: figures, the planner's alternatives, a row per layer

Grids larger than MAX_PIXELS per side are shown downsampled by blocks: the mean for SRAM
and link load, the most common owner for regions (a 762 x 1172 WSE-3 grid is drawn at
full resolution; several wafers are drawn side by side).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from compiler.cores import core_bytes
from compiler.cost import plan_step
from compiler.place import anchor, mapping_name
from compiler.route import routing_of
from compiler.serialize import save_json
from compiler.summary import summary

MAX_PIXELS = 1200


def _blocks(a: np.ndarray, how: str = "mean") -> np.ndarray:
    """Downsample a 2-D array by whole blocks so neither side exceeds MAX_PIXELS."""
    f = max(1, -(-max(a.shape) // MAX_PIXELS))
    if f == 1:
        return a
    r, c = (-(-a.shape[0] // f)) * f, (-(-a.shape[1] // f)) * f
    padded = np.full((r, c), np.nan)
    padded[:a.shape[0], :a.shape[1]] = a
    b = padded.reshape(r // f, f, c // f, f)
    return np.nanmax(b, axis=(1, 3)) if how == "max" else np.nanmean(b, axis=(1, 3))


def _side_by_side(per_wafer: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(a.shape[0] for a in per_wafer)
    parts = []
    for i, a in enumerate(per_wafer):
        if i:
            parts.append(np.full((h, gap), np.nan))
        parts.append(np.pad(a, ((0, h - a.shape[0]), (0, 0)), constant_values=np.nan))
    return np.concatenate(parts, axis=1)


def _figure(img: np.ndarray, title: str, path: Path, cmap: str, label: str,
            vmin=None, vmax=None, legend=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = img.shape
    fig, ax = plt.subplots(figsize=(min(16, 3 + 10 * w / max(h, w)), min(12, 2 + 8 * h / max(h, w))))
    im = ax.imshow(img, cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax, aspect="equal")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("core column (wafers left to right)")
    ax.set_ylabel("core row")
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(color=im.cmap(im.norm(v)), label=name) for name, v in legend]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    else:
        fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sram_png(plan, path: Path) -> None:
    used = core_bytes(plan) / plan.target.sram_bytes
    img = _side_by_side([_blocks(w) for w in used])
    _figure(img, f"SRAM in use per core: {plan.source} on {plan.target.name} "
            f"(context {plan.context:,})", path, "viridis", "fraction of the core's SRAM",
            0.0, 1.0)


def region_png(plan, path: Path) -> None:
    """Cores coloured by the layer of the region that owns them (its anchor op)."""
    t = plan.target
    owner = np.full((plan.wafers, t.rows, t.cols), -1.0)
    names = {}
    for name, r in plan.regions.items():
        if r.group is not None:
            continue
        op = plan.graph.op(name)
        key = op.layer if op.layer is not None else (-2 if name.startswith(("embed", "lm")) else -3)
        owner[r.wafer, r.row:r.row + r.rows, r.col:r.col + r.cols] = key
        last = min(key + plan.share - 1, plan.cfg.n_layers - 1) if key >= 0 else key
        names[key] = ("embedding / output" if key < 0 else
                      f"layer {key}" if last == key else f"layers {key}-{last}")
    if plan.share == 0:  # every layer overlaid: colour by wafer instead
        for w, ls in enumerate(plan.wafer_layers):
            owner[w][owner[w] >= -2] = w
        names = {w: f"wafer {w}: layers {ls[0]}-{ls[-1]}" for w, ls in enumerate(plan.wafer_layers)
                 if ls}
    imgs = []
    for w in owner:
        if max(w.shape) > MAX_PIXELS:
            f = -(-max(w.shape) // MAX_PIXELS)
            r, c = -(-w.shape[0] // f) * f, -(-w.shape[1] // f) * f
            p = np.full((r, c), -1.0)
            p[:w.shape[0], :w.shape[1]] = w
            b = p.reshape(r // f, f, c // f, f).transpose(0, 2, 1, 3).reshape(r // f, c // f, -1)
            w = np.apply_along_axis(lambda v: Counter(v.tolist()).most_common(1)[0][0], 2, b)
        imgs.append(np.where(w == -1, np.nan, w))
    img = _side_by_side(imgs)
    legend = sorted(names.items())
    if len(legend) > 24:  # too many to list: the colour bar tells the layer
        legend = None
    _figure(img, f"Regions by layer: {plan.source} on {plan.target.name} "
            f"({mapping_name(plan.share)})", path, "tab20" if legend else "turbo",
            "layer", legend=[(n, k) for k, n in legend] if legend else None)


def link_png(plan, path: Path) -> None:
    """Bytes per token through each core's links (the sum over its east and south links
    plus those arriving from west and north, halved: each link counts once overall)."""
    rt = routing_of(plan)
    w, r, c = rt.paths.shape
    load = np.zeros((w, r, c))
    load[:, :, :-1] += rt.h_load
    load[:, :, 1:] += rt.h_load
    load[:, :-1, :] += rt.v_load
    load[:, 1:, :] += rt.v_load
    img = _side_by_side([_blocks(x / 2) for x in load])
    best, where = rt.max_link
    _figure(img, f"Link load per token (busiest link {best:,.0f} B at wafer {where[0]}, "
            f"core {where[1]},{where[2]} {where[3]})", path, "magma", "bytes per token")


def trace_events(plan, context: int | None = None) -> dict:
    """One decode step as Chrome trace events: a process per wafer, a thread per region."""
    sc = plan_step(plan, context)
    clock = plan.target.clock_hz
    us = 1e6 / clock  # microseconds per cycle
    events = []
    tids: dict[str, int] = {}
    for w in range(plan.wafers):
        events.append({"ph": "M", "name": "process_name", "pid": w,
                       "args": {"name": f"wafer {w}"}})
    for o in plan.graph.ops:
        region = anchor(plan.regions, plan.host[o.name])
        r = plan.regions[region]
        if region not in tids:
            tids[region] = len(tids)
            events.append({"ph": "M", "name": "thread_name", "pid": r.wafer,
                           "tid": tids[region], "args": {"name": region}})
        own = sc.ops[o.name]
        start = sc.start[o.name]
        comm = own.hops + own.stages + own.transfer + own.wafer
        base = {"pid": r.wafer, "tid": tids[region], "ph": "X"}
        args = {"op": o.name, "kind": o.kind, "compute_cycles": round(own.compute),
                "hops_cycles": round(own.hops), "stage_cycles": round(own.stages),
                "transfer_cycles": round(own.transfer)}
        ready = max([sc.finish[i] for i in o.inputs], default=0.0)
        if start > ready:
            events.append({**base, "name": f"hand-off to {o.name}", "cat": "hand-off",
                           "ts": ready * us, "dur": (start - ready) * us})
        events.append({**base, "name": o.name, "cat": "compute", "ts": start * us,
                       "dur": own.compute * us, "args": args})
        if comm:
            events.append({**base, "name": f"{o.name} (collectives)", "cat": "communication",
                           "ts": (start + own.compute) * us, "dur": comm * us, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"model": plan.source, "target": plan.target.name,
                          "context": context or plan.context,
                          "step_seconds": sc.seconds(plan.target)}}


def layer_rows(plan) -> list[dict]:
    """Per layer: cores, tile shapes, bytes and predicted time in one decode step."""
    sc = plan_step(plan)
    clock = plan.target.clock_hz
    by_layer: dict = defaultdict(list)
    for o in plan.graph.ops:
        by_layer[o.layer].append(o)
    rows = []
    for layer in sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0)):
        ops = by_layer[layer]
        placed = [o for o in ops if o.name in plan.regions]
        n_cores = 0
        for w in range(plan.wafers):  # cores covered by the layer's regions on each wafer
            rects = [plan.regions[o.name] for o in placed if plan.regions[o.name].wafer == w]
            if rects:
                r0, c0 = min(r.row for r in rects), min(r.col for r in rects)
                r1 = max(r.row + r.rows for r in rects)
                c1 = max(r.col + r.cols for r in rects)
                mask = np.zeros((r1 - r0, c1 - c0), bool)
                for r in rects:
                    mask[r.row - r0:r.row - r0 + r.rows, r.col - c0:r.col - c0 + r.cols] = True
                n_cores += int(mask.sum())
        tiles = ", ".join(f"{o.name.rsplit('.', 1)[-1]} {plan.regions[o.name].tiling.tk}x"
                          f"{plan.regions[o.name].tiling.tn}" for o in placed if o.kind == "matvec")
        nbytes = sum(int(plan.regions[o.name].tiling.core_bytes().sum()) for o in placed)
        begin = min(sc.start[o.name] for o in ops)
        end = max(sc.finish[o.name] for o in ops)
        rows.append({"layer": "-" if layer is None else layer, "ops": len(ops),
                     "cores": int(n_cores), "tiles": tiles, "bytes": nbytes,
                     "time_us": (end - begin) / clock * 1e6})
    return rows


def markdown(plan) -> str:
    s = summary(plan)
    lines = [f"# {s['model']} on {s['target']}", "",
             f"Context {s['context']:,} positions; mapping: {s['mapping']}; "
             f"{s['wafers']} wafer(s); compiled in {s['compile_s']:.2f} s.", "",
             "| figure | value |", "|---|---|"]
    for key in ("params", "weight_bytes", "kv_cache_bytes", "tiles", "cores_used",
                "sram_mean_fraction", "sram_max_fraction", "max_context", "ttft_s"):
        v = s[key]
        lines.append(f"| {key} | {v:,.4g} |" if isinstance(v, float) else f"| {key} | {v:,} |")
    for c, v in s["decode_tokens_per_s"].items():
        lines.append(f"| decode tokens/s at {int(c):,} | {v:,.0f} |")
    lines += ["", "Seconds per token by component (critical path, at the plan's context):", "",
              "| component | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.3e} |" for k, v in s["breakdown"].items()]
    lines += ["", f"Routing: {json.dumps(s['routing'])}", "",
              "## Planner alternatives", "", "| mapping | rows | wafers | cores | tokens/s |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['mapping']} | {a['band_rows']} | {a['wafers']} | {a['cores']:,} | "
              f"{a['decode_tokens_per_s']:,.0f} |" for a in s["alternatives"]]
    lines += ["", "## Layers", "",
              "| layer | ops | cores | matvec tiles (K x N per core) | bytes | predicted us |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['ops']} | {r['cores']:,} | {r['tiles']} | {r['bytes']:,} | "
              f"{r['time_us']:.2f} |" for r in layer_rows(plan)]
    lines += ["", "![SRAM per core](sram.png)", "", "![Regions](regions.png)", "",
              "![Link load](links.png)", "",
              "`trace.json` opens in https://ui.perfetto.dev (one decode step)."]
    return "\n".join(lines) + "\n"


def write_report(plan, directory) -> Path:
    """Write plan.json, the pictures, a decode-step trace and report.md into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_json(plan, d / "plan.json")
    sram_png(plan, d / "sram.png")
    region_png(plan, d / "regions.png")
    link_png(plan, d / "links.png")
    (d / "trace.json").write_text(json.dumps(trace_events(plan)))
    (d / "report.md").write_text(markdown(plan))
    return d
