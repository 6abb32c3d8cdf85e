"""The frontend process BuildKit runs: read options, read the Dockerfile, answer with LLB and config.

Flow: Ping (caps) -> Dockerfile from the `dockerfile` local (or an input / URL context) -> parse ->
ResolveImageConfig for each base image -> parse again with the base configs -> LLB -> Solve -> Return
{ref, containerimage.config}. Any failure is returned as the build's error, never printed to stdout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .convert import BuildOptions, ConvertError, Converter, normalize_image
from lazybuild.dockerfile import model
from lazybuild.dockerfile.dockerignore import read_patterns
from lazybuild.dockerfile.parser import DockerfileError, parse
from lazybuild.dockerfile.shell import ShellLex
from lazybuild.errors import RemoteError
from lazybuild.registry.reference import Reference

from . import subrequests
from .gateway import Bridge, GatewayError
from .llb import builder as llb
from .llb.builder import State
from .llb.proto import gateway_pb2 as gw
from .llb.proto import ops_pb2 as pb

# google.rpc codes
INVALID_ARGUMENT, UNKNOWN, UNIMPLEMENTED = 3, 2, 12
EXPORTER_ARGS = ["/opt/lazybuild/bin/python3", "-m", "lazybuild.exporter.buildkit", "--states", "/lazybuild/states",
                 "--meta", "/lazybuild/meta/export.json", "--out", "/out"]


class Unsupported(RemoteError):
    """A request this frontend does not implement (answered with gRPC Unimplemented)."""


@dataclass
class Options:
    """BUILDKIT_FRONTEND_OPT_* after parsing, plus the session and workers."""

    raw: dict[str, str] = field(default_factory=dict)
    session_id: str = ""

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> "Options":
        raw = {}
        for k, v in environ.items():
            if k.startswith("BUILDKIT_FRONTEND_OPT_"):
                key, _, value = v.partition("=")
                raw[key] = value
        return cls(raw, environ.get("BUILDKIT_SESSION_ID", ""))

    def get(self, key: str, default: str = "") -> str:
        return self.raw.get(key, default)

    def prefixed(self, prefix: str) -> dict[str, str]:
        return {k[len(prefix):]: v for k, v in self.raw.items() if k.startswith(prefix)}

    @property
    def filename(self) -> str:
        return self.get("filename") or "Dockerfile"

    @property
    def build_args(self) -> dict[str, str]:
        return self.prefixed("build-arg:")

    @property
    def platforms(self) -> list[str]:
        return [p.strip() for p in self.get("platform").split(",") if p.strip()]


def platform_string(p: pb.Platform) -> str:
    return "/".join(x for x in (p.OS, p.Architecture, p.Variant) if x)


def parse_platform(text: str) -> pb.Platform:
    parts = text.strip().lower().split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DockerfileError(f"invalid platform {text!r}: want os/arch[/variant]", 0, 0)
    arch, variant = parts[1], parts[2] if len(parts) > 2 else ""
    arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    if arch == "arm64" and variant == "v8":
        variant = ""
    return pb.Platform(OS=parts[0], Architecture=arch, Variant=variant)


class Frontend:
    def __init__(self, bridge: Bridge, opts: Options):
        self.bridge, self.opts = bridge, opts
        self.caps = bridge.ping()
        self.inputs = {k: llb.from_definition(v) for k, v in bridge.inputs().items()}
        self.base_digests: dict[str, str] = {}

    # ---- the Dockerfile and its context
    def local(self, name: str, hint: str, follow: list[str] | None = None, custom: str = "") -> State:
        return llb.local(name, session_id=self.opts.session_id, shared_key_hint=hint, follow_paths=follow,
                         info=llb.Info(custom))

    def url_context(self, url: str) -> State:
        """A context given as a URL: a git repository, or a (tar) file over HTTP that is unpacked."""
        if url.startswith("git://") or url.startswith("git@") or url.split("#")[0].endswith(".git"):
            remote, _, frag = url.partition("#")
            return llb.git(remote.split("://", 1)[-1], frag, full_url=remote)
        # Docker's API upload (http://build-context-ID) can be fetched once: this op must be the very
        # vertex the built-in frontend already solved (same bytes: filename attr, empty constraints).
        download = llb.http(url, filename="context")
        return llb.scratch().file(llb.Copy(download, "/context", "/", unpack_archive=True))

    def context_and_dockerfile(self) -> tuple[State | None, State, str]:
        """(the build context if not the session's local, the state holding the Dockerfile, its path)."""
        fname = self.opts.filename
        sub = self.opts.get("contextsubdir")
        context = self.inputs.get(self.opts.get("contextkey") or "context")
        url = self.opts.get("context")
        if context is None and url and ("://" in url or url.startswith("git@")):
            context = self.url_context(url)
        if context is not None and sub:
            context = subdir(context, sub)
        if "dockerfile" in self.inputs:
            return context, self.inputs["dockerfile"], fname
        if context is not None and url:
            return context, context, fname
        df = self.local(self.opts.get("dockerfilekey") or "dockerfile", "dockerfile",
                        [fname, fname + ".dockerignore"], f"[internal] load build definition from {fname}")
        return context, df, fname

    def read(self, state: State, path: str, what: str) -> bytes | None:
        return self.read_ref(self.bridge.solve(llb.definition(state), what=what), path)

    def read_ref(self, ref: str, path: str) -> bytes | None:
        try:
            return self.bridge.read_file(ref, path)
        except GatewayError:
            return None

    def context_dockerignore(self, context: State | None) -> bytes | None:
        src = context if context is not None else self.local(
            "context", "context-.dockerignore", [".dockerignore"], "[internal] load .dockerignore")
        return self.read(src, ".dockerignore", "load .dockerignore")

    # ---- the build
    def run(self) -> gw.Result:
        request = self.opts.get("requestid")  # buildx --print / --call: outline, targets, describe
        try:
            subrequests.check_frontend_caps(self.opts.get("frontend.caps"))
            if request and not subrequests.needs_dockerfile(request):
                return answer(subrequests.describe())
        except subrequests.UnsupportedRequest as e:
            raise Unsupported(str(e)) from None
        source_date_epoch(self.opts.build_args)  # refused before anything is solved
        context, df_state, fname = self.context_and_dockerfile()
        # The Dockerfile, its own .dockerignore and the context's are read at once: each is a round
        # trip to the client, and this runs on every build.
        df_ref = self.bridge.solve(llb.definition(df_state), what="load Dockerfile")
        with ThreadPoolExecutor(3) as pool:
            text_f = pool.submit(self.read_ref, df_ref, fname)
            own_ignore_f = pool.submit(self.read_ref, df_ref, fname + ".dockerignore")
            ctx_ignore_f = pool.submit(self.context_dockerignore, context)
            text, ignore = text_f.result(), own_ignore_f.result()
            if ignore is None:
                ignore = ctx_ignore_f.result()
        if text is None and fname == "Dockerfile":
            text = self.read_ref(df_ref, "dockerfile")
        if text is None:
            raise DockerfileError(f"failed to read {fname}: no such file in the Dockerfile's directory", 0, 0, fname)
        text = text.decode("utf-8", errors="replace")
        if request == subrequests.TARGETS:
            return answer(subrequests.targets(text, fname))
        if request == subrequests.OUTLINE:
            platform = platform_string(self.caps.default_platform or pb.Platform(OS="linux", Architecture="amd64"))
            build = model.load(text, filename=fname, build_args=self.opts.build_args, target=self.opts.get("target"),
                               platform=platform, build_platform=platform)
            return answer(subrequests.outline(text, fname, build))
        if "gateway.warnings" in self.caps.frontend:
            self.warn_lint(text, fname, df_state)
        excludes = read_patterns(ignore.decode("utf-8", errors="replace")) if ignore else []

        worker = self.caps.default_platform or pb.Platform(OS="linux", Architecture="amd64")
        targets = [parse_platform(p) for p in self.opts.platforms] or [worker]
        results = {}
        for plat in targets:
            results[platform_string(plat)] = self.build_platform(text, fname, plat, worker, context, excludes)

        if len(results) == 1 and not self.opts.get("multi-platform") and \
                self.opts.build_args.get("BUILDKIT_MULTI_PLATFORM", "") not in ("1", "true"):
            (ref, config), = results.values()
            res = gw.Result(ref=gw.Ref(id=ref))
            res.metadata["containerimage.config"] = json.dumps(config).encode()
            return res
        if "returnmap" not in self.caps.frontend:
            raise DockerfileError("several platforms need a BuildKit that returns a map of results", 0, 0, fname)
        res = gw.Result(refs=gw.RefMap())
        platforms = []
        for pid, (ref, config) in results.items():
            res.refs.refs[pid].id = ref
            res.metadata[f"containerimage.config/{pid}"] = json.dumps(config).encode()
            p = parse_platform(pid)
            platforms.append({"ID": pid, "Platform": {"architecture": p.Architecture, "os": p.OS,
                                                      **({"variant": p.Variant} if p.Variant else {})}})
        res.metadata["refs.platforms"] = json.dumps({"Platforms": platforms}).encode()
        return res

    def warn_lint(self, text: str, fname: str, df_state: State) -> None:
        """The parser's warnings, shown by the daemon with the build (BuildKit >= v0.11), each pointing at
        its lines of the Dockerfile as the vertex that loaded it."""
        warnings = parse(text, fname).warnings
        if not warnings:
            return
        definition = llb.definition(df_state)
        vertex = pb.Op.FromString(getattr(definition, "def")[-1]).inputs[0].digest
        info = pb.SourceInfo(filename=fname, data=text.encode(), definition=definition)
        for w in warnings:
            self.bridge.warn(vertex, w.short, [w.detail], w.url, info, (w.line, w.line))

    def build_platform(self, text: str, fname: str, plat: pb.Platform, worker: pb.Platform,
                       context: State | None, excludes: list[str]) -> tuple[str, dict]:
        kwargs = dict(filename=fname, build_args=self.opts.build_args, target=self.opts.get("target"),
                      platform=platform_string(plat), build_platform=platform_string(worker))
        first = model.load(text, **kwargs)
        named = self.named_contexts()
        base_configs = {}
        stage_platforms = {}
        for st in first.stages:
            stage_platforms[st.index] = parse_platform(st.platform) if st.platform else plat
            if st.base_stage is None and st.base != "scratch" and st.base not in base_configs and st.base not in named:
                try:
                    digest, config = self.bridge.resolve_image_config(
                        normalize_image(st.base), stage_platforms[st.index], self.opts.get("image-resolve-mode") or "default",
                        self.opts.session_id)
                except GatewayError as e:
                    raise DockerfileError(f"base image {st.base!r}: {e}", st.line, st.line, fname) from None
                base_configs[st.base] = config
                self.base_digests[st.base] = digest  # empty for images only in Docker's local store
        build = model.load(text, base_configs=base_configs, **kwargs)
        for st in build.stages:
            stage_platforms.setdefault(st.index, parse_platform(st.platform) if st.platform else plat)

        no_cache = None
        if "no-cache" in self.opts.raw:
            no_cache = {s for s in self.opts.get("no-cache").split(",") if s}
        bopts = BuildOptions(
            session_id=self.opts.session_id, image_resolve_mode=self.opts.get("image-resolve-mode") or "default",
            force_network_mode=self.opts.get("force-network-mode"), no_cache=no_cache,
            extra_hosts=[tuple(h.split("=", 1)) for h in self.opts.get("add-hosts").split(",") if "=" in h],
            cache_ns=self.opts.build_args.get("BUILDKIT_CACHE_MOUNT_NS", ""), excludes=excludes,
            context=context, named_contexts=named, context_name=self.opts.get("contextkey") or "context")
        conv = Converter(build, self.caps, bopts, stage_platforms, ShellLex(build.escape_token), fname)
        states = conv.convert()
        final = states[build.target.index]
        target_plat = stage_platforms[build.target.index]
        output = self.opts.get("output") or self.opts.build_args.get("LAZYBUILD_OUTPUT", "")
        if output == "stargz":
            final = self.stargz_export(conv, build, target_plat, worker)
        elif output:
            raise DockerfileError(f"LAZYBUILD_OUTPUT={output}: the only other output is stargz", 0, 0, fname)
        cache_imports = [{"Type": "registry", "Attrs": {"ref": r}} for r in self.opts.get("cache-from").split(",") if r]
        ref = self.bridge.solve(llb.definition(final), cache_imports=cache_imports, what="build")
        return ref, image_config(build, target_plat, self.opts.prefixed("label:"), source_date_epoch(self.opts.build_args))

    def stargz_export(self, conv: Converter, build: model.Build, plat: pb.Platform, worker: pb.Platform) -> State:
        """Append the export step: our exporter, run from this frontend's own image, reads the target
        stage's states (one read-only mount per layer step) and writes an OCI layout of eStargz layers to
        its output mount, which becomes the build's result (`docker build --output type=local|tar`)."""
        source = self.opts.get("source")
        if not source:
            raise Unsupported("LAZYBUILD_OUTPUT=stargz needs the frontend to run from its image (# syntax=)")
        for cap in ("exec.mount.bind", "exec.mount.selector", "exec.meta.network"):
            conv.require(cap, "LAZYBUILD_OUTPUT=stargz", 0)
        chain = conv.chain(build.target.index)
        args = self.opts.build_args
        epoch = source_date_epoch(args)
        meta = {"states": len(chain), "baseEmpty": chain[0].is_scratch,
                "config": image_config(build, plat, self.opts.prefixed("label:"), epoch),
                "compression": args.get("LAZYBUILD_COMPRESSION", "gzip"), "tag": "latest"}
        if meta["compression"] not in ("gzip", "zstd"):
            raise DockerfileError(f"LAZYBUILD_COMPRESSION={meta['compression']}: want gzip or zstd", 0, 0)
        if epoch is not None:
            meta["sourceDateEpoch"] = epoch
        # A base image in a registry (the daemon resolved it to a digest) keeps its own layers, read by
        # digest in the export step: eStargz ones as they are, others converted to eStargz one by one
        # unless LAZYBUILD_CONVERT_BASE=0. A base with no registry digest becomes one eStargz layer made
        # from its state.
        root = build.target
        while root.base_stage is not None:
            root = next(s for s in build.stages if s.index == root.base_stage)
        digest = self.base_digests.get(root.base, "")
        from_registry = not chain[0].is_scratch and bool(digest)
        if from_registry:
            r = Reference.parse(root.base)
            meta["base"] = {"repository": f"{r.host}/{r.repository}", "digest": digest, "platform": platform_string(plat),
                            "convert": flag(args, "LAZYBUILD_CONVERT_BASE", True)}
        optimize = optimize_settings(args)
        if optimize is not None:
            conv.require("exec.meta.security", "LAZYBUILD_OPTIMIZE", 0)
            meta["optimize"] = optimize
        # With DiffOp the exporter visits only what each step changed instead of walking both trees.
        diffs = conv.caps.has("diffop")
        if diffs:
            meta["diffs"] = "/lazybuild/diffs"
        # The prioritized files' mount has always been the op's first input, then the exporter's root.
        mounts: list[llb.Mount] = []
        prio = args.get("LAZYBUILD_PRIORITIZED_FILES", "")
        if prio:
            rel = prio.lstrip("/")
            ctx = self.local(self.opts.get("contextkey") or "context", "context-prioritized", [rel],
                             f"[internal] load {rel}")
            mounts.append(llb.Bind("/lazybuild/context", ctx, readonly=True))
            meta["prioritized"] = "/lazybuild/context/" + rel
        settings = llb.scratch().file(llb.Mkfile("/export.json", json.dumps(meta).encode(), mode=0o644),
                                      info=llb.Info("[lazybuild] export settings"))
        mounts += [llb.ROOT, llb.Bind("/lazybuild/meta", settings, readonly=True)]
        mounts += [llb.Bind(f"/lazybuild/states/{i}", state, readonly=True) for i, state in enumerate(chain)
                   if not state.is_scratch]
        if diffs:
            mounts += [llb.Bind(f"/lazybuild/diffs/{i}", llb.diff(chain[i - 1], state), readonly=True)
                       for i, state in enumerate(chain) if i > 0 and not chain[i - 1].is_scratch]
        mounts.append(llb.Bind("/out", output=True))  # the layout: the build's result
        exporter = llb.image(normalize_image(source), platform=worker)
        # Recording the workload's reads takes fanotify, which needs CAP_SYS_ADMIN: the security.insecure
        # entitlement.
        export = exporter.run(EXPORTER_ARGS, env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                              mounts=mounts, platform=worker, info=llb.Info("[lazybuild] export optimized eStargz image layout"),
                              network="host" if from_registry else "none",  # the base's registry is reached from the host
                              insecure=optimize is not None)
        result = export.mount_output("/out")
        if optimize is not None:
            # Solved here rather than after Return, so a daemon that does not grant the entitlement
            # gets an answer that says what to do.
            try:
                self.bridge.solve(llb.definition(result), evaluate=True, what="export with LAZYBUILD_OPTIMIZE")
            except GatewayError as e:
                if "security.insecure" in str(e) or "entitlement" in str(e):
                    raise DockerfileError(
                        "LAZYBUILD_OPTIMIZE runs the workload under fanotify, which needs the security.insecure "
                        "entitlement: allow it on the daemon (dockerd: \"builder\": {\"entitlements\": "
                        "{\"security-insecure\": true}}; buildkitd --allow-insecure-entitlement security.insecure) "
                        "and in the build (buildx build --allow security.insecure, buildctl build --allow "
                        "security.insecure; Docker 20.10's classic docker build cannot ask for it); "
                        f"the daemon said: {e}", 0, 0) from None
                raise
        return result

    def named_contexts(self) -> dict[str, State]:
        out = {}
        for name, value in self.opts.prefixed("context:").items():
            name = name.split("::")[0]
            if value.startswith("docker-image://"):
                out[name] = llb.image(normalize_image(value[len("docker-image://"):]))
            elif value.startswith("local:"):
                out[name] = self.local(value[len("local:"):], value[len("local:"):], None)
            elif value.startswith("input:"):
                if value[len("input:"):] not in self.inputs:
                    raise DockerfileError(f"named context {name}: no input {value[6:]!r}", 0, 0)
                out[name] = self.inputs[value[len("input:"):]]
            elif value.startswith(("http://", "https://", "git://", "git@")):
                out[name] = self.url_context(value)
            else:
                raise Unsupported(f"named context {name}={value}: the lazybuild frontend takes docker-image://, "
                                  "local:, input:, git and http(s) contexts")
        return out


def flag(args: dict[str, str], name: str, default: bool) -> bool:
    """A boolean build arg: 1/true/yes/on or 0/false/no/off; anything else is refused."""
    value = args.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise DockerfileError(f"{name}={args[name]}: want 1 or 0 (true/false)", 0, 0)


def optimize_settings(args: dict[str, str]) -> dict | None:
    """LAZYBUILD_OPTIMIZE=1 (the image's ENTRYPOINT/CMD) or LAZYBUILD_OPTIMIZE_CMD (a JSON array, or a
    shell command) for LAZYBUILD_OPTIMIZE_PERIOD seconds (default 10): the export step's workload run."""
    cmd_text = args.get("LAZYBUILD_OPTIMIZE_CMD", "").strip()
    if not cmd_text and not flag(args, "LAZYBUILD_OPTIMIZE", False):
        return None
    cmd: list[str] = []
    if cmd_text.startswith("["):
        try:
            cmd = json.loads(cmd_text)
        except ValueError as e:
            raise DockerfileError(f"LAZYBUILD_OPTIMIZE_CMD: not a JSON array of strings ({e})", 0, 0) from None
        if not cmd or not all(isinstance(a, str) for a in cmd):
            raise DockerfileError("LAZYBUILD_OPTIMIZE_CMD: want a non-empty JSON array of strings", 0, 0)
    elif cmd_text:
        cmd = ["/bin/sh", "-c", cmd_text]
    period_text = args.get("LAZYBUILD_OPTIMIZE_PERIOD", "10")
    try:
        period = float(period_text)
    except ValueError:
        period = -1.0
    if not 0 < period <= 3600:
        raise DockerfileError(f"LAZYBUILD_OPTIMIZE_PERIOD={period_text}: want seconds, more than 0 and at most 3600", 0, 0)
    return {"cmd": cmd, "period": period}


def answer(a: subrequests.Answer) -> gw.Result:
    """A sub-request's answer: metadata only, no filesystem."""
    res = gw.Result()
    for key, value in a.metadata().items():
        res.metadata[key] = value
    return res


def subdir(state: State, sub: str) -> State:
    return llb.scratch().file(llb.Copy(state, "/" + sub.strip("/"), "/", follow_symlinks=True, copy_dir_contents=True))


def source_date_epoch(args: dict[str, str]) -> int | None:
    """The SOURCE_DATE_EPOCH build arg (seconds since 1970), as BuildKit v0.11's frontend reads it."""
    text = args.get("SOURCE_DATE_EPOCH", "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DockerfileError(f"invalid SOURCE_DATE_EPOCH: {text} (want seconds since 1970-01-01 UTC)", 0, 0) from None


def clamp_times(history: list[dict], epoch: int) -> list[dict]:
    """History at SOURCE_DATE_EPOCH, as BuildKit v0.11's frontend writes it: this build's entries are created
    then, and a base image's entries created later (or never said) are moved back to it."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for h in history:
        created = h.get("created")
        try:
            later = created is None or datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() > epoch
        except (TypeError, ValueError):
            later = True  # a base image's unreadable time says nothing: the epoch does
        out.append(dict(h, created=stamp) if later else dict(h))
    return out


def image_config(build: model.Build, plat: pb.Platform, labels: dict[str, str], epoch: int | None = None) -> dict:
    """The image config BuildKit's frontend returns: the target stage's config and history, the target
    platform, and the `label:` options merged into Labels; history times at SOURCE_DATE_EPOCH if given."""
    config = dict(build.target.config)
    if labels:
        config["Labels"] = {**(config.get("Labels") or {}), **labels}
    image = {"architecture": plat.Architecture, "os": plat.OS}
    if plat.Variant:
        image["variant"] = plat.Variant
    history = list(build.target.history)
    if epoch is not None:
        history = clamp_times(history, epoch)
    image.update({"config": config, "rootfs": {"type": "layers", "diff_ids": []}, "history": history})
    return image


def main() -> int:
    bridge = Bridge.from_stdio()
    try:
        frontend = Frontend(bridge, Options.from_env(dict(os.environ)))
        result = frontend.run()
    except (DockerfileError, ConvertError) as e:
        bridge.return_error(INVALID_ARGUMENT, str(e))
        return 0
    except Unsupported as e:
        bridge.return_error(UNIMPLEMENTED, f"lazybuild frontend: {e}")
        return 0
    except GatewayError as e:
        bridge.return_error(UNKNOWN, f"lazybuild frontend: {e}")
        return 0
    except Exception as e:  # a bug of ours: the user sees its summary, the daemon log the traceback
        traceback.print_exc(file=sys.stderr)
        bridge.return_error(UNKNOWN, f"lazybuild frontend: internal error: {type(e).__name__}: {e}")
        return 0
    bridge.return_result(result)
    return 0
