"""The ``anyserve up`` loop: start order, restart with backoff, shutdown.

One plain loop in the main thread owns every piece of state. Other threads only
*report* into its inbox (typed messages, :mod:`anyserve.up.messages`): child output
lines, the API server poller (health and registry), the readiness probe, the file
watcher, the control socket, the object store sweeper. Signal handlers only record the
signal. The loop acts on all of it, so there are no locks around the process table.

Start order: the API server first; the replicas, in parallel, once it answers
``/health``. A replica is ready when its replica id shows up in ``/registry``. Each
process gets a fresh replica id (``chat-0-1a2b3c``) because during a reload the old and
the new process of one slot are registered side by side (:mod:`anyserve.up.reload`).

Stuck replicas: a probe thread asks every ready replica ``ServerReady`` once a second
(:mod:`anyserve.up.stuck` judges the answers).

Shutdown: replicas get SIGTERM (they unregister and finish in-flight requests), then
the API server; a second signal kills everything at once.

Tests construct :class:`Supervisor` with a fake ``spawn`` and ``clock`` and drive it
with :meth:`Supervisor.start`, :meth:`Supervisor.handle` and :meth:`Supervisor.step`;
:meth:`Supervisor.run` adds the threads, the control socket and the signal handlers.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from anyserve.client import ENV_TOKEN
from anyserve.errors import AnyServeError
from anyserve.logs import SUPERVISOR, Event, LogFiles
from anyserve.process import ChildProcess, Sampler, Spawn, free_port, spawn
from anyserve.topology import API_NAME, GroupSpec, Topology
from anyserve.up import commands, launch, watchers
from anyserve.up.changes import changed_groups, drop_stale_bytecode
from anyserve.up.messages import (
    ApiHealthy,
    ControlRequest,
    FilesChanged,
    Message,
    Note,
    OutputLine,
    ProbeAnswers,
    Registry,
)
from anyserve.up.policy import RestartPolicy, Timings
from anyserve.up.preflight import preflight
from anyserve.up.reload import RELOAD_FAILED, request_reload, step_reload
from anyserve.up.snapshot import LogLine, ProcessView, ReplicaView, Snapshot
from anyserve.up.state import (
    NOTABLE,
    EventKind,
    Kind,
    Phase,
    Proc,
    Reload,
    RestartMode,
    Role,
    State,
)
from anyserve.up.stuck import judge, probe_targets
from anyserve.up.tokens import TOKEN_FILE, auth_headers, token_file

Sink = Callable[[Event], None]
Sample = Callable[[Sequence[int]], Mapping[int, tuple[float, int]]]
"""``{pid: (cpu_percent, rss_bytes)}`` of those of the given pids still alive."""


class Supervisor:
    """Runs one :class:`Topology` until a signal or ``anyserve down``.

    ``spawn`` starts a child (a test passes a fake that records signals and exits when
    told); ``clock`` is the monotonic time every deadline and backoff is measured in;
    ``sample`` reads CPU and memory of children.
    """

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
        spawn: Spawn = spawn,
        sample: Sample | None = None,
    ) -> None:
        self.topology = topology
        self.sink = sink
        self.reload_enabled = reload
        self.insecure = insecure
        self.token: str | None = None
        self.create_token = False
        self.policy = policy or RestartPolicy()
        self.timings = timings or Timings()
        self.clock = clock
        self.start_child = spawn
        self.sample = sample or Sampler().sample
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.procs: list[Proc] = []
        self.desired = {g.name: g.count for g in topology.groups}
        self.reloads: dict[str, Reload] = {}
        self.registry: dict[str, Mapping[str, Any]] = {}
        self.api_reachable = False
        self.replicas_started = False
        self.phase = Phase.RUNNING
        self.exit_code = 0
        self.signals: list[int] = []
        self.events: deque[LogLine] = deque(maxlen=20)
        self.logs: deque[LogLine] = deque(maxlen=200)
        self.samples: Mapping[int, tuple[float, int]] = {}
        self.started_wall = time.time()
        self.dirty = True
        self.by_pid: dict[int, Proc] = {}
        self.stop_event = threading.Event()
        self.fast = threading.Event()
        """Set while something is starting or draining: the registry is polled often."""
        self.probe_targets: Mapping[int, str] = {}
        """``{pid: endpoint}`` for the probe thread, replaced (never mutated) by the loop."""
        self.next_sample = 0.0
        self.next_cleanup = 0.0
        self.api_stop_sent = False
        self.files: LogFiles | None = None  # created by run(): preflight writes nothing
        self.http: Any = None  # an httpx.Client while run() runs

    # ------------------------------------------------------------------ public surface

    def preflight(self) -> None:
        """Refuse to start when something stands in the way (see :func:`preflight`)."""
        self.token, self.create_token = preflight(self.topology, insecure=self.insecure)

    def run(self, on_tick: Callable[[], None] | None = None) -> int:
        """Start everything, supervise until stopped, and return the exit code."""
        import httpx

        from anyserve.control import ControlServer

        if self.create_token:
            self.token = token_file(self.topology.state_dir)
        headers = auth_headers(self.token)
        self.http = httpx.Client(timeout=2.0, headers=headers)
        self.files = LogFiles(self.topology.state_dir / "logs")
        control = ControlServer(self.topology.state_dir, self.control)
        previous = {
            sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        report = self.inbox.put
        threads = [
            threading.Thread(
                target=watchers.poll_api,
                args=(
                    self.topology.api_server.url,
                    headers,
                    self.timings,
                    self.fast,
                    self.stop_event,
                    report,
                ),
                name="poll",
                daemon=True,
            ),
            threading.Thread(
                target=watchers.probe_replicas,
                args=(
                    lambda: self.probe_targets,
                    self.timings,
                    self.clock,
                    self.stop_event,
                    report,
                ),
                name="probe",
                daemon=True,
            ),
        ]
        if self.reload_enabled and any(g.watch for g in self.topology.groups):
            threads.append(
                threading.Thread(
                    target=watchers.watch_files,
                    args=(self.topology, self.timings.debounce_ms, self.stop_event, report),
                    name="watch",
                    daemon=True,
                )
            )
        try:
            self.start()
            for thread in threads:
                thread.start()
            while self.phase is not Phase.DONE:
                self.wait_inbox()
                self.step()
                if on_tick is not None:
                    on_tick()
        finally:
            self.stop_event.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.kill_everything()
            control.close()
            self.http.close()
            self.http = None
            self.files.close()
            self.files = None
        return self.exit_code

    def start(self) -> None:
        """Say what starts, and start the API server (the replicas follow its health)."""
        self.say(
            f"starting {self.topology.path.name}: API server at {self.topology.api_server.url}"
        )
        self.say_auth()
        proc = Proc(group=API_NAME, slot=0, kind=Kind.API, port=self.topology.api_server.port)
        self.procs.append(proc)
        self.spawn(proc)

    def snapshot(self) -> Snapshot:
        """The current state as plain data (for the dashboard and ``anyserve ps``)."""
        now = self.clock()
        views = tuple(
            ProcessView.of(p, now, self.samples.get(p.pid or -1) if p.child else None)
            for p in sorted(self.procs, key=lambda p: p.order)
        )
        return Snapshot(
            topology=str(self.topology.path),
            api_url=self.topology.api_server.url,
            pid=os.getpid(),
            started_at=self.started_wall,
            state=self.phase if self.phase is not Phase.DONE else State.STOPPED,
            api_reachable=self.api_reachable,
            processes=views,
            replicas=tuple(ReplicaView.from_registry(r) for r in self.registry.values()),
            events=tuple(self.events),
            logs=tuple(self.logs)[-50:],
        )

    def control(self, request: dict[str, Any]) -> Any:
        """Runs in the control thread: queue the request for the loop and wait."""
        message = ControlRequest(request)
        self.inbox.put(message)
        if not message.reply.ready.wait(10.0):
            raise AnyServeError("`anyserve up` is busy; try again")
        if message.reply.error is not None:
            raise message.reply.error
        return message.reply.value

    def request_reload(self, group: str, slot: int | None, reason: str) -> None:
        """Start (or queue) a rolling reload of ``group`` (one ``slot`` or all)."""
        request_reload(self, group, slot, reason)

    def on_signal(self, signum: int, frame: object) -> None:
        # Only record; the loop notices within one tick.
        self.signals.append(signum)

    # ------------------------------------------------------------------ events

    def emit(self, event: Event) -> None:
        if self.files is not None:
            self.files.write(event)
        line = LogLine(at=event.at, name=event.name, text=event.message, kind=event.kind)
        self.logs.append(line)
        if event.kind in NOTABLE:
            self.events.append(line)
        self.sink(event)
        self.dirty = True

    def say(
        self, message: str, name: str = SUPERVISOR, kind: EventKind = EventKind.LIFECYCLE
    ) -> None:
        self.emit(Event(kind=kind, name=name, message=message))

    def say_auth(self) -> None:
        api = self.topology.api_server
        if self.create_token:
            path = self.topology.state_dir / TOKEN_FILE
            self.say(
                f"registration and object writes need the token in {path} (client commands "
                f"run in {self.topology.root} read it; elsewhere: export {ENV_TOKEN}=$(cat {path}))"
            )
        elif self.token is None and not api.loopback:
            self.say(
                f"token = false, --insecure: the API server listens on {api.host} without a "
                "token; anyone who can reach it may register replicas and write objects",
                kind=EventKind.ERROR,
            )

    def on_line(self, child: ChildProcess, stream: str, line: str) -> None:
        # Called from a reader thread: hand over, do not touch state.
        self.inbox.put(OutputLine(child.pid, stream, line))

    # ------------------------------------------------------------------ the loop

    def wait_inbox(self) -> None:
        try:
            message = self.inbox.get(timeout=self.timings.tick)
        except queue.Empty:
            return
        self.handle(message)
        # Drain what else arrived, bounded so a chatty child cannot starve the loop.
        for _ in range(500):
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.handle(message)

    def handle(self, message: Message) -> None:
        """Act on one report from a helper thread (or from a test)."""
        if isinstance(message, OutputLine):
            proc = self.by_pid.get(message.pid)
            name = proc.name if proc else SUPERVISOR
            self.emit(
                Event(kind=EventKind.OUTPUT, name=name, message=message.line, stream=message.stream)
            )
        elif isinstance(message, ApiHealthy):
            self.api_ready()
        elif isinstance(message, Registry):
            self.on_registry(message.records)
        elif isinstance(message, FilesChanged):
            self.on_changes(message.paths)
        elif isinstance(message, ControlRequest):
            try:
                message.reply.answer(commands.answer(self, message.request))
            except AnyServeError as exc:
                message.reply.fail(exc)
        elif isinstance(message, Note):
            self.say(message.text, kind=message.kind)
        elif isinstance(message, ProbeAnswers):
            self.on_probe(message.sent_at, message.answers)

    def step(self) -> None:
        """Everything that is due by ``clock()``: signals, exits, stops, restarts, reloads."""
        now = self.clock()
        while self.signals:
            self.on_stop_signal(self.signals.pop(0))
        for proc in list(self.procs):
            if proc.child is not None:
                code = proc.child.poll()
                if code is not None:
                    self.on_exit(proc, code, now)
                    continue
                if proc.term_at is not None and now >= proc.term_at:
                    proc.term_at = None
                    proc.child.terminate()
                    proc.kill_at = now + self.grace(proc) + self.timings.kill_margin
                elif proc.kill_at is not None and now >= proc.kill_at:
                    self.say(
                        f"did not stop within its grace period; killing pid {proc.pid}", proc.name
                    )
                    proc.kill_at = None
                    proc.child.kill()
            elif (
                proc.retry_at is not None
                and now >= proc.retry_at
                and self.phase is Phase.RUNNING
                and (proc.kind is Kind.API or self.replicas_started)
            ):
                self.spawn(proc)
            if (
                proc.state is State.READY
                and proc.failures
                and proc.ready_at is not None
                and now - proc.ready_at >= self.policy.stable_after
            ):
                proc.failures = 0  # a stable minute forgives earlier crashes
        if self.phase is Phase.RUNNING:
            for op in list(self.reloads.values()):
                step_reload(self, op, now)
        elif self.phase is Phase.STOPPING:
            self.step_stop(now)
        if now >= self.next_sample:
            self.next_sample = now + self.timings.sample
            self.samples = self.sample([p.pid for p in self.procs if p.child is not None and p.pid])
            self.dirty = True
        self.maybe_cleanup(now)
        self.probe_targets = (
            probe_targets(self.procs, self.topology) if self.phase is Phase.RUNNING else {}
        )
        busy = bool(self.reloads) or any(
            p.state in (State.STARTING, State.DRAINING) for p in self.procs
        )
        if busy:
            self.fast.set()
        else:
            self.fast.clear()

    # ------------------------------------------------------------------ processes

    def add_slot(self, group: GroupSpec, slot: int) -> Proc:
        proc = Proc(group=group.name, slot=slot, kind=Kind.REPLICA, port=group.port_for(slot))
        self.procs.append(proc)
        self.spawn(proc)
        return proc

    def spawn(self, proc: Proc, port: int | None = None) -> None:
        """Start ``proc``'s process now (first start, restart or reload candidate)."""
        topo = self.topology
        if proc.kind is Kind.API:
            argv = launch.api_server_argv(topo)
            env = launch.child_env(os.environ, self.token)
            proc.replica_id = proc.instance = None
        else:
            group = topo.group(proc.group)
            if port is None:
                port = group.port_for(proc.slot) or free_port(group.host)
            proc.port = port
            proc.replica_id = launch.new_replica_id(group, proc.slot)
            proc.instance = launch.new_instance()
            argv = launch.replica_argv(topo, group, port, proc.replica_id)
            env = launch.child_env(
                os.environ,
                self.token,
                group.env_dict,
                auth=topo.api_server.auth,
                instance=proc.instance,
            )
        if proc.started_at is not None and proc.role is Role.SERVE:
            proc.restarts += 1
        proc.retry_at = None
        proc.exit_code = None
        proc.term_at = proc.kill_at = None
        proc.ready_at = None
        proc.unhealthy_since = proc.stuck_for = None
        try:
            child = self.start_child(argv, topo.root, env, self.on_line)
        except OSError as exc:
            proc.state = State.STOPPED
            proc.message = f"cannot start: {exc}"
            self.say(proc.message, proc.name, kind=EventKind.ERROR)
            return
        proc.child = child
        proc.pid = child.pid
        proc.started_at = self.clock()
        proc.state = State.STARTING
        self.by_pid[child.pid] = proc
        where = f" on port {proc.port}" if proc.port else ""
        ident = f" as {proc.replica_id}" if proc.replica_id else ""
        self.say(f"started pid {child.pid}{ident}{where}", proc.name)

    def api_ready(self) -> None:
        self.api_reachable = True
        for proc in self.procs:
            if proc.kind is Kind.API and proc.state is State.STARTING and proc.child is not None:
                self.mark_ready(proc)
        if not self.replicas_started and self.phase is Phase.RUNNING:
            self.replicas_started = True
            for group in self.topology.groups:
                for slot in range(self.desired[group.name]):
                    self.add_slot(group, slot)

    def on_registry(self, records: Sequence[Mapping[str, Any]] | None) -> None:
        if records is None:
            self.api_reachable = False
            self.dirty = True
            return
        self.registry = {str(r.get("replica_id")): r for r in records}
        self.api_ready()
        for proc in self.procs:
            if (
                proc.kind is Kind.REPLICA
                and proc.state is State.STARTING
                and proc.child is not None
                and proc.replica_id in self.registry
            ):
                self.mark_ready(proc)
        self.dirty = True

    def mark_ready(self, proc: Proc) -> None:
        proc.state = State.READY
        proc.ready_at = self.clock()
        proc.backoff = None
        if proc.role is Role.SERVE and not proc.message.startswith(RELOAD_FAILED):
            proc.message = ""
        what = (
            "registered"
            if proc.kind is Kind.REPLICA
            else f"healthy at {self.topology.api_server.url}"
        )
        self.say(f"ready ({what})", proc.name)

    def restart_mode(self, proc: Proc) -> RestartMode:
        if proc.kind is Kind.API:
            return RestartMode.ALWAYS
        return RestartMode(self.topology.group(proc.group).restart)

    def on_exit(self, proc: Proc, code: int, now: float) -> None:
        child = proc.child
        assert child is not None
        child.join_output(0.3)
        self.flush_lines()
        self.by_pid.pop(child.pid, None)
        proc.child = None
        proc.exit_code = code
        proc.stderr_tail = tuple(child.stderr_tail)
        proc.term_at = proc.kill_at = None
        ran = now - (proc.started_at or now)
        how = f"exited with code {code}" if code >= 0 else f"killed by {signame(-code)}"
        if proc.stuck_for is not None:
            how = f"stuck (no answer to ServerReady for {proc.stuck_for:.1f}s), killed"
        proc.unhealthy_since = None
        if self.phase is not Phase.RUNNING:
            proc.state = State.STOPPED
            self.say(f"stopped ({how})", proc.name)
            return
        if proc.role is Role.RETIRE:
            self.procs.remove(proc)
            self.say(f"stopped ({how})", proc.name)
            return
        if proc.role is Role.CANDIDATE:
            proc.state = State.STOPPED
            return  # its reload notices and reports
        if proc.restart_now:
            proc.restart_now = False
            proc.state = State.STARTING
            proc.retry_at = now
            self.say(f"{how}; restarting as asked", proc.name, kind=EventKind.EXIT)
            return
        mode = self.restart_mode(proc)
        last = proc.stderr_tail[-1].strip() if proc.stderr_tail else ""
        proc.message = f"{how}: {last}" if last and proc.stuck_for is None else how
        if mode is RestartMode.NEVER or (mode is RestartMode.ON_FAILURE and code == 0):
            proc.state = State.STOPPED
            self.say(
                f"{how}; not restarting (restart = {mode.value!r})", proc.name, kind=EventKind.EXIT
            )
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
        proc.state = State.CRASH_LOOP if crash_loop else State.BACKING_OFF
        label = "crash loop: " if crash_loop else ""
        self.say(
            f"{label}{how} after {ran:.1f}s; restarting in {delay:.1f}s",
            proc.name,
            kind=EventKind.ERROR if crash_loop else EventKind.EXIT,
        )

    def flush_lines(self) -> None:
        """Handle output lines already queued, so they are logged before the exit."""
        pending = []
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, OutputLine):
                self.handle(message)
            else:
                pending.append(message)
        for message in pending:
            self.inbox.put(message)

    def grace(self, proc: Proc) -> float:
        if proc.kind is Kind.API:
            return self.timings.api_grace
        return self.topology.group(proc.group).drain_timeout

    def unregister(self, proc: Proc) -> None:
        """Take ``proc`` out of routing now; it stops in ``settle`` seconds and drains."""
        if proc.replica_id and self.api_reachable:
            if self.http is not None:
                self.delete_registration(proc)
            self.registry.pop(proc.replica_id, None)
        proc.role = Role.RETIRE
        proc.state = State.DRAINING
        proc.term_at = self.clock() + self.timings.settle
        self.say(f"unregistered {proc.replica_id}; draining", proc.name)

    def delete_registration(self, proc: Proc) -> None:
        # If this fails the replica still unregisters itself on SIGTERM, a moment later.
        try:
            reply = self.http.request(
                "DELETE",
                self.topology.api_server.url + "/unregister",
                # As the lease's owner: no token needed for the registry to accept it.
                json={"replica_id": proc.replica_id, "instance": proc.instance},
            )
            if reply.status_code not in (200, 404):
                self.say(
                    f"could not unregister {proc.replica_id}: API server answered "
                    f"{reply.status_code} {reply.text[:200]}",
                    proc.name,
                )
        except Exception as exc:
            self.say(f"could not unregister {proc.replica_id}: {exc}", proc.name)

    def discard(self, proc: Proc) -> None:
        """Kill ``proc`` now and drop it from the table (a reload's failed candidate)."""
        child = proc.child
        if child is not None:
            child.kill()
            child.wait(2.0)
            proc.stderr_tail = tuple(child.stderr_tail)
            self.by_pid.pop(child.pid, None)
            proc.child = None
        if proc in self.procs:
            self.procs.remove(proc)

    # ------------------------------------------------------------------ stuck replicas

    def on_probe(self, sent_at: float, answers: Mapping[int, bool]) -> None:
        """Mark replicas that stopped answering; kill one stuck past its group's bound."""
        now = self.clock()
        for pid, ok in answers.items():
            proc = self.by_pid.get(pid)
            if proc is None:
                continue
            judge(
                proc,
                ok,
                sent_at=sent_at,
                now=now,
                bound=self.topology.group(proc.group).stuck_timeout,
                may_kill=self.restart_mode(proc) is not RestartMode.NEVER,
                say=self.say,
            )
        self.dirty = True

    # ------------------------------------------------------------------ reload

    def on_changes(self, paths: frozenset[str]) -> None:
        if self.phase is not Phase.RUNNING:
            return
        groups = changed_groups(self.topology, paths)
        if not groups:
            return
        drop_stale_bytecode(paths)
        shown = ", ".join(sorted(os.path.relpath(p, self.topology.root) for p in paths)[:3])
        for name in groups:
            self.request_reload(name, None, f"changed: {shown}")

    # ------------------------------------------------------------------ stop

    def on_stop_signal(self, signum: int) -> None:
        if self.phase is Phase.STOPPING:
            self.say("second signal: killing everything now", kind=EventKind.ERROR)
            self.kill_everything()
            self.phase = Phase.DONE
            return
        code = 128 + signum
        self.begin_stop(code, f"{signame(signum)} received: stopping (again to force)")

    def begin_stop(self, code: int, why: str) -> None:
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.STOPPING
        self.exit_code = code
        self.say(why)
        self.reloads.clear()
        now = self.clock()
        for proc in self.procs:
            proc.retry_at = None
            if proc.child is None:
                proc.state = State.STOPPED
            elif proc.kind is Kind.REPLICA:
                proc.state = State.DRAINING
                proc.term_at = now  # SIGTERM: it unregisters and finishes in-flight requests

    def step_stop(self, now: float) -> None:
        replicas_left = any(p.child is not None for p in self.procs if p.kind is Kind.REPLICA)
        api = [p for p in self.procs if p.kind is Kind.API and p.child is not None]
        if not replicas_left and not self.api_stop_sent:
            self.api_stop_sent = True
            for proc in api:
                proc.state = State.DRAINING
                proc.term_at = now
        if not replicas_left and not api:
            self.say("all processes stopped")
            self.phase = Phase.DONE

    def kill_everything(self) -> None:
        for proc in self.procs:
            if proc.child is not None:
                proc.child.kill()
        for proc in self.procs:
            if proc.child is not None:
                proc.child.wait(2.0)
                proc.child = None
                proc.state = State.STOPPED

    # ------------------------------------------------------------------ object store

    def maybe_cleanup(self, now: float) -> None:
        ttl = self.topology.objects.ttl
        if ttl is None or now < self.next_cleanup:
            return
        # Often enough that nothing outlives its TTL by much, rarely enough to cost nothing.
        self.next_cleanup = now + min(max(ttl / 4, 5.0), 300.0)
        threading.Thread(
            target=watchers.sweep_objects,
            args=(self.topology.objects.path, ttl, self.inbox.put),
            name="objects-gc",
            daemon=True,
        ).start()


def signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
