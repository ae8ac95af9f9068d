"""Check the streaming demo: tokens arrive as Server-Sent Events and join to the sentence.

Usage: python examples/mvp_demo/test_stream_client.py [API_SERVER_URL]   (default http://localhost:8080)
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

BASE = (
    sys.argv[1]
    if len(sys.argv) > 1
    else os.environ.get("ANYSERVE_API_SERVER", "http://localhost:8080")
).rstrip("/")
EXPECTED = "Hello world! This is streaming."


def main() -> int:
    body = {
        "model_name": "chat",
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["Hello"]},
            }
        ],
    }
    req = urllib.request.Request(
        BASE + "/infer/stream",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Capability-Type": "chat"},
    )
    tokens: list[str] = []
    finish = []
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            if reply.headers.get("Content-Type", "").split(";")[0] != "text/event-stream":
                print(f"FAIL  not an event stream: {reply.headers.get('Content-Type')}")
                return 1
            for raw in reply:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    print(f"FAIL  error event: {event['error']}")
                    return 1
                for tensor in event.get("outputs", []):
                    values = tensor.get("contents", {}).get("bytes_contents", [])
                    if tensor["name"] == "text_output":
                        tokens.extend(values)
                        print(f"  +{(time.perf_counter() - started) * 1000:6.0f} ms  {values[0]!r}")
                    elif tensor["name"] == "finish_reason":
                        finish.extend(values)
    except OSError as exc:
        print(f"API server not reachable at {BASE}: {exc}")
        return 1
    text = "".join(tokens)
    ok = text == EXPECTED and len(tokens) == 11 and finish[-1:] == ["stop"] and not any(finish[:-1])
    print(f"{'PASS' if ok else 'FAIL'}  streamed {len(tokens)} tokens: {text!r}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
