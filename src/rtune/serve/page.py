"""The pages of `rtune serve`: side-by-side chat at `/`, blind rating at `/rate`.

Plain HTML, CSS and JavaScript shipped in the package (rtune/serve/page/), served as they are: no
build step, nothing fetched from elsewhere (the page works offline). The pages themselves hold no
data and are open; everything they show comes from the API routes, which the API key guards (the
page asks for the key once and sends it as a Bearer header).

Every page response carries a Content-Security-Policy that allows scripts from this origin's files
only (no inline script, no eval, no other origin): a second wall behind the pages' own rule of
showing model output as text (textContent), never as HTML.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from rtune.serve.api import ApiError

PAGE_FILES = {  # the only files served: name -> media type
    "chat.html": "text/html; charset=utf-8",
    "rate.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "rate.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
OPEN_PATHS = frozenset({"/", "/rate", *(f"/page/{name}" for name in PAGE_FILES)})


def _file(name: str) -> Response:
    data = resources.files("rtune.serve").joinpath("page", name).read_bytes()
    return Response(data, media_type=PAGE_FILES[name], headers=HEADERS)


router = APIRouter()


@router.get("/")
async def chat_page(request: Request):
    state = request.app.state
    if not state.models and not state.endpoints:
        return RedirectResponse("/rate")  # `rtune rate`: the rating page only
    return _file("chat.html")


@router.get("/rate")
async def rate_page(request: Request):
    if request.app.state.rating is None:
        raise ApiError(404, "this server rates no evaluation (start it with --rate EVAL_DIR)", None, "not_found")
    return _file("rate.html")


@router.get("/page/{name}")
async def page_file(name: str):
    if name not in PAGE_FILES:
        raise ApiError(404, "no such file", None, "not_found")
    return _file(name)


@router.get("/api/page")
async def page_info(request: Request):
    """What the pages link to (behind the key: a page calls it first to learn whether it needs one)."""
    state = request.app.state
    return {"chat": bool(state.models or state.endpoints), "rate": state.rating is not None}
