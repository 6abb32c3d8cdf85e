"""The daemonless builder: Dockerfile stages on lazily mounted images, RUN under runc on overlayfs."""
