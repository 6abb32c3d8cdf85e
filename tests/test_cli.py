"""`lazybuild layer ...` as users and other parts script it: the installed console script, end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import tarcases

LAZYBUILD = shutil.which("lazybuild")


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
    res = json.loads(run("layer", "convert", layer_tar, str(out), "--chunk-size", "4KiB",
                         *(["--zstd"] if zstd else [])).stdout)
    assert set(res) >= {"digest", "size", "tocDigest", "diffID", "uncompressedSize", "mediaType"}
    assert res["mediaType"].endswith("+zstd" if zstd else "+gzip") and res["size"] == out.stat().st_size
    assert os.listdir(tmp_path) == ["layer.blob"]

    v = run("layer", "verify", str(out), "--toc-digest", res["tocDigest"])
    assert v.stdout.startswith("ok: ") and res["tocDigest"] in v.stdout

    listing = run("layer", "ls", str(out)).stdout.splitlines()
    assert any(line.endswith("etc/sl -> hello.txt") for line in listing)
    assert any(line.startswith("crw-rw-rw-") and line.endswith("dev/null") for line in listing)
    entries = [json.loads(line) for line in run("layer", "ls", "--json", "--chunks", str(out)).stdout.splitlines()]
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
        res = json.loads(run("layer", "convert", "-", str(tmp_path / "o"), "--prioritized-files", str(record),
                             stdin=f).stdout)
    order = [json.loads(line)["path"] for line in run("layer", "ls", "--json", str(tmp_path / "o")).stdout.splitlines()]
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
