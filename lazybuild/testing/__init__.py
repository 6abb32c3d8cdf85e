"""Local services for tests, benches and examples.

Nothing here is used by lazybuild itself: these are the stand-ins a test, a bench or an example starts
on this machine, each private to its caller (its own work directory, loopback ports, its own sockets)
so that none of them touches a system service.

- `registry`: Debian's docker-registry (distribution v2) on 127.0.0.1 (`RegistryProcess`), plain HTTP,
  TLS (`make_tls`) + htpasswd (`make_htpasswd`) basic auth, or token auth; `docker_config` writes the
  credentials as `docker login` would.
- `images`: a Debian root filesystem from debootstrap, cached in /var/cache/lazybuild-test
  (`debootstrap_rootfs`), and `docker save`-style archives from layer tars (`docker_archive`).
- `dockerd`: a private Docker 20.10 daemon (BuildKit v0.8 inside, `--bridge=none`, its own data and
  exec roots and socket: `Dockerd`), started with the Debian base image imported (`start_with_base`,
  `BASE_IMAGE`), and the frontend image pushed to a registry (`push_frontend_image`, from a checkout).
- `procs`: `stop_process`, SIGTERM then SIGKILL.

They need what scripts/setup.sh installs (docker-registry, openssl, apache2-utils, debootstrap,
docker.io) and, for the daemons, root. Only the standard library and lazybuild's core are imported.
"""
