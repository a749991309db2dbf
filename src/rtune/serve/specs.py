"""What `rtune serve` serves: named models (with in-context formats) and other servers' endpoints.

    rtune serve [NAME=]MODEL_OR_RUN[+FORMAT] ...  [--endpoint NAME=URL[#MODEL] ...]

FORMAT is the prompt format of a plain (untrained) model: an in-context format (urial, urial-r,
zero-shot) or a template (tulu, model: the tokenizer's own chat template), so `base=gemma-3-270m
urial=gemma-3-270m+urial-r` serves the base model with the tulu template and the same weights
prompted with URIAL-R, and `smollm2=smollm2-135m-instruct+model` an instruct model in its own chat
template. A FORMAT overrides --template/--icl for its spec; run folders bring their own template and
take none. NAME defaults to the folder's name with its format, `gemma-3-270m+urial-r`, the label
`rtune eval --icl urial-r` gives. A spec that is an existing path is taken whole, '=' and '+'
included.

Weights are loaded once per model: names that give the same model with other templates share one
loaded model (and, in the app, one scheduler: rtune.serve.app.create_app groups engines by model).

An endpoint is a model behind another OpenAI-compatible server (vLLM, a hosted API) that the page can
show beside the local ones: requests naming it are forwarded to URL (`/chat/completions` under it)
with MODEL as the upstream model name (default NAME), and its API key is read from the environment
variable RTUNE_ENDPOINT_KEY_<NAME> (NAME upper-cased, other characters than letters and digits as
'_'), so the key is never on a command line, in a page or in a reply.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from rtune.errors import RtuneError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}")
TEMPLATE_FORMATS = ("tulu", "model")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str  # what load_for_inference takes: a run, a merged folder or a model spec
    format: str | None = None  # a prompt format (urial, urial-r, zero-shot, tulu, model), or None


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    url: str  # the API base, e.g. http://gpu1:8000/v1
    model: str  # the upstream model name

    @property
    def key_env(self) -> str:
        return "RTUNE_ENDPOINT_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", self.name).upper()

    def api_key(self) -> str | None:
        return os.environ.get(self.key_env) or None


def _check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise RtuneError(f"{what}: the name {name!r} must start with a letter or digit and hold letters, digits "
                         "and . _ + : - (at most 128)")
    return name


def parse_model_spec(text: str) -> ModelSpec:
    """`[NAME=]MODEL_OR_RUN[+FORMAT]` (see the module docstring)."""
    from rtune.render.templates import ICL_TEMPLATES
    from rtune.serve.engine import default_model_name

    if not text:
        raise RtuneError("an empty model spec")
    if os.path.exists(text):
        return ModelSpec(default_model_name(text), text)
    name, model = None, text
    head, sep, rest = text.partition("=")
    if sep:
        name, model = _check_name(head, f"model spec {text!r}"), rest
    fmt = None
    if not os.path.exists(model):
        for candidate in sorted(TEMPLATE_FORMATS + ICL_TEMPLATES, key=len, reverse=True):  # urial-r before urial
            if model.endswith("+" + candidate):
                model, fmt = model[: -len(candidate) - 1], candidate
                break
    if not model:
        raise RtuneError(f"model spec {text!r} names no model")
    return ModelSpec(name or default_model_name(model) + (f"+{fmt}" if fmt else ""), model, fmt)


def parse_endpoint(text: str) -> EndpointSpec:
    """`NAME=URL[#MODEL]`."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise RtuneError(f"--endpoint {text!r}: give NAME=URL, e.g. llama8b=http://127.0.0.1:8001/v1")
    _check_name(name, f"--endpoint {text!r}")
    url, _, model = rest.partition("#")
    if not re.match(r"https?://[^/\s]+", url):
        raise RtuneError(f"--endpoint {name}: the URL must start with http:// or https://")
    return EndpointSpec(name, url.rstrip("/"), model or name)


def check_unique(names: list[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise RtuneError(f"two models are named {n!r}: give each its own NAME= (e.g. rt=runs/rt it=runs/it)")
        seen.add(n)


def load_engines(specs: list[ModelSpec], *, dtype=None, template: str | None = None, icl_file: str | None = None):
    """One Engine per spec; specs of the same model share its weights and tokenizer.

    template applies to plain models without a FORMAT (tulu by default); icl_file holds the
    demonstrations of urial and urial-r."""
    from rtune.infer.load import load_for_inference, load_renderer
    from rtune.render import Renderer
    from rtune.serve.engine import Engine

    check_unique([s.name for s in specs])
    loaded: dict[str, tuple] = {}  # model key -> (model, tokenizer)
    engines = []
    for spec in specs:
        fmt = spec.format or template
        demos = icl_file if fmt in ("urial", "urial-r") else None
        key = os.path.realpath(spec.model) if os.path.exists(spec.model) else spec.model
        if key not in loaded:
            model, tokenizer, renderer = load_for_inference(spec.model, template=fmt, dtype=dtype, icl_file=demos)
            loaded[key] = (model, tokenizer)
        else:
            model, tokenizer = loaded[key]
            # This template over the loaded tokenizer (the model thread uses that one object).
            renderer = Renderer.from_dict(load_renderer(spec.model, fmt, icl_file=demos).to_dict(), tokenizer)
        engines.append(Engine(model, tokenizer, renderer, spec.name, spec=spec.model))
    return engines
