"""Web pages and timers declared where they live, registered on the Faust
app when it is built.

Why not ``@app.page`` in each module: that needs the app at import time, so
importing ``stream.api`` would build the app (read settings, make its data
directory) and tie ``stream.app``, ``stream.api`` and ``stream.live`` into an
import circle.  A module declares on its own :class:`Routes`; the app's
builder calls :meth:`Routes.register`."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Routes:
    def __init__(self) -> None:
        self._pages: list[tuple[str, type]] = []
        self._timers: list[tuple[float, Callable[..., Any]]] = []

    def page(self, path: str) -> Callable[[type], type]:
        """As ``app.page(path)``: a ``faust.web.View`` class served at ``path``."""
        def declare(view: type) -> type:
            self._pages.append((path, view))
            return view
        return declare

    def timer(self, interval: float) -> Callable[[F], F]:
        """As ``app.timer(interval=...)``: an async function run every ``interval`` seconds."""
        def declare(fn: F) -> F:
            self._timers.append((interval, fn))
            return fn
        return declare

    def register(self, app: Any) -> None:
        """Everything declared, onto ``app`` (a ``faust.App``)."""
        for path, view in self._pages:
            app.page(path)(view)
        for interval, fn in self._timers:
            app.timer(interval=interval)(fn)
