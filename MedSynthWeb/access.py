"""Only the page itself may use the server of ``medsynth review``: no other web page open in the browser.

A browser lets any page open a websocket to any address (``ws://127.0.0.1:8080``); it only says, in
the ``Origin`` header, which page asked.  wslink accepts every client that says its well-known default
secret, so any page could read a reviewer's note or a study's items and answer in the reader's name.
Here the server

* refuses (HTTP 403, before the websocket opens) a websocket or session request whose ``Origin`` is not
  the page's own, and every request whose ``Host`` is not this server's name or an IP address (a page of
  another site whose name was made to point at this computer, "DNS rebinding");
* draws a new wslink secret at each start and gives it only in the answer to the session request that
  the trame client makes before it connects (a page of another origin cannot read that answer);
* forbids other sites to show the page in a frame (clicks on a hidden page would answer in its name);
* admits only a browser that opened the address printed at the start: it carries an access token drawn at
  each start (``?token=``), which the server turns into a cookie of the page.  Origin and Host stop other web
  pages, not other programs on a shared computer (they send whatever headers they like); those never see the
  printed address.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import sys
from typing import Any

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ALL_INTERFACES = frozenset({"", "0.0.0.0", "::"})
#: Where the trame client asks for its session (websocket address and secret) before it connects: its
#: default session-manager address, answered in the format of wslink's launcher.
SESSION_PATH = "/paraview/"
WEBSOCKET_PATH = "/ws"  # wslink's default endpoint, which the trame client also assumes
#: What a browser sends as Host: a name or an IP address (IPv6 in brackets), and the port unless 80.
HOST_HEADER = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}))?")
NO_FRAMES = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}


def server_names(host: str) -> frozenset[str]:
    """The names a page of a server listening on ``host`` may be opened under (besides IP addresses)."""
    names = set(LOOPBACK_NAMES)
    if host in ALL_INTERFACES:
        names |= {socket.gethostname(), socket.getfqdn()}
    else:
        names.add(host)
    return frozenset(name.lower().strip("[]") for name in names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class PageAccess:
    """Admits the page's own requests to a server on ``host``:``port``; see the module's description."""

    def __init__(self, host: str, port: int) -> None:
        self.names = server_names(host)
        self.port = port
        self.secret = secrets.token_urlsafe(32)
        self.token = secrets.token_urlsafe(32)
        #: Cookies of one host are shared by all its ports: a name per port keeps two servers' tokens apart.
        self.cookie_name = f"medsynth_review_{port}"
        self._told: set[str] = set()

    def address(self, host: str) -> str:
        """The page's address to give the reader: with this start's access token."""
        return f"http://{host}:{self.port}/?token={self.token}"

    def token_refusal(self, query_token: str | None, cookie_token: str | None) -> str | None:
        """Why a request carrying these tokens (``?token=``, the page's cookie) is refused, or None."""
        for given in (query_token, cookie_token):
            if given and secrets.compare_digest(given.encode(), self.token.encode()):
                return None
        return "no valid access token (open the address medsynth review printed, with its ?token=)"

    def refusal(self, method: str, path: str, headers: Any) -> str | None:
        """Why a request with these headers is refused, or None where it is the page's own."""
        host = headers.get("Host", "")
        match = HOST_HEADER.fullmatch(host)
        name = match["name"].lower().strip("[]") if match else ""
        port = int(match["port"] or 80) if match else None
        if port != self.port or not (name in self.names or _is_ip(name)):
            return f"Host {host!r} is not this server (open the page under the address it printed)"
        if method not in ("GET", "HEAD") or path == WEBSOCKET_PATH or "Upgrade" in headers:
            # A browser sends the origin as scheme://host[:port], the way it sends Host: a same-origin page
            # has both the same.
            origin = headers.get("Origin")
            if origin is None or origin.lower() != f"http://{host.lower()}":
                said = f"Origin {origin!r}" if origin is not None else "no Origin"
                return f"{said}, only the page's own (http://{host}) may connect"
        return None

    def bind(self, web_server: Any) -> None:
        """trame's ``on_server_bind``: guard wslink's aiohttp application and answer the session request."""
        from aiohttp import web

        @web.middleware
        async def only_the_page(request: web.Request, handler: Any) -> web.StreamResponse:
            query_token = request.query.get("token")
            reason = (self.refusal(request.method, request.path, request.headers)
                      or self.token_refusal(query_token, request.cookies.get(self.cookie_name)))
            if reason is None:
                response = await handler(request)
                if query_token is not None and not response.prepared:
                    # The page's own later requests (its scripts, the session, the websocket) carry the cookie;
                    # no script may read it.
                    response.set_cookie(self.cookie_name, self.token, httponly=True, samesite="Strict", path="/")
                return response
            if reason not in self._told and len(self._told) < 20:  # a page retrying in a loop floods no log
                self._told.add(reason)
                print(f"medsynth review: refused {request.method} {request.path}: {reason}", file=sys.stderr,
                      flush=True)
            raise web.HTTPForbidden(text=f"medsynth review: {reason}\n")

        async def session(request: web.Request) -> web.Response:
            # USE_HOST: the client puts in the host:port it loaded the page from.
            return web.json_response({"sessionURL": f"ws://USE_HOST{WEBSOCKET_PATH}", "secret": self.secret},
                                     headers={"Cache-Control": "no-store"})

        web_server.app.middlewares.append(only_the_page)  # before the server starts, as aiohttp requires
        web_server.app.router.add_post(SESSION_PATH, session)


def protect(server: Any, host: str, port: int) -> PageAccess:
    """Set up ``server`` (a trame server, not started yet) to admit only its own page."""
    access = PageAccess(host, port)
    server.cli.set_defaults(authKey=access.secret)  # wslink's key, read when the server starts
    for header, value in NO_FRAMES.items():
        server.http_headers.set_header(header, value)
    server.controller.on_server_bind.add(access.bind)
    return access
