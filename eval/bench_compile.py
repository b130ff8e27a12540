"""`spark bench compile`: how long compiling takes, and how it grows with the tile count.

Compiles tiny (the shipped checkpoint's shapes) onto a 64 x 64 grid, llama3-8b onto one
wse3, and llama3-70b onto as many wse3 wafers as it needs, each in a fresh process so its
peak memory (max resident set) is its own. Every pass runs: trace, plan, place, refine,
route, cost (the latency predictions) and check. Targets: 8B in <= 10 s, 70B in <= 60 s,
under 4 GB of memory.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

CASES = [  # (model, target, wafers allowed, seconds target, context)
    ("tiny", "grid:64x64:48KB", 1, None, 4096),
    ("llama3-8b", "wse3", 1, 10.0, 131_072),
    ("llama3-70b", "wse3", 16, 60.0, 131_072),
]


def _child(model: str, target: str, wafers: int, context: int) -> None:
    import time

    import compiler
    from compiler.summary import summary

    t0 = time.perf_counter()
    plan = compiler.compile(model, target, context, wafers=wafers)
    wall = time.perf_counter() - t0
    s = summary(plan)
    print(json.dumps({
        "model": model, "target": target, "context": context, "compile_s": wall,
        "tiles": s["tiles"], "cores_used": s["cores_used"], "wafers": s["wafers"],
        "mapping": s["mapping"], "decode_tokens_per_s": s["decode_tokens_per_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(json_path: str | None = None) -> int:
    rows = []
    for model, target, wafers, limit, context in CASES:
        r = subprocess.run([sys.executable, "-m", "eval.bench_compile", "--child", model,
                            target, str(wafers), str(context)],
                           capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["target_s"] = limit
        rows.append(row)
        verdict = "" if limit is None else (" (target <= %.0f s: %s)" % (
            limit, "met" if row["compile_s"] <= limit else "MISSED"))
        print(f"{model:>11} on {target:<16} {row['wafers']} wafer(s)  "
              f"{row['tiles']:>12,} tiles  {row['compile_s']:6.2f} s{verdict}  "
              f"peak {row['peak_rss_mb']:,.0f} MB  [{row['mapping']}]")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
