"""Evaluation results -> reports: tables and plots side by side (filled by the evaluation issues)."""
