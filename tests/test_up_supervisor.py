"""The supervisor's rules, driven without a single process: a fake ``spawn`` that records
the signals each child gets and exits when told, a clock the test moves, and scripted
reports (health, registry, probe answers) handed to the loop as the threads would.

Each test replays one history through ``start``/``handle``/``step`` and checks what the
supervisor did; none starts a subprocess or waits on real time.
"""

from __future__ import annotations

import itertools
import signal
import textwrap
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from anyserve.errors import BadRequest, NotFound
from anyserve.logs import Event
from anyserve.process import LineCallback
from anyserve.topology import Topology, loads
from anyserve.up.messages import ApiHealthy, ControlRequest, Note, ProbeAnswers, Registry
from anyserve.up.policy import RestartPolicy, Timings
from anyserve.up.state import EventKind, Kind, Phase, Proc, Role, State
from anyserve.up.supervisor import Supervisor

_PIDS = itertools.count(900_001)


class FakeChild:
    """A child that records signals; SIGKILL ends it, anything else waits for ``exit``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.pid = next(_PIDS)
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.signals: list[int] = []
        self.code: int | None = None

    def exit(self, code: int, stderr: str = "") -> None:
        if stderr:
            self.stderr_tail.append(stderr)
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append(signal.SIGTERM)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        if self.code is None:
            self.code = -signal.SIGKILL

    def wait(self, timeout: float) -> int | None:
        return self.code

    def join_output(self, timeout: float = 1.0) -> None:
        return None


class FakeSpawn:
    """The process constructor: every child it made, in order."""

    def __init__(self) -> None:
        self.children: list[FakeChild] = []

    def __call__(
        self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], on_line: LineCallback
    ) -> FakeChild:
        child = FakeChild(argv, env)
        self.children.append(child)
        return child


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A supervisor on a fake clock and fake processes, with helpers to script history."""

    def __init__(self, tmp_path: Path, groups: str, policy: RestartPolicy | None = None) -> None:
        text = '[api_server]\nhost = "127.0.0.1"\nport = 18080\n' + textwrap.dedent(groups)
        (tmp_path / "app.py").write_text("app = None\n")
        self.topology: Topology = loads(text, tmp_path / "anyserve.toml")
        self.clock = Clock()
        self.spawn = FakeSpawn()
        self.events: list[Event] = []
        self.sup = Supervisor(
            self.topology,
            self.events.append,
            policy=policy or RestartPolicy(jitter=0.0),
            timings=Timings(settle=1.0, ready_timeout=10.0, kill_margin=1.0),
            clock=self.clock,
            spawn=self.spawn,
            sample=lambda pids: {},
        )

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.sup.step()

    def up(self) -> None:
        """The API server answers and every replica registers."""
        self.sup.start()
        self.sup.handle(ApiHealthy())
        self.register()
        self.sup.step()

    def register(self, *extra: str) -> None:
        """The registry lists every live replica (and ``extra`` ids)."""
        ids = [p.replica_id for p in self.live() if p.replica_id]
        self.sup.handle(Registry.of(*ids, *extra))

    def live(self, group: str | None = None) -> list[Proc]:
        return [
            p
            for p in self.sup.procs
            if p.child is not None and p.kind is Kind.REPLICA and group in (None, p.group)
        ]

    def proc(self, name: str, role: Role = Role.SERVE) -> Proc:
        return next(p for p in self.sup.procs if p.name == name and p.role is role)

    def child(self, proc: Proc) -> FakeChild:
        assert isinstance(proc.child, FakeChild)
        return proc.child

    def said(self, text: str) -> bool:
        return any(text in e.message for e in self.events)


ECHO = """
[replicas.echo]
app = "app:app"
drain_timeout = 2
"""


def test_start_order_api_first_then_replicas_ready_when_registered(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO.replace("drain_timeout = 2", "count = 2"))
    h.sup.start()
    assert [c.argv[2] for c in h.spawn.children] == ["anyserve.api_server"]
    h.sup.handle(ApiHealthy())
    assert len(h.spawn.children) == 3
    assert {p.state for p in h.live()} == {State.STARTING}
    assert h.proc("api.0").state is State.READY
    # Only the replica the registry lists is ready.
    first = h.proc("echo.0")
    h.sup.handle(Registry.of(str(first.replica_id)))
    assert first.state is State.READY and h.proc("echo.1").state is State.STARTING


