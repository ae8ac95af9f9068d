"""The ``anyserve up`` loop: start order, restart with backoff, rolling reload, shutdown.

One plain loop in the main thread owns every piece of state. Other threads only
*report* into its inbox: child output lines, the API server poller (health and
registry), the file watcher, the control socket, the object store sweeper. Signal
handlers only record the signal. The loop acts on all of it, so there are no locks
around the process table.

Start order: the API server first; the replicas, in parallel, once it answers
``/health``. A replica is ready when its replica id shows up in ``/registry``. Each
process gets a fresh replica id (``chat-0-1a2b3c``) because during a reload the old and
the new process of one slot are registered side by side.

Rolling reload of a group, one slot at a time: start the new process, wait until it is
registered, unregister the old one (``DELETE /unregister``), give requests already
routed to it a moment to arrive, then SIGTERM it (it drains) and wait, bounded. A new
process that exits or never registers is killed; the old one keeps serving and the
error is shown. A slot with a fixed port goes through a bridge process on a free port,
since the old process still holds the fixed port while the new one starts.

Stuck replicas: a probe thread asks every ready replica ``ServerReady`` once a second.
One that has not answered for its group's ``stuck_timeout`` (its event loop is blocked,
or it was stopped) is SIGKILLed, and the normal restart path with backoff takes over.

Shutdown: replicas get SIGTERM (they unregister and finish in-flight requests), then
the API server; a second signal kills everything at once.

Authentication: the token (``[api_server] token``, else ``$ANYSERVE_TOKEN``, else one
created in ``.anyserve/token`` when the API server listens beyond loopback) reaches every
child as ``$ANYSERVE_TOKEN``, never on a command line, where ``ps`` would show it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyserve.dashboard import LogLine, ProcessView, ReplicaView, Snapshot
from anyserve.errors import AnyServeError, BadRequest, ConfigError, NotFound
from anyserve.logs import SUPERVISOR, Event, LogFiles
from anyserve.process import Child, Sampler, free_port, port_in_use
from anyserve.topology import API_NAME, GroupSpec, Topology, config_error

API_KIND = "api server"
REPLICA_KIND = "replica"
TOKEN_ENV = "ANYSERVE_TOKEN"
TOKEN_FILE = "token"
"""Created in the state directory when ``up`` makes a token up."""

Sink = Callable[[Event], None]


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff: ``initial`` doubling to ``cap``, with jitter; ``stable_after``
    seconds of being ready forgive past failures; ``crash_loop_after`` quick failures in a
    row put the process in the crash-loop state."""

    initial: float = 0.5
    cap: float = 30.0
    stable_after: float = 60.0
    crash_loop_after: int = 4
    jitter: float = 0.15

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.cap, self.initial * 2 ** max(0, failures - 1))
        return base * (1 - self.jitter + 2 * self.jitter * rand())


@dataclass(frozen=True)
class Timings:
    """How often the loop looks at things; shortened only by tests."""

    tick: float = 0.1
    poll_fast: float = 0.2
    poll_slow: float = 1.0
    sample: float = 1.0
    settle: float = 1.0
    """After unregistering, wait this long before SIGTERM: a request routed just before
    the unregister still reaches the old process while it is accepting."""
    ready_timeout: float = 60.0
    kill_margin: float = 5.0
    api_grace: float = 5.0
    debounce_ms: int = 300
    probe_every: float = 1.0
    """How often every ready replica is asked ``ServerReady``..."""
    probe_timeout: float = 1.0
    """... and how long it has to answer (an idle replica answers in a millisecond)."""


@dataclass
class Proc:
    """One slot's process (or a reload's new process) and everything known about it."""

    group: str
    slot: int
    kind: str
    port: int | None = None
    state: str = "starting"
    role: str = "serve"  # serve | candidate (reload's new process) | retire (on its way out)
    child: Child | None = None
    pid: int | None = None
    replica_id: str | None = None
    restarts: int = 0
    failures: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    retry_at: float | None = None
    backoff: float | None = None
    exit_code: int | None = None
    message: str = ""
    stderr_tail: tuple[str, ...] = ()
    term_at: float | None = None
    kill_at: float | None = None
    restart_now: bool = False
    unhealthy_since: float | None = None
    """When ``ServerReady`` first went unanswered (None while it answers)."""
    stuck_for: float | None = None
    """Set when the supervisor killed the process for not answering: for how long."""

    @property
    def name(self) -> str:
        return f"{self.group}.{self.slot}"


@dataclass
class Reload:
    """A rolling reload of some slots of one group."""

    group: str
    slots: list[int]
    reason: str
    started: float
    candidate: Proc | None = None
    old: Proc | None = None
    phase: str = "next"
    deadline: float = 0.0
    again: bool = False
    old_state: str = ""


