"""`lazybuild layer ...` as users and other parts script it: the installed console script, end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from support import tarcases

# The console script next to this interpreter (the install under test), else the one on PATH.
LAZYBUILD = next((p for p in (os.path.join(os.path.dirname(sys.executable), "lazybuild"),) if os.path.exists(p)),
                 None) or shutil.which("lazybuild")


def run(*args, stdin=None, ok=True):
    p = subprocess.run([LAZYBUILD, *args], capture_output=True, text=True, stdin=stdin, env={**os.environ, "CI": "1"})
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return tarcases.ustar_all_types(str(d / "in.tar"))


@pytest.mark.parametrize("zstd", [False, True])
def test_convert_verify_ls_extract(layer_tar, tmp_path, zstd):
    out = tmp_path / "layer.blob"
    res = json.loads(run("layer", "convert", "--format", "json", layer_tar, str(out), "--chunk-size", "4KiB",
                         *(["--zstd"] if zstd else [])).stdout)
    assert set(res) >= {"digest", "size", "tocDigest", "diffID", "uncompressedSize", "mediaType"}
    assert res["mediaType"].endswith("+zstd" if zstd else "+gzip") and res["size"] == out.stat().st_size
    assert os.listdir(tmp_path) == ["layer.blob"]

    v = run("layer", "verify", str(out), "--toc-digest", res["tocDigest"])
    assert v.stdout.startswith("ok: ") and res["tocDigest"] in v.stdout

    listing = run("layer", "ls", str(out)).stdout.splitlines()
    assert any(line.endswith("etc/sl -> hello.txt") for line in listing)
    assert any(line.startswith("crw-rw-rw-") and line.endswith("dev/null") for line in listing)
    entries = json.loads(run("layer", "ls", "--format", "json", "--chunks", str(out)).stdout)
    big = [e for e in entries if e["path"] == "data/f12305"]
    assert len(big) == 4 and all(e["compressedRange"][0] == e["offset"] for e in big)

    dest = tmp_path / "x"
    run("layer", "extract", str(out), str(dest), "--toc-digest", res["tocDigest"])
    assert (dest / "etc/hello.txt").read_bytes() == b"hello world\n"
    assert os.readlink(dest / "etc/sl") == "hello.txt"
    assert os.stat(dest / "etc/hl").st_ino == os.stat(dest / "etc/hello.txt").st_ino
    assert os.stat(dest / "bin/suid").st_mode & 0o7777 == 0o4755
    assert os.stat(dest / "etc/hello.txt").st_mtime == 1600000000


def test_stdin_and_prioritized_record(layer_tar, tmp_path):
    record = tmp_path / "record.ndjson"
    record.write_text('{"path": "etc/hello.txt", "layer": 0}\n\n/data/f4096\n')
    with open(layer_tar, "rb") as f:
        res = json.loads(run("layer", "convert", "--format", "json", "-", str(tmp_path / "o"), "--prioritized-files", str(record),
                             stdin=f).stdout)
    order = [e["path"] for e in json.loads(run("layer", "ls", "--format", "json", str(tmp_path / "o")).stdout)]
    assert order[:5] == ["", "etc", "etc/hello.txt", "data", "data/f4096"] and order[5] == ".prefetch.landmark"
    assert res["tocDigest"].startswith("sha256:")


def test_missing_prioritized_file(layer_tar, tmp_path):
    prio = tmp_path / "prio"
    prio.write_text("etc/hello.txt\nno/such/file\n")
    p = run("layer", "convert", layer_tar, str(tmp_path / "o"), "--prioritized-files", str(prio), ok=False)
    assert p.returncode == 1 and "no/such/file" in p.stderr
    assert os.listdir(tmp_path) == ["prio"]
    p = run("layer", "convert", layer_tar, str(tmp_path / "o"), "--prioritized-files", str(prio),
            "--allow-missing-prioritized")
    assert "warning" in p.stderr and "no/such/file" in p.stderr


def test_errors_are_one_line_for_people(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a layer at all" * 10)
    p = run("layer", "ls", str(junk), ok=False)
    assert p.returncode == 1 and p.stderr.startswith("lazybuild: error: ") and str(junk) in p.stderr
    p = run("layer", "convert", str(junk), str(tmp_path / "o"), ok=False)
    assert p.returncode == 1 and "not a tar" in p.stderr and not (tmp_path / "o").exists()
    p = run("layer", "verify", str(tmp_path / "missing"), ok=False)
    assert p.returncode == 1 and "No such file" in p.stderr


# --- The one error boundary: lazybuild.cli.main, called in this process with a command that raises. ---

import errno  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402

import lazybuild.cli  # noqa: E402
from lazybuild import errors  # noqa: E402

COMPONENT_PACKAGES = ["lazybuild", "lazybuild.builder", "lazybuild.exporter", "lazybuild.frontend",
                      "lazybuild.mounter", "lazybuild.snapshotter"]

# The exit codes README's CLI section promises, per area.
AREA_EXIT_CODES = {errors.UsageError: 2, errors.InputError: 1, errors.BadDockerfile: 1, errors.DataError: 1,
                   errors.RemoteError: 3, errors.BuildFailure: 4, errors.HostError: 5, errors.MountError: 5,
                   errors.SnapshotterError: 5, errors.MissingExtra: 5}


def _exception_classes() -> list[type]:
    """Every public exception class the package defines (all modules imported, __main__ ones excepted)."""
    found = {}
    for name in COMPONENT_PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, prefix=name + "."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if (isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == info.name
                        and not obj.__name__.startswith("_")):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


EXCEPTION_CLASSES = _exception_classes()

# Classes whose constructor takes more than a message.
SPECIAL_ARGS = {"RunError": (["false"], 1, ["boom"]), "SnapshotError": ("not_found", "boom"),
                "MissingExtra": ("lazybuild mount", "pyfuse3", "mount")}


def _instance(cls: type) -> BaseException:
    return cls(*SPECIAL_ARGS.get(cls.__name__, ("boom",)))


def _run_raising(monkeypatch, capsys, exc: BaseException, argv=("layer", "verify", "BLOB")):
    def command(args):
        raise exc

    monkeypatch.setattr(lazybuild.cli.layer, "verify", command)
    code = lazybuild.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_exception_class_is_a_lazybuild_error():
    assert len(EXCEPTION_CLASSES) >= 30
    outside = [c for c in EXCEPTION_CLASSES if not issubclass(c, errors.LazybuildError)]
    assert outside == [], "exception classes outside lazybuild.errors' hierarchy"
    assert set(AREA_EXIT_CODES) < set(EXCEPTION_CLASSES)
    for area, code in AREA_EXIT_CODES.items():
        assert area.exit_code == code and area.hint, area


@pytest.mark.parametrize("cls", [c for c in EXCEPTION_CLASSES if c is not errors.LazybuildError],
                         ids=lambda c: c.__name__)
def test_each_error_reaches_the_user_as_one_line_with_its_exit_code(monkeypatch, capsys, cls):
    exc = _instance(cls)
    code, out, err = _run_raising(monkeypatch, capsys, exc)
    area = next(a for a in cls.__mro__ if a.__module__ == "lazybuild.errors")
    assert code == area.exit_code == exc.exit_code
    assert out == "" and "Traceback" not in err
    message = str(exc)
    assert err.startswith(f"lazybuild: error: {message}\n")
    rest = err[len(f"lazybuild: error: {message}\n"):]
    assert rest == f"lazybuild: hint: {exc.hint.replace('{command}', 'layer verify')}\n"


def test_a_hint_given_where_the_error_is_raised_wins(monkeypatch, capsys):
    code, _, err = _run_raising(monkeypatch, capsys, errors.RemoteError("no", hint="try later"))
    assert code == 3 and err == "lazybuild: error: no\nlazybuild: hint: try later\n"


@pytest.mark.parametrize("exc", [ValueError("oops"), RuntimeError("oops"), KeyError("oops"), TypeError("oops"),
                                 ModuleNotFoundError("No module named 'yaml'", name="yaml")],
                         ids=lambda e: type(e).__name__)
def test_a_bug_prints_its_traceback(monkeypatch, capsys, exc):
    code, out, err = _run_raising(monkeypatch, capsys, exc)
    assert code == lazybuild.cli.EXIT_BUG == 70
    assert "Traceback (most recent call last)" in err and f"{type(exc).__name__}: " in err
    assert err.rstrip().splitlines()[-1].startswith("lazybuild: error: this is a bug in lazybuild")


def test_files_the_system_refuses(monkeypatch, capsys):
    code, _, err = _run_raising(monkeypatch, capsys, FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"))
    assert code == 1 and err == "lazybuild: error: No such file or directory: /x\n"
    code, _, err = _run_raising(monkeypatch, capsys, PermissionError(errno.EACCES, "Permission denied", "/dev/fuse"))
    assert code == 1 and err.startswith("lazybuild: error: Permission denied: /dev/fuse\nlazybuild: hint: ")


def test_interrupted(monkeypatch, capsys):
    code, _, err = _run_raising(monkeypatch, capsys, KeyboardInterrupt())
    assert code == 130 and err == "lazybuild: error: interrupted\n"


def test_a_reader_that_went_away_is_not_an_error(monkeypatch, capsys, tmp_path):
    def command(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(lazybuild.cli.layer, "verify", command)
    # main points stdout's file descriptor at /dev/null, as it must for the reader that left: give it a
    # stdout of its own, so pytest's capture (and every later test's output) is not the one redirected.
    with open(tmp_path / "stdout", "w") as own:
        monkeypatch.setattr(sys, "stdout", own)
        assert lazybuild.cli.main(["layer", "verify", "BLOB"]) == 0
    assert capsys.readouterr().err == ""


def test_a_missing_extra_names_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # `import pyfuse3` now fails as if not installed
    for argv in (["mount", "127.0.0.1:5000/x", str(tmp_path)], ["snapshotter", "--root", str(tmp_path / "sn")]):
        code = lazybuild.cli.main(argv)
        err = capsys.readouterr().err
        assert code == 5, err
        assert err.startswith(f"lazybuild: error: lazybuild {argv[0]}") and "pyfuse3" in err
        assert "pip install 'lazybuild[mount]'" in err and "Traceback" not in err
    # `lazybuild build` mounts its bases through the mounter's API, which checks before it forks its child
    from lazybuild import mounter

    with pytest.raises(errors.MissingExtra, match="pyfuse3"):
        mounter.mount_image("127.0.0.1:9/x", str(tmp_path), mounter.MountOptions())
    # deeper down (a module that imports pyfuse3 or trio on its own): the boundary says the same
    code, _, err = _run_raising(monkeypatch, capsys, ModuleNotFoundError("No module named 'trio'", name="trio"))
    assert code == 5 and "pip install 'lazybuild[mount]'" in err and "Traceback" not in err


# --- Real user errors through the installed console script. ---

def _error_and_hint(p) -> tuple[str, str]:
    lines = p.stderr.splitlines()
    assert "Traceback" not in p.stderr and lines[0].startswith("lazybuild: error: "), p.stderr
    assert len(lines) == 2 and lines[1].startswith("lazybuild: hint: "), p.stderr
    return lines[0], lines[1]


def test_usage_errors_exit_2(tmp_path):
    p = run("mount", "127.0.0.1:5000/x", ok=False)
    assert p.returncode == 2 and "mount needs REF and DIR" in _error_and_hint(p)[0]
    p = run("build", "-o", "type=nonsense", str(tmp_path), ok=False)
    error, hint = _error_and_hint(p)
    assert p.returncode == 2 and "type=nonsense" in error and "lazybuild build --help" in hint
    p = run("build", "--secret", "id=x", str(tmp_path), ok=False)
    assert p.returncode == 2 and "--secret" in _error_and_hint(p)[0]


def test_input_errors_exit_1(tmp_path, layer_tar):
    p = run("inspect", "Not/A/Reference", ok=False)
    assert p.returncode == 1 and "must be lowercase" in _error_and_hint(p)[0]
    p = run("pull", "127.0.0.1:5000/x", "oci:" + str(tmp_path / "o"), "--platform", "linux", ok=False)
    assert p.returncode == 1 and "os/arch" in _error_and_hint(p)[0]
    (tmp_path / "Dockerfile").write_text("FROM scratch\nFROBNICATE now\n")
    p = run("inspect-dockerfile", str(tmp_path), ok=False)
    error, hint = _error_and_hint(p)
    assert p.returncode == 1 and "Dockerfile:2" in error and "inspect-dockerfile" in hint
    p = run("layer", "convert", layer_tar, str(tmp_path / "o.blob"), "--level", "99", ok=False)
    assert p.returncode == 1 and "level 99" in _error_and_hint(p)[0] and not (tmp_path / "o.blob").exists()
    for name, content in (("record", b'{"layer": 0}\n'), ("latin1", b"caf\xe9\n")):
        (tmp_path / name).write_bytes(content)
        p = run("layer", "convert", layer_tar, str(tmp_path / "o.blob"), "--estargz-record-in", str(tmp_path / name),
                ok=False)
        assert p.returncode == 1 and str(tmp_path / name) in _error_and_hint(p)[0]


def test_an_unreachable_registry_exits_3():
    p = run("inspect", "127.0.0.1:9/x", ok=False)  # the discard port: nothing listens there
    error, hint = _error_and_hint(p)
    assert p.returncode == 3 and "127.0.0.1:9" in error and "--insecure" in hint


def test_the_command_line_starts_without_the_components():
    """`lazybuild` builds its parser without importing the builder, exporter, profiles or registry client:
    a command imports its component when it runs (the snapshotter's restart and `--help` stay fast)."""
    heavy = ("httpx", "lazybuild.builder.executor", "lazybuild.exporter.assemble", "lazybuild.dockerfile.model",
             "lazybuild.profiles", "pyfuse3", "grpc")
    code = ("import sys, lazybuild.cli as c; c.build_parser(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
