"""Generate the Python code (messages, gRPC stubs, mypy stubs) from protos/.

`python -m tools.protogen DIR` writes into DIR; `--check DIR` generates into a
temporary folder and fails if DIR differs, so CI catches stale generated code;
`--descriptor-set FILE` writes a self-contained FileDescriptorSet for
`buf lint` (buf cannot fetch googleapis from the registry on a closed network).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import google.api
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("pulse/device/v1")
GOOGLEAPIS = Path(next(iter(google.api.__path__))).parent.parent
WELL_KNOWN = Path(protoc.__file__).parent / "_proto"
# The mypy plugins live beside this interpreter, which need not be on PATH.
PLUGINS = Path(sys.executable).parent


def _protoc(*args: str) -> None:
    files = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    argv = ["protoc", f"-I{PROTO_ROOT}", f"-I{GOOGLEAPIS}", f"-I{WELL_KNOWN}", *args, *files]
    if protoc.main(argv) != 0:
        sys.exit("protoc failed")


def generate(out: Path) -> None:
    target = out / PACKAGE
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    _protoc(
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={PLUGINS / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={PLUGINS / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
    )
    # Regular packages, so the generated modules are importable and typed.
    for pkg in (out / "pulse", out / "pulse/device", target):
        (pkg / "__init__.py").touch()
    (out / "pulse" / "py.typed").touch()


def _differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [f"only in {a}: {n}" for n in cmp.left_only]
    found += [f"only in {b}: {n}" for n in cmp.right_only]
    found += [f"differs: {b / n}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        found += _differences(a / sub, b / sub)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--descriptor-set", type=Path)
    args = parser.parse_args()
    if args.descriptor_set:
        args.descriptor_set.parent.mkdir(parents=True, exist_ok=True)
        _protoc(
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={args.descriptor_set}",
        )
        return
    if args.out is None:
        parser.error("an output folder is required")
    if not args.check:
        generate(args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        diffs = _differences(Path(tmp) / "pulse", args.out / "pulse")
    if diffs:
        print("generated code is stale; run `make proto`:", *diffs, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
