"""GET /openapi.json: a valid OpenAPI document that covers every route, and that the live
server keeps to (schemathesis generates requests from it and checks every reply)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from anyserve.api_server import ROUTES, ApiServerConfig, create_app
from anyserve.openapi import document
from anyserve.registry import Registry

from .conftest import ApiServer, Procs, start_cluster

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

# Routes that change the registry or delete data are left out of the generated run: a
# generated registration points at an endpoint nobody listens on, after which requests
# routed there fail with 503 by design, and deletes would remove what other cases use.
EXCLUDED_PATHS = ["/register", "/heartbeat", "/unregister"]
EXCLUDED_OPERATIONS = ["deleteObject"]
# positive_data_acceptance expects every schema-valid body to succeed, but tensors have rules
# JSON Schema cannot state (datatype names, shape vs data counts): such bodies get a 400.
# allow_header_conformance wants Allow to list every method of a path; Starlette lists
# those of the first route entry only (GET and POST /objects are two entries).
EXCLUDED_CHECKS = [
    schemathesis.checks.positive_data_acceptance,
    schemathesis.checks.allow_header_conformance,
]
# A binary body for /infer and /infer/stream is sent the way an octet-stream one is.
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")


def served_operations() -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every route the API server serves."""
    ops = set()
    for route in ROUTES:
        assert isinstance(route, Route)
        if "{path:path}" in route.path:  # the /v2 catch-all answers what no route does
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                ops.add((path, method.lower()))
    return ops


def test_the_document_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    validate(document())


def test_every_route_is_described() -> None:
    described = {
        (path, method)
        for path, item in document()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert served_operations() == described


def test_operation_ids_are_unique() -> None:
    ids = [op["operationId"] for item in document()["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_served_at_openapi_json() -> None:
    app = create_app(ApiServerConfig(), Registry())

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get("/openapi.json")

    reply = asyncio.run(go())
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == document()


# ---------------------------------------------------------------------- generated requests


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("openapi")
    procs = Procs(tmp)
    try:
        yield start_cluster(procs, tmp)
    finally:
        procs.stop_all()


# The schema comes from the document in-process (test_served_at_openapi_json shows the server
# serves the same one), so the cases can be generated before the server starts.
schema = (
    schemathesis.openapi.from_dict(document())
    .exclude(path=EXCLUDED_PATHS)
    .exclude(operation_id=EXCLUDED_OPERATIONS)
)


@schema.parametrize()
@hypothesis.settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_live_server_keeps_to_its_schema(case: Any, live_api: ApiServer) -> None:
    """No 5xx; every reply's status, content type, headers and body are as described; and
    requests the schema calls invalid are refused."""
    case.call_and_validate(base_url=live_api.url, timeout=30, excluded_checks=EXCLUDED_CHECKS)
