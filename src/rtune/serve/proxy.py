"""Models behind other OpenAI-compatible servers (`rtune serve --endpoint NAME=URL`), proxied.

The page talks to one origin: a chat or completion request naming an endpoint's model is forwarded
to the endpoint (`URL/chat/completions` or `URL/completions`) with the upstream model name and the
endpoint's own API key (from its environment variable, rtune.serve.specs.EndpointSpec.key_env), and
the endpoint's answer is passed back as it arrives (streams included). The client's own
Authorization header is never forwarded, the endpoint's key never comes back, and errors name the
endpoint, never its URL (which may hold credentials). An endpoint that refuses its key (401/403)
answers 502: the client's key is fine, the server's is not.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from rtune.serve.api import ApiError
from rtune.serve.specs import EndpointSpec

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # between two pieces of a reply: a large model's long prefill


def new_client():
    import httpx2  # the HTTP client the openai SDK brings

    return httpx2.AsyncClient(timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S), follow_redirects=False)


def model_card(spec: EndpointSpec, created: int) -> dict:
    return {"id": spec.name, "object": "model", "created": created, "owned_by": "endpoint", "rtune_endpoint": True}


def named_endpoint(request: Request, body: bytes) -> EndpointSpec | None:
    """The endpoint a request body names by "model", or None (the body is parsed properly later)."""
    endpoints = request.app.state.endpoints
    if not endpoints:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return endpoints.get(model) if isinstance(model, str) else None


async def forward(request: Request, spec: EndpointSpec, path: str, body: bytes):
    import httpx2


    data = json.loads(body)
    data["model"] = spec.model
    # identity: the bytes are passed on as they come, so they must not be compressed.
    headers = {"Content-Type": "application/json", "Accept": request.headers.get("accept", "*/*"),
               "Accept-Encoding": "identity"}
    key = spec.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    client = request.app.state.proxy_client
    upstream_request = client.build_request("POST", f"{spec.url}/{path}", json=data, headers=headers)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx2.HTTPError as e:
        raise ApiError(502, f"the endpoint {spec.name!r} did not answer ({type(e).__name__})", "model",
                       "endpoint_unreachable", "server_error") from None
    if upstream.status_code in (401, 403):
        await upstream.aclose()
        raise ApiError(502, f"the endpoint {spec.name!r} refused its API key (HTTP {upstream.status_code}); the "
                       f"server reads it from ${spec.key_env}", "model", "endpoint_auth", "server_error")

    async def body_parts():
        try:
            async for part in upstream.aiter_raw():
                yield part
        except httpx2.HTTPError:
            return  # the endpoint went away mid-reply: the client sees the stream end
        finally:
            await upstream.aclose()

    passed = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
    return StreamingResponse(body_parts(), status_code=upstream.status_code, headers={**passed, "Cache-Control": "no-cache"})
