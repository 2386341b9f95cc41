"""The running proxy: current config, listeners, reload and drain.

Listener life cycle (one table, the rules):

    state      event                         → state      action
    (none)     apply: listener added         → Active     bind socket, start accept loop
    Active     apply: same address and port  → Active     swap spec/chain; socket kept
    Active     apply: address/port changed   → Active     bind new socket first, then close old
    Active     apply: listener removed       → (closed)   stop accepting; open connections finish
    Active     SIGTERM (drain)               → Draining   not ready; keep accepting and serving for
                                                          settings.drain_duration (Istio's
                                                          terminationDrainDuration) while callers move
                                                          away: HTTP/1.1 responses carry connection:
                                                          close, HTTP/2 connections get GOAWAY
    Active     SIGINT, or drain_duration 0   → Closing    (at once)
    Draining   drain_duration over           → Closing    stop accepting; idle connections closed;
                                                          busy ones finish their request
    Closing    all connections done or
               settings.drain_timeout        → (exit 0)

``apply(cfg)`` checks everything first (the one ProxyConfig validator,
loader.proxyconfig.check_proxy_config, that config files also pass; core's
compile errors; bindability) and only then swaps; on any problem it raises
ConfigRejected and the old config and listeners stay as they were. Requests
take the snapshot current when they start, so in-flight requests finish on
the old config.

Sockets come from the network backend given to the runtime (backend.py):
``SocketBackend`` in production, a memory backend in tests
(proxy/testing.py). The runtime assembles the request path: listeners →
each connection's task (connection.py) → connection handlers (http.py, h2conn.py, tcp.py) → stages (stages.py) →
the forwarder (forward.py) over the HTTP/1.1 and HTTP/2 exchanges
(h1upstream.py, h2pool.py).
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any, Callable

import meshctl.proxy.aio as aio
from ..core.errors import CoreConfigError
from ..core.logthrottle import LogThrottle
from ..core.peeruid import checks as checks_peer
from ..loader.proxyconfig import check_proxy_config
from ..model.proxyconfig import Listener, ProxyConfig
from .accesslog import AccessLog
from .admin import serve_admin
from .backend import BackendListener, NetworkBackend, SocketBackend
from .dns import refresh as dns_refresh
from .extauthz import ExtAuthzClient
from .gateway_tls import GatewayCredentials
from .mirror import MirrorState
from .peercheck import PeerUids, allowed_uids
from .overload import FD_ERRNOS, MAX_REFUSING, Condition, default_connection_limit, refuse
from .forward import Forwarder
from .h1upstream import H1Exchange
from .protocols import LazyH2Exchange
from .connection import serve_connection
from .limits import commit_limiters
from .listener import ActiveListener
from .pool import UpstreamPool
from .ratelimit_stage import RateLimits
from .request import ConnState, new_request_id
from .snapshot import Snapshot
from .stats import Stats
from .stream import bind_listener
from .telemetry import Telemetry
from .tracing import Tracer

log = logging.getLogger("meshctl.proxy")

WATCHDOG_INTERVAL = 0.25  # resolution of header and idle timeouts
SWEEP_EVERY = 4  # watchdog ticks between sweeps of idle pooled connections and limiters (1 s)
WATCHDOG_CHUNK = 512  # connections the watchdog looks at between checkpoints
CLIENT_GONE_AFTER = 1.0  # a request older than this is dropped if its client closed


class ConfigRejected(Exception):
    """A config the proxy will not run; the previous one stays in place."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _h2_exchange(rt):
    """The HTTP/2 upstream exchange, made by the first HTTP/2 try (protocols.LazyH2Exchange):
    a sidecar whose traffic is HTTP/1.1 never loads jh2 (~2.8 MB of RSS)."""
    from .h2pool import H2Exchange

    return H2Exchange(rt)


