"""LLM judges as pure functions: prompts (requests), parsing of the judge's replies, and aggregates."""
