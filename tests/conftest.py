import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def rtune_cache_home(request):
    """A persistent RTUNE_HOME for the real tokenizers, so they are extracted once per machine."""
    home = Path(request.config.cache.mkdir("rtune-home"))
    old = os.environ.get("RTUNE_HOME")
    os.environ["RTUNE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("RTUNE_HOME", None)
    else:
        os.environ["RTUNE_HOME"] = old


@pytest.fixture(scope="session")
def gemma_tokenizer(rtune_cache_home):
    from rtune.models import load_tokenizer

    return load_tokenizer("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(rtune_cache_home):
    from rtune.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.byte_bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return tiny.tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
