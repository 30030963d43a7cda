"""Generate (or check) the Python stubs of KEDA's external scaler protocol.

The stubs are committed so the package runs without grpcio-tools; this module regenerates them
and checks that the committed ones still match `externalscaler.proto`.

    python -m autoscaler.keda.codegen          # regenerate the committed stubs
    python -m autoscaler.keda.codegen --check  # exit 1 if they are out of date

The proto is compiled with the repository root as include path, so the gRPC stub imports
`from autoscaler.keda import externalscaler_pb2` (a package import that works wherever the
package is installed) rather than a bare `import externalscaler_pb2`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

KEDA_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = KEDA_DIR.parent.parent
PROTO_RELATIVE = "autoscaler/keda/externalscaler.proto"
GENERATED = ("externalscaler_pb2.py", "externalscaler_pb2_grpc.py")
GENERATED_MARKER = "# Protobuf Python Version:"


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate or check

    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{PACKAGE_ROOT}", f"-I{include}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {PROTO_RELATIVE}")


def generate(out_root: Path) -> dict[str, Path]:
    """Compile the proto into `out_root`; returns the generated files by name."""
    _protoc(
        [
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PACKAGE_ROOT / PROTO_RELATIVE),
        ]
    )
    out_dir = out_root / "autoscaler" / "keda"
    return {name: out_dir / name for name in GENERATED}


def descriptor_of_proto() -> bytes:
    """The serialized FileDescriptorProto that protoc builds from the proto file today."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        _protoc([f"--descriptor_set_out={out}", str(PACKAGE_ROOT / PROTO_RELATIVE)])
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file_proto,) = descriptor_set.file
    return _canonical(file_proto)


def descriptor_of_committed_stub() -> bytes:
    """The FileDescriptorProto embedded in the committed `externalscaler_pb2.py`."""
    from google.protobuf import descriptor_pb2

    from autoscaler.keda import externalscaler_pb2

    file_proto = descriptor_pb2.FileDescriptorProto.FromString(
        externalscaler_pb2.DESCRIPTOR.serialized_pb
    )
    return _canonical(file_proto)


def _canonical(file_proto: Any) -> bytes:
    """Serialized descriptor without `json_name`, which protoc's descriptor sets fill in but the
    generated module's embedded copy leaves out (it is derived from the field name anyway)."""
    copy = type(file_proto)()
    copy.CopyFrom(file_proto)
    pending = list(copy.message_type)
    while pending:
        message = pending.pop()
        for message_field in message.field:
            message_field.ClearField("json_name")
        pending.extend(message.nested_type)
    return copy.SerializeToString(deterministic=True)


def _body(text: str) -> str:
    """Generated text without the lines naming tool versions, which differ across machines."""
    return "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith(GENERATED_MARKER)
        and "GRPC_GENERATED_VERSION =" not in line
        and "_runtime_version.ValidateProtobufRuntimeVersion" not in line
    )


def stale_files() -> list[str]:
    """Names of committed stubs that differ from what the proto generates now.

    The pb2 module is compared by its embedded descriptor (what defines the wire protocol),
    the gRPC module by its text with version-stamp lines removed.
    """
    stale: list[str] = []
    if descriptor_of_committed_stub() != descriptor_of_proto():
        stale.append(GENERATED[0])
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed_grpc = (KEDA_DIR / GENERATED[1]).read_text()
        if _body(fresh[GENERATED[1]].read_text()) != _body(committed_grpc):
            stale.append(GENERATED[1])
    return stale


def write_stubs() -> list[Path]:
    """Regenerate the committed stubs in place."""
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in generate(Path(tmp)).items():
            target = KEDA_DIR / name
            shutil.copyfile(path, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(
                f"stale generated stubs: {', '.join(stale)}; "
                "run: python -m autoscaler.keda.codegen",
                file=sys.stderr,
            )
            return 1
        print("generated stubs match externalscaler.proto")
        return 0
    for path in write_stubs():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
