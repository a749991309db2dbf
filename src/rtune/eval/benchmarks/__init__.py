"""Evaluation sets: one small module per benchmark on a shared base (rtune.eval.benchmarks.base)."""
