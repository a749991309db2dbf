"""Generations -> metrics and judgments: benchmarks, judge-free measures, LLM judges (filled by the evaluation issues)."""