class _Reply:
    """A control request waiting for the loop's answer."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.value: Any = None
        self.error: AnyServeError | None = None


class Supervisor:
    """Runs one :class:`Topology` until a signal or ``anyserve down``."""

    def __init__(
        self,
        topology: Topology,
        sink: Sink,
        *,
        reload: bool = True,
        insecure: bool = False,
        policy: RestartPolicy | None = None,
        timings: Timings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topology = topology
        self.sink = sink
        self.reload_enabled = reload
        self.insecure = insecure
        self.token: str | None = None
        self._create_token = False
        self.policy = policy or RestartPolicy()
        self.timings = timings or Timings()
        self.clock = clock
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.procs: list[Proc] = []
        self.desired = {g.name: g.count for g in topology.groups}
        self.reloads: dict[str, Reload] = {}
        self.registry: dict[str, dict[str, Any]] = {}
        self.api_reachable = False
        self.replicas_started = False
        self.phase = "running"  # running | stopping | done
        self.exit_code = 0
        self.signals: list[int] = []
        self.events: deque[LogLine] = deque(maxlen=20)
        self.logs: deque[LogLine] = deque(maxlen=200)
        self.samples: dict[int, tuple[float, int]] = {}
        self.started_wall = time.time()
        self.dirty = True
        self._by_child: dict[int, Proc] = {}
        self._stop = threading.Event()
        self._fast = threading.Event()
        self._sampler = Sampler()
        self._next_sample = 0.0
        self._next_cleanup = 0.0
        self._api_stop_sent = False
        self._files: LogFiles | None = None  # created by run(): preflight writes nothing
        self._http: Any = None
        self._probe_targets: dict[int, str] = {}  # pid -> endpoint, replaced by the loop

    # ------------------------------------------------------------------ public surface

    def preflight(self) -> None:
        """Refuse to start when a fixed port is taken (naming the port and the group) or
        when the API server would listen beyond loopback with no token."""
        from anyserve.control import running_pid

        self.token, self._create_token = token_plan(self.topology, insecure=self.insecure)

        pid = running_pid(self.topology.state_dir)
        if pid is not None:
            raise AnyServeError(
                f"`anyserve up` is already running for {self.topology.path} (pid {pid}); "
                "use `anyserve status`, or stop it with `anyserve down`"
            )
        api = self.topology.api_server
        if port_in_use(api.host, api.port):
            raise config_error(
                self.topology,
                ("api_server", "port"),
                f"port {api.port} on {api.host} is already in use (API server); stop what "
                "listens there or choose another port",
            )
        if api.grpc_port is not None and port_in_use(api.host, api.grpc_port):
            raise config_error(
                self.topology,
                ("api_server", "grpc_port"),
                f"port {api.grpc_port} on {api.host} is already in use (API server, gRPC); "
                "stop what listens there or choose another port",
            )
        for group in self.topology.groups:
            if group.port is not None and group.count > 0 and port_in_use(group.host, group.port):
                raise config_error(
                    self.topology,
                    ("replicas", group.name, "port"),
                    f"port {group.port} on {group.host} is already in use (group {group.name}); "
                    "stop what listens there, choose another port or omit it for a free one",
                )

    def run(self, on_tick: Callable[[], None] | None = None) -> int:
        """Start everything, supervise until stopped, and return the exit code."""
        import httpx

        from anyserve.control import ControlServer

        if self._create_token:
            self.token = token_file(self.topology.state_dir)
        self._http = httpx.Client(timeout=2.0, headers=self._auth_headers())
        self._files = LogFiles(self.topology.state_dir / "logs")
        control = ControlServer(self.topology.state_dir, self._control)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        threads = [
            threading.Thread(target=self._poll_api, name="poll", daemon=True),
            threading.Thread(target=self._probe, name="probe", daemon=True),
        ]
        if self.reload_enabled and any(g.watch for g in self.topology.groups):
            threads.append(threading.Thread(target=self._watch, name="watch", daemon=True))
        try:
            self._say(
                f"starting {self.topology.path.name}: API server at {self.topology.api_server.url}"
            )
            self._say_auth()
            self._start_api()
            for thread in threads:
                thread.start()
            while self.phase != "done":
                self._wait_inbox()
                self._step()
                if on_tick is not None:
                    on_tick()
        finally:
            self._stop.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_everything()
            control.close()
            self._http.close()
            self._files.close()
            self._files = None
        return self.exit_code

    def snapshot(self) -> Snapshot:
        """The current state as plain data (for the dashboard and ``anyserve ps``)."""
        now = self.clock()
        views = []
        for p in sorted(self.procs, key=_order):
            sample = self.samples.get(p.pid or -1) if p.child else None
            views.append(
                ProcessView(
                    name=p.name,
                    group=p.group,
                    kind=p.kind,
                    state=p.state,
                    pid=p.pid if p.child else None,
                    port=p.port,
                    replica_id=p.replica_id,
                    restarts=p.restarts,
                    uptime=(now - p.started_at) if p.child and p.started_at else None,
                    cpu=sample[0] if sample else None,
                    rss=sample[1] if sample else None,
                    exit_code=p.exit_code,
                    backoff=p.backoff if p.retry_at is not None else None,
                    retry_in=max(0.0, p.retry_at - now) if p.retry_at is not None else None,
                    message=p.message,
                    stderr_tail=p.stderr_tail,
                )
            )
        return Snapshot(
            topology=str(self.topology.path),
            api_url=self.topology.api_server.url,
            pid=os.getpid(),
            started_at=self.started_wall,
            state=self.phase if self.phase != "done" else "stopped",
            api_reachable=self.api_reachable,
            processes=tuple(views),
            replicas=tuple(ReplicaView.from_registry(r) for r in self.registry.values()),
            events=tuple(self.events),
            logs=tuple(self.logs)[-50:],
        )

    # ------------------------------------------------------------------ events

    def _emit(self, event: Event) -> None:
        if self._files is not None:
            self._files.write(event)
        line = LogLine(at=event.at, name=event.name, text=event.message, kind=event.kind)
        self.logs.append(line)
        if event.kind in ("reload", "error", "exit"):
            self.events.append(line)
        self.sink(event)
        self.dirty = True

    def _say(self, message: str, name: str = SUPERVISOR, kind: str = "lifecycle") -> None:
        self._emit(Event(kind=kind, name=name, message=message))

    def _on_line(self, child: Child, stream: str, line: str) -> None:
        # Called from a reader thread: hand over, do not touch state.
        self.inbox.put(("line", child.pid, stream, line))

    def _say_auth(self) -> None:
        api = self.topology.api_server
        if self._create_token:
            path = self.topology.state_dir / TOKEN_FILE
            self._say(
                f"the API server listens on {api.host}: registration and object writes need "
                f"the token in {path} (clients: export {TOKEN_ENV}=$(cat {path}))"
            )
        elif self.token is None and not api.loopback:
            self._say(
                f"--insecure: the API server listens on {api.host} without a token; anyone "
                "who can reach it may register replicas and write objects",
                kind="error",
            )

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record; the loop notices within one tick.
        self.signals.append(signum)

    # ------------------------------------------------------------------ the loop

    def _wait_inbox(self) -> None:
        try:
            message = self.inbox.get(timeout=self.timings.tick)
        except queue.Empty:
            return
        self._handle(message)
        # Drain what else arrived, bounded so a chatty child cannot starve the loop.
        for _ in range(500):
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "line":
            _, pid, stream, line = message
            proc = self._by_child.get(pid)
            name = proc.name if proc else SUPERVISOR
            self._emit(Event(kind="output", name=name, message=line, stream=stream))
        elif kind == "health":
            self._api_ready()
        elif kind == "registry":
            self._on_registry(message[1])
        elif kind == "changes":
            self._on_changes(message[1])
        elif kind == "control":
            _, request, reply = message
            try:
                reply.value = self._answer(request)
            except AnyServeError as exc:
                reply.error = exc
            reply.ready.set()
        elif kind == "note":
            self._say(message[1], kind=message[2] if len(message) > 2 else "lifecycle")
        elif kind == "probe":
            self._on_probe(message[1], message[2])

    def _step(self) -> None:
        now = self.clock()
        while self.signals:
            self._on_stop_signal(self.signals.pop(0))
        for proc in list(self.procs):
            if proc.child is not None:
                code = proc.child.poll()
                if code is not None:
                    self._on_exit(proc, code, now)
                    continue
                if proc.term_at is not None and now >= proc.term_at:
                    proc.term_at = None
                    proc.child.terminate()
                    grace = self._grace(proc)
                    proc.kill_at = now + grace + self.timings.kill_margin
                elif proc.kill_at is not None and now >= proc.kill_at:
                    self._say(
                        f"did not stop within its grace period; killing pid {proc.pid}", proc.name
                    )
                    proc.kill_at = None
                    proc.child.kill()
            elif (
                proc.retry_at is not None
                and now >= proc.retry_at
                and self.phase == "running"
                and (proc.kind == API_KIND or self.replicas_started)
            ):
                self._spawn(proc)
            if (
                proc.state == "ready"
                and proc.failures
                and proc.ready_at is not None
                and now - proc.ready_at >= self.policy.stable_after
            ):
                proc.failures = 0  # a stable minute forgives earlier crashes
        if self.phase == "running":
            for reload in list(self.reloads.values()):
                self._step_reload(reload, now)
        elif self.phase == "stopping":
            self._step_stop(now)
        if now >= self._next_sample:
            self._next_sample = now + self.timings.sample
            pids = [p.pid for p in self.procs if p.child is not None and p.pid]
            self.samples = self._sampler.sample(pids)
            self.dirty = True
        self._maybe_cleanup(now)
        self._probe_targets = self._probe_list() if self.phase == "running" else {}
        busy = any(p.state in ("starting", "draining") for p in self.procs) or bool(self.reloads)
        if busy:
            self._fast.set()
        else:
            self._fast.clear()

    # ------------------------------------------------------------------ processes

    def _start_api(self) -> None:
        proc = Proc(group=API_NAME, slot=0, kind=API_KIND, port=self.topology.api_server.port)
        self.procs.append(proc)
        self._spawn(proc)

    def _start_replicas(self) -> None:
        self.replicas_started = True
        for group in self.topology.groups:
            for slot in range(self.desired[group.name]):
                self._add_slot(group, slot)

    def _add_slot(self, group: GroupSpec, slot: int) -> Proc:
        proc = Proc(group=group.name, slot=slot, kind=REPLICA_KIND, port=group.port_for(slot))
        self.procs.append(proc)
        self._spawn(proc)
        return proc

    def _spawn(self, proc: Proc, port: int | None = None) -> None:
        """Start ``proc``'s process now (first start, restart or reload candidate)."""
        topo = self.topology
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(TOKEN_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token
        if proc.kind == API_KIND:
            api = topo.api_server
            argv = [
                sys.executable,
                "-m",
                "anyserve.api_server",
                "--host",
                api.host,
                "--port",
                str(api.port),
                "--object-store",
                str(topo.objects.path),
            ]
            if api.lease_ttl is not None:
                argv += ["--lease-ttl", str(api.lease_ttl)]
            if api.heartbeat_interval is not None:
                argv += ["--heartbeat-interval", str(api.heartbeat_interval)]
            if api.auth != "writes":
                argv += ["--auth", api.auth]
            if api.grpc_port is not None:
                argv += ["--grpc-port", str(api.grpc_port)]
            proc.replica_id = None
        else:
            group = topo.group(proc.group)
            env.update(group.env_dict)
            env.pop(TOKEN_ENV, None)  # the group's env does not choose the token
            if self.token:
                env[TOKEN_ENV] = self.token
            if port is None:
                port = group.port_for(proc.slot) or free_port(group.host)
            proc.port = port
            proc.replica_id = f"{group.name}-{proc.slot}-{secrets.token_hex(3)}"
            argv = [
                sys.executable,
                "-m",
                "anyserve",
                "replica",
                group.app,
                "--host",
                group.host,
                "--port",
                str(port),
                "--api-server",
                topo.api_server.url,
                "--object-store",
                str(topo.objects.path),
                "--replica-id",
                proc.replica_id,
                "--grace",
                str(group.drain_timeout),
                "--max-in-flight",
                str(group.max_in_flight),
            ]
            if topo.objects.allow_pickle:
                argv.append("--allow-pickle")
        if proc.started_at is not None and proc.role == "serve":
            proc.restarts += 1
        proc.retry_at = None
        proc.exit_code = None
        proc.term_at = proc.kill_at = None
        proc.ready_at = None
        proc.unhealthy_since = proc.stuck_for = None
        try:
            child = Child(argv, cwd=topo.root, env=env, on_line=self._on_line)
        except OSError as exc:
            proc.state = "stopped"
            proc.message = f"cannot start: {exc}"
            self._say(proc.message, proc.name, kind="error")
            return
        proc.child = child
        proc.pid = child.pid
        proc.started_at = self.clock()
        proc.state = "starting"
        self._by_child[child.pid] = proc
        where = f" on port {proc.port}" if proc.port else ""
        ident = f" as {proc.replica_id}" if proc.replica_id else ""
        self._say(f"started pid {child.pid}{ident}{where}", proc.name)

    def _api_ready(self) -> None:
        self.api_reachable = True
        for proc in self.procs:
            if proc.kind == API_KIND and proc.state == "starting" and proc.child is not None:
                self._mark_ready(proc)
        if not self.replicas_started and self.phase == "running":
            self._start_replicas()

    def _on_registry(self, records: list[dict[str, Any]] | None) -> None:
        if records is None:
            self.api_reachable = False
            self.dirty = True
            return
        self.registry = {str(r.get("replica_id")): r for r in records}
        self._api_ready()
        for proc in self.procs:
            if (
                proc.kind == REPLICA_KIND
                and proc.state == "starting"
                and proc.child is not None
                and proc.replica_id in self.registry
            ):
                self._mark_ready(proc)
        self.dirty = True

    def _mark_ready(self, proc: Proc) -> None:
        proc.state = "ready"
        proc.ready_at = self.clock()
        proc.backoff = None
        if proc.role == "serve" and not proc.message.startswith("reload failed"):
            proc.message = ""
        what = (
            "registered"
            if proc.kind == REPLICA_KIND
            else f"healthy at {self.topology.api_server.url}"
        )
        self._say(f"ready ({what})", proc.name)

    def _on_exit(self, proc: Proc, code: int, now: float) -> None:
        child = proc.child
        assert child is not None
        child.join_output(0.3)
        self._flush_lines()
        self._by_child.pop(child.pid, None)
        proc.child = None
        proc.exit_code = code
        proc.stderr_tail = tuple(child.stderr_tail)
        proc.term_at = proc.kill_at = None
        ran = now - (proc.started_at or now)
        how = f"exited with code {code}" if code >= 0 else f"killed by {_signame(-code)}"
        if proc.stuck_for is not None:
            how = f"stuck (no answer to ServerReady for {proc.stuck_for:.1f}s), killed"
        proc.unhealthy_since = None
        if self.phase != "running":
            proc.state = "stopped"
            self._say(f"stopped ({how})", proc.name)
            return
        if proc.role == "retire":
            self.procs.remove(proc)
            self._say(f"stopped ({how})", proc.name)
            return
        if proc.role == "candidate":
            proc.state = "stopped"
            return  # its reload notices and reports
        if proc.restart_now:
            proc.restart_now = False
            proc.state = "starting"
            proc.retry_at = now
            self._say(f"{how}; restarting as asked", proc.name, kind="exit")
            return
        policy = "always" if proc.kind == API_KIND else self.topology.group(proc.group).restart
        last = proc.stderr_tail[-1].strip() if proc.stderr_tail else ""
        proc.message = f"{how}: {last}" if last and proc.stuck_for is None else how
        if policy == "never" or (policy == "on-failure" and code == 0):
            proc.state = "stopped"
            self._say(f"{how}; not restarting (restart = {policy!r})", proc.name, kind="exit")
            return
        if proc.ready_at is not None and now - proc.ready_at >= self.policy.stable_after:
            proc.failures = 0
        proc.failures += 1
        delay = self.policy.delay(proc.failures)
        proc.backoff = delay
        proc.retry_at = now + delay
        crash_loop = (
            proc.failures >= self.policy.crash_loop_after and ran < self.policy.stable_after
        )
        proc.state = "crash loop" if crash_loop else "backing off"
        label = "crash loop: " if crash_loop else ""
        self._say(
            f"{label}{how} after {ran:.1f}s; restarting in {delay:.1f}s",
            proc.name,
            kind="error" if crash_loop else "exit",
        )

    def _flush_lines(self) -> None:
        """Handle output lines already queued, so they are logged before the exit."""
        pending = []
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            if message[0] == "line":
                self._handle(message)
            else:
                pending.append(message)
        for message in pending:
            self.inbox.put(message)

    def _grace(self, proc: Proc) -> float:
        if proc.kind == API_KIND:
            return self.timings.api_grace
        return self.topology.group(proc.group).drain_timeout

    def _unregister(self, proc: Proc) -> None:
        """Take ``proc`` out of routing now; it stops in ``settle`` seconds and drains."""
        if proc.replica_id and self.api_reachable:
            # If this fails the replica still unregisters itself on SIGTERM, a moment later.
            try:
                reply = self._http.request(
                    "DELETE",
                    self.topology.api_server.url + "/unregister",
                    json={"replica_id": proc.replica_id},
                )
                if reply.status_code not in (200, 404):
                    self._say(
                        f"could not unregister {proc.replica_id}: API server answered "
                        f"{reply.status_code} {reply.text[:200]}",
                        proc.name,
                    )
            except Exception as exc:
                self._say(f"could not unregister {proc.replica_id}: {exc}", proc.name)
            self.registry.pop(proc.replica_id, None)
        proc.role = "retire"
        proc.state = "draining"
        proc.term_at = self.clock() + self.timings.settle
        self._say(f"unregistered {proc.replica_id}; draining", proc.name)

    # ------------------------------------------------------------------ stuck replicas

    def _probe_list(self) -> dict[int, str]:
        """``{pid: endpoint}`` of the replicas the probe thread should ask ``ServerReady``."""
        targets: dict[int, str] = {}
        for proc in self.procs:
            if (
                proc.kind != REPLICA_KIND
                or proc.child is None
                or proc.role == "retire"
                or proc.state not in ("ready", "unhealthy")
                or proc.port is None
            ):
                continue
            group = self.topology.group(proc.group)
            if group.stuck_timeout is None:
                continue
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
                group.host, group.host
            )
            host = f"[{host}]" if ":" in host else host
            targets[proc.child.pid] = f"{host}:{proc.port}"
        return targets

    def _on_probe(self, sent_at: float, answers: dict[int, bool]) -> None:
        """Mark replicas that stopped answering; kill one stuck past its group's bound."""
        now = self.clock()
        for pid, ok in answers.items():
            proc = self._by_child.get(pid)
            if (
                proc is None
                or proc.child is None
                or proc.stuck_for is not None  # already killed; its exit is on the way
                or proc.state not in ("ready", "unhealthy")
            ):
                continue
            if ok:
                if proc.state == "unhealthy":
                    proc.state = "ready"
                    proc.message = ""
                    self._say("answers ServerReady again", proc.name)
                proc.unhealthy_since = None
                continue
            bound = self.topology.group(proc.group).stuck_timeout
            if proc.unhealthy_since is None:
                proc.unhealthy_since = sent_at
                proc.state = "unhealthy"
                self._say(f"pid {pid} does not answer ServerReady", proc.name, kind="exit")
            silent = now - proc.unhealthy_since
            proc.message = f"no answer to ServerReady for {silent:.1f}s"
            if bound is None or silent < bound:
                continue
            policy = self.topology.group(proc.group).restart
            if policy == "never":
                proc.message += " (restart = 'never': left as it is)"
                continue
            proc.stuck_for = silent
            self._say(
                f"stuck: no answer to ServerReady for {silent:.1f}s; killing pid {pid}",
                proc.name,
                kind="error",
            )
            proc.child.kill()  # SIGKILL ends a stopped process too; the exit path restarts it
        self.dirty = True

    def _probe(self) -> None:
        """Thread: ask every ready replica ``ServerReady``; report who answered."""
        from anyserve.process import ReadinessProbe

        probe = ReadinessProbe()
        every = self.timings.probe_every
        next_at = time.monotonic() + every
        try:
            # At a fixed rate, not a pause after each round: a round that waits for a stuck
            # replica's timeout must not stretch the time until it is found stuck.
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = max(next_at + every, time.monotonic())
                targets = self._probe_targets
                if not targets:
                    probe.forget_all()
                    continue
                sent_at = self.clock()
                answers = probe.ask(targets, min(self.timings.probe_timeout, every))
                if not self._stop.is_set():
                    self.inbox.put(("probe", sent_at, answers))
        except Exception as exc:  # a broken probe must not take `up` down; say so
            self.inbox.put(("note", f"replica health probe stopped: {exc}", "error"))
        finally:
            probe.forget_all()

    # ------------------------------------------------------------------ reload

    def _on_changes(self, paths: set[str]) -> None:
        if self.phase != "running":
            return
        groups = _changed_groups(self.topology, paths)
        if not groups:
            return
        _drop_stale_bytecode(paths)
        shown = ", ".join(sorted(os.path.relpath(p, self.topology.root) for p in paths)[:3])
        for name in groups:
            self.request_reload(name, None, f"changed: {shown}")

    def request_reload(self, group: str, slot: int | None, reason: str) -> None:
        """Start (or queue) a rolling reload of ``group`` (one ``slot`` or all)."""
        if not self.replicas_started:
            return
        current = self.reloads.get(group)
        if current is not None:
            current.again = True
            return
        slots = sorted(p.slot for p in self.procs if p.group == group and p.role == "serve")
        if slot is not None:
            slots = [s for s in slots if s == slot]
        if not slots:
            return
        self.reloads[group] = Reload(group=group, slots=slots, reason=reason, started=self.clock())
        self._say(f"reloading {group} ({reason})", group, kind="reload")

    def _step_reload(self, op: Reload, now: float) -> None:
        group = self.topology.group(op.group)
        if op.phase == "next":
            if not op.slots:
                return self._finish_reload(op, None)
            slot = op.slots[0]
            old = next(
                (
                    p
                    for p in self.procs
                    if p.group == op.group and p.slot == slot and p.role == "serve"
                ),
                None,
            )
            if old is None:
                op.slots.pop(0)
                return
            if old.child is None or old.state not in ("ready", "starting"):
                # Nothing serves in this slot (crashed, backing off, stuck): no traffic to
                # protect, so start it with the new code right away. A process still starting
                # may already be registered (and receiving requests) before the registry poll
                # notices, so it is replaced the rolling way like a ready one.
                op.slots.pop(0)
                if old.child is None:
                    old.retry_at = now
                else:
                    old.restart_now = True
                    old.child.kill()
                return
            fixed = group.port_for(slot)
            # The old process holds the fixed port, so the new one bridges on a free port;
            # a second round moves the slot back onto its fixed port.
            port = fixed if fixed is not None and old.port != fixed else free_port(group.host)
            candidate = Proc(group=op.group, slot=slot, kind=REPLICA_KIND, role="candidate")
            candidate.restarts = old.restarts
            self.procs.append(candidate)
            self._spawn(candidate, port=port)
            op.old_state = old.state
            old.state = "reloading"
            op.old, op.candidate = old, candidate
            op.phase = "wait_ready"
            op.deadline = now + self.timings.ready_timeout
        elif op.phase == "wait_ready":
            cand, old = op.candidate, op.old
            assert cand is not None and old is not None
            if cand.state == "ready":
                cand.role = "serve"
                cand.failures = 0
                if old.child is not None:
                    self._unregister(old)
                else:
                    self.procs.remove(old)
                old.role = "retire"
                op.phase = "drain"
                op.deadline = (
                    now + self.timings.settle + group.drain_timeout + 2 * self.timings.kill_margin
                )
                return
            failed = cand.child is None
            if failed or now >= op.deadline:
                if cand.child is not None:
                    cand.child.kill()
                    cand.child.wait(2.0)
                    cand.stderr_tail = tuple(cand.child.stderr_tail)
                    self._by_child.pop(cand.child.pid, None)
                    cand.child = None
                if cand in self.procs:
                    self.procs.remove(cand)
                why = (
                    f"exited with code {cand.exit_code}"
                    if failed
                    else f"not registered within {self.timings.ready_timeout:.0f}s"
                )
                last = cand.stderr_tail[-1].strip() if cand.stderr_tail else ""
                message = f"reload failed: new process {why}" + (f": {last}" if last else "")
                if old.child is not None:
                    old.state = op.old_state or "ready"
                    old.message = message + " (old code still serving; save again to retry)"
                else:
                    old.message = message
                self._say(message, old.name, kind="error")
                self._finish_reload(op, message)
        elif op.phase == "drain":
            old = op.old
            assert old is not None
            if old in self.procs and now < op.deadline:
                return
            if old in self.procs and old.child is not None:
                old.child.kill()
                return
            cand = op.candidate
            assert cand is not None
            fixed = group.port_for(cand.slot)
            if fixed is None or cand.port == fixed:
                op.slots.pop(0)
            op.phase = "next"
            op.candidate = op.old = None

    def _finish_reload(self, op: Reload, error: str | None) -> None:
        del self.reloads[op.group]
        if error is None:
            took = self.clock() - op.started
            for proc in self.procs:
                if proc.group == op.group and proc.message.startswith("reload failed"):
                    proc.message = ""
            self._say(f"reloaded {op.group} in {took:.1f}s", op.group, kind="reload")
        if op.again:
            self.request_reload(op.group, None, "changed again during the reload")

    # ------------------------------------------------------------------ control

    def _control(self, request: dict[str, Any]) -> Any:
        """Runs in the control thread: queue the request for the loop and wait."""
        reply = _Reply()
        self.inbox.put(("control", request, reply))
        if not reply.ready.wait(10.0):
            raise AnyServeError("`anyserve up` is busy; try again")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _answer(self, request: dict[str, Any]) -> Any:
        command = request.get("command")
        if command in ("ps", "status"):
            return self.snapshot().to_dict()
        if command == "down":
            self._begin_stop(0, "stopping (anyserve down)")
            return "stopping"
        if command == "restart":
            return self._restart(str(request.get("name", "")))
        if command == "scale":
            return self._scale(str(request.get("name", "")), request.get("count"))
        raise BadRequest(f"unknown command {command!r}")

    def _restart(self, name: str) -> str:
        group, _, slot_text = name.partition(".")
        if group == API_NAME:
            api = next(p for p in self.procs if p.kind == API_KIND)
            api.failures = 0
            if api.child is not None:
                api.restart_now = True
                api.term_at = self.clock()
            else:
                api.retry_at = self.clock()
            return "restarting the API server"
        try:
            self.topology.group(group)
        except KeyError:
            raise NotFound(f"no process or group named {name!r}; {self._names()}") from None
        slot = None
        if slot_text:
            if not slot_text.isdigit() or not any(
                p.group == group and p.slot == int(slot_text) for p in self.procs
            ):
                raise NotFound(f"no process named {name!r}; {self._names()}")
            slot = int(slot_text)
        for proc in self.procs:
            if proc.group == group and (slot is None or proc.slot == slot):
                proc.failures = 0
        self.request_reload(group, slot, "restart requested")
        return f"restarting {name} one replica at a time"

    def _scale(self, name: str, count: object) -> str:
        try:
            group = self.topology.group(name)
        except KeyError:
            raise NotFound(f"no replica group named {name!r}; {self._names()}") from None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise BadRequest(f"expected a replica count >= 0, got {count!r}")
        self.desired[name] = count
        serving = sorted(
            (p for p in self.procs if p.group == name and p.role == "serve"), key=lambda p: p.slot
        )
        if count > len(serving):
            used = {p.slot for p in serving}
            slot = 0
            for _ in range(count - len(serving)):
                while slot in used:
                    slot += 1
                used.add(slot)
                self._add_slot(group, slot)
        else:
            for proc in serving[count:]:
                if proc.child is None:
                    self.procs.remove(proc)
                else:
                    self._unregister(proc)
        self._say(f"scaled {name} to {count}", name, kind="reload")
        return f"scaled {name} from {len(serving)} to {count}"

    def _names(self) -> str:
        names = [API_NAME] + [g.name for g in self.topology.groups]
        return "known: " + ", ".join(names)

    # ------------------------------------------------------------------ stop

    def _on_stop_signal(self, signum: int) -> None:
        if self.phase == "stopping":
            self._say("second signal: killing everything now", kind="error")
            self._kill_everything()
            self.phase = "done"
            return
        code = 128 + signum
        self._begin_stop(code, f"{_signame(signum)} received: stopping (again to force)")

    def _begin_stop(self, code: int, why: str) -> None:
        if self.phase != "running":
            return
        self.phase = "stopping"
        self.exit_code = code
        self._say(why)
        self.reloads.clear()
        now = self.clock()
        for proc in self.procs:
            proc.retry_at = None
            if proc.child is None:
                proc.state = "stopped"
            elif proc.kind == REPLICA_KIND:
                proc.state = "draining"
                proc.term_at = now  # SIGTERM: it unregisters and finishes in-flight requests

    def _step_stop(self, now: float) -> None:
        replicas_left = any(p.child is not None for p in self.procs if p.kind == REPLICA_KIND)
        api = [p for p in self.procs if p.kind == API_KIND and p.child is not None]
        if not replicas_left and not self._api_stop_sent:
            self._api_stop_sent = True
            for proc in api:
                proc.state = "draining"
                proc.term_at = now
        if not replicas_left and not api:
            self._say("all processes stopped")
            self.phase = "done"

    def _kill_everything(self) -> None:
        for proc in self.procs:
            if proc.child is not None:
                proc.child.kill()
        for proc in self.procs:
            if proc.child is not None:
                proc.child.wait(2.0)
                proc.child = None
                proc.state = "stopped"

    # ------------------------------------------------------------------ helper threads

    def _poll_api(self) -> None:
        """Thread: /health until it answers, then /registry; report into the inbox."""
        import httpx

        url = self.topology.api_server.url
        healthy = False
        with httpx.Client(timeout=2.0, headers=self._auth_headers()) as client:
            while not self._stop.is_set():
                try:
                    if not healthy:
                        healthy = client.get(url + "/health").status_code == 200
                        if healthy:
                            self.inbox.put(("health",))
                    else:
                        reply = client.get(url + "/registry")
                        reply.raise_for_status()
                        self.inbox.put(("registry", list(reply.json().get("replicas", []))))
                except (httpx.HTTPError, ValueError):
                    if healthy:
                        self.inbox.put(("registry", None))
                wait = self.timings.poll_fast if self._fast.is_set() else self.timings.poll_slow
                # Wake early when something starts, so readiness is seen quickly.
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and not self._stop.is_set():
                    if self._fast.is_set() and wait > self.timings.poll_fast:
                        break
                    self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def _watch(self) -> None:
        """Thread: watch every group's files; report changed paths (debounced)."""
        from watchfiles import DefaultFilter, watch

        topo = self.topology
        paths = sorted({str(p) for g in topo.groups for p in g.watch if p.exists()})
        if not paths:
            return
        ignore = (str(topo.state_dir), str(topo.objects.path))

        class _Filter(DefaultFilter):
            ignore_entity_patterns = (*DefaultFilter.ignore_entity_patterns, r"\.log(\.\d+)?$")

        try:
            for changes in watch(
                *paths,
                watch_filter=_Filter(ignore_paths=ignore),
                debounce=self.timings.debounce_ms,
                step=50,
                stop_event=self._stop,
                raise_interrupt=False,
            ):
                self.inbox.put(("changes", {path for _, path in changes}))
        except Exception as exc:  # e.g. inotify limits; reload is a convenience, keep serving
            self.inbox.put(("note", f"file watching stopped: {exc}", "error"))

    def _maybe_cleanup(self, now: float) -> None:
        ttl = self.topology.objects.ttl
        if ttl is None or now < self._next_cleanup:
            return
        # Often enough that nothing outlives its TTL by much, rarely enough to cost nothing.
        self._next_cleanup = now + min(max(ttl / 4, 5.0), 300.0)
        threading.Thread(target=self._cleanup, args=(ttl,), name="objects-gc", daemon=True).start()

    def _cleanup(self, ttl: float) -> None:
        from anyserve.objects import ObjectStore

        try:
            removed = ObjectStore(self.topology.objects.path).cleanup(ttl)
        except Exception as exc:
            self.inbox.put(("note", f"object store cleanup failed: {exc}", "error"))
            return
        if removed:
            self.inbox.put(
                ("note", f"object store: removed {removed} object(s) older than the TTL")
            )


