"""Build hook: compile proto/*.proto into kvbm_codec/_proto/ at install time.

Generated gRPC code is not committed (it would drift from the .proto and from the pinned
grpcio-tools). `build_py` runs for wheel builds and for PEP 660 editable installs alike, so both
`pip install .` and `pip install -e .` (scripts/bootstrap.sh) produce the modules. They are written
into the source tree, which is where an editable install imports them from; a wheel build then
copies them like any other module of the package.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = "kvbm_codec._proto"
OUT_DIR = ROOT / "kvbm_codec" / "_proto"


def compile_protos() -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in protos:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{well_known}",
                f"--python_out={OUT_DIR}",
                f"--pyi_out={OUT_DIR}",
                f"--grpc_python_out={OUT_DIR}",
                str(proto),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
    # protoc emits `import x_pb2` (top-level) in *_pb2_grpc.py; inside a package it must be relative.
    for grpc_file in OUT_DIR.glob("*_pb2_grpc.py"):
        text = grpc_file.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.M)
        grpc_file.write_text(fixed)
    init = OUT_DIR / "__init__.py"
    init.write_text('"""Generated from proto/ by setup.py at install time; do not edit or commit."""\n')
    return protos


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        if self.packages is not None and OUT_PACKAGE not in self.packages:
            self.packages.append(OUT_PACKAGE)  # found after packages.find ran on a fresh clone
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
