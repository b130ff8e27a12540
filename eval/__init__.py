"""Evaluation: HumanEval pass@k in a sandbox, held-out bits per byte, speed benchmarks."""
