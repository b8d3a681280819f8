"""Multi-node groups on torch's own rendezvous (``torch.distributed.elastic.rendezvous``).

corral invents no membership protocol: each node's corral joins a round of
torch's rendezvous (c10d by default; the backends torch offers) and gets its
node rank, the number of nodes and a store shared by the round. Through that
store the nodes agree on global ranks (each node publishes its rank count, as
torchrun's agent does) and on how the round ended: the first node whose rank
fails writes the failure to the round's ``end`` key (compare-and-set, so the
first writer is the world's root cause); a node whose ranks all succeeded
counts itself done, and the last one writes ``ok``; a node closed by its user
writes ``closed``. Every node waits on that key in a thread of its own (a
blocking ``store.wait`` on a cloned connection: an event, not a poll), so a
failure on one node ends the ranks of every node within milliseconds.

torch is imported only here and only when a group asks for a rendezvous.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from ._errors import ConfigError, CorralError
from ._result import Failure

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._result import Result

__all__ = ("Node", "Rendezvous", "World", "WorldEnd", "stopped")

_log = logging.getLogger("corral")

#: torch's default port for a c10d endpoint given without one.
DEFAULT_PORT: Final = 29400
#: Backends corral can watch (their store is one every node reaches).
BACKENDS: Final = ("c10d", "static")
_INSTALL: Final = (
    "a multi-node group needs torch (its c10d rendezvous): pip install 'corral[torch]' "
    "(or pip install torch)"
)


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """How this node meets the others: torchrun's ``--nnodes``/``--rdzv-*`` options.

    Attributes:
        endpoint: ``host:port`` of the rendezvous store (c10d: the first node
            able to bind it hosts it; static: node 0's address).
        run_id: the job's id; every node of a job gives the same.
        nnodes: the number of nodes, ``N`` or ``"MIN:MAX"``.
        backend: ``"c10d"`` (default) or ``"static"``.
        node_rank: this node's rank (static backend only; c10d assigns it).
        join_timeout: seconds to wait for the other nodes before failing.
        local_addr: this node's address as the others reach it (default: torch's choice).
        config: other ``--rdzv-conf`` settings, passed to torch as given.
    """

    endpoint: str
    run_id: str = "none"
    nnodes: int | str = 1
    backend: str = "c10d"
    node_rank: int | None = None
    join_timeout: float = 600.0
    local_addr: str | None = None
    config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host, port = split_endpoint(self.endpoint)
        del host, port
        low, high = parse_nnodes(self.nnodes)
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"rendezvous backend {self.backend!r} is not supported: use one of {BACKENDS}"
            )
        if self.backend == "static":
            if low != high:
                raise ConfigError("the static rendezvous needs a fixed node count (nnodes N)")
            if self.node_rank is None or not 0 <= self.node_rank < high:
                raise ConfigError(f"the static rendezvous needs node_rank in 0..{high - 1}")
        elif self.node_rank is not None:
            raise ConfigError("node_rank is for the static backend: c10d assigns node ranks")
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ConfigError("rendezvous run_id must be a non-empty string")
        if not (isinstance(self.join_timeout, (int, float)) and self.join_timeout > 0):
            raise ConfigError(f"join_timeout must be > 0 seconds, not {self.join_timeout!r}")

    @property
    def min_nodes(self) -> int:
        return parse_nnodes(self.nnodes)[0]

    @property
    def max_nodes(self) -> int:
        return parse_nnodes(self.nnodes)[1]


def split_endpoint(endpoint: object) -> tuple[str, int]:
    """``host:port`` (or ``host``, port 29400; ``[v6]:port``) -> (host, port)."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigError(f"rendezvous endpoint must be 'HOST:PORT', not {endpoint!r}")
    text = endpoint.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"rendezvous endpoint {endpoint!r}: the port must be 1..65535")
    return host, int(port_text)


def parse_nnodes(nnodes: object) -> tuple[int, int]:
    """``2`` or ``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4)."""
    text = str(nnodes).strip() if isinstance(nnodes, (int, str)) else ""
    low, _, high = text.partition(":")
    try:
        a = int(low)
        b = int(high) if high else a
    except ValueError:
        raise ConfigError(f"nnodes must be N or MIN:MAX, not {nnodes!r}") from None
    if isinstance(nnodes, bool) or a < 1 or b < a:
        raise ConfigError(f"nnodes must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, not {nnodes!r}")
    return a, b


