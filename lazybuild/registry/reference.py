"""Image references as Docker spells them: `[host[:port]/]repo[:tag][@digest]`, Docker Hub normalized."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..digest import check_digest
from ..errors import InputError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
# host[:port] as Docker's reference grammar has it (a DNS name or an IPv4, or [IPv6]): no userinfo, no
# spaces, nothing a URL would read as more than a host.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    host: str  # as written (docker.io for Docker Hub)
    repository: str
    tag: str = ""
    digest: str = ""

    def __post_init__(self):
        # A digest also arrives here from manifests and indexes (with_digest), and it becomes a URL path.
        if self.digest:
            check_digest(self.digest, f"digest of {self.host}/{self.repository}")

    @classmethod
    def parse(cls, text: str) -> "Reference":
        original = text
        digest = ""
        if "@" in text:
            text, digest = text.split("@", 1)
            check_digest(digest, f"reference {original!r}")  # InvalidDigest is a ValueError
        host, _, rest = text.partition("/")
        if not rest or ("." not in host and ":" not in host and host != "localhost"):
            host, rest = DOCKER_HUB, text  # Docker Hub: `ubuntu`, `library/ubuntu`, `user/image`
        tag = ""
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG_RE.fullmatch(tag):
                raise InputError(f"reference {original!r}: {tag!r} is not a valid tag")
        if not _HOST_RE.fullmatch(host):
            raise InputError(f"reference {original!r}: {host!r} is not a registry host (host[:port])")
        if host == DOCKER_HUB and "/" not in rest:
            rest = "library/" + rest
        if not _REPO_RE.fullmatch(rest):
            raise InputError(f"reference {original!r}: repository {rest!r} must be lowercase letters, digits, . _ - and /")
        if not tag and not digest:
            tag = "latest"
        return cls(host, rest, tag, digest)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def is_loopback(self) -> bool:
        name = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host[1:].split("]")[0]
        if name == "localhost":
            return True
        import ipaddress  # here, not at the top: the BuildKit frontend imports this module on every build

        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.host, self.repository, tag, "")

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.host, self.repository, self.tag, digest)

    @property
    def object(self) -> str:
        """What to ask the manifests endpoint for: the digest when pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        s = f"{self.host}/{self.repository}"
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s