def token_plan(
    topology: Topology, *, insecure: bool, env: dict[str, str] | None = None
) -> tuple[str | None, bool]:
    """``(token, create)``: the API server's token and whether ``up`` must create one.

    ``[api_server] token`` wins, then ``$ANYSERVE_TOKEN``. With neither, a loopback API
    server runs without one, and a non-loopback one gets a token ``up`` creates, unless
    ``--insecure``. ``token = false`` on a non-loopback address needs ``--insecure``.
    """
    api = topology.api_server
    env = dict(os.environ) if env is None else env
    if api.token:
        return api.token, False
    if not api.token_off and env.get(TOKEN_ENV):
        return env[TOKEN_ENV], False
    if api.loopback or insecure:
        return None, False
    if api.token_off:
        raise config_error(
            topology,
            ("api_server", "token"),
            f"false leaves the API server on {api.host} open to anyone who can reach it; "
            "remove the line (up then creates a token) or pass --insecure",
        )
    return None, True


def token_file(state_dir: Path) -> str:
    """The token in ``state_dir/token``, created (0600) if there is none yet.

    Reused across runs, so clients that read it keep working after `up` restarts.
    """
    path = state_dir / TOKEN_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    try:
        info = path.lstat()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return token
    import stat

    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{path} is not a private file of yours (expected mode 0600); remove it and "
            "`anyserve up` creates a new token"
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"{path} is empty; remove it and `anyserve up` creates a new token")
    return token


