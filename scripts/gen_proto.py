"""Regenerate anyserve/_proto from proto/grpc_predict_v2.proto.

Usage: python scripts/gen_proto.py [--check]

The generator is pinned (grpcio-tools 1.66.x, in the ``test`` extra): it emits
protobuf 5.27 code, which loads without a warning under protobuf 5.27 through 7.x.
Newer generators emit code that refuses older protobuf runtimes. With ``--check``
nothing is written; the exit code is 1 when the committed code is stale.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "anyserve" / "_proto"
PROTO = "grpc_predict_v2.proto"
GENERATOR = "1.66."


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) into ``out`` and make the imports package-relative."""
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if not version.startswith(GENERATOR):
        sys.exit(f"grpcio-tools {GENERATOR}x is required, found {version}")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_DIR / PROTO),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    grpc_file = out / "grpc_predict_v2_pb2_grpc.py"
    text = grpc_file.read_text()
    text = re.sub(
        r"^import grpc_predict_v2_pb2 as", "from . import grpc_predict_v2_pb2 as", text, flags=re.M
    )
    grpc_file.write_text(text)


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = []
        for path in sorted(fresh.iterdir()):
            target = OUT_DIR / path.name
            if not target.exists() or target.read_bytes() != path.read_bytes():
                stale.append(path.name)
                if not check:
                    target.write_bytes(path.read_bytes())
    if check and stale:
        print("stale generated code: " + ", ".join(stale) + " (run scripts/gen_proto.py)")
        return 1
    print("up to date" if not stale else "regenerated: " + ", ".join(stale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