class ProxyRuntime:
    def __init__(self, *, config_path: str | Path | None = None,
                 loader: Callable[[str | Path], ProxyConfig] | None = None,
                 rand: random.Random | None = None, backend: NetworkBackend | None = None) -> None:
        self.backend: NetworkBackend = backend if backend is not None else SocketBackend()
        self.config_path = Path(config_path) if config_path is not None else None
        self._loader = loader
        self.rand = rand or random.Random(int.from_bytes(os.urandom(8), "big"))
        self.stats = Stats()
        self.telemetry = Telemetry()  # Istio metrics (telemetry.py)
        self.tracer = Tracer()  # sampled spans, sent to Zipkin in batches (tracing.py)
        self.admin_verifier = ""  # checks the mesh credential on admin /traces (credentials.mesh_verifier)
        self.access_log: AccessLog | None = None  # set before run() to log requests
        self.ratelimits = RateLimits()  # RateLimit resources; .mixer_url for global quotas
        self.ext_authz = ExtAuthzClient()  # AuthorizationPolicy CUSTOM (proxy/extauthz.py)
        self.snapshot: Snapshot | None = None
        self.listeners: dict[str, ActiveListener] = {}
        self.conns: set[ConnState] = set()
        self.active: dict[tuple[str, int], int] = {}
        self.draining = False
        self.closing = False  # draining, and the drain period is over: listeners closed
        self.ready = False
        self.forwarder = Forwarder(self, H1Exchange(self), LazyH2Exchange(self, _h2_exchange))
        self.pool: UpstreamPool | None = None
        self._nursery: aio.Nursery | None = None
        self._mtime: float | None = None
        self._drained = aio.Event()
        self.admin_port: int | None = None
        self.tls = None  # the sidecar's CertificateHolder when it has an identity (proxy/identity.py)
        self.default_conn_limit = default_connection_limit()  # from RLIMIT_NOFILE (overload.py)
        self.refusing = 0
        self.open_conns = 0  # accepted on all listeners, not closed yet
        self.fd_shortage = Condition("accept")
        self.mirrors = MirrorState()  # shadow requests (mirror.py)
        self._conn_nursery: aio.Nursery | None = None
        self.gateway_credentials = GatewayCredentials()  # TLS on gateway servers; secrets_dir set by main
        self.peer_uids: PeerUids | None = None  # outbound listeners' local-user check (peercheck.py)
        self.refusal_log = LogThrottle()  # refused users and mTLS handshakes: a line per cause per 10 s
        self.peer_allowed: frozenset[int] = frozenset({os.geteuid()})

    # ------------------------------------------------------------ helpers

    def mirror_nursery(self) -> aio.Nursery | None:
        """Where shadow requests run (mirror.py): beside the connections, so a drain waits for them."""
        return None if self.draining else self._conn_nursery

    def new_request_id(self) -> str:
        return new_request_id(self.rand)

    @property
    def config(self) -> ProxyConfig | None:
        return self.snapshot.cfg if self.snapshot else None

    # ------------------------------------------------------------ apply

    def apply(self, cfg: ProxyConfig) -> None:
        """Validate and swap in ``cfg`` atomically. Raises ConfigRejected
        (keeping the current config) when it is invalid or cannot be bound."""
        if self.closing:  # during the drain period configs still apply (callers' endpoints move)
            raise ConfigRejected("the proxy is shutting down")
        # the same validator as for config files, then what only a running proxy can check
        errs = [f"{e.field}: {e.message}" if e.field else e.message for e in check_proxy_config(cfg)]
        errs += self.gateway_credentials.problems(cfg, self.tls)
        peer_allowed, why = allowed_uids(cfg.settings.outbound_users)  # user names unknown here
        errs += why
        if errs:
            self.stats.config_rejected += 1
            raise ConfigRejected("; ".join(errs))
        try:
            prev = self.snapshot
            snap = Snapshot(cfg, self.stats, prev.outliers if prev is not None else None,
                            prev.limiters if prev is not None else None, prev.slow_starts if prev is not None else None)
        except CoreConfigError as exc:  # core cannot compile a rule (the message names the value)
            self.stats.config_rejected += 1
            raise ConfigRejected(f"cannot compile config: {exc}") from None
        # bind new and moved listeners before touching anything
        new_socks: dict[str, BackendListener] = {}
        try:
            for spec in cfg.listeners:
                cur = self.listeners.get(spec.name)
                if cur is not None and (cur.spec.address, cur.spec.port) == (spec.address, spec.port):
                    continue
                reuse = self._socket_for(spec.address, spec.port)
                new_socks[spec.name] = reuse if reuse is not None else self.backend.listen(spec.address, spec.port)
        except OSError as exc:
            for name, s in new_socks.items():
                if all(a.sock is not s for a in self.listeners.values()):
                    s.close()
            self.stats.config_rejected += 1
            raise ConfigRejected(f"{exc.strerror or exc}") from None
        # commit: nothing below can fail
        old = self.listeners
        self.peer_allowed = peer_allowed
        if (self.peer_uids is None and isinstance(self.backend, SocketBackend)
                and any(checks_peer(s.direction) for s in cfg.listeners)):
            self.peer_uids = PeerUids()  # logs once when the check cannot run here
        self.snapshot = snap
        commit_limiters(prev.limiters if prev is not None else None, snap.limiters)
        for lim in snap.limiters.values():
            lim.pool.backend = self.backend
        pool = self.pool
        assert pool is not None, "apply() before run()"  # run() sets the pool first
        pool.limits = snap.limits
        pool.idle_timeout = float(cfg.settings.idle_timeout)
        keep: dict[str, ActiveListener] = {}
        for spec in cfg.listeners:
            cur = old.get(spec.name)
            if spec.name in new_socks:
                al = ActiveListener(spec, new_socks[spec.name], snap)
                keep[spec.name] = al
                if self._nursery is not None:
                    self._nursery.start_soon(self._accept_loop, al)
                log.info("listener %s (%s %s) on %s:%d", spec.name, spec.direction, spec.protocol,
                         spec.address, al.bound_port)
            else:
                assert cur is not None  # not rebound: same address as the current listener of this name
                cur.set_spec(spec, snap)
                keep[spec.name] = cur
        self.listeners = keep
        kept_socks = {id(a.sock) for a in keep.values()}
        for name, al in old.items():
            if keep.get(name) is not al:
                al.scope.cancel()
                if id(al.sock) not in kept_socks:
                    al.sock.close()
                    if self._nursery is not None:
                        self._nursery.start_soon(self._drain_connections_of, name, al.sock)
                log.info("listener %s closed", name)
        self.stats.config_applied += 1
        self.telemetry.set_workload(cfg.workload)
        log.info("config %s applied (%d listeners, %d clusters)", cfg.version, len(cfg.listeners),
                 len(cfg.clusters))

    async def apply_async(self, cfg: ProxyConfig) -> None:
        """``apply`` for callers that want an awaitable (the Pilot client)."""
        self.apply(cfg)
        await aio.checkpoint()

    def _socket_for(self, address: str, port: int) -> BackendListener | None:
        """A socket already bound to address:port by a listener being renamed."""
        if port == 0:
            return None
        for al in self.listeners.values():
            if (al.spec.address, al.spec.port) == (address, port):
                return al.sock
        return None

    async def _drain_connections_of(self, name: str, bound: BackendListener) -> None:
        """A removed listener's connections drain, as Envoy's listener drain: they go on
        serving (HTTP/2 gets GOAWAY) for settings.drain_timeout, then are closed."""
        def mine() -> list:
            return [c for c in self.conns if c.accepted_on is bound]

        asked: set[int] = set()
        snap = self.snapshot
        assert snap is not None  # a listener is removed by apply(), after the first config
        with aio.move_on_after(float(snap.settings.drain_timeout)):
            while True:
                left = mine()
                if not left:
                    return
                for c in left:
                    graceful = getattr(c, "drain", None)
                    if graceful is not None and id(c) not in asked:
                        asked.add(id(c))
                        graceful()
                await aio.sleep(0.05)
        left = mine()
        if left:
            log.info("listener %s: closing %d connections at the drain timeout", name, len(left))
        for c in left:
            c.scope.cancel()

    # ------------------------------------------------------------ serving

    async def _accept_loop(self, al: ActiveListener) -> None:
        with al.scope:
            nursery = self._conn_nursery
            assert nursery is not None  # run() sets it before starting any accept loop
            while True:
                try:
                    stream, client_ip = await al.sock.accept()
                except (OSError, aio.ClosedResourceError) as exc:
                    if al.sock.closed:
                        return
                    if isinstance(exc, OSError) and exc.errno in FD_ERRNOS:  # out of descriptors: pause (overload.py)
                        self.fd_shortage.hit(aio.current_time(), f"{exc.strerror}: pausing accepts")
                    else:
                        log.warning("listener %s: accept failed: %s", al.spec.name, exc)
                    await aio.sleep(0.1)
                    continue
                self.fd_shortage.clear()
                snap = self.snapshot
                assert snap is not None  # applied before any listener exists
                limit = snap.settings.max_connections or self.default_conn_limit
                if al.active >= limit or self.open_conns >= self.default_conn_limit:
                    # the listener's limit, or all listeners together past what the fds allow
                    al.overload.hit(aio.current_time(), f"{al.active} connections open (limit {limit}, "
                                    f"{self.open_conns} on all listeners): refusing new ones")
                    if self.refusing < MAX_REFUSING:
                        spec = al.spec  # a 503 only where the client speaks plaintext HTTP first
                        plain = (spec.protocol == "http" and not spec.tls_servers  # a TLS port: closed, never plaintext
                                 and (spec.direction != "inbound" or spec.mtls_mode == "DISABLE"))
                        nursery.start_soon(self._refuse, stream, plain)
                    else:
                        stream.close_now()
                    continue
                if al.overload.on and al.active < limit * 0.9:
                    al.overload.clear()
                al.active += 1
                self.open_conns += 1
                nursery.start_soon(serve_connection, self, al, stream, client_ip)  # (connection.py)

    async def _refuse(self, stream: Any, http: bool) -> None:
        self.refusing += 1
        try:
            await refuse(stream, http)
        finally:
            self.refusing -= 1

    async def run(self, cfg: ProxyConfig, *, admin_port: int | None = None, admin_address: str = "127.0.0.1",
                  handle_signals: bool = True, task_status=aio.TASK_STATUS_IGNORED) -> None:
        """Apply ``cfg`` and serve until drained (SIGTERM or ``drain()``).

        Raises ConfigRejected before serving anything when ``cfg`` cannot run
        or the admin port cannot be bound."""
        pool = self.pool = UpstreamPool(limits=None, backend=self.backend)  # limits set by apply
        admin_sock = None
        if admin_port is not None:
            try:
                admin_sock = bind_listener(admin_address, admin_port, backlog=64)
            except OSError as exc:
                raise ConfigRejected(f"admin: {exc.strerror or exc}") from None
            self.admin_port = admin_sock.getsockname()[1]
            log.info("admin on %s:%d (/ready /stats /listeners; /config /mirror /traces with the mesh credential)", admin_address, self.admin_port)
        try:
            self.apply(cfg)  # raises ConfigRejected: nothing started yet
        except BaseException:
            if admin_sock is not None:
                admin_sock.close()
            raise
        async with aio.open_nursery() as outer:
            if admin_sock is not None:
                outer.start_soon(serve_admin, self, admin_sock)
            if self.access_log is not None:
                outer.start_soon(self.access_log.run)
            outer.start_soon(self.tracer.run, self)
            async with aio.open_nursery() as conns:
                self._conn_nursery = conns
                async with aio.open_nursery() as nursery:
                    self._nursery = nursery
                    for al in self.listeners.values():
                        nursery.start_soon(self._accept_loop, al)
                    if self.config_path is not None:
                        try:
                            self._mtime = self.config_path.stat().st_mtime
                        except OSError:
                            self._mtime = None
                    nursery.start_soon(self._housekeeping, handle_signals)
                    nursery.start_soon(dns_refresh)  # upstream names past their TTL (dns.py)
                    self.ready = True
                    task_status.started(self)
                    await self._drained.wait()
                    nursery.cancel_scope.cancel()
                # listeners are closed; wait for connections
                snap = self.snapshot
                assert snap is not None  # apply(cfg) above succeeded
                with aio.move_on_after(float(snap.settings.drain_timeout)):
                    while self.conns:
                        await aio.sleep(0.02)
                if self.conns:
                    log.warning("drain timeout: closing %d connections", len(self.conns))
                conns.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        pool.close_all()
        snap = self.snapshot  # the last config applied (configs still apply while draining)
        assert snap is not None
        for lim in snap.limiters.values():
            lim.retire()  # closes the idle connections of clusters with connectionPool limits
        log.info("proxy stopped")

    def drain(self, duration: float | None = None) -> None:
        """Drain: serve ``duration`` s more (default settings.drain_duration) with
        every response closing its connection, then stop accepting, close idle
        connections and let busy ones finish."""
        if self.draining:
            if duration == 0:
                self._stop_listening()  # a second signal, or SIGINT: no more waiting
            return
        self.draining = True
        self.ready = False
        d = float(self.snapshot.settings.drain_duration) if duration is None and self.snapshot else (duration or 0.0)
        log.info("draining: %d connections open%s", len(self.conns), f"; serving {d:g}s more" if d > 0 else "")
        for c in list(self.conns):
            graceful = getattr(c, "drain", None)  # HTTP/2 (h2conn.H2ConnState): GOAWAY, close when done
            if graceful is not None:
                graceful()
        if d > 0 and self._nursery is not None:
            self._nursery.start_soon(self._drain_after, d)
        else:
            self._stop_listening()

    async def _drain_after(self, seconds: float) -> None:
        await aio.sleep(seconds)
        self._stop_listening()

    def _stop_listening(self) -> None:
        if self._drained.is_set():
            return
        log.info("drain period over: closing listeners; %d connections open", len(self.conns))
        self.closing = True
        for al in self.listeners.values():
            al.scope.cancel()
            al.sock.close()
        for c in list(self.conns):
            graceful = getattr(c, "drain", None)  # HTTP/2 (h2conn.H2ConnState): GOAWAY, close when done
            if graceful is not None:
                graceful()
            elif not c.busy:
                c.scope.cancel()
        self._drained.set()

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Reload the config file; True if applied. Errors are logged, never raised."""
        if self.config_path is None or self._loader is None:
            return False
        try:
            cfg = self._loader(self.config_path)
        except Exception as exc:
            self.stats.config_rejected += 1
            log.error("reload of %s rejected: %s", self.config_path, exc)
            return False
        try:
            self.apply(cfg)
        except ConfigRejected as exc:
            log.error("config %s rejected: %s", cfg.version, exc.reason)
            return False
        return True

    async def _housekeeping(self, handle_signals: bool) -> None:
        """The runtime's one clock: the watchdog every WATCHDOG_INTERVAL, and every
        SWEEP_EVERY-th tick the sweeps (idle pooled connections, limiters) and the config
        file's mtime. One timer, not one per job: at 1,000 rps each wake-up of an idle
        sidecar costs ~0.15 ms of CPU (cold caches), and most land beside a request
        and delay it by as much (bench/tail_probe.sh)."""
        signals = handle_signals and _main_thread()
        with aio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) if signals else _nullcm() as sigs:
            async with aio.open_nursery() as n:
                if sigs is not None:
                    n.start_soon(self._signals, sigs)
                pool = self.pool
                assert pool is not None  # started by run()
                tick = 0
                while True:
                    await aio.sleep(WATCHDOG_INTERVAL)
                    now = aio.current_time()
                    await self._watchdog(now)
                    tick += 1
                    if tick % SWEEP_EVERY:
                        continue
                    pool.sweep()
                    snap = self.snapshot
                    assert snap is not None
                    for lim in snap.limiters.values():
                        lim.sweep(now)
                    self._check_mtime()

    async def _watchdog(self, now: float) -> None:
        """Close connections past their header/idle deadline, and abandon
        requests whose client went away while the upstream is still working
        (checked once a request is older than CLIENT_GONE_AFTER).
        WATCHDOG_CHUNK connections at a time, with a checkpoint between: a look at
        one costs ~0.2-0.3 µs, and 10,000 idle keep-alive connections in one step
        held the loop ~2 ms four times a second."""
        snap = self.snapshot
        assert snap is not None  # started by run(), after the first apply()
        head_timeout = float(snap.settings.request_headers_timeout)
        for i, c in enumerate(list(self.conns)):
            if i and not i % WATCHDOG_CHUNK:
                await aio.checkpoint()
            if not c.busy and c.server is not None and c.server.receiving_head:
                # a keep-alive request's head has begun: one header timeout from here
                # (Envoy's request_headers_timeout), not the idle timeout
                c.deadline = min(c.deadline, now + head_timeout)
            if c.deadline < now:
                c.scope.cancel()
            elif c.busy and now - c.since > CLIENT_GONE_AFTER and c.client_gone():
                log.info("client went away: abandoning %s %s", c.rq.head.method, c.rq.head.path)
                self.stats.flag("DC")
                c.scope.cancel()

    async def _signals(self, sigs) -> None:
        async for signum in sigs:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", self.config_path)
                self.reload()
            else:
                log.info("%s: draining", signal.Signals(signum).name)
                self.drain(0.0 if signum == signal.SIGINT else None)

    def _check_mtime(self) -> None:
        if self.config_path is None:
            return
        try:
            m = self.config_path.stat().st_mtime
        except OSError:
            return
        if m != self._mtime:
            self._mtime = m
            log.info("%s changed: reloading", self.config_path)
            self.reload()


class _nullcm:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