def _order(proc: Proc) -> tuple[int, str, int, int]:
    return (
        0 if proc.kind == API_KIND else 1,
        proc.group,
        proc.slot,
        0 if proc.role == "retire" else 1,
    )


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _drop_stale_bytecode(paths: set[str]) -> None:
    """Remove cached bytecode of changed sources.

    A pyc is trusted when the source's mtime (whole seconds) and size match; an edit
    within the same second that keeps the size would otherwise load the old code.
    """
    for raw in paths:
        path = Path(raw)
        if path.suffix != ".py":
            continue
        for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            with contextlib.suppress(OSError):
                cached.unlink()


def _changed_groups(topology: Topology, paths: set[str]) -> list[str]:
    """The groups whose watch paths contain a changed file.

    With the default watch (the app's package folder) several groups often share one
    folder; a change to one group's own app module then reloads only that group.
    """
    from anyserve.topology import module_file

    app_files: dict[str, str] = {}
    for group in topology.groups:
        found = module_file(topology.root, group.app.split(":", 1)[0])
        if found is not None:
            app_files[group.name] = os.path.realpath(found)
    owners: dict[str, set[str]] = {}
    for name, file in app_files.items():
        owners.setdefault(file, set()).add(name)
    hit: list[str] = []
    for group in topology.groups:
        roots = [os.path.realpath(p) for p in group.watch]
        for raw in paths:
            path = os.path.realpath(raw)
            if not any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                continue
            owner = owners.get(path)
            if owner is not None and group.name not in owner:
                continue  # another group's app module, not imported by this one (we assume)
            hit.append(group.name)
            break
    return hit


