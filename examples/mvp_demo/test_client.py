"""Check a running demo end to end: registry, chat, embed, heavy, errors.

Usage: python examples/mvp_demo/test_client.py [API_SERVER_URL]   (default http://localhost:8080)
Exits 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

BASE = (
    sys.argv[1]
    if len(sys.argv) > 1
    else os.environ.get("ANYSERVE_API_SERVER", "http://localhost:8080")
).rstrip("/")


def request(
    method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        BASE + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def text_body(name: str, text: str) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [text]},
            }
        ]
    }


def outputs(reply: dict[str, Any]) -> dict[str, list[Any]]:
    out = {}
    for tensor in reply.get("outputs", []):
        contents = tensor.get("contents", {})
        out[tensor["name"]] = next(iter(contents.values()), [])
    return out


failures: list[str] = []


def check(name: str, condition: bool, detail: Any = "") -> None:
    print(f"{'PASS' if condition else 'FAIL'}  {name}" + ("" if condition else f": {detail}"))
    if not condition:
        failures.append(name)


def main() -> int:
    try:
        status, health = request("GET", "/health")
    except OSError as exc:
        print(f"API server not reachable at {BASE}: {exc}")
        return 1
    check("health", status == 200 and health == {"status": "healthy"}, health)

    _, registry = request("GET", "/registry")
    types = {str(c.get("type")) for r in registry["replicas"] for c in r["capabilities"]}
    check("registry lists chat, embed, heavy", {"chat", "embed", "heavy"} <= types, types)

    status, reply = request(
        "POST", "/infer/json", text_body("text", "Hello World"), {"X-Capability-Type": "chat"}
    )
    check(
        "chat",
        status == 200
        and outputs(reply).get("text_output") == ["[Chat Response] You said: Hello World"],
        reply,
    )

    status, reply = request(
        "POST",
        "/infer/json",
        text_body("text", "Hello World"),
        {"X-Capability-Type": "chat", "X-Capability-Model": "demo"},
    )
    check(
        "chat model=demo",
        status == 200
        and outputs(reply).get("text_output") == ["[Chat Response] You said: Hello World"],
        reply,
    )

    status, reply = request(
        "POST", "/infer/json", text_body("text", "Sample text"), {"X-Capability-Type": "embed"}
    )
    check("embed", status == 200 and outputs(reply).get("embedding") == [11.0, 1.0, 0.5], reply)

    status, reply = request(
        "POST", "/infer/json", text_body("data", "Heavy task"), {"X-Capability-Type": "heavy"}
    )
    out = outputs(reply) if status == 200 else {}
    check("heavy", out.get("status") == ["completed"] and bool(out.get("result_ref")), reply)

    status, reply = request(
        "POST",
        "/infer/json",
        text_body("text", "Hi"),
        {"X-Capability-Type": "chat", "X-Capability-Model": "with-embedding"},
    )
    out = outputs(reply) if status == 200 else {}
    check(
        "chat with embedding (object + call)",
        out.get("text_output") == ["[Chat+Embed Response] Processed: Hi"]
        and out.get("embedding") == [2.0, 2.0, 0.5],
        reply,
    )

    status, reply = request("POST", "/infer/json", text_body("text", "x"), {})
    check("missing capability header is 400", status == 400, (status, reply))

    status, reply = request(
        "POST", "/infer/json", text_body("text", "x"), {"X-Capability-Type": "nope"}
    )
    check("unknown capability is 404", status == 404 and "type=chat" in str(reply), (status, reply))

    summary = f"{len(failures)} failed: " + ", ".join(failures) if failures else "all checks passed"
    print("\n" + summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
