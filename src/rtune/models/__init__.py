"""Model specs -> loaded base models and tokenizers (hub ids, folders, .gguf files, built-in offline models)."""

from rtune.models.load import (  # noqa: F401  (the public API of this package)
    ModelRef,
    library_versions,
    load_model,
    load_tokenizer,
    quiet_peft,
    remote_code_allowed,
    resolve_model,
)
