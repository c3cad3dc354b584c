"""Project-level promises: the public API is what __all__ says, and generated code is current."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import types

import meshid
import meshid.aio

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _public(module) -> list[str]:
    return sorted(n for n in vars(module) if not n.startswith("_") and n not in {"annotations", "logging"})


def test_all_is_sorted_and_complete() -> None:
    for module in (meshid, meshid.aio):
        assert module.__all__ == sorted(module.__all__), f"{module.__name__}.__all__ is not sorted"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{module.__name__}.__all__ names {missing} that do not exist"
        # submodules become attributes of the package once imported; they are not API names
        stray = [
            n for n in _public(module) if n not in module.__all__ and not isinstance(getattr(module, n), types.ModuleType)
        ]
        assert not stray, f"{module.__name__} has public names missing from __all__: {stray}"


def test_errors_share_one_root() -> None:
    for name in meshid.__all__:
        obj = getattr(meshid, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, meshid.MeshIdError), name
    for name in ("InvalidSpiffeIdError", "InvalidSvidError", "InvalidBundleError", "InvalidPolicyError"):
        assert issubclass(getattr(meshid, name), ValueError)


def test_py_typed_ships() -> None:
    assert (ROOT / "meshid" / "py.typed").exists()


def test_generated_code_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_stale_generated_code_is_detected(tmp_path) -> None:
    # The check must be able to fail: a proto with one more field than the committed code.
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "meshid" / "_proto", copy / "meshid" / "_proto")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    greeter = copy / "protos" / "meshid" / "examples" / "v1" / "greeter.proto"
    greeter.write_text(greeter.read_text().replace("string name = 1;", "string name = 1;\n  string extra = 2;"))
    out = subprocess.run(
        [sys.executable, str(copy / "scripts" / "genproto.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 1
    assert "greeter_pb2.py" in out.stdout


def test_import_meshid_loads_only_what_is_used() -> None:
    # `import meshid` is cheap; using the interceptor does not load the agent, the Workload API
    # or the CA; and `meshid.aio` comes with `import meshid`, as grpc.aio with grpc.
    probe = (
        "import sys, meshid\n"
        "bare = sorted(m for m in sys.modules if m.startswith(('grpc', 'meshid.')))\n"
        "meshid.AuthorizationInterceptor, meshid.server_credentials, meshid.secure_channel, meshid.StaticSource\n"
        "server = sorted(m for m in sys.modules if m.startswith('meshid.'))\n"
        "print(bare, server, meshid.aio.AuthorizationInterceptor.__module__, sep='\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]", out[0]
    loaded = eval(out[1])
    assert not [m for m in loaded if m.startswith(("meshid.agent", "meshid.workloadapi", "meshid.ca"))], loaded
    assert out[2] == "meshid.aio.interceptors"


def test_python_dash_m_meshid_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "meshid", "--version"], capture_output=True, text=True, check=False)
    assert (out.returncode, out.stdout.strip()) == (0, f"meshid {meshid.__version__}")


def test_type_checkers_see_every_lazily_loaded_name() -> None:
    # meshid/__init__.py loads names on use; its TYPE_CHECKING imports are what mypy and IDEs
    # read. Both lists must name the same things, from the same modules.
    import ast

    tree = ast.parse((ROOT / "meshid" / "__init__.py").read_text())
    seen = {
        alias.asname or alias.name: f"{node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("meshid")
        for alias in node.names
    }
    seen.pop("aio")
    assert sorted(seen) == meshid.__all__
    for name, home in seen.items():
        assert getattr(meshid, name) is getattr(__import__(home, fromlist=[name]), name), name


def test_license_metadata_is_an_spdx_expression_with_its_file() -> None:
    # A `license = { text = ... }` table makes every build print setuptools' deprecation warning.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert [p for p in project["license-files"] if (ROOT / p).is_file()] == project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text().splitlines()[0]


def test_the_example_greeter_has_a_public_home_that_make_proto_writes() -> None:
    from meshid.examples import greeter_pb2, greeter_pb2_grpc

    assert greeter_pb2.DESCRIPTOR.package == "meshid.examples.v1"
    assert greeter_pb2.HelloRequest(name="me").name == "me" and greeter_pb2_grpc.GreeterStub
    # The generated files themselves, which `make proto` writes and --check compares.
    for module in (greeter_pb2, greeter_pb2_grpc):
        assert pathlib.Path(module.__file__).parent == ROOT / "meshid" / "_proto"
    # What a newcomer copies from imports no private name.
    for example in sorted((ROOT / "examples").rglob("*.py")):
        assert "meshid._" not in example.read_text(), f"{example.relative_to(ROOT)} imports a private module"
