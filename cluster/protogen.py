"""Regenerate the Python gRPC stubs in ``cluster/api/`` from the versioned contract.

Run from a checkout, with the test/dev extras installed (grpcio-tools provides protoc)::

    python -m cluster.protogen           # rewrite cluster/api/
    python -m cluster.protogen --check   # exit 1 if cluster/api/ is stale, write nothing

Source: ``proto/tpserve/v1/tpserve.proto``. Output: ``cluster/api/__init__.py``,
``tpserve_pb2.py``, ``tpserve_pb2.pyi`` and ``tpserve_pb2_grpc.py``.

Also the KServe v2 service as Triton publishes it (``proto/inference/``, see its README) into
``cluster/api/kserve/``. Its files keep their names (``grpc_service.proto``, package
``inference``), which Triton's own client registers too; so these stubs are built into a
descriptor pool of their own (``cluster.api.kserve.POOL``), not protobuf's default one, and a
process may import both.

protoc names Python modules after the proto's path (``tpserve.v1.tpserve_pb2``), but we
ship the stubs inside our own package, so two lines are rewritten to ``cluster.api``:
the import in the gRPC module and the module name given to the message classes. The
proto file name (``tpserve/v1/tpserve.proto``) and package (``tpserve.v1``) inside the
descriptor are left alone, so reflection still shows ``tpserve.v1.TPServe``.

The output depends only on the .proto file and the grpcio-tools version: the same
input gives byte-identical files, which tests/test_proto.py checks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
# Path of the contract relative to PROTO_ROOT; it is also the descriptor's file name.
PROTO_FILE = "tpserve/v1/tpserve.proto"
API_DIR = Path(__file__).resolve().parent / "api"
API_PACKAGE = "cluster.api"

_PROTOC_MODULE = "tpserve.v1.tpserve_pb2"  # what protoc calls the generated module
_STEM = "tpserve"

INIT_SOURCE = '''"""Generated gRPC stubs for the tpserve.v1 API (proto/tpserve/v1/tpserve.proto).

Do not edit these files: regenerate them with ``python -m cluster.protogen``.
"""
'''

# (file, text protoc writes, what we write instead); each must occur exactly once.
_REWRITES = (
    (
        f"{_STEM}_pb2_grpc.py",
        f"from tpserve.v1 import {_STEM}_pb2 as",
        f"from {API_PACKAGE} import {_STEM}_pb2 as",
    ),
    (
        f"{_STEM}_pb2.py",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{_PROTOC_MODULE}', _globals)",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{API_PACKAGE}.{_STEM}_pb2', _globals)",
    ),
)


def run_protoc(out_dir: Path) -> Path:
    """Run protoc (from grpcio-tools) on the contract; return the folder it wrote into."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # a test/dev dependency, not a serving one
        raise SystemExit(
            "grpcio-tools is needed to generate the stubs: pip install -e '.[test]'"
        ) from exc
    well_known_types = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known_types}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
    return out_dir / Path(PROTO_FILE).parent


def rewrite_imports(name: str, source: str) -> str:
    """Point a generated module at ``cluster.api`` instead of ``tpserve.v1``."""
    return _replace_once(name, source, [(old, new) for file_name, old, new in _REWRITES if file_name == name])


def _replace_once(name: str, source: str, rules) -> str:
    """Each (old, new) of `rules` applied to protoc's `name`, where old must occur exactly once."""
    for old, new in rules:
        count = source.count(old)
        if count != 1:
            raise RuntimeError(
                f"expected {old!r} once in protoc's {name}, found it {count} times; "
                "has the grpcio-tools output format changed?"
            )
        source = source.replace(old, new)
    return source