@dataclass(frozen=True, slots=True)
class World:
    """What one rendezvous round gave this node."""

    node: int
    nnodes: int
    #: Global rank of this node's local rank 0, and the world's rank count.
    base_rank: int
    world_size: int
    master_addr: str
    master_port: int
    run_id: str
    use_agent_store: bool
    host: str

    def env(self, local_rank: int) -> dict[str, str]:
        """torchrun's variables for ``local_rank`` of this node."""
        rank = str(self.base_rank + local_rank)
        return {
            "RANK": rank,
            "ROLE_RANK": rank,
            "WORLD_SIZE": str(self.world_size),
            "ROLE_WORLD_SIZE": str(self.world_size),
            "GROUP_RANK": str(self.node),
            "GROUP_WORLD_SIZE": str(self.nnodes),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "TORCHELASTIC_RUN_ID": self.run_id,
            "TORCHELASTIC_USE_AGENT_STORE": str(self.use_agent_store),
        }


@dataclass(frozen=True, slots=True)
class WorldEnd:
    """How a round ended for the whole world."""

    #: ``"ok"``, ``"failed"`` or ``"closed"`` (a node was closed by its user or a signal).
    kind: str
    #: The world's root cause when ``kind`` is ``"failed"``.
    failure: Failure | None = None
    #: The node that closed the world (``"closed"``).
    node: int | None = None


