"""`RUN --mount=type=ssh`: an SSH agent of the host (`--ssh ID=SOCKET`) offered to one RUN step.

The step does not get the host's socket itself: it gets a socket of its own, owned by the mount's uid/gid with
its mode (as BuildKit's), and each connection to it is relayed to the host's agent, byte for byte. The agent
signs with its keys; the keys never enter the step. The relay lives as long as the step."""

from __future__ import annotations

import os
import socket
import stat
import threading

from lazybuild.errors import InputError

CHUNK = 64 << 10


class SshError(InputError):
    hint = ("give --ssh default (the agent of $SSH_AUTH_SOCK) or --ssh ID=SOCKET; start one with "
            "`eval $(ssh-agent)` and `ssh-add KEY`")


def parse_ssh(items: list[str], environ=os.environ) -> dict[str, str]:
    """`--ssh default|ID[=SOCKET]` -> {id: agent socket path}. An ID alone is $SSH_AUTH_SOCK, as buildx reads it."""
    out: dict[str, str] = {}
    for item in items:
        sid, eq, path = item.partition("=")
        if not sid or "," in sid:
            raise SshError(f"--ssh {item!r}: want default, ID or ID=SOCKET")
        if not eq:
            path = environ.get("SSH_AUTH_SOCK", "")
            if not path:
                raise SshError(f"--ssh {item}: $SSH_AUTH_SOCK is not set (no agent to forward)")
        if "," in path:
            raise SshError(f"--ssh {item}: several key files are not supported; add them to an agent and "
                           "give its socket")
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise SshError(f"--ssh {item}: {path}: {e.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise SshError(f"--ssh {item}: {path} is not an agent socket (a key file is not supported: "
                           "ssh-add it to an agent and give the agent's socket)")
        out[sid] = path
    return out


class AgentRelay:
    """A socket at PATH (uid, gid, mode) whose connections are relayed to the agent at UPSTREAM."""

    def __init__(self, upstream: str, path: str, uid: int, gid: int, mode: int):
        self.upstream = upstream
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        self.listener.listen(16)
        self.closed = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="ssh-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                agent.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed:
                    client.close()
                    agent.close()
                    return
                self.conns += [client, agent]
            threading.Thread(target=_pump, args=(client, agent), daemon=True).start()
            threading.Thread(target=_pump, args=(agent, client), daemon=True).start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns, self.conns = self.conns, []
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
