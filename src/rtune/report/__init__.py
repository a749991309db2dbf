"""Evaluation results -> reports: tables and plots side by side (`rtune report`, see rtune.report.report)."""

from rtune.report.report import build_report

__all__ = ["build_report"]
