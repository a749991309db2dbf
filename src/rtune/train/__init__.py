"""Rendered sequences -> a run folder: config, batch plan, loss, model and adapters, checkpoints, the recipe.

The entry point is `rtune.train.recipe.train`.
"""