class Node:
    """This node's membership in a torch rendezvous, one round per attempt."""

    def __init__(self, rdzv: Rendezvous, nprocs: int) -> None:
        self._rdzv = rdzv
        self._nprocs = nprocs
        self._handler: Any = None
        self._store: Any = None  # the round's store (torch's prefix store)
        self._world: World | None = None
        self._round = ""
        #: The round's liveness links (see ``_link``): node 0's server, the open
        #: connections, and the tasks reading them to their end of file.
        self._server: asyncio.Server | None = None
        self._links: list[asyncio.StreamWriter] = []
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def world(self) -> World | None:
        return self._world

    # -- joining ----------------------------------------------------------------
    async def join(self) -> World:
        """Join the next round: wait for the other nodes, agree on ranks.

        Cancellation:
            The rendezvous is closed (every node's join ends with an error
            rather than wait for this one), the joining thread is awaited to
            its end, then ``CancelledError`` propagates.
        """
        if self._handler is None:
            self._handler = await self._in_thread(self._make_handler)
        try:
            world: World = await self._in_thread(self._join, on_cancel=self._close_rendezvous)
        except asyncio.CancelledError:
            await self.shutdown()
            raise
        self._world = world
        try:
            await self._link(world)
        except asyncio.CancelledError:
            await self.shutdown()
            raise
        except OSError as exc:
            await self.shutdown()
            raise CorralError(f"could not link to node 0 at {world.master_addr}: {exc}") from exc
        return world

    # -- liveness -----------------------------------------------------------------------
    async def _link(self, world: World) -> None:
        """Connect every node to node 0 for the round: a node whose corral dies is seen at once.

        The kernel closes a dead process's sockets, so the other end reads
        end of file within milliseconds: node 0 then ends the round with
        "node K lost", node K with "node 0 lost" (whoever writes the round's
        end first wins; once the round has ended these writes change nothing).
        Membership stays torch's: this only watches the members it gave.
        """
        store = self._store
        key = self._key("link")
        if world.node == 0:
            # One socket, so one port, for IPv4 and IPv6 (others dial master_addr, either).
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                sock = socket.create_server(("", 0))
            self._server = await asyncio.start_server(self._accept, sock=sock)
            port = sock.getsockname()[1]
            await self._in_thread(lambda: store.set(key, str(port)))
            return
        port = int(await self._in_thread(lambda: store.get(key)))
        reader, writer = await asyncio.open_connection(world.master_addr, port)
        writer.write(f"{world.node}\n".encode())
        self._links.append(writer)
        self._watch(reader, 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links.append(writer)
        line = await reader.readline()
        if line.strip().isdigit():
            self._watch(reader, int(line))

    def _watch(self, reader: asyncio.StreamReader, node: int) -> None:
        async def until_eof() -> None:
            try:
                while await reader.read(4096):
                    pass
            except OSError:
                pass
            await self._end({"kind": "failed", "failure": _node_lost(node)})

        task = asyncio.ensure_future(until_eof())
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def end_round(self) -> None:
        """The round has ended (its end key is written): drop the liveness links."""
        for task in list(self._readers):
            task.cancel()
        if self._readers:
            await asyncio.wait(self._readers)
        for writer in self._links:
            writer.close()
        self._links.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _make_handler(self) -> Any:
        if "torch" not in sys.modules:
            # torch's C++ store logs a screenful per broken connection, and a
            # node that ended breaks connections by design: errors only. (Read
            # at import; the host's own setting wins, and ranks never see it.)
            os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        try:
            with warnings.catch_warnings():  # e.g. "Failed to initialize NumPy": not ours to show
                warnings.simplefilter("ignore")
                from torch.distributed.elastic.rendezvous import (
                    RendezvousParameters,
                    registry,
                )
        except ImportError as exc:
            raise CorralError(_INSTALL) from exc
        rdzv = self._rdzv
        config: dict[str, Any] = dict(rdzv.config)
        config.setdefault("join_timeout", rdzv.join_timeout)
        if rdzv.backend == "static":
            config["rank"] = rdzv.node_rank
        params = RendezvousParameters(
            backend=rdzv.backend,
            endpoint=rdzv.endpoint,
            run_id=rdzv.run_id,
            min_nodes=rdzv.min_nodes,
            max_nodes=rdzv.max_nodes,
            local_addr=rdzv.local_addr,
            **config,
        )
        try:
            return registry.get_rendezvous_handler(params)
        except Exception as exc:
            raise CorralError(f"could not reach the rendezvous at {rdzv.endpoint}: {exc}") from exc

    def _join(self) -> World:
        try:
            info = self._handler.next_rendezvous()
        except Exception as exc:
            raise CorralError(
                f"rendezvous {self._rdzv.run_id!r} at {self._rdzv.endpoint} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        store = info.store
        node, nnodes = info.rank, info.world_size
        # Global ranks: every node publishes its rank count; node K's ranks
        # follow those of nodes 0..K-1 (torchrun's agent does the same).
        store.set(f"corral/nprocs/{node}", str(self._nprocs))
        counts = [int(store.get(f"corral/nprocs/{k}")) for k in range(nnodes)]
        if node == 0:
            store.set("corral/round", uuid.uuid4().hex)
        self._round = store.get("corral/round").decode()
        self._store = store
        boot = info.bootstrap_store_info
        return World(
            node=node,
            nnodes=nnodes,
            base_rank=sum(counts[:node]),
            world_size=sum(counts),
            master_addr=boot.master_addr,
            master_port=int(boot.master_port),
            run_id=self._handler.get_run_id(),
            use_agent_store=bool(getattr(self._handler, "use_agent_store", False)),
            host=socket.gethostname(),
        )

    # -- how the round ends ---------------------------------------------------------
    async def ended(self) -> WorldEnd:
        """Wait until the round's ``end`` key is written (by any node); what it says."""
        try:
            watcher = self._store.clone()
        except Exception as exc:  # the store's host is gone
            return _lost(exc)

        def wait() -> bytes:
            watcher.wait([self._key("end")], timedelta(days=365))
            value: bytes = watcher.get(self._key("end"))
            return value

        try:
            raw = await self._in_thread(wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection to the store broke: its host died
            return _lost(exc)
        return _decode(raw)

    async def publish(self, result: Result, *, closed: bool) -> None:
        """Tell the world how this node's attempt ended (the first end written wins)."""
        root = result.root_cause
        if closed:
            await self.publish_closed()
        elif root is not None:
            await self.publish_failure(root)
        else:
            await self._publish_done()

    async def publish_failure(self, failure: Failure) -> None:
        """This node's first failure, as the world's root cause unless another came first."""
        world = self._world
        assert world is not None
        await self._end({"kind": "failed", "failure": _encode(failure, world)})

    async def publish_closed(self) -> None:
        """This node was closed (by its user, a cancellation, a signal): the world ends."""
        world = self._world
        assert world is not None
        await self._end({"kind": "closed", "node": world.node})

    async def _publish_done(self) -> None:
        """Every rank here succeeded; the last node to say so ends the round with ``ok``."""
        world = self._world
        assert world is not None
        store, end = self._store, self._key("end")

        def done() -> None:
            if store.add(self._key("done"), 1) == world.nnodes:
                store.compare_set(end, "", json.dumps({"kind": "ok"}))

        await self._in_thread(done, quiet=True)

    async def _end(self, value: dict[str, object]) -> None:
        store, end, text = self._store, self._key("end"), json.dumps(value)
        await self._in_thread(lambda: store.compare_set(end, "", text), quiet=True)

    def enrich(self, failure: Failure) -> Failure:
        """``failure`` of a local rank, with its node, host and global rank."""
        world = self._world
        assert world is not None
        return replace(
            failure, node=world.node, host=world.host, global_rank=world.base_rank + failure.rank
        )

    async def shutdown(self) -> None:
        """Close the rendezvous for every node (the job is over) and release it."""
        await self.end_round()
        handler = self._handler
        if handler is None:
            return
        self._handler = None
        await self._in_thread(handler.shutdown, quiet=True)

    def _close_rendezvous(self) -> None:
        """Close the rendezvous from any thread (a blocked join then ends in about a second)."""
        handler, self._handler = self._handler, None
        if handler is not None:
            try:
                handler.shutdown()
            except Exception:
                _log.debug("corral: closing the rendezvous failed", exc_info=True)

    def _key(self, name: str) -> str:
        return f"corral/{self._round}/{name}"

    async def _in_thread(self, fn: Any, *, quiet: bool = False, on_cancel: Any = None) -> Any:
        """Run blocking torch code in a thread; on cancellation, await the thread's end.

        A thread is never left behind: a cancelled caller first calls
        ``on_cancel`` (in a thread of its own: what makes ``fn`` return, e.g.
        closing the rendezvous), then waits for ``fn``'s thread, even when
        cancelled again, then re-raises.
        """
        future, thread = _threaded(fn)
        threads = [thread]
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            pending = [future]
            if on_cancel is not None and not future.done():
                closing, closer = _threaded(on_cancel)
                pending.append(closing)
                threads.append(closer)
            while not all(f.done() for f in pending):
                try:
                    await asyncio.wait(pending)
                except asyncio.CancelledError:
                    continue
            for f in pending:  # seen: their outcome no longer matters
                if not f.cancelled():
                    f.exception()
            raise
        except Exception:
            if quiet:
                _log.debug("corral: rendezvous call failed", exc_info=True)
                return None
            raise
        finally:
            for t in threads:  # each has settled its future: its last step
                t.join()


def _threaded(fn: Any) -> tuple[asyncio.Future[Any], threading.Thread]:
    """Run ``fn`` in a thread of its own (ended when ``fn`` returns); its outcome, as a future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def body() -> None:
        try:
            value = fn()
        except BaseException as exc:  # handed to the loop
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, value, None)

    thread = threading.Thread(target=body, name="corral-rendezvous", daemon=True)
    thread.start()
    return future, thread


def _settle(future: asyncio.Future[Any], value: object, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _encode(failure: Failure, world: World) -> dict[str, object]:
    return {
        "rank": failure.rank,
        "global_rank": world.base_rank + failure.rank,
        "node": world.node,
        "host": world.host,
        "pid": failure.pid,
        "exitcode": failure.exitcode,
        "signal": failure.signal,
        "timestamp": failure.timestamp,
        "message": failure.message,
        "error_file": None if failure.error_file is None else str(failure.error_file),
    }


def _decode(raw: bytes) -> WorldEnd:
    data = json.loads(raw)
    kind = data.get("kind")
    if kind == "failed":
        f = data["failure"]
        failure = Failure(
            rank=int(f["rank"]),
            pid=f["pid"],
            exitcode=int(f["exitcode"]),
            signal=f["signal"],
            timestamp=float(f["timestamp"]),
            error_file=None,
            error=None,
            message=str(f["message"]),
            node=int(f["node"]),
            host=None if f["host"] is None else str(f["host"]),
            global_rank=None if f["global_rank"] is None else int(f["global_rank"]),
        )
        return WorldEnd("failed", failure)
    if kind == "closed":
        return WorldEnd("closed", node=data.get("node"))
    return WorldEnd("ok")


def _node_lost(node: int) -> dict[str, object]:
    """The encoded failure of a node whose corral ended without a word (SIGKILL, a crash)."""
    return {
        "rank": -1,
        "global_rank": None,
        "node": node,
        "host": None,
        "pid": None,
        "exitcode": 1,
        "signal": None,
        "timestamp": time.time(),
        "message": "its corral ended without a word (killed?); its ranks ended with it",
    }


def stopped(node: int | None) -> Failure:
    """Why this node's ranks were closed: another node was stopped (a signal, its user)."""
    return _node_failure("it was stopped (a signal to its corral, or its program closed it)", node)


def _lost(exc: BaseException) -> WorldEnd:
    """The round's store became unreachable: the node hosting it is gone."""
    failure = _node_failure(f"lost the rendezvous store (the node hosting it ended?): {exc}")
    return WorldEnd("failed", failure)


def _node_failure(message: str, node: int | None = None) -> Failure:
    """A failure of a node as a whole (no rank of it is known to have failed)."""
    return Failure(
        rank=-1,
        pid=None,
        exitcode=1,
        signal=None,
        timestamp=time.time(),
        error_file=None,
        error=None,
        message=message,
        node=node,
    )
