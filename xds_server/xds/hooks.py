"""The one interface through which the xDS server reports (and lets others gate) a stream's
life: authentication and bounds, SDS, metrics and admin observers all implement `StreamHooks`
and are composed in a `HookChain`.

Every method has a no-op default: override only what you follow. In the order of a stream:

- `admit(conn, proxy)`: once, with the first request's node parsed into a claim (`proxy` is
  that claim, unverified), before the stream has a view. Return the proxy as verified (with
  a `Proof`), or raise `StreamRefused`. Chained: each hook gets the previous one's result.
- `viewing(conn, view)`: the view the provider made for the verified proxy; return it, or a
  view wrapping it (SDS maps secret names per identity). Chained like `admit`.
- `requested(conn)`: every request, before it is applied; may raise `StreamRefused`.
- `subscribed(conn, type_url, added, wildcard)`: a request subscribed to names (or the type
  is wildcard).
- `pushed(conn, push)`: a response is on the wire.
- `acked(conn, ack)`: a request ACKed or NACKed (`ack.nack`) the previous response.
- `flushed(pending, waited, touched)`: a debounced burst of cache changes was applied: the
  changed names by type, how long the burst waited, the streams it marked.
- `initialized(conn, seconds)`: the stream holds its first full config (everything it asked
  for was sent and answered), `seconds` after it opened.
- `closed(conn)`: the stream ended (also after a refused admission).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import grpc

from ..model.identity import VerifiedProxy
from .cache import View
from .stream import Ack, Push

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["HookChain", "StreamHooks", "StreamRefused"]


class StreamRefused(Exception):
    """Close the stream with `code` and `reason` (safe to send: never holds a credential)."""

    def __init__(self, code: grpc.StatusCode, reason: str, counter: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.counter = counter


class StreamHooks:
    """No-op defaults for every point of a stream's life (see the module doc)."""

    async def admit(self, conn: Connection, proxy: VerifiedProxy) -> VerifiedProxy:
        return proxy

    def viewing(self, conn: Connection, view: View) -> View:
        return view

    def requested(self, conn: Connection) -> None:
        pass

    def subscribed(self, conn: Connection, type_url: str, added: set[str], wildcard: bool) -> None:
        pass

    def pushed(self, conn: Connection, push: Push) -> None:
        pass

    def acked(self, conn: Connection, ack: Ack) -> None:
        pass

    def flushed(self, pending: Mapping[str, set[str]], waited: float,
                touched: set[Connection]) -> None:
        pass

    def initialized(self, conn: Connection, seconds: float) -> None:
        pass

    def closed(self, conn: Connection) -> None:
        pass


_METHODS = ("admit", "viewing", "requested", "subscribed", "pushed", "acked", "flushed",
            "initialized", "closed")


class HookChain(StreamHooks):
    """Several hooks in the order added. Each method calls only the hooks that override it,
    so observers of one event cost nothing on the others' hot paths."""

    def __init__(self, hooks: Iterable[StreamHooks] = ()) -> None:
        self._hooks: list[StreamHooks] = []
        self._by_method: dict[str, list[StreamHooks]] = {m: [] for m in _METHODS}
        for hook in hooks:
            self.add(hook)

    def add(self, hook: StreamHooks) -> Callable[[], None]:
        """Follow the stream with `hook` too; returns a function that removes it."""
        self._hooks.append(hook)
        self._index()
        return lambda: self.remove(hook)

    def remove(self, hook: StreamHooks) -> None:
        if hook in self._hooks:
            self._hooks.remove(hook)
            self._index()

    def __iter__(self) -> Iterator[StreamHooks]:  # the hooks, in order
        return iter(list(self._hooks))

    def __len__(self) -> int:
        return len(self._hooks)

    def _index(self) -> None:
        for method in _METHODS:
            default = getattr(StreamHooks, method)
            self._by_method[method] = [
                h for h in self._hooks
                if getattr(type(h), method) is not default
            ]

    async def admit(self, conn: Connection, proxy: VerifiedProxy) -> VerifiedProxy:
        for hook in self._by_method["admit"]:
            proxy = await hook.admit(conn, proxy)
        return proxy

    def viewing(self, conn: Connection, view: View) -> View:
        for hook in self._by_method["viewing"]:
            view = hook.viewing(conn, view)
        return view

    def requested(self, conn: Connection) -> None:
        for hook in self._by_method["requested"]:
            hook.requested(conn)

    def subscribed(self, conn: Connection, type_url: str, added: set[str], wildcard: bool) -> None:
        for hook in self._by_method["subscribed"]:
            hook.subscribed(conn, type_url, added, wildcard)

    def pushed(self, conn: Connection, push: Push) -> None:
        for hook in self._by_method["pushed"]:
            hook.pushed(conn, push)

    def acked(self, conn: Connection, ack: Ack) -> None:
        for hook in self._by_method["acked"]:
            hook.acked(conn, ack)

    def flushed(self, pending: Mapping[str, set[str]], waited: float,
                touched: set[Connection]) -> None:
        for hook in self._by_method["flushed"]:
            hook.flushed(pending, waited, touched)

    def initialized(self, conn: Connection, seconds: float) -> None:
        for hook in self._by_method["initialized"]:
            hook.initialized(conn, seconds)

    def closed(self, conn: Connection) -> None:
        # Every hook hears of the close, even when an earlier one fails: a leaked identity
        # slot or secret would outlive the stream.
        error: Exception | None = None
        for hook in self._by_method["closed"]:
            try:
                hook.closed(conn)
            except Exception as err:
                error = error or err
        if error is not None:
            raise error
