"""RUN steps of `lazybuild build` are confined as BuildKit confines them (issue 14).

Tried from inside (the spec and the seccomp profile as data: unit/test_runc_spec.py): real builds under
runc on the Debian test base (debootstrap, pushed to the local registry as eStargz): a probe step
reports what it can see and do, and steps that an attacker would write aim an image's /etc/passwd
and a RUN working directory at the host canary tree, which must come out untouched."""

from __future__ import annotations

import json
import platform
import subprocess

import pytest

from lazybuild.testing.images import debootstrap_rootfs, docker_archive
from support.cli_runner import lazybuild
from support.flatten import flatten_oci_tar

# Docker's 14 default capabilities as /proc/self/status shows them (bits 0 1 3 4 5 6 7 8 10 13 18 27 29 31).
DEFAULT_CAPS_MASK = "00000000a80425fb"

# Syscall numbers the probe calls directly (no wrapper in Python or in the base image's tools).
SYSCALLS = {
    "x86_64": {"keyctl": 250, "add_key": 248, "personality": 135, "clone3": 435},
    "aarch64": {"keyctl": 219, "add_key": 217, "personality": 92, "clone3": 435},
}

PROBE = r'''
import ctypes, errno, json, os, socket, subprocess, sys, threading

nr = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}

def call(name, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr[name], *[ctypes.c_long(a) for a in args])
    return errno.errorcode.get(ctypes.get_errno(), "?") if r == -1 else "ok"

status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
for key in ("Seccomp", "NoNewPrivs", "CapEff", "CapBnd", "CapPrm", "CapInh", "CapAmb"):
    out[key] = status[key].strip()

def run(*argv):
    p = subprocess.run(argv, capture_output=True, text=True)
    return [p.returncode, (p.stdout + p.stderr).strip()]

out["unshare_user"] = run("unshare", "--user", "true")
out["unshare_mount"] = run("unshare", "--mount", "true")
out["mount_tmpfs"] = run("mount", "-t", "tmpfs", "none", "/mnt")
out["keyctl"] = call("keyctl", 0, -3, 0)   # KEYCTL_GET_KEYRING_ID of the session keyring
out["add_key"] = call("add_key", 0, 0, 0, 0, 0)
out["clone3"] = call("clone3", 0, 0)
out["personality_query"] = call("personality", 0xFFFFFFFF)
out["personality_no_aslr"] = call("personality", 0x0040000)  # ADDR_NO_RANDOMIZE

def sock(family):
    try:
        socket.socket(family, socket.SOCK_STREAM if family != 38 else socket.SOCK_SEQPACKET).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "?")

out["socket_inet"] = sock(socket.AF_INET)
out["socket_unix"] = sock(socket.AF_UNIX)
out["socket_vsock"] = sock(40)
out["socket_alg"] = sock(38)

masked = {}
for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/acpi", "/proc/scsi",
             "/sys/firmware", "/sys/devices/virtual/powercap"):
    if not os.path.exists(path):
        masked[path] = "absent"
    elif os.path.isdir(path):
        masked[path] = "empty" if not os.listdir(path) else "listed: " + " ".join(sorted(os.listdir(path))[:5])
    else:
        with open(path, "rb") as f:
            masked[path] = "empty" if f.read(64) == b"" else "readable"
out["masked"] = masked

def write(path):
    try:
        with open(path, "w") as f:
            f.write("1\n")
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "?")

out["write_proc_sys"] = write("/proc/sys/kernel/domainname")
out["write_sys"] = write("/sys/kernel/uevent_helper")
out["mounts"] = [[line.split()[4], line.split()[5], line.split(" - ")[1].split()[0]]  # point, options, type
                 for line in open("/proc/self/mountinfo")]

# What BuildKit allows must still work: chown, device nodes, setuid, threads, chroot.
open("/tmp/f", "w").close()
os.chown("/tmp/f", 1234, 1234)
os.mknod("/tmp/null", 0o20666, os.makedev(1, 3))
out["chown_mknod"] = "ok"
out["setuid_child"] = run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "id", "-u")
t = threading.Thread(target=lambda: None)
t.start()
t.join()
out["chroot"] = run("chroot", "/", "true")
print("PROBE " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def base(registry, tmp_path_factory) -> str:
    """The Debian test base (lazybuild.testing.images' cached debootstrap tree) as eStargz."""
    d = tmp_path_factory.mktemp("confinement-base")
    archive = docker_archive([debootstrap_rootfs()], str(d / "base.tar"))
    ref = f"{registry.host}/confinement/base:1"
    lazybuild("convert", f"docker-archive:{archive}", ref)
    return ref


def build(tmp_path, dockerfile: str, *args: str, files: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (ctx / name).write_text(text)
    return subprocess.run(["lazybuild", "build", "--progress", "plain", "--no-cache", *args, str(ctx)],
                          capture_output=True, text=True, timeout=600)


def step_output(p: subprocess.CompletedProcess) -> list[str]:
    """What the RUN steps printed (the builder shows each line as `  | line`)."""
    return [line.split("  | ", 1)[1] for line in p.stderr.splitlines() if "  | " in line]


@pytest.fixture(scope="module")
def probe(base, tmp_path_factory) -> dict:
    machine = platform.machine()
    # lazybuild build has Docker's seccomp profile for these machines only (runtime/seccomp.py refuses others)
    assert machine in SYSCALLS, f"the probe knows syscall numbers for {sorted(SYSCALLS)} only, not {machine}"
    tmp = tmp_path_factory.mktemp("probe")
    p = build(tmp, f"FROM {base}\nCOPY probe.py /probe.py\nRUN python3 /probe.py '{json.dumps(SYSCALLS[machine])}'\n",
              files={"probe.py": PROBE})
    assert p.returncode == 0, p.stderr[-4000:]
    lines = [line for line in step_output(p) if line.startswith("PROBE ")]
    assert lines, p.stderr[-4000:]
    return json.loads(lines[-1][len("PROBE "):])


def test_seccomp_no_new_privileges_and_default_capabilities(probe):
    assert probe["Seccomp"] == "2"  # a filter
    assert probe["NoNewPrivs"] == "1"
    assert probe["CapEff"] == probe["CapBnd"] == probe["CapPrm"] == DEFAULT_CAPS_MASK
    assert probe["CapInh"] == probe["CapAmb"] == "0000000000000000"


def test_no_namespaces_or_mounts_of_its_own(probe):
    for key in ("unshare_user", "unshare_mount"):
        code, text = probe[key]
        assert code != 0 and "Operation not permitted" in text, (key, probe[key])
    code, text = probe["mount_tmpfs"]
    assert code != 0 and "permission denied" in text.lower(), text


def test_syscalls_docker_refuses_are_refused(probe):
    assert probe["keyctl"] == probe["add_key"] == "EPERM"
    assert probe["clone3"] == "ENOSYS"  # so that libc falls back to clone, whose flags the filter sees
    assert probe["personality_query"] == "ok" and probe["personality_no_aslr"] == "EPERM"
    assert probe["socket_inet"] == probe["socket_unix"] == "ok"
    assert probe["socket_vsock"] == probe["socket_alg"] == "EPERM"


def test_host_state_masked_and_kernel_settings_read_only(probe):
    for path, seen in probe["masked"].items():
        assert seen in ("absent", "empty"), (path, seen)
    assert probe["write_proc_sys"] == "EROFS"
    assert probe["write_sys"] in ("EROFS", "ENOENT")
    mounts = {point: options for point, options, _ in probe["mounts"]}
    assert "ro" in mounts["/sys"].split(",")
    cgroups = [(point, options) for point, options, kind in probe["mounts"] if kind in ("cgroup", "cgroup2")]
    assert cgroups and all("ro" in options.split(",") for _, options in cgroups), cgroups
    for point in ("/proc", "/dev/shm", "/dev/mqueue", "/etc/resolv.conf", "/etc/hosts"):
        assert {"nosuid", "nodev", "noexec"} <= set(mounts[point].split(",")), (point, mounts[point])


def test_what_buildkit_allows_still_works(probe):
    assert probe["chown_mknod"] == "ok"
    assert probe["setuid_child"] == [0, "65534"]
    assert probe["chroot"][0] == 0, probe["chroot"]


@pytest.mark.parametrize("user", ["someone", "root"])
def test_passwd_symlink_to_a_host_file_is_not_read(base, tmp_path, canary, user):
    """/etc/passwd -> the canary's secret (an absolute host path). Read on the host, the secret's
    `root:CANARY-SECRET:19000:...` line would make `USER root` uid 19000; in the image the link
    leads nowhere, so neither user exists."""
    p = build(tmp_path, f"FROM {base}\nRUN ln -sf {canary.secret} /etc/passwd\nUSER {user}\nRUN id -u\n")
    assert p.returncode != 0
    assert f"unable to find user {user}: no matching entries in /etc/passwd" in p.stderr, p.stderr[-3000:]
    assert "19000" not in p.stderr and "CANARY" not in p.stderr


def test_passwd_symlink_resolves_inside_the_image(base, tmp_path, canary):
    p = build(tmp_path, f"FROM {base}\n"
              "RUN mkdir /real && echo 'someone:x:4321:4322::/:/bin/sh' > /real/passwd"
              " && echo 'someone:x:4322:' > /real/group && echo 'extra:x:4323:someone' >> /real/group"
              " && ln -sf /real/passwd /etc/passwd && ln -sf /real/group /etc/group\n"
              "USER someone\nRUN echo \"ids $(id -u) $(id -g) $(id -G)\"\n")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ids 4321 4322 4322 4323" in step_output(p)


def test_oversized_passwd_is_refused_with_a_clear_error(base, tmp_path):
    p = build(tmp_path, f"FROM {base}\nRUN head -c 2000000 /dev/zero | tr '\\0' a > /etc/passwd\n"
              "USER someone\nRUN true\n")
    assert p.returncode != 0
    assert "cannot read /etc/passwd of the image: /etc/passwd is larger than 1048576 bytes" in p.stderr, \
        p.stderr[-3000:]


def test_run_cwd_under_a_symlink_to_the_host_is_made_in_the_image(base, tmp_path, canary):
    """WORKDIR made /app/sub/x; a step then turns /app/sub into a link to a host directory. The next
    step's working directory must be made (and used) inside the image, not in the host's directory."""
    out = tmp_path / "image.tar"
    p = build(tmp_path, f"FROM {base}\nWORKDIR /app/sub/x\n"
              f"RUN rm -rf /app/sub && ln -s {canary.writable_dir} /app/sub\n"
              "RUN echo \"cwd $(pwd -P)\" && touch made-here\n", "--output", f"type=oci,dest={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"cwd {canary.writable_dir}/x" in step_output(p)
    _, fs = flatten_oci_tar(str(out))
    inside = canary.writable_dir.lstrip("/")
    assert f"{inside}/x/made-here" in fs and "app/sub" in fs
