"""Per-item measures of generations and their aggregates with intervals: refusal, generation statistics, relevance."""