def test_backoff_grows_then_resets_after_a_stable_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO, RestartPolicy(jitter=0.0, crash_loop_after=10))
    h.up()
    proc = h.proc("echo.0")
    delays = []
    for _ in range(4):
        h.child(proc).exit(1)
        h.sup.step()
        assert proc.state is State.BACKING_OFF and proc.child is None
        delays.append(proc.backoff)
        assert proc.retry_at is not None
        h.advance(proc.retry_at - h.clock.now - 0.01)
        assert proc.child is None  # not before its time
        h.advance(0.01)
        assert proc.state is State.STARTING and proc.child is not None
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert proc.restarts == 4
    # Registered and then ready for `stable_after`: earlier crashes are forgiven.
    h.register()
    assert proc.state is State.READY
    h.advance(h.sup.policy.stable_after)
    assert proc.failures == 0
    h.child(proc).exit(1)
    h.sup.step()
    assert proc.backoff == 0.5


def test_backoff_is_capped(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO, RestartPolicy(jitter=0.0, cap=3.0, crash_loop_after=100))
    h.up()
    proc = h.proc("echo.0")
    for _ in range(6):
        h.child(proc).exit(1)
        h.sup.step()
        assert proc.retry_at is not None
        h.advance(proc.retry_at - h.clock.now)
    assert proc.backoff == 3.0


def test_quick_failures_reach_the_crash_loop_state_and_keep_retrying(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO + '\n[replicas.other]\napp = "app:app"\n')
    h.up()
    proc = h.proc("echo.0")
    other = h.proc("other.0")
    states = []
    for _ in range(4):
        h.child(proc).exit(1, stderr="RuntimeError: boom")
        h.sup.step()
        states.append(proc.state)
        view = next(v for v in h.sup.snapshot().processes if v.name == "echo.0")
        assert proc.retry_at is not None
        h.advance(proc.retry_at - h.clock.now)
    assert states == [State.BACKING_OFF] * 3 + [State.CRASH_LOOP]
    # What the dashboard shows while it waits: the exit code, stderr and the delay.
    assert view.state == "crash loop" and view.exit_code == 1 and view.retry_in == 4.0
    assert view.stderr_tail == ("RuntimeError: boom",)
    assert proc.message == "exited with code 1: RuntimeError: boom"
    assert h.said("crash loop: exited with code 1")
    assert proc.child is not None and proc.restarts == 4  # still retried
    assert other.state is State.READY and h.child(other).signals == []


def test_restart_never_and_on_failure(tmp_path: Path) -> None:
    groups = """
    [replicas.once]
    app = "app:app"
    restart = "never"

    [replicas.job]
    app = "app:app"
    restart = "on-failure"
    """
    h = Harness(tmp_path, groups)
    h.up()
    h.child(h.proc("once.0")).exit(1)
    h.child(h.proc("job.0")).exit(0)
    h.advance(100)
    assert h.proc("once.0").state is State.STOPPED and h.proc("once.0").child is None
    assert h.proc("job.0").state is State.STOPPED
    assert len(h.spawn.children) == 3


def test_rolling_reload_new_ready_then_old_drained(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO.replace("drain_timeout = 2", "drain_timeout = 2\ncount = 2"))
    h.up()
    old = [h.proc("echo.0"), h.proc("echo.1")]
    h.sup.request_reload("echo", None, "test")
    h.sup.step()
    cand = h.proc("echo.0", Role.CANDIDATE)
    assert cand.state is State.STARTING and old[0].state is State.RELOADING
    h.advance(5)
    assert h.child(old[0]).signals == []  # the old one serves until the new one is ready
    h.register()
    h.sup.step()
    assert cand.role is Role.SERVE and cand.state is State.READY
    assert old[0].role is Role.RETIRE and old[0].state is State.DRAINING
    # It is unregistered at once and stopped (SIGTERM) after the settle time.
    h.advance(0.5)
    assert h.child(old[0]).signals == []
    h.advance(0.5)
    assert h.child(old[0]).signals == [signal.SIGTERM]
    h.child(old[0]).exit(0)
    h.sup.step()
    assert old[0] not in h.sup.procs
    h.sup.step()  # the drain is over: on to the next slot
    cand1 = h.proc("echo.1", Role.CANDIDATE)
    h.register()
    h.sup.step()
    h.advance(1.0)
    assert h.child(old[1]).signals == [signal.SIGTERM]
    h.child(old[1]).exit(0)
    h.advance(0.1)
    h.advance(0.1)
    assert "echo" not in h.sup.reloads
    assert h.said("reloaded echo in")
    serving = sorted((p for p in h.sup.procs if p.group == "echo"), key=lambda p: p.slot)
    assert serving == [cand, cand1]
    assert all(p.state is State.READY and p.role is Role.SERVE for p in serving)


