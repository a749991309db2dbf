"""Run folders and models -> generations and scores: loading, batched generation, likelihood scoring, chat, merge."""
