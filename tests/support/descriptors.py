"""Writes the protobuf descriptors the tests need to encode recorded Istio config (proto-JSON).

Envoy's API comes from PyPI's `xds-protos` (every `*_pb2` module it ships), the Istio-only types
from `proto/istio/*.proto` (compiled with `grpcio-tools`). Usage: descriptors.py OUTPUT
"""

import importlib
import os
import pkgutil
import sys
import tempfile

from google.protobuf import descriptor_pb2


def envoy_files():
    """Every FileDescriptorProto reachable from the xds-protos packages."""
    seen = {}

    def add(fd):
        if fd.name in seen:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        seen[fd.name] = proto

    for top in ("envoy", "udpa", "xds", "validate", "google.api"):
        package = importlib.import_module(top)
        for info in pkgutil.walk_packages(package.__path__, top + "."):
            if info.name.endswith("_pb2"):
                try:
                    module = importlib.import_module(info.name)
                except Exception:  # a module needing an optional dependency: not ours to use
                    continue
                add(module.DESCRIPTOR)
    return seen


def istio_files(root):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(f for f in os.listdir(root) if f.endswith(".proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "istio.bin")
        args = ["protoc", f"-I{root}", f"-I{include}", f"--descriptor_set_out={out}"] + protos
        if protoc.main(args) != 0:
            sys.exit("compiling proto/istio failed")
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    return {fd.name: fd for fd in fds.file}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    files = envoy_files()
    files.update(istio_files(os.path.join(here, "..", "..", "proto", "istio")))
    fds = descriptor_pb2.FileDescriptorSet(file=list(files.values()))
    tmp = sys.argv[1] + ".tmp"
    with open(tmp, "wb") as f:
        f.write(fds.SerializeToString())
    os.replace(tmp, sys.argv[1])
    print(f"wrote {len(files)} file descriptors to {sys.argv[1]}")


if __name__ == "__main__":
    main()
