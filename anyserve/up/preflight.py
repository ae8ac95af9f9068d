"""What ``anyserve up`` checks before it starts anything (and before it writes anything):
another ``up`` for the same topology, taken fixed ports, a token where one is needed."""

from __future__ import annotations

from anyserve.errors import AnyServeError
from anyserve.process import port_in_use
from anyserve.topology import Topology, config_error
from anyserve.up.tokens import token_plan


def preflight(topology: Topology, *, insecure: bool) -> tuple[str | None, bool]:
    """``(token, create)`` as :func:`token_plan` decides, once nothing stands in the way.

    Refuses when a fixed port is taken (naming the port and the group) or when the API
    server would listen beyond loopback with no token.
    """
    from anyserve.control import running_pid

    plan = token_plan(topology, insecure=insecure)
    pid = running_pid(topology.state_dir)
    if pid is not None:
        raise AnyServeError(
            f"`anyserve up` is already running for {topology.path} (pid {pid}); "
            "use `anyserve status`, or stop it with `anyserve down`"
        )
    api = topology.api_server
    if port_in_use(api.host, api.port):
        raise config_error(
            topology,
            ("api_server", "port"),
            f"port {api.port} on {api.host} is already in use (API server); stop what "
            "listens there or choose another port",
        )
    if api.grpc_port is not None and port_in_use(api.host, api.grpc_port):
        raise config_error(
            topology,
            ("api_server", "grpc_port"),
            f"port {api.grpc_port} on {api.host} is already in use (API server, gRPC); "
            "stop what listens there or choose another port",
        )
    for group in topology.groups:
        if group.port is not None and group.count > 0 and port_in_use(group.host, group.port):
            raise config_error(
                topology,
                ("replicas", group.name, "port"),
                f"port {group.port} on {group.host} is already in use (group {group.name}); "
                "stop what listens there, choose another port or omit it for a free one",
            )
    return plan
