"""`--ssh` (builder/ssh_forward.py): what the flag takes, and a real ssh-agent relayed through a socket of the
step's own (owner and mode as the mount says), answering the agent protocol through it."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest

from lazybuild.builder.ssh_forward import AgentRelay, SshError, parse_ssh


@pytest.fixture
def agent(tmp_path):
    """ssh-agent in the foreground on a socket, holding one new ed25519 key."""
    sock = str(tmp_path / "agent.sock")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock) and time.time() < deadline:
        time.sleep(0.05)
    key = str(tmp_path / "id")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    subprocess.run(["ssh-add", "-q", key], env={**os.environ, "SSH_AUTH_SOCK": sock}, check=True,
                   capture_output=True)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)


def identities(path: str) -> int:
    """SSH2_AGENTC_REQUEST_IDENTITIES (11) -> SSH2_AGENT_IDENTITIES_ANSWER (12) with its key count."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(struct.pack(">IB", 1, 11))
        length, kind = struct.unpack(">IB", s.recv(5))
        assert kind == 12
        return struct.unpack(">I", s.recv(4))[0]


def test_parse(agent, tmp_path):
    assert parse_ssh(["default"], {"SSH_AUTH_SOCK": agent}) == {"default": agent}
    assert parse_ssh(["git=" + agent, "other"], {"SSH_AUTH_SOCK": agent}) == {"git": agent, "other": agent}
    (tmp_path / "key").write_text("not a socket")
    for items, env, message in ((["default"], {}, "$SSH_AUTH_SOCK is not set"),
                                ([f"k={tmp_path / 'key'}"], {}, "is not an agent socket (a key file is not supported"),
                                ([f"k={tmp_path / 'none'}"], {}, "No such file or directory"),
                                ([f"k={agent},{agent}"], {}, "several key files are not supported"),
                                (["=x"], {}, "want default, ID or ID=SOCKET")):
        with pytest.raises(SshError) as e:
            parse_ssh(items, env)
        assert message in str(e.value)


def test_relay(agent, tmp_path):
    path = str(tmp_path / "relay.sock")
    relay = AgentRelay(agent, path, 1000, 1001, 0o600)
    try:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1001, 0o600)
        assert identities(path) == 1
        assert identities(path) == 1  # each connection relayed on its own
    finally:
        relay.close()
    with pytest.raises(OSError):
        identities(path)
