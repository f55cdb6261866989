"""The web console: three static files served by the API at `/` (no build step, nothing
fetched from elsewhere). It talks to the public API only, with the token kept in the tab's
sessionStorage and sent as an Authorization header (docs/console.md)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
# Everything from this origin and nothing inline: a task's output rendered in the page can
# never become script, style or a request elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_cache: dict[str, bytes] = {}


def _read(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = resources.files("task_job.api.console").joinpath(name).read_bytes()
    return _cache[name]


def _serve(name: str) -> web.Response:
    return web.Response(body=_read(name), headers={
        "Content-Type": f"{FILES[name]}; charset=utf-8", "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})


async def index(request: web.Request) -> web.Response:
    return _serve("index.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in FILES:
        raise web.HTTPNotFound()
    return _serve(name)


index.scope = None  # type: ignore[attr-defined]  # static, no secret in it: no token needed
asset.scope = None  # type: ignore[attr-defined]

CONSOLE_ROUTES = [("GET", "/", index), ("GET", "/console/{name}", asset)]