KSERVE_ROOT = PROTO_ROOT / "inference"
KSERVE_FILES = ("model_config.proto", "grpc_service.proto")
KSERVE_PACKAGE = f"{API_PACKAGE}.kserve"
KSERVE_INIT = '''"""Generated stubs of the KServe v2 gRPC service as Triton publishes it (proto/inference/).

Built into POOL, a descriptor pool of their own: Triton's client registers the same file names
in protobuf's default pool. Do not edit: regenerate with ``python -m cluster.protogen``.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def _kserve_rewrites(name: str, source: str) -> str:
    """Imports into cluster.api.kserve, and descriptors into its own pool."""
    stem = name.split(".")[0].removesuffix("_grpc").removesuffix("_pb2")
    rules = []
    if name.endswith("_pb2.py"):
        rules += [("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile("),
                  ("from google.protobuf.internal import builder as _builder\n",
                   f"from google.protobuf.internal import builder as _builder\nfrom {KSERVE_PACKAGE} import POOL as _POOL\n"),
                  (f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{stem}_pb2', _globals)",
                   f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{KSERVE_PACKAGE}.{stem}_pb2', _globals)")]
        if stem == "grpc_service":
            rules.append(("import model_config_pb2 as model__config__pb2",
                          f"from {KSERVE_PACKAGE} import model_config_pb2 as model__config__pb2"))
    elif name.endswith("_pb2_grpc.py") and stem == "grpc_service":
        rules.append(("import grpc_service_pb2 as grpc__service__pb2",
                      f"from {KSERVE_PACKAGE} import grpc_service_pb2 as grpc__service__pb2"))
    return _replace_once(name, source, rules)


def render_kserve() -> dict[str, bytes]:
    """The KServe stubs in memory: file name -> contents (no .pyi: these are not ours to type)."""
    from grpc_tools import protoc

    files = {"__init__.py": KSERVE_INIT}
    with tempfile.TemporaryDirectory(prefix="tpserve-protogen-") as tmp:
        args = ["grpc_tools.protoc", f"--proto_path={KSERVE_ROOT}",
                f"--proto_path={resources.files('grpc_tools') / '_proto'}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", *(str(KSERVE_ROOT / f) for f in KSERVE_FILES)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {KSERVE_ROOT}")
        for path in sorted(Path(tmp).iterdir()):
            if path.name == "model_config_pb2_grpc.py":
                continue  # no services in it
            files[path.name] = _kserve_rewrites(path.name, path.read_text(encoding="utf-8"))
    return {name: text.encode("utf-8") for name, text in sorted(files.items())}


def render() -> dict[str, bytes]:
    """Generate the stubs in memory: file name -> contents, in name order; the KServe ones under
    ``kserve/``."""
    files = {"__init__.py": INIT_SOURCE}
    with tempfile.TemporaryDirectory(prefix="tpserve-protogen-") as tmp:
        proto_out = run_protoc(Path(tmp))
        for path in sorted(proto_out.iterdir()):
            text = path.read_text(encoding="utf-8")
            files[path.name] = rewrite_imports(path.name, text)
    out = {name: text.encode("utf-8") for name, text in sorted(files.items())}
    out.update({f"kserve/{name}": data for name, data in render_kserve().items()})
    return out


def generate(out_dir: Path | str = API_DIR) -> list[Path]:
    """Write the generated stubs into ``out_dir`` (created if needed); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in render().items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def stale_files(api_dir: Path | str = API_DIR) -> list[str]:
    """Names of the files in ``api_dir`` that differ from, are missing from, or are not
    in a fresh generation (``__pycache__`` aside)."""
    api_dir = Path(api_dir)
    fresh = render()
    committed = {
        p.relative_to(api_dir).as_posix(): p.read_bytes()
        for p in [*api_dir.glob("*"), *api_dir.glob("kserve/*")] if p.is_file()
    } if api_dir.is_dir() else {}
    names = sorted(set(fresh) | set(committed))
    return [n for n in names if fresh.get(n) != committed.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.protogen", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report whether cluster/api/ is up to date (exit 1 if stale)",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale in {API_DIR}: {', '.join(stale)}; run python -m cluster.protogen")
            return 1
        print(f"{API_DIR} is up to date")
        return 0
    for path in generate():
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
