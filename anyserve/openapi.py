"""The OpenAPI 3.1 description of the API server's HTTP surface, served at ``GET /openapi.json``.

The document is data written out by hand next to the routes it describes (a test checks
that every route of the API server appears in it, and that replies match its schemas).
It is built and serialized once, on the first request.
"""

from __future__ import annotations

import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from anyserve import __version__

__all__ = ["document", "openapi_json"]

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _detail(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _v2_error(description: str) -> dict[str, Any]:
    return _json(_ref("V2Error"), description)


def _null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null: the JSON parser treats a null member as an absent one."""
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return {**schema, "type": [*kinds, "null"]}
    return {"oneOf": [schema, {"type": "null"}]}


_EMPTY = {"description": "true (the body is empty)"}
_BINARY_SCHEMA = {"type": "string", "format": "binary"}

# -- schemas ----------------------------------------------------------------------------------

_SCALAR = {"type": ["string", "number", "boolean"]}
_FLOATS = {"type": "array", "items": {"type": ["number", "null"]}}  # NaN/±inf travel as null
_INTS = {"type": "array", "items": {"type": "integer"}}
_BYTES_ITEM = {
    "oneOf": [
        {"type": "string", "description": "UTF-8 text"},
        {
            "type": "object",
            "description": "binary that is not UTF-8, base64-encoded",
            "properties": {"b64": {"type": "string"}},
            "required": ["b64"],
            "additionalProperties": False,
        },
    ]
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "An error on AnyServe's own routes; the message says what to do next.",
        "properties": {"detail": {"type": "string"}},
        "required": ["detail"],
    },
    "V2Error": {
        "type": "object",
        "description": "An error on the KServe v2 routes.",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "Capability": {
        "type": "object",
        "description": 'Free key/values, e.g. {"type": "chat", "model": "demo"}; '
        '"stream": true marks a streaming capability.',
        "minProperties": 1,
        "additionalProperties": _SCALAR,
    },
    "Registration": {
        "type": "object",
        "properties": {
            "replica_id": {"type": "string", "minLength": 1},
            "endpoint": {"type": "string", "description": "host:port of the replica's gRPC"},
            "capabilities": {"type": "array", "items": _ref("Capability")},
            "instance": {"type": "string", "description": "random token of the process"},
        },
        "required": ["replica_id", "endpoint", "capabilities"],
    },
    "Lease": {
        "type": "object",
        "properties": {
            "success": {"type": "boolean"},
            "replica_id": {"type": "string"},
            "lease_ttl": {"type": "number"},
            "heartbeat_interval": {"type": "number"},
            "registered": {"type": "boolean", "description": "heartbeat only: re-registered"},
        },
        "required": ["success", "replica_id", "lease_ttl", "heartbeat_interval"],
    },
    "Unregistration": {
        "type": "object",
        "properties": {"replica_id": {"type": "string"}, "instance": {"type": "string"}},
        "required": ["replica_id"],
    },
    "Unregistered": {
        "type": "object",
        "properties": {"success": {"type": "boolean"}, "replica_id": {"type": "string"}},
        "required": ["success", "replica_id"],
    },
    "Replica": {
        "type": "object",
        "properties": {
            "replica_id": {"type": "string"},
            "endpoint": {"type": "string"},
            "capabilities": {"type": "array", "items": _ref("Capability")},
            "registered_at": {"type": "number", "description": "Unix time"},
            "last_heartbeat": {"type": "number", "description": "Unix time"},
            "heartbeat_age": {"type": "number", "description": "seconds"},
            "state": {"type": "string", "description": "ready, or stale when heartbeats are late"},
            "in_flight": {"type": "integer"},
            "requests": {"type": "integer"},
            "errors": {"type": "integer"},
            "p50_ms": {"type": ["number", "null"]},
            "p99_ms": {"type": ["number", "null"]},
        },
        "required": ["replica_id", "endpoint", "capabilities", "registered_at", "last_heartbeat"],
    },
    "Registry": {
        "type": "object",
        "properties": {
            "replicas": {"type": "array", "items": _ref("Replica")},
            "total": {"type": "integer"},
        },
        "required": ["replicas", "total"],
    },
    "Stats": {
        "type": "object",
        "properties": {
            "uptime_s": {"type": "number"},
            "requests": {"type": "integer"},
            "errors": {"type": "integer"},
            "in_flight": {"type": "integer"},
            "open_streams": {"type": "integer"},
            "lease_ttl": {"type": "number"},
            "heartbeat_interval": {"type": "number"},
            "replicas": {"type": "array", "items": _ref("Replica")},
            "total": {"type": "integer"},
        },
        "required": ["uptime_s", "requests", "errors", "replicas", "total"],
    },
    "Parameters": {
        "type": "object",
        "description": "KServe parameters; a plain value picks its kind, "
        '{"uint64_param": n} names one.',
        "additionalProperties": {
            "oneOf": [
                {"type": ["string", "number", "boolean", "null"]},
                {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "properties": {
                        "bool_param": {"type": "boolean"},
                        "int64_param": {"type": "integer"},
                        "string_param": {"type": "string"},
                        "double_param": {"type": "number"},
                        "uint64_param": {"type": "integer", "minimum": 0},
                    },
                    "additionalProperties": False,
                },
            ]
        },
    },
    "Contents": {
        "type": "object",
        "description": "The tensor's values in the field of its datatype (KServe "
        "InferTensorContents).",
        "properties": {
            "bool_contents": {"type": "array", "items": {"type": "boolean"}},
            "int_contents": _INTS,
            "int64_contents": _INTS,
            "uint_contents": _INTS,
            "uint64_contents": _INTS,
            "fp32_contents": _FLOATS,
            "fp64_contents": _FLOATS,
            "bytes_contents": {"type": "array", "items": _BYTES_ITEM},
        },
        "additionalProperties": False,
    },
    "Tensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "datatype": {"type": "string", "examples": ["BYTES", "FP32", "INT64"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "parameters": _ref("Parameters"),
            "contents": _ref("Contents"),
            "data": {"type": "array", "description": "KServe v2 REST form, flat or nested"},
        },
        "required": ["name"],
    },
    "InferRequest": {
        "type": "object",
        "description": "The JSON form of a ModelInferRequest (/infer/json, /infer/stream).",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "inputs": {"type": "array", "items": _ref("Tensor")},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "parameters": _ref("Parameters"),
                    },
                    "required": ["name"],
                },
            },
            "raw_input_contents": {"type": "array", "items": {"type": "string", "format": "byte"}},
        },
        "required": ["inputs"],
        "example": {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "contents": {"bytes_contents": ["Hello"]},
                }
            ]
        },
    },
    "InferResponse": {
        "type": "object",
        "description": "The JSON form of a ModelInferResponse.",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "datatype": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "parameters": _ref("Parameters"),
                        "contents": _ref("Contents"),
                    },
                    "required": ["name", "datatype", "shape", "contents"],
                },
            },
            "raw_output_contents": {
                "type": "array",
                "items": {"type": "string", "format": "byte"},
            },
        },
        "required": ["model_name", "outputs"],
    },
    "ObjRef": {
        "type": "object",
        "properties": {
            "key": {"type": "string"},
            "path": {"type": "string"},
            "size": {"type": "integer"},
            "content_type": {"type": "string", "enum": ["json", "bytes", "pickle"]},
            "created_at": {"type": "number"},
        },
        "required": ["key", "path", "size", "content_type", "created_at"],
    },
    "ObjectList": {
        "type": "object",
        "properties": {
            "objects": {"type": "array", "items": _ref("ObjRef")},
            "total": {"type": "integer"},
        },
        "required": ["objects", "total"],
    },
    "Deleted": {
        "type": "object",
        "properties": {"success": {"type": "boolean"}, "key": {"type": "string"}},
        "required": ["success", "key"],
    },
    "V2ServerMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "V2TensorMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["name", "datatype", "shape"],
    },
    "V2ModelMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the capability `model` values registered for this type",
            },
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("V2TensorMetadata")},
        },
        "required": ["name", "platform", "inputs", "outputs"],
    },
    "TritonTensorConfig": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "data_type": {"type": "string", "examples": ["TYPE_INT32", "TYPE_STRING"]},
            "dims": {"type": "array", "items": {"type": "integer", "minimum": -1}},
        },
        "required": ["name", "data_type", "dims"],
    },
    "TritonModelConfig": {
        "type": "object",
        "description": "Triton's model configuration, from the declared tensors",
        "properties": {
            "name": {"type": "string"},
            "platform": {"type": "string"},
            "backend": {"type": "string"},
            "max_batch_size": {"type": "integer", "minimum": 0},
            "input": {"type": "array", "items": _ref("TritonTensorConfig")},
            "output": {"type": "array", "items": _ref("TritonTensorConfig")},
        },
        "required": ["name", "platform", "max_batch_size", "input", "output"],
    },
    "V2InferRequest": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "inputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "datatype": {"type": "string", "examples": ["BYTES", "FP32"]},
                        "parameters": _ref("Parameters"),
                        "data": {
                            "type": "array",
                            "description": "row-major values, flat or nested; BYTES as text",
                        },
                    },
                    "required": ["name", "shape", "datatype"],
                },
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "parameters": _ref("Parameters"),
                    },
                    "required": ["name"],
                },
            },
        },
        "required": ["inputs"],
        "example": {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}]
        },
    },
    "V2InferResponse": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": _ref("Parameters"),
                        "data": {"type": "array", "description": "flat, row-major"},
                    },
                    "required": ["name", "shape", "datatype"],
                },
            },
        },
        "required": ["model_name", "outputs"],
    },
}


def _lenient(schema: dict[str, Any]) -> dict[str, Any]:
    """A request schema whose optional members may also be null, as the server reads them."""
    out = dict(schema)
    if "properties" in out:
        required = set(out.get("required", ()))
        out["properties"] = {
            name: sub if name in required else _null(_lenient(sub))
            for name, sub in out["properties"].items()
        }
    if isinstance(out.get("items"), dict):
        out["items"] = _lenient(out["items"])
    return out


for _name in ("Contents", "Tensor", "InferRequest", "V2InferRequest", "Registration"):
    SCHEMAS[_name] = _lenient(SCHEMAS[_name])

# -- parameters -------------------------------------------------------------------------------

_CAPABILITY_HEADERS = (
    "Every `X-Capability-<Key>` header is a routing key (`<key>` lowercased, `-` → `_`); a "
    "replica matches when each key is present in one of its capabilities with an equal "
    "value. `X-Request-Timeout: <seconds>` sets the deadline and `X-Request-ID` is echoed."
)
_HEADER_PARAMS = [
    {
        "name": "X-Capability-Type",
        "in": "header",
        "required": False,
        "description": "the capability's `type`; any other `X-Capability-*` header works alike "
        "and at least one of them is required (400 otherwise)",
        "schema": {"type": "string", "minLength": 1, "examples": ["chat"]},
    },
    {
        "name": "X-Capability-Model",
        "in": "header",
        "required": False,
        "description": "the capability's `model`",
        "schema": {"type": "string", "minLength": 1, "examples": ["demo"]},
    },
]
_ID_PARAM = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "echoed on the reply; generated when absent or not 1-128 characters of "
    "letters, digits and ._:@/+=-",
    "schema": {"type": "string"},
}
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "the capability `type`",
    "schema": {"type": "string"},
}
_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "the capability `model`",
    "schema": {"type": "string"},
}
_KEY = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}

# -- operations -------------------------------------------------------------------------------


def _infer_errors() -> dict[str, Any]:
    return {
        "400": _detail("malformed body or headers, or no X-Capability-* header"),
        "404": _detail("no replica serves the capability; the message lists those that exist"),
        "500": _detail("the handler raised; the message is its error"),
        "503": _detail("no replica reachable"),
        "default": _detail("other errors: 413 too large, 502, 504 deadline, 508 loop"),
    }


def _infer_json_body() -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref("InferRequest")}}}


def _v2_model_ops(versioned: bool) -> dict[str, dict[str, Any]]:
    # Without a version in the path, X-Capability-Model may narrow the choice.
    params = [_NAME, _VERSION] if versioned else [_NAME, _HEADER_PARAMS[1]]
    which = "name and version" if versioned else "name"
    binary_reply = {
        "schema": {
            **_BINARY_SCHEMA,
            "description": "binary tensor extension: an `Inference-Header-Content-Length` "
            "byte JSON header (V2InferResponse; binary outputs carry "
            "parameters.binary_data_size instead of data), then the outputs' raw bytes",
        }
    }
    return {
        "metadata": {
            "get": {
                "tags": ["KServe v2"],
                "summary": f"Model metadata by {which}",
                "operationId": f"v2ModelMetadata{'Version' if versioned else ''}",
                "parameters": params,
                "responses": {
                    "200": _json(_ref("V2ModelMetadata"), "the model as the registry knows it"),
                    "400": _v2_error("malformed headers"),
                    "404": _v2_error("no such model"),
                },
            }
        },
        "config": {
            "get": {
                "tags": ["KServe v2"],
                "summary": f"Triton model configuration by {which}",
                "operationId": f"v2ModelConfig{'Version' if versioned else ''}",
                "parameters": params,
                "responses": {
                    "200": _json(_ref("TritonModelConfig"), "the declared tensors, Triton's shape"),
                    "400": _v2_error("malformed headers"),
                    "404": _v2_error("no such model"),
                },
            }
        },
        "ready": {
            "get": {
                "tags": ["KServe v2"],
                "summary": f"Model readiness by {which}",
                "description": "200 when a replica serves the capability (unary or stream).",
                "operationId": f"v2ModelReady{'Version' if versioned else ''}",
                "parameters": params,
                "responses": {
                    "200": _EMPTY,
                    "400": _v2_error("malformed headers"),
                    "404": _v2_error("no replica serves it"),
                },
            }
        },
        "infer": {
            "post": {
                "tags": ["KServe v2"],
                "summary": f"Inference by model {which}",
                "description": "Routed like /infer/json. Binary tensor extension: with the "
                "header `Inference-Header-Content-Length: N` the body is N bytes of JSON "
                "(V2InferRequest) followed by the raw data of the inputs that have "
                "parameters.binary_data_size (little-endian; BYTES elements 4-byte "
                "length-prefixed). Outputs come back in binary when their parameters.binary_data"
                " is true, else when parameters.binary_data_output is, else when the request "
                "sent binary data. `Content-Encoding: gzip|deflate` bodies are accepted. "
                + _CAPABILITY_HEADERS,
                "operationId": f"v2Infer{'Version' if versioned else ''}",
                "parameters": [*params, _ID_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("V2InferRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "the outputs",
                        "headers": {
                            "Inference-Header-Content-Length": {
                                "description": "present when the reply carries binary data",
                                "schema": {"type": "integer"},
                            }
                        },
                        "content": {
                            "application/json": {"schema": _ref("V2InferResponse")},
                            "application/octet-stream": binary_reply,
                        },
                    },
                    "400": _v2_error("malformed request"),
                    "404": _v2_error("no such model"),
                    "500": _v2_error("the handler raised"),
                    "503": _v2_error("no replica reachable"),
                    "default": _v2_error("other errors (413, 502, 504, 508)"),
                },
            }
        },
    }


def _paths() -> dict[str, Any]:
    model = _v2_model_ops(versioned=False)
    versioned = _v2_model_ops(versioned=True)
    protobuf = {"application/x-protobuf": {"schema": _BINARY_SCHEMA}}
    return {
        "/health": {
            "get": {
                "tags": ["API server"],
                "summary": "Liveness",
                "operationId": "health",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"status": {"const": "healthy"}},
                            "required": ["status"],
                        },
                        "the API server is up",
                    )
                },
            }
        },
        "/register": {
            "post": {
                "tags": ["Registry"],
                "summary": "Register (or replace) a replica",
                "operationId": "register",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Registration")}},
                },
                "responses": {
                    "200": _json(_ref("Lease"), "registered; heartbeat at the interval given"),
                    "400": _detail("malformed registration; nothing was registered"),
                },
            }
        },
        "/heartbeat": {
            "post": {
                "tags": ["Registry"],
                "summary": "Renew a lease (an unknown id registers again)",
                "operationId": "heartbeat",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Registration")}},
                },
                "responses": {
                    "200": _json(_ref("Lease"), "renewed"),
                    "400": _detail("malformed body"),
                    "409": _detail("another process owns this replica id"),
                },
            }
        },
        "/unregister": {
            op: {
                "tags": ["Registry"],
                "summary": "Remove a replica's record",
                "operationId": f"unregister{op.capitalize()}",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Unregistration")}},
                },
                "responses": {
                    "200": _json(_ref("Unregistered"), "removed"),
                    "400": _detail("malformed body"),
                    "404": _detail("no such replica"),
                    "409": _detail("another process owns this replica id"),
                },
            }
            for op in ("delete", "post")
        },
        "/registry": {
            "get": {
                "tags": ["Registry"],
                "summary": "Every live replica with its capabilities and load",
                "operationId": "registry",
                "responses": {"200": _json(_ref("Registry"), "the registry")},
            }
        },
        "/stats": {
            "get": {
                "tags": ["API server"],
                "summary": "Totals since start and per-replica load",
                "operationId": "stats",
                "responses": {"200": _json(_ref("Stats"), "the counters")},
            }
        },
        "/metrics": {
            "get": {
                "tags": ["API server"],
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["API server"],
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/infer": {
            "post": {
                "tags": ["Inference"],
                "summary": "Inference with a serialized ModelInferRequest",
                "description": _CAPABILITY_HEADERS,
                "operationId": "inferProtobuf",
                "parameters": [*_HEADER_PARAMS, _ID_PARAM],
                # An empty body is the serialization of an empty ModelInferRequest.
                "requestBody": {"required": False, "content": protobuf},
                "responses": {
                    "200": {"description": "a serialized ModelInferResponse", "content": protobuf},
                    **_infer_errors(),
                },
            }
        },
        "/infer/json": {
            "post": {
                "tags": ["Inference"],
                "summary": "Inference with the JSON form of ModelInferRequest",
                "description": _CAPABILITY_HEADERS,
                "operationId": "inferJson",
                "parameters": [*_HEADER_PARAMS, _ID_PARAM],
                "requestBody": _infer_json_body(),
                "responses": {
                    "200": _json(_ref("InferResponse"), "the handler's response"),
                    **_infer_errors(),
                },
            }
        },
        "/infer/stream": {
            "post": {
                "tags": ["Inference"],
                "summary": "Streaming inference as server-sent events",
                "description": "One `data: <json>` event per message (InferResponse shape); an "
                'error mid-stream is `data: {"error": ..., "status": ...}`. Matches only '
                "streaming capabilities. The body may also be a serialized ModelInferRequest "
                "(Content-Type: application/x-protobuf). " + _CAPABILITY_HEADERS,
                "operationId": "inferStream",
                "parameters": [*_HEADER_PARAMS, _ID_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("InferRequest")},
                        **protobuf,
                    },
                },
                "responses": {
                    "200": {
                        "description": "the event stream",
                        "content": {
                            "text/event-stream": {
                                "schema": {"description": "events whose data is InferResponse JSON"}
                            }
                        },
                    },
                    **_infer_errors(),
                },
            }
        },
        "/objects": {
            "get": {
                "tags": ["Objects"],
                "summary": "List stored objects, oldest first",
                "operationId": "listObjects",
                "responses": {"200": _json(_ref("ObjectList"), "the objects")},
            },
            "post": {
                "tags": ["Objects"],
                "summary": "Store the body as an object",
                "operationId": "uploadObject",
                "parameters": [
                    {
                        "name": "key",
                        "in": "query",
                        "required": False,
                        "description": "a plain file name; generated when absent",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "type",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["bytes", "json"]},
                    },
                ],
                "requestBody": {
                    "required": False,  # an empty object is an object
                    "content": {"application/octet-stream": {"schema": _BINARY_SCHEMA}},
                },
                "responses": {
                    "201": _json(_ref("ObjRef"), "stored"),
                    "400": _detail("bad key or type"),
                    "413": _detail("larger than the configured limit"),
                },
            },
        },
        "/objects/{key}": {
            "get": {
                "tags": ["Objects"],
                "summary": "An object's data",
                "operationId": "downloadObject",
                "parameters": [_KEY],
                "responses": {
                    "200": {
                        "description": "the stored bytes (application/json for JSON objects)",
                        "content": {
                            "application/octet-stream": {"schema": _BINARY_SCHEMA},
                            "application/json": {},
                        },
                    },
                    "400": _detail("not a valid key"),
                    "404": _detail("no such object"),
                },
            },
            "delete": {
                "tags": ["Objects"],
                "summary": "Delete an object",
                "operationId": "deleteObject",
                "parameters": [_KEY],
                "responses": {
                    "200": _json(_ref("Deleted"), "deleted"),
                    "400": _detail("not a valid key"),
                    "404": _detail("no such object"),
                },
            },
        },
        "/v2": {
            "get": {
                "tags": ["KServe v2"],
                "summary": "Server metadata",
                "operationId": "v2ServerMetadata",
                "responses": {"200": _json(_ref("V2ServerMetadata"), "name, version, extensions")},
            }
        },
        "/v2/health/live": {
            "get": {
                "tags": ["KServe v2"],
                "summary": "Server liveness",
                "operationId": "v2Live",
                "responses": {"200": _EMPTY},
            }
        },
        "/v2/health/ready": {
            "get": {
                "tags": ["KServe v2"],
                "summary": "Server readiness: at least one replica is registered",
                "operationId": "v2Ready",
                "responses": {"200": _EMPTY, "400": _v2_error("not ready: no replica registered")},
            }
        },
        "/v2/models/{name}": model["metadata"],
        "/v2/models/{name}/ready": model["ready"],
        "/v2/models/{name}/config": model["config"],
        "/v2/models/{name}/infer": model["infer"],
        "/v2/models/{name}/versions/{version}": versioned["metadata"],
        "/v2/models/{name}/versions/{version}/ready": versioned["ready"],
        "/v2/models/{name}/versions/{version}/config": versioned["config"],
        "/v2/models/{name}/versions/{version}/infer": versioned["infer"],
    }


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; do not mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AnyServe API server",
            "version": __version__,
            "description": "Capability-routed model serving: the registry, inference "
            "(protobuf, JSON, server-sent events and KServe v2 REST), the object store and "
            "metrics. Replicas speak KServe v2 gRPC behind it.",
        },
        "tags": [
            {"name": "Inference"},
            {"name": "KServe v2", "description": "The Open Inference Protocol (REST)."},
            {"name": "Registry"},
            {"name": "Objects"},
            {"name": "API server"},
        ],
        "paths": _paths(),
        "components": {"schemas": SCHEMAS},
    }


@functools.cache
def _document_bytes() -> bytes:
    from anyserve.tensors import dumps

    return dumps(document())


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: the OpenAPI document of every HTTP route."""
    return Response(_document_bytes(), media_type="application/json")
