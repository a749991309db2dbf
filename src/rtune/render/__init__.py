"""Records -> rendered sequences: token ids and the loss mask, built while rendering a chat template."""

from rtune.render.renderer import (  # noqa: F401  (the public API of this package)
    ALL_TEMPLATES,
    ICL_TEMPLATES,
    IGNORE,
    METHODS,
    TEMPLATES,
    RenderedSequence,
    Renderer,
    RenderStats,
    training_messages,
)
