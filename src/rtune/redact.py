"""Credentials out of everything rtune writes or logs.

A URL a user gives (a judge or generation endpoint) may carry a secret: `https://user:key@host/v1`
or `?api-key=...`. `redact_url` drops the user-info part and replaces the values of query
parameters whose names look like secrets, so results files, summaries and logs can be shared.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"
# Query parameter names that carry secrets in the wild: api-key (Azure), key (Google), token,
# access_token, sig / signature (signed URLs), secret, password, auth, code, credential.
_SECRET_NAME = re.compile(r"key|token|secret|sig|pass|auth|code|credential|session", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL without user-info and with secret-looking query values replaced; anything unparsable whole."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rpartition("@")[2]  # user:password@host -> host
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_NAME.search(k) else v) for k, v in pairs], safe=REDACTED)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, url: str) -> str:
    """text with every occurrence of url (and of its user-info) replaced by the redacted URL."""
    if not text or not url:
        return text
    text = text.replace(str(url), redact_url(url))
    userinfo = urlsplit(str(url)).netloc.rpartition("@")[0]
    return text.replace(userinfo, REDACTED) if userinfo else text
