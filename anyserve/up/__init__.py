"""``anyserve up``: supervise one topology's API server and replica processes.

Layers, each importing only those listed before it:

- :mod:`~anyserve.up.state` — enums of states, kinds, roles and phases; process table rows
- :mod:`~anyserve.up.policy` — restart backoff and the loop's timings
- :mod:`~anyserve.up.messages` — what helper threads report to the loop
- :mod:`~anyserve.up.snapshot` — the plain data the dashboard and ``anyserve ps`` read
- :mod:`~anyserve.up.tokens` — which token the API server gets, and its file
- :mod:`~anyserve.up.preflight` — what is checked before anything starts
- :mod:`~anyserve.up.launch` — the command lines and environments of the children
- :mod:`~anyserve.up.changes` — which groups a changed file reloads
- :mod:`~anyserve.up.watchers` — the helper threads (API poller, probe, files, sweeper)
- :mod:`~anyserve.up.stuck` — which replicas are probed, and when one is stuck
- :mod:`~anyserve.up.reload` — the rolling-reload state machine
- :mod:`~anyserve.up.commands` — ``restart``, ``scale``, ``ps``, ``down`` requests
- :mod:`~anyserve.up.supervisor` — the loop, which owns every piece of state
- :mod:`~anyserve.up.dashboard` — the view of a snapshot (the model never imports it)
- :mod:`~anyserve.up.run` — ``anyserve up`` itself: the loop with the dashboard or lines
"""
