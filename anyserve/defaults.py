"""Every default and limit shared by more than one module, defined once.

The API server, the replica, ``up`` and the configuration loader all read these; a
value retyped elsewhere drifts (the replica's gRPC message limit once did).
"""

from __future__ import annotations

#: The shared object store directory when none is configured.
OBJECT_STORE_PATH = "/tmp/anyserve-objects"

#: Requests the API server may have in flight on one replica at once, when its registration
#: does not say. Enough concurrency to keep a model busy, few enough that excess requests
#: wait in the API server's queue, where they can be shed, not inside the replica.
MAX_IN_FLIGHT = 8
#: The largest ``max_in_flight`` a registration may claim; beyond it the limit means nothing.
MAX_IN_FLIGHT_LIMIT = 4096

#: Requests may be delegated this many times; one more is a loop (508).
MAX_DELEGATION_DEPTH = 3

#: Largest request body on the HTTP routes (413 beyond it), and so the gRPC message size:
#: a 64 MiB tensor is a large model input, and the limit bounds what one request can make
#: the API server hold in memory.
MAX_BODY_SIZE = 64 * 1024 * 1024
#: What a message may add to its body on the way to gRPC (field tags, names, parameters).
MESSAGE_SLACK = 64 * 1024


def max_message_bytes(max_body_size: int = MAX_BODY_SIZE) -> int:
    """The gRPC message limit (both ways) that carries a body of ``max_body_size`` bytes."""
    return max_body_size + MESSAGE_SLACK


#: gRPC message limit both ways for the default body size; replicas use the same.
MAX_MESSAGE_BYTES = max_message_bytes()

#: The API server's ``--auth`` modes, the default first: ``writes`` guards registration and
#: object writes with the token, ``all`` every route but liveness. Replicas follow the same.
AUTH_MODES = ("writes", "all")
AUTH_MODE = AUTH_MODES[0]
