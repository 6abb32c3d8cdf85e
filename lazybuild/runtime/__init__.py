"""Running a step: the OCI runtime spec (runc.py) with its seccomp profile (seccomp.py), and overlayfs
(overlay.py). Core: the daemonless builder and the exporter's optimizer both run steps with it."""
