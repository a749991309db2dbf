"""Sources -> records: datasets and files normalised to {"id", "instruction", "response", "source"}, and prompt files."""

from rtune.data.prompts import read_prompts  # noqa: F401  (the public API of this package)
from rtune.data.sources import heldout_path, load_source, prepare, read_records  # noqa: F401
