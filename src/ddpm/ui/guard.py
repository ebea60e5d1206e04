"""Who may talk to `ddpm ui`: the page's own address only (as Jupyter's server guards itself).

An ASGI middleware in front of the app refuses a request whose ``Host`` is not a name the
server answers to (DNS rebinding: a foreign name resolved to 127.0.0.1), a state-changing
request from another origin or without a JSON body (a page elsewhere can send a ``no-cors``
POST of ``text/plain``, never ``application/json`` nor the ``X-DDPM-Token`` header), and, off
loopback, any request without the token printed at start. Every answer forbids framing.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse

TOKEN_HEADER = "x-ddpm-token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """The Host names answered at ``port``, the names the user listed (any port; ``*``: any name),
    and the token every request must carry (None on loopback)."""

    port: int
    names: frozenset[str]
    allowed: frozenset[str] = frozenset()
    token: str | None = None

    @property
    def cookie(self) -> str:  # per port: two servers on one machine keep their own
        return f"ddpm-token-{self.port}"


def access_for(host: str, port: int, allow_hosts: Sequence[str] = ()) -> Access:
    """What `ddpm ui --host HOST --port PORT [--allow-host NAME ...]` answers to."""
    bound = f"[{host}]" if ":" in host else host
    names = {*LOOPBACK_NAMES, bound.lower()}
    if host in ("0.0.0.0", "::"):  # every interface: the machine's own name too
        names.add(socket.gethostname().lower())
    token = None if is_loopback(host) else secrets.token_urlsafe(32)
    return Access(port, frozenset(names), frozenset(h.lower() for h in allow_hosts), token)


class Refusal(NamedTuple):
    status: int
    message: str


def split_host(value: str) -> tuple[str, int | None]:
    """'name:port' / '[::1]:port' / 'name' -> (name, port or None); a bad port is -1."""
    name, sep, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
    if not sep:
        return value.lower(), None
    return name.lower(), int(port) if port.isdigit() else -1


def host_ok(access: Access, host: str) -> bool:
    name, port = split_host(host)
    if "*" in access.allowed or name in access.allowed or host.lower() in access.allowed:
        return True
    return name in access.names and (port or 80) == access.port


def token_ok(access: Access, headers: Headers, query: QueryParams) -> bool:
    given = (headers.get(TOKEN_HEADER), query.get("token"), _cookies(headers).get(access.cookie))
    return any(_same(g, access.token) for g in given)


def _same(given: str | None, token: str | None) -> bool:
    return given is not None and token is not None and hmac.compare_digest(given.encode(), token.encode())


def _cookies(headers: Headers) -> dict[str, str]:
    pairs = (c.strip().partition("=") for c in headers.get("cookie", "").split(";"))
    return {k: v for k, _, v in pairs if k}


def refusal(access: Access, method: str, headers: Headers, query: QueryParams) -> Refusal | None:
    """Why this request is refused (None: it is not)."""
    host = headers.get("host", "")
    if not host_ok(access, host):
        return Refusal(421, f"this server does not answer to the name {host!r}; open the address `ddpm ui` "
                            "printed (or start it with --allow-host NAME)")
    if access.token is not None and not token_ok(access, headers, query):
        return Refusal(403, "this page needs the token `ddpm ui` printed at start: open the address it printed "
                            "(…/?token=…), or send the token in the X-DDPM-Token header")
    if method in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None and (urlsplit(origin).netloc.lower() != host.lower()
                               or urlsplit(origin).scheme not in ("http", "https")):
        return Refusal(403, f"refused a {method} from another web site ({origin})")
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return Refusal(403, f"refused a {method} from another web site ({headers['sec-fetch-site']})")
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and TOKEN_HEADER not in headers:
        return Refusal(415, f"a {method} must send JSON (Content-Type: application/json) or carry the "
                            "X-DDPM-Token header")
    return None


class Guard:
    """The ASGI middleware: refuses what :func:`refusal` names, adds the security headers to
    every answer, and keeps a token given as ``?token=`` in a cookie for the page's own requests."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "websocket":  # the page uses none
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers, query = Headers(scope=scope), QueryParams(scope.get("query_string", b""))
        extra = list(SECURITY_HEADERS)
        if _same(query.get("token"), self.access.token):
            extra.append((b"set-cookie", f"{self.access.cookie}={self.access.token}; Path=/; HttpOnly; "
                                         "SameSite=Strict".encode()))

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        why = refusal(self.access, scope.get("method", "GET"), headers, query)
        if why is not None:
            await JSONResponse({"error": why.message}, status_code=why.status)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)
