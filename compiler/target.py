"""Targets: the spatial machines the compiler maps onto.

A target is a 2D mesh of cores, each with its own SRAM and a router to its four
neighbours, possibly several such wafers joined by a slower link. The figures of the
presets come from public sources (see ../shared/HARDWARE.md in the project's workspace,
summarised per field below); those marked ASSUMED have no public figure and are our
choice, stated so a reader can change them.

Presets:
  wse2             Cerebras WSE-2: the 757 x 996 core fabric programs get, 48 KB per core.
  wse3             Cerebras WSE-3: 762 x 1172 cores, 48 KB per core.
  grid:RxC[:MEM]   a small parameterised grid for tests, e.g. grid:64x64:48KB; the other
                   figures are WSE-3's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

KB = 1024
MB = 1024 * KB


class TargetError(ValueError):
    """A target that cannot describe a machine (unknown name, zero cores, bad memory)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A wafer-scale mesh of cores (or several wafers of it)."""

    name: str  # Preset or spec string this target came from.
    rows: int  # Core grid rows available to programs.
    cols: int  # Core grid columns.
    sram_bytes: int  # SRAM per core.
    reserve_fraction: float  # Share of each core's SRAM kept for code, stack and queues.
    clock_hz: float  # Core and fabric clock.
    macs_per_cycle: float  # Multiply-accumulates per core per cycle (16-bit operands).
    hop_cycles: float  # Cycles for a message to cross one link to a neighbour.
    routing_stage_cycles: float  # Cycles of a software relay stage (re-routing in a core).
    link_bytes_per_cycle: float  # Bytes one link moves per cycle.
    routing_paths: int  # Routes a core's router can hold at once.
    wafers: int = 1  # Wafers available (a pipeline of contiguous layers spans them).
    wafer_link_bytes_per_s: float = 150e9  # Bandwidth between consecutive wafers.
    wafer_link_latency_s: float = 5e-6  # One-way latency between wafers.

    def __post_init__(self) -> None:
        for field in ("rows", "cols", "sram_bytes", "routing_paths", "wafers"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TargetError(f"target {self.name!r}: {field} must be a positive integer, "
                                  f"got {value!r}")
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise TargetError(f"target {self.name!r}: reserve_fraction must be in [0, 1), "
                              f"got {self.reserve_fraction}")
        for field in ("clock_hz", "macs_per_cycle", "hop_cycles", "routing_stage_cycles",
                      "link_bytes_per_cycle", "wafer_link_bytes_per_s"):
            if not getattr(self, field) > 0:
                raise TargetError(f"target {self.name!r}: {field} must be positive")
        if self.wafer_link_latency_s < 0:
            raise TargetError(f"target {self.name!r}: wafer_link_latency_s must be >= 0")

    @property
    def cores(self) -> int:
        """Cores per wafer."""
        return self.rows * self.cols

    @property
    def core_budget(self) -> int:
        """Bytes per core left for tiles, KV cache and buffers after the reserve."""
        return int(self.sram_bytes * (1.0 - self.reserve_fraction))

    @property
    def wafer_bytes(self) -> int:
        """Usable bytes of one wafer (budget x cores)."""
        return self.core_budget * self.cores

    def replace(self, **changes: Any) -> "Target":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Shared by both Cerebras presets. Sources, per field:
#  - hop_cycles 1: the SDK says a wavelet reaches a neighbouring core in a single cycle.
#  - link_bytes_per_cycle 4: one 32-bit wavelet per cycle per link.
#  - routing_paths 24: colours 0-23 are routable (the 5-bit header allows 32 ids).
#  - routing_stage_cycles 20: ASSUMED. WaferLLM gives no figure, only that a software
#    routing stage (header parsing and rewriting in a core) costs far more than a hop;
#    20 cycles is our estimate of a task switch plus a re-send. Both calibration cases
#    (tests/test_cost.py) hold for values from about 12 to 32 cycles.
#  - reserve_fraction 0.10: ASSUMED, about 5 KB of 48 KB for code and queues.
#  - wafer link 150 GB/s and 5 us: ASSUMED (the system's 12 x 100 GbE I/O, about
#    150 GB/s; latency of a switched Ethernet hop).
_CEREBRAS = dict(sram_bytes=48 * KB, reserve_fraction=0.10, hop_cycles=1.0,
                 routing_stage_cycles=20.0, link_bytes_per_cycle=4.0, routing_paths=24)

PRESETS: dict[str, Target] = {
    # WSE-2: 757 x 996 usable fabric, ~1.1 GHz, one multiply-accumulate per cycle
    # (WaferLLM, sec. 7: two 32-bit operands fetched, one MAC, one write-back per cycle).
    "wse2": Target(name="wse2", rows=757, cols=996, clock_hz=1.1e9, macs_per_cycle=1.0,
                   **_CEREBRAS),
    # WSE-3: 762 x 1172 usable fabric. Clock 1.1 GHz ASSUMED (no official figure);
    # macs_per_cycle 2 ASSUMED: SIMD is wider than WSE-2's (no public width) and the
    # published fp16 peak doubles (125 vs 62.5 PF) with 6% more cores.
    "wse3": Target(name="wse3", rows=762, cols=1172, clock_hz=1.1e9, macs_per_cycle=2.0,
                   **_CEREBRAS),
}

_GRID = re.compile(r"^grid:(\d+)x(\d+)(?::(-?\d+(?:\.\d+)?)(B|KB|MB)?)?$", re.IGNORECASE)


def _parse_grid(spec: str) -> Target:
    m = _GRID.match(spec.strip())
    if not m:
        raise TargetError(f"bad grid target {spec!r}; write grid:ROWSxCOLS[:MEM], "
                          "e.g. grid:64x64:48KB")
    rows, cols = int(m.group(1)), int(m.group(2))
    if rows == 0 or cols == 0:
        raise TargetError(f"target {spec!r} has no cores ({rows} x {cols})")
    sram = PRESETS["wse3"].sram_bytes
    if m.group(3) is not None:
        amount = float(m.group(3))
        unit = {"B": 1, "KB": KB, "MB": MB}[(m.group(4) or "B").upper()]
        sram = int(amount * unit)
        if sram <= 0:
            raise TargetError(f"target {spec!r}: memory per core must be positive")
    return PRESETS["wse3"].replace(name=spec, rows=rows, cols=cols, sram_bytes=sram)


def get_target(target: "str | Target", *, wafers: int | None = None) -> Target:
    """A target by preset name or grid spec (or a Target, returned as is); `wafers`
    overrides how many wafers are available."""
    if isinstance(target, Target):
        t = target
    elif not isinstance(target, str):
        raise TargetError(f"a target is a name or a Target, got {type(target).__name__}")
    elif target.lower().startswith("grid:"):
        t = _parse_grid(target)
    elif target.lower() in PRESETS:
        t = PRESETS[target.lower()]
    else:
        raise TargetError(f"unknown target {target!r}; choose one of {sorted(PRESETS)} "
                          "or grid:ROWSxCOLS[:MEM]")
    if wafers is not None:
        t = t.replace(wafers=wafers)
    return t