def run(topology: Topology, *, tui: bool, reload: bool = True, insecure: bool = False) -> int:
    """``anyserve up``: preflight, then supervise with the dashboard or prefixed lines."""
    from anyserve.logs import Printer

    if not tui:
        width = max(
            [len(SUPERVISOR), len(f"{API_NAME}.0")]
            + [len(f"{g.name}.{max(g.count - 1, 0)}") for g in topology.groups]
        )
        supervisor = Supervisor(topology, Printer(width=width), reload=reload, insecure=insecure)
        supervisor.preflight()
        return supervisor.run()
    return _run_tui(topology, reload, insecure)


def _run_tui(topology: Topology, reload: bool, insecure: bool) -> int:
    from rich.console import Console
    from rich.live import Live

    from anyserve.dashboard import Dashboard, plain

    supervisor = Supervisor(topology, lambda event: None, reload=reload, insecure=insecure)
    supervisor.preflight()
    console = Console()
    last = 0.0
    with Live(console=console, auto_refresh=False, screen=True, redirect_stderr=False) as live:

        def refresh() -> None:
            nonlocal last
            now = time.monotonic()
            # At most 4 frames a second, and only when something changed (or uptimes tick).
            if now - last < 0.25 or (not supervisor.dirty and now - last < 1.0):
                return
            last = now
            supervisor.dirty = False
            try:
                snapshot = supervisor.snapshot()
                # Give the log lines whatever height the tables leave.
                used = 16 + len(snapshot.processes) + 2 * len(snapshot.replicas)
                lines = max(3, console.height - used)
                live.update(Dashboard(snapshot, log_lines=lines), refresh=True)
            except Exception as exc:
                # The view must never stop the supervisor: an error raised here would
                # leave run() through its cleanup, which stops every process.
                notice = plain(f"anyserve up: the dashboard could not be drawn: {exc!r}")
                with contextlib.suppress(Exception):
                    live.update(notice, refresh=True)

        code = supervisor.run(on_tick=refresh)
    for line in list(supervisor.events)[-5:]:
        console.print(f"{line.name} | {line.text}", markup=False, highlight=False)
    console.print(
        f"anyserve up stopped (exit {code}); logs in {topology.state_dir / 'logs'}",
        markup=False,
        highlight=False,
    )
    return code
