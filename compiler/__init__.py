"""Wafer-mapping compiler: trace the decode step, tile weights over a 2D core grid, place, route, cost."""
