"""AnyServe's benchmark: what a request through AnyServe costs over one straight to the replica.

``python -m benchmarks [--quick] [--json PATH] [--duration S]`` starts its own API server
and echo replica on free ports, measures unary and streaming requests through the HTTP
routes and straight over gRPC, the API server's CPU per request, the object store, start-up
and reload times, and the load generator's own ceiling, then prints a table with each
performance budget marked PASS or MISS and writes the figures to a JSON file.

Modules, in the order a run uses them:

- ``servers``   children on free ports in their own process groups, killed at the end
- ``http``      a minimal HTTP/1.1 keep-alive client on asyncio streams
- ``load``      closed-loop phases: N workers, latencies, events, CPU of a server process
- ``unary``, ``streaming``, ``storage``, ``startup``, ``ceiling``  the sections
- ``trivial``   a fixed-200 HTTP server, for the generator's ceiling
- ``wrk``       the same unary phase through ``wrk`` when it is installed
- ``budgets``   the targets and their PASS/MISS
- ``report``    the terminal table
- ``run``       the command line and the order of sections
"""