def test_rolling_reload_kills_an_old_process_that_outlives_its_drain(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    old = h.proc("echo.0")
    h.sup.request_reload("echo", None, "test")
    h.sup.step()
    h.register()
    h.sup.step()
    h.advance(1.0)
    assert h.child(old).signals == [signal.SIGTERM]
    # Grace (drain_timeout 2) plus the kill margin (1) later it is SIGKILLed.
    h.advance(2.9)
    assert signal.SIGKILL not in h.child(old).signals
    h.advance(0.2)
    assert h.child(old).signals[-1] == signal.SIGKILL


def test_reload_whose_new_process_fails_keeps_the_old_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    old = h.proc("echo.0")
    h.sup.request_reload("echo", None, "test")
    h.sup.step()
    cand = h.proc("echo.0", Role.CANDIDATE)
    h.child(cand).exit(1, stderr="SyntaxError: invalid syntax")
    h.sup.step()
    h.sup.step()
    assert cand not in h.sup.procs
    assert old.state is State.READY and old.role is Role.SERVE
    assert h.child(old).signals == []
    assert old.message.startswith("reload failed: new process exited with code 1: SyntaxError")
    assert "echo" not in h.sup.reloads
    assert any(e.kind is EventKind.ERROR and "reload failed" in e.message for e in h.events)


def test_reload_whose_new_process_never_registers_is_killed(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    old = h.proc("echo.0")
    h.sup.request_reload("echo", None, "test")
    h.sup.step()
    cand = h.proc("echo.0", Role.CANDIDATE)
    cand_child = h.child(cand)
    h.advance(9.9)
    assert cand_child.signals == []
    h.advance(0.2)
    assert cand_child.signals == [signal.SIGKILL]
    assert old.state is State.READY and h.child(old).signals == []
    assert "not registered within 10s" in old.message
    # A later reload that works clears the message.
    h.sup.request_reload("echo", None, "again")
    h.sup.step()
    h.register()
    h.sup.step()
    h.advance(1.0)
    h.child(old).exit(0)
    h.advance(0.1)
    h.advance(0.1)
    assert h.proc("echo.0").message == ""


def test_a_change_during_a_reload_queues_another(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    h.sup.request_reload("echo", None, "first")
    h.sup.step()
    h.sup.request_reload("echo", None, "second")
    assert h.sup.reloads["echo"].again
    h.register()
    h.sup.step()
    h.advance(1.0)
    h.child(h.proc("echo.0", Role.RETIRE)).exit(0)
    h.advance(0.1)
    h.advance(0.1)
    assert h.sup.reloads["echo"].reason == "changed again during the reload"


def test_scale_up_and_down(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    reply = ControlRequest({"command": "scale", "name": "echo", "count": 3})
    h.sup.handle(reply)
    assert reply.reply.value == "scaled echo from 1 to 3"
    assert sorted(p.slot for p in h.live("echo")) == [0, 1, 2]
    h.register()
    assert all(p.state is State.READY for p in h.live("echo"))
    h.sup.handle(ControlRequest({"command": "scale", "name": "echo", "count": 1}))
    retiring = [p for p in h.live("echo") if p.role is Role.RETIRE]
    assert sorted(p.slot for p in retiring) == [1, 2]
    h.advance(1.0)
    assert all(h.child(p).signals == [signal.SIGTERM] for p in retiring)
    for p in retiring:
        h.child(p).exit(0)
    h.sup.step()
    assert [p.slot for p in h.sup.procs if p.group == "echo"] == [0]
    assert h.sup.desired["echo"] == 1


def test_bad_control_requests_are_refused_not_raised(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    cases: list[tuple[dict[str, object], type[Exception]]] = [
        ({"command": "scale", "name": "echo", "count": -1}, BadRequest),
        ({"command": "scale", "name": "echo", "count": True}, BadRequest),
        ({"command": "scale", "name": "nope", "count": 1}, NotFound),
        ({"command": "restart", "name": "echo.7"}, NotFound),
        ({"command": "explode"}, BadRequest),
    ]
    for request, error in cases:
        message = ControlRequest(request)
        h.sup.handle(message)
        assert isinstance(message.reply.error, error), request
    assert h.sup.phase is Phase.RUNNING


def test_stuck_replica_is_killed_after_its_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO + 'stuck_timeout = "3s"\n')
    h.up()
    proc = h.proc("echo.0")
    assert proc.pid in h.sup.probe_targets
    h.sup.handle(ProbeAnswers(h.clock.now, {proc.pid or 0: False}))
    assert proc.state is State.UNHEALTHY
    h.clock.now += 2
    h.sup.handle(ProbeAnswers(h.clock.now, {proc.pid or 0: False}))
    assert h.child(proc).signals == []
    h.clock.now += 1.5
    h.sup.handle(ProbeAnswers(h.clock.now, {proc.pid or 0: False}))
    assert h.child(proc).signals == [signal.SIGKILL]
    h.sup.step()
    assert proc.state is State.BACKING_OFF and proc.message.startswith("stuck")


def test_signal_stops_replicas_first_then_the_api_server(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.up()
    api, echo = h.proc("api.0"), h.proc("echo.0")
    h.sup.signals.append(signal.SIGTERM)
    h.sup.step()
    h.sup.step()
    assert h.child(echo).signals == [signal.SIGTERM] and h.child(api).signals == []
    h.child(echo).exit(0)
    h.sup.step()
    h.sup.step()
    assert h.child(api).signals == [signal.SIGTERM]
    h.child(api).exit(0)
    h.sup.step()
    assert h.sup.phase is Phase.DONE and h.sup.exit_code == 128 + signal.SIGTERM


def test_token_reaches_children_only_in_the_environment(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO + 'env = { ANYSERVE_TOKEN = "group-choice", X = "1" }\n')
    h.sup.token = "s3cret"
    h.up()
    for child in h.spawn.children:
        assert child.env["ANYSERVE_TOKEN"] == "s3cret"
        assert not any("s3cret" in arg for arg in child.argv)
    assert h.spawn.children[1].env["X"] == "1"


def test_replicas_get_the_api_servers_auth_mode_and_an_instance_in_the_environment(
    tmp_path: Path,
) -> None:
    """A group's ``env`` chooses neither: the replica's port follows the API server, and
    the instance is the supervisor's own secret for that one process."""
    groups = 'auth = "all"\n' + ECHO + "count = 2\n"
    groups += 'env = { ANYSERVE_AUTH = "writes", ANYSERVE_INSTANCE = "mine" }\n'
    h = Harness(tmp_path, groups)
    h.up()
    api, *replicas = h.spawn.children
    assert "ANYSERVE_AUTH" not in api.env and "ANYSERVE_INSTANCE" not in api.env
    assert [c.env["ANYSERVE_AUTH"] for c in replicas] == ["all", "all"]
    instances = [c.env["ANYSERVE_INSTANCE"] for c in replicas]
    assert instances == [h.proc("echo.0").instance, h.proc("echo.1").instance]
    assert len(set(instances)) == 2 and all(len(i) == 32 for i in instances)
    for child, instance in zip(replicas, instances, strict=True):
        assert not any(instance in arg for arg in child.argv)
    # A restart is a new process: a new secret.
    h.child(h.proc("echo.0")).exit(1)
    h.sup.step()
    h.advance(5)
    assert len(h.spawn.children) == 4
    restarted = h.spawn.children[-1].env["ANYSERVE_INSTANCE"]
    assert restarted == h.proc("echo.0").instance and restarted not in instances


def test_rolling_reload_unregisters_the_old_replica_as_its_owner(tmp_path: Path) -> None:
    """The DELETE /unregister carries the instance the old replica was started with, so
    the registry accepts it from its owner whether or not the route trusts the token."""
    import json

    import httpx

    bodies: list[dict[str, object]] = []

    def api_server(request: httpx.Request) -> httpx.Response:
        bodies.append({"method": request.method, "path": request.url.path})
        bodies[-1].update(json.loads(request.content))
        return httpx.Response(200, json={"ok": True})

    h = Harness(tmp_path, ECHO)
    h.sup.http = httpx.Client(transport=httpx.MockTransport(api_server))
    h.up()
    old = h.proc("echo.0")
    old_env = h.child(old).env
    h.sup.request_reload("echo", None, "test")
    h.sup.step()
    h.register()
    h.sup.step()
    assert old.role is Role.RETIRE
    assert bodies == [
        {
            "method": "DELETE",
            "path": "/unregister",
            "replica_id": old.replica_id,
            "instance": old_env["ANYSERVE_INSTANCE"],
        }
    ]
    assert not h.said("could not unregister")


def test_notes_from_helper_threads_are_shown(tmp_path: Path) -> None:
    h = Harness(tmp_path, ECHO)
    h.sup.handle(Note("file watching stopped: too many files", EventKind.ERROR))
    assert [e.text for e in h.sup.snapshot().events] == ["file watching stopped: too many files"]


@pytest.mark.parametrize("state", list(State))
def test_states_show_as_their_words(state: State) -> None:
    assert f"{state}" == state.value and str(state) == state.value
