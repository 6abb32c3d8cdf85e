"""The daemonless build: the steps of the Dockerfile model run on lazily mounted base images.

Each base image is mounted by the mounter (`mounter.mount_image`: one overlay lower dir per eStargz
layer, contents fetched on first read). Each step runs on an overlay whose lower dirs are the image's
layers and the earlier steps' upper dirs and whose upper dir is new: a RunStep under runc, CopySteps and
WorkdirSteps by us. A step's upper dir is its layer. The model has applied the Dockerfile's rules (argv
with heredocs, mount defaults, destinations); this only executes steps. Steps are cached by a key over
everything that decides their result (parent, step, files read), so an unchanged step is reused, as
BuildKit does.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

from lazybuild import inroot, mounter, profiles
from lazybuild.defaults import CACHE_DIR, STATE_DIR
from lazybuild.dockerfile import model
from lazybuild.dockerfile.dockerignore import DockerIgnore, read_patterns
from lazybuild.dockerfile.steps import (PIPES_DIR, BindMount, CacheMount, CopyStep, RunStep, SecretMount, SshMount,
                                        Step, TmpfsMount, WorkdirStep)
from lazybuild.errors import BuildFailure, InputError, LazybuildError
from lazybuild.image import Manifest, Platform
from lazybuild.registry import Reference, Registry
from lazybuild.runtime import runc
from lazybuild.runtime.overlay import mount_overlay, unmount
from lazybuild.timings import NoTimings, Timings

from . import filecopy
from .ssh_forward import AgentRelay

RUN_DIR = "/run/lazybuild/b"
STUB_PATHS = ("/etc/resolv.conf", "/etc/hosts", "/proc", "/sys", "/dev")


class BuildError(BuildFailure):
    """A build that cannot go on: names the Dockerfile line when there is one."""


@dataclass
class BuildOptions:
    context: str
    dockerfile: str = ""
    target: str = ""
    build_args: dict[str, str] = field(default_factory=dict)
    platform: str = ""
    no_cache: bool = False
    secrets: dict[str, str] = field(default_factory=dict)  # id -> file
    insecure: bool = False
    state_dir: str = STATE_DIR
    chunk_cache: str = CACHE_DIR
    network: str = "host"  # RUN steps without --network=: host or none (`lazybuild build --network`)
    labels: dict[str, str] = field(default_factory=dict)  # `--label`: over the Dockerfile's LABELs
    ssh: dict[str, str] = field(default_factory=dict)  # `--ssh`: agent id -> the host's agent socket
    record_base: str = ""  # append the base files RUN steps read here (NDJSON {path, layer})
    profile: str = "auto"  # build profiles: auto (use one found, save what was read), push (and push it), off


@dataclass
class Layer:
    """One layer of a stage: a lower dir for overlay, and where it came from.

    A base image's layer has no path until its image is mounted (`Builder.lowers`): a build whose
    steps are all cached never mounts anything."""

    path: str
    key: str  # the chain key of the stage state ending with this layer
    image: "BaseImage | None" = None  # set for a base image's layer
    index: int = 0  # its index in the image's manifest
    history: str = ""


@dataclass
class BaseImage:
    ref: Reference
    registry: Registry
    manifest: Manifest
    config: dict
    mountpoint: str = ""  # set once the mount serves
    mounted: "mounter.MountedImage | None" = None  # set when the mount starts
    mount_dir: str = ""
    mount_started: float = 0.0
    profile: "profiles.Profile | None" = None  # the build profile found for it (prefetched at mount)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids") or [])


@dataclass
class StageResult:
    stage: model.Stage
    layers: list[Layer]
    base: BaseImage | None
    key: str


@dataclass
class BuildResult:
    build: model.Build
    target: StageResult
    images: list[BaseImage]
    platform: Platform
    config: dict

    def bytes_fetched(self) -> dict:
        """Per base image: bytes fetched lazily and the image's compressed size."""
        out = {}
        for img in self.images:
            try:
                status = img.mounted.status() if img.mounted else {}
            except OSError:
                status = {}
            fetched = sum(layer.get("fetchedBytes", 0) for layer in status.get("layers", [])) if status else 0
            out[str(img.ref)] = {"fetched": fetched, "size": sum(d.size for d in img.manifest.layers)}
        return out


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def publish_step(tmp: str, final: str, record: dict) -> None:
    """Make the step finished in TMP the step cache's entry FINAL: its `done` marker (RECORD and the time),
    then a rename, replacing what FINAL held (a --no-cache rerun, or an unfinished step left by a failure)."""
    with open(os.path.join(tmp, "done"), "w") as f:
        json.dump({**record, "time": time.time()}, f)
    if os.path.exists(final):
        old = final + ".old-" + uuid.uuid4().hex[:6]
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)


def tree_digest(root: str, rel_paths: list[str], ignored=None) -> str:
    """A digest of what COPY would read: names, types, modes, owners, link targets and contents.

    Each path is resolved inside ROOT as COPY resolves it (a symlink source is followed, within the
    root), and .dockerignore is asked about the path really read."""
    h = hashlib.sha256()
    root = os.path.abspath(root)

    def add(path: str, rel: str) -> None:
        st = os.lstat(path)
        h.update(f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(path).encode())
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                child = os.path.join(path, name)
                real = os.path.relpath(child, root)
                if ignored is None or not ignored(real):
                    add(child, posixpath.join(rel, name) if rel else name)

    for rel in sorted(rel_paths):
        full = inroot.resolve(root, rel)
        real = os.path.relpath(full, root)
        if os.path.lexists(full) and (ignored is None or real == "." or not ignored(real)):
            add(full, rel)
    return h.hexdigest()


class Builder:
    def __init__(self, opts: BuildOptions, log=None, timings: Timings | None = None):
        self.opts = opts
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.timings = timings or NoTimings()
        self.id = uuid.uuid4().hex[:8]
        self.run_dir = os.path.join(RUN_DIR, self.id)
        self.steps_dir = os.path.join(opts.state_dir, "steps")
        self.cache_mounts = os.path.join(opts.state_dir, "cache-mounts")
        self.empty = os.path.join(opts.state_dir, "empty")
        self.empty2 = os.path.join(opts.state_dir, "empty2")
        self.mounts: list[str] = []  # everything we mounted, unmounted in reverse at the end
        self.images: dict[str, BaseImage] = {}
        self.views: dict[str, str] = {}
        self.step_keys: list[str] = []  # every step of this build, cached or run, in order (for --cache-to)
        self.relays: list[AgentRelay] = []  # the running step's ssh agent relays
        for d in (self.run_dir, self.steps_dir, self.cache_mounts, self.empty, self.empty2):
            os.makedirs(d, exist_ok=True)
        self.context = os.path.abspath(opts.context)
        dockerfile = os.path.abspath(opts.dockerfile or os.path.join(self.context, "Dockerfile"))
        self.dockerfile = dockerfile
        self.ignore = DockerIgnore(read_patterns(_dockerignore_text(self.context, dockerfile)))

    # ---- lifecycle
    def close(self) -> None:
        """Unmount everything this build mounted (steps, views, lazy images), even after a failure."""
        for img in self.images.values():
            if img.mounted:
                self._mount_timings(img)
        for mp in reversed(self.mounts):
            try:
                unmount(mp)
            except OSError as e:
                self.log(f"warning: {e}")
        self.mounts.clear()
        for img in self.images.values():
            if img.mounted:
                try:
                    img.mounted.close()
                except OSError as e:
                    self.log(f"warning: {e}")
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def ignored(self, rel: str) -> bool:
        return self.ignore.ignored(rel)

    def context_view(self, src: str) -> str:
        """SRC (a resolved path in the context) as BuildKit's context would show it: without the
        files .dockerignore leaves out. A tree that holds none is used as it is; otherwise a copy
        without them (hardlinks where the filesystem allows) is made for this build."""
        rel = os.path.relpath(src, self.context)
        if rel != "." and self.ignored(rel):
            raise BuildError(f"{rel}: excluded by .dockerignore")
        if not os.path.isdir(src) or os.path.islink(src):
            return src
        hidden = []
        for dirpath, dirs, files in os.walk(src):
            for name in dirs + files:
                if self.ignored(os.path.relpath(os.path.join(dirpath, name), self.context)):
                    hidden.append(name)
        if not hidden:
            return src
        view = os.path.join(tempfile.mkdtemp(prefix="ctx-", dir=self.run_dir), "c")

        def link_or_copy(s: str, d: str) -> None:
            try:
                os.link(s, d, follow_symlinks=False)
            except OSError:
                shutil.copy2(s, d, follow_symlinks=False)

        shutil.copytree(src, view, symlinks=True, copy_function=link_or_copy,
                        ignore=lambda d, names: [n for n in names
                                                 if self.ignored(os.path.relpath(os.path.join(d, n), self.context))])
        return view

    # ---- images
    def image(self, ref_text: str, platform: Platform) -> BaseImage:
        ref = Reference.parse(ref_text)
        key = f"{ref}|{platform}"
        if key in self.images:
            return self.images[key]
        registry = Registry(ref.host, insecure=self.opts.insecure)
        try:
            with self.timings.phase(f"resolve {ref}"):
                resolved = registry.resolve(ref, platform)
            with self.timings.phase(f"config of {ref}"):
                cfg_desc = resolved.manifest.config
                config = json.loads(registry.read_blob(ref.repository, cfg_desc.digest, size=cfg_desc.size))
        except Exception as e:
            raise BuildError(f"base image {ref}: {e}") from None
        img = BaseImage(resolved.reference, registry, resolved.manifest, config)
        self.images[key] = img
        return img

    def mount_image(self, img: BaseImage) -> list[str]:
        """Mount the image lazily (once); its layer dirs, bottom first."""
        if not img.mountpoint:
            self.start_mount(img)
            try:
                img.mounted.wait_until_mounted()
            except OSError as e:
                img.mounted = None
                raise BuildError(f"cannot mount {img.ref} lazily: {e} "
                                 "(its layers must be eStargz: `lazybuild convert` it)") from None
            self.timings.add(f"mount {img.ref.repository}", time.monotonic() - img.mount_started, img.mount_started)
            img.mountpoint = img.mount_dir
        return [os.path.join(img.mountpoint, str(i)) for i in range(len(img.manifest.layers))]

    def start_mount(self, img: BaseImage) -> None:
        """Start mounting IMG (once) and return at once: the build goes on (hashing the context for the
        next steps' keys) while the mount child fetches and indexes the TOCs; mount_image() waits."""
        if img.mounted is None:
            mp = os.path.join(self.run_dir, f"i{len([i for i in self.images.values() if i.mounted])}")
            os.makedirs(mp, exist_ok=True)
            # No background fetch: a build reads what it reads; the rest of the image is never downloaded.
            pinned = f"{img.ref.host}/{img.ref.repository}@{img.manifest.digest}"  # the manifest we resolved
            img.profile = self.find_profile(img)
            record = self.opts.record_base or None  # with profiles: its own file, copied there after the build
            if self.opts.profile != "off":
                record = self.record_path(img)
            opts = mounter.MountOptions(cache_dir=self.opts.chunk_cache, background_fetch=False, layers=True,
                                        insecure=self.opts.insecure, record=record, manifest=img.manifest,
                                        prefetch_files=img.profile.layers if img.profile else None)
            img.mount_started = time.monotonic()
            try:
                img.mounted = mounter.mount_image(pinned, mp, opts, wait=False)
            except OSError as e:
                raise BuildError(f"cannot mount {img.ref} lazily: {e}") from None
            img.mount_dir = mp

    # ---- build profiles (lazybuild/profiles.py)
    def record_path(self, img: BaseImage) -> str:
        return os.path.join(self.run_dir, f"record-{img.manifest.digest.split(':')[-1]}.ndjson")

    def find_profile(self, img: BaseImage) -> "profiles.Profile | None":
        """The profile of IMG's manifest: the state dir's, else the registry's; a bad one is reported and
        not used (the build goes on without it)."""
        if self.opts.profile == "off":
            return None
        where = "the state dir"
        try:
            found = profiles.ProfileStore(self.opts.state_dir).load(img.manifest.digest)
            if found is None:
                where = f"{img.ref.host}/{img.ref.repository}"
                hit = profiles.find_profile(img.registry, img.ref.repository, img.manifest.digest)
                found = hit[0] if hit else None
                if found is not None:  # kept: the next build here needs no registry for it
                    profiles.ProfileStore(self.opts.state_dir).save(found)
        except (LazybuildError, OSError) as e:
            self.log(f"warning: the build profile of {img.ref} in {where} is not used: {e}")
            return None
        if found is not None:
            self.log(f"  profile of {img.ref} ({where}): {found.file_count} files, prefetched as it mounts")
        return found

    def save_profiles(self, push: bool = False) -> None:
        """After the build: what each base's mount recorded is merged into its profile, saved in the state
        dir (and pushed beside the base when PUSH), and appended to --record-base. Never fails the build:
        a profile is an optimisation."""
        if self.opts.profile == "off":
            return
        done = set()  # an image named twice (a tag and a digest) is one base
        for img in self.images.values():
            if not img.mountpoint or img.manifest.digest in done:
                continue
            done.add(img.manifest.digest)
            try:
                self._save_profile(img, push)
            except (LazybuildError, OSError) as e:
                self.log(f"warning: the build profile of {img.ref} was not saved: {e}")

    def _save_profile(self, img: BaseImage, push: bool) -> None:
        reads, lines = [], []
        try:
            with open(self.record_path(img), encoding="utf-8", errors="surrogateescape") as f:
                lines = f.readlines()
        except FileNotFoundError:
            pass
        layers = img.manifest.layers
        for line in lines:
            try:
                rec = json.loads(line)
                index = rec["layer"]
                if type(index) is int and 0 <= index < len(layers) and isinstance(rec["path"], str):
                    reads.append((layers[index].digest, rec["path"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted mount
        if self.opts.record_base and lines:
            with open(self.opts.record_base, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.writelines(lines)
        fp, deadline = None, time.monotonic() + 2.0
        while img.mounted:  # the status is written every 0.25 s: give the prefetch's last answer time to show
            try:
                fp = img.mounted.status().get("filePrefetch")
            except OSError:
                break
            if not fp or fp["done"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if fp:
            self.log(f"profile prefetch of {img.ref}: {fp['files']} files, {fp['chunks']} chunks in {fp['requests']} "
                     f"requests, {fp['bytes'] / 1e6:.1f} MB" + ("" if fp["done"] else " (still running)"))
        old = img.profile or profiles.Profile(img.manifest.digest)
        new = old.merged(reads)
        store = profiles.ProfileStore(self.opts.state_dir)
        if new.file_count > old.file_count or (new.file_count and img.profile is None):
            path = store.save(new)
            self.log(f"profile of {img.ref}: {new.file_count} files ({new.file_count - old.file_count} new), "
                     f"saved in {path}")
        if push and new.file_count:
            subject = profiles.Subject(img.manifest.media_type, img.manifest.digest, len(img.manifest.raw))
            digest = profiles.push_profile(img.registry, img.ref.repository, new, subject)
            self.log(f"profile of {img.ref} pushed to {img.ref.host}/{img.ref.repository}:"
                     f"{profiles.profile_tag(new.base)} ({digest})")

    def _mount_timings(self, img: BaseImage) -> None:
        """The mount child's own phases (it measures them on the same monotonic clock)."""
        if isinstance(self.timings, NoTimings):
            return
        try:
            phases = img.mounted.status().get("timings", [])
        except OSError:
            return
        for p in phases:
            self.timings.add(f"mount {img.ref.repository}: {p['name']}", p["duration"], p["start"])

    def lowers(self, layers: list[Layer]) -> list[str]:
        """The overlay lower dirs of LAYERS, top first; mounts the base images whose layers have no
        path yet (a base is mounted only when a step that is not cached runs on it)."""
        for layer in layers:
            if not layer.path and layer.image is not None:
                dirs = self.mount_image(layer.image)
                for other in layers:
                    if other.image is layer.image:
                        other.path = dirs[other.index]
        return [lay.path for lay in reversed(layers)]

    def view(self, layers: list[Layer], name: str) -> str:
        """A read-only merged view of LAYERS (for COPY --from and bind mounts)."""
        key = layers[-1].key if layers else "scratch"
        if key not in self.views:
            mp = os.path.join(self.run_dir, f"v{len(self.views)}")
            os.makedirs(mp, exist_ok=True)
            lowers = self.lowers(layers)
            lowers += [self.empty, self.empty2][:max(0, 2 - len(lowers))]  # read-only overlays need two lowers
            mount_overlay(lowers, None, None, mp)
            self.mounts.append(mp)
            self.views[key] = mp
        return self.views[key]

    # ---- the build
    def load(self) -> model.Build:
        text = _read_text(self.dockerfile, self.context)
        if text is None:
            raise InputError(f"{self.dockerfile}: no such file (give the Dockerfile with -f, or put one in the context)")
        plat = self.opts.platform or str(Platform.host())
        kwargs = dict(filename=os.path.basename(self.dockerfile), build_args=self.opts.build_args,
                      target=self.opts.target, platform=plat, build_platform=str(Platform.host()))
        first = model.load(text, **kwargs)
        by_name = {s.name: s for s in first.stages}
        base_configs = {}
        for st in first.stages:
            if st.base_stage is None and st.base != "scratch" and st.base not in by_name:
                img = self.image(st.base, Platform.parse(st.platform or plat))
                base_configs[st.base] = img.config
        return model.load(text, base_configs=base_configs, **kwargs)

    def run(self) -> BuildResult:
        build = self.load()
        plat = Platform.parse(self.opts.platform or str(Platform.host()))
        results: dict[int, StageResult] = {}
        for st in build.stages:
            results[st.index] = self.run_stage(st, results, build)
        target = results[build.target.index]
        config = dict(target.base.config) if target.base else {}
        config = {k: v for k, v in config.items() if k not in ("container", "container_config", "docker_version",
                                                               "created", "config", "history", "rootfs")}
        # Empty fields are left out, as Go's omitempty does in BuildKit's image config.
        image_config = dict(build.target.config)
        if self.opts.labels:  # --label, as buildx: over the Dockerfile's and the base's labels
            image_config["Labels"] = {**(image_config.get("Labels") or {}), **self.opts.labels}
        image_config = {k: v for k, v in image_config.items() if v not in ("", None, [], {})}
        config.update({"architecture": plat.architecture, "os": plat.os, "config": image_config,
                       "history": [dict(h) for h in build.target.history]})
        if plat.variant:
            config["variant"] = plat.variant
        return BuildResult(build, target, [i for i in self.images.values() if i.mountpoint], plat, config)

    def run_stage(self, st: model.Stage, results: dict[int, StageResult], build: model.Build) -> StageResult:
        label = st.name or f"stage-{st.index}"
        plat = Platform.parse(st.platform) if st.platform else Platform.host()
        if st.base_stage is not None:
            parent = results[st.base_stage]
            layers, base, key = list(parent.layers), parent.base, parent.key
        elif st.base == "scratch":
            layers, base, key = [], None, _sha("scratch")
        else:
            base = self.image(st.base, plat)
            self.log(f"[{label}] FROM {base.ref} (mounted lazily when a step runs on it)")
            key = _sha("image", base.manifest.digest)
            layers = []
            for i, desc in enumerate(base.manifest.layers):
                key = _sha(key, desc.digest)
                layers.append(Layer(base.mountpoint and os.path.join(base.mountpoint, str(i)), key, base, i))
        steps = st.steps
        # Keys first: the base is mounted only if a step misses the cache, and its mount starts at the
        # first miss, so the context is hashed for the later steps' keys while the mount comes up.
        keys = []
        for n, step in enumerate(steps, 1):
            with self.timings.phase(f"[{label} {n}/{len(steps)}] {step.text}: cache key"):
                key = _sha(key, self.step_identity(step, results))
            keys.append(key)
            self.step_keys.append(key)
            if base is not None and not self._cached(key):
                self.start_mount(base)
        for n, (step, key) in enumerate(zip(steps, keys), 1):
            name = f"[{label} {n}/{len(steps)}] {step.text}"
            cached = os.path.join(self.steps_dir, key[:32])
            if self._cached(key):
                self.log(f"{name}  (cached)")
                layers.append(Layer(os.path.join(cached, "upper"), key, history=step.text))
                continue
            self.log(name)
            start = time.monotonic()
            upper = self.run_step(step, layers, results, key, label, name)
            layers.append(Layer(upper, key, history=step.text))
            self.log(f"  done in {time.monotonic() - start:.1f} s")
        return StageResult(st, layers, base, key)

    def _cached(self, key: str) -> bool:
        return not self.opts.no_cache and os.path.isfile(os.path.join(self.steps_dir, key[:32], "done"))

    def step_identity(self, step: Step, results: dict[int, StageResult]) -> dict:
        """What decides a step's result besides its parent: the step and the files it reads."""
        ident = {k: v for k, v in asdict(step).items() if k not in ("line", "text")}
        ident["step"] = type(step).__name__
        match step:
            case CopyStep():
                ident["source"] = self.source_identity(results, step.from_stage, step.from_image,
                                                       [src.text for src in step.sources])
            case RunStep():
                if step.network not in ("none", "host") and self.opts.network != "host":
                    ident["network"] = self.opts.network  # --network none: another result than the host's
                ident["mountKeys"] = [self.source_identity(results, m.from_stage, m.from_image, [m.source])
                                      for m in step.mounts if isinstance(m, BindMount)]
        return ident

    def source_identity(self, results: dict[int, StageResult], from_stage: int | None, from_image: str,
                        paths: list[str]) -> str:
        """What files read from a stage, an image or the build context are: a stage's key, an image's
        digest (its name may move, its digest does not), or a digest of the context files."""
        if from_stage is not None:
            return results[from_stage].key
        if from_image:
            return self.image(from_image, Platform.host()).manifest.digest
        if any(filecopy.has_magic(p) for p in paths):  # a pattern may match anything
            return tree_digest(self.context, [""], self.ignored)
        return tree_digest(self.context, [p.lstrip("/") for p in paths], self.ignored)

    def run_step(self, step: Step, layers: list[Layer], results, key: str, label: str, name: str = "") -> str:
        final = os.path.join(self.steps_dir, key[:32])
        tmp = tempfile.mkdtemp(prefix="tmp-", dir=self.steps_dir)
        upper, work, merged = os.path.join(tmp, "upper"), os.path.join(tmp, "work"), os.path.join(self.run_dir, "m")
        os.makedirs(upper)
        os.makedirs(work)
        os.makedirs(merged, exist_ok=True)
        lowers = self.lowers(layers) or [self.empty]
        phase = self.timings.phase
        try:
            with phase(f"{name}: overlay mount"):
                mount_overlay(lowers, upper, work, merged)
            self.mounts.append(merged)
            try:
                with phase(f"{name}: {type(step).__name__}"):
                    match step:
                        case RunStep():
                            self.do_run(step, merged, results)
                        case CopyStep():
                            self.do_copy(step, merged, results)
                        case WorkdirStep():
                            self.do_workdir(step, merged)
            finally:
                with phase(f"{name}: overlay unmount"):
                    unmount(merged)
                self.mounts.remove(merged)
            shutil.rmtree(work, ignore_errors=True)
            publish_step(tmp, final, {"instruction": step.text, "stage": label})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return os.path.join(final, "upper")

    # ---- steps
    def source_root(self, from_stage: int | None, from_image: str, results) -> str:
        """Where `--from=` / `from=` files are read: a view of an earlier stage or of an image; the build
        context otherwise."""
        if from_stage is not None:
            return self.view(results[from_stage].layers, f"stage {from_stage}")
        if from_image:
            img = self.image(from_image, Platform.host())
            return self.view([Layer(d, f"{img.manifest.digest}/{i}") for i, d in enumerate(self.mount_image(img))],
                             from_image)
        return self.context

    def do_workdir(self, step: WorkdirStep, root: str) -> None:
        owner = filecopy.parse_chown(step.user, root) if step.user else None
        try:
            inroot.mkdir_all(root, step.path, 0o755, owner)
        except inroot.UnsafePath as e:
            raise BuildError(f"line {step.line}: WORKDIR {step.path}: {e.strerror}") from None

    def do_copy(self, step: CopyStep, root: str, results) -> None:
        if step.parents:
            raise BuildError(f"line {step.line}: COPY --parents is not supported by lazybuild build yet")
        if step.exclude:
            raise BuildError(f"line {step.line}: {step.keyword} --exclude is not supported by lazybuild build yet")
        if any(src.kind != "path" for src in step.sources):
            raise BuildError(f"line {step.line}: ADD of a URL or git repository is not supported by "
                             "lazybuild build yet (download it in a RUN step)")
        src_root = self.source_root(step.from_stage, step.from_image, results)
        ignored = self.ignored if src_root == self.context else None
        sources = [(src_root, src.text) for src in step.sources]
        try:
            if sources:
                filecopy.copy(root, step.dest, sources, chown=step.chown, chmod=step.chmod, unpack=step.unpack,
                              ignored=ignored)
            for doc in step.files:
                filecopy.write_file(root, step.dest, doc.name, doc.data.encode(), chown=step.chown,
                                    chmod=step.chmod)
        except (filecopy.CopyError, OSError, ValueError) as e:
            raise BuildError(f"line {step.line}: {step.text}: {e}") from None

    def do_run(self, step: RunStep, root: str, results) -> None:
        if step.security == "insecure":
            raise BuildError(f"line {step.line}: RUN --security=insecure is not supported by lazybuild build")
        mounts, cleanup = self.run_mounts(step, results)
        try:
            stubs = _missing_paths(root, [m.destination for m in mounts] + list(STUB_PATHS))
            env = list(step.env) + [f"{p.key}={p.value}" for p in step.proxy_env]
            network = step.network if step.network in ("none", "host") else self.opts.network
            try:
                runc.run(root, list(step.argv), env, step.cwd, step.user, mounts, network=network,
                         output=lambda line: self.log("  | " + line))
            except (runc.RunError, ValueError) as e:
                raise BuildError(f"line {step.line}: {e}") from None
            finally:
                _remove_stubs(root, stubs)
        finally:
            self._close_relays()
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)

    def _close_relays(self) -> None:
        for relay in self.relays:
            relay.close()
        self.relays.clear()

    def run_mounts(self, step: RunStep, results) -> tuple[list[runc.Mount], list[str]]:
        """The step's mounts as runc mounts, and the scratch dirs to remove after the run."""
        out: list[runc.Mount] = []
        cleanup: list[str] = []

        def scratch(prefix: str) -> str:
            path = tempfile.mkdtemp(prefix=prefix, dir=self.run_dir)
            cleanup.append(path)
            return path

        try:
            if step.inline_files:  # `#!` heredoc scripts, run as files
                pipes = scratch("pipes-")
                for f in step.inline_files:
                    path = os.path.join(pipes, f.name)
                    with open(path, "w") as fh:
                        fh.write(f.data)
                    os.chmod(path, f.mode)
                out.append(runc.Mount(PIPES_DIR, pipes, "bind", ["rbind", "ro"]))
            for m in step.mounts:
                out.append(self.run_mount(m, step, results, scratch))
        except BaseException:
            self._close_relays()
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return [m for m in out if m is not None], cleanup

    def run_mount(self, m, step: RunStep, results, scratch) -> runc.Mount | None:
        line = step.line
        match m:
            case BindMount():
                src_root = self.source_root(m.from_stage, m.from_image, results)
                src = inroot.resolve(src_root, m.source)
                if not os.path.exists(src):
                    raise BuildError(f"line {line}: RUN --mount source {m.source!r} not found")
                if src_root == self.context:
                    src = self.context_view(src)
                if not m.readonly:  # writes to a rw bind mount are thrown away, as in BuildKit
                    dst = os.path.join(scratch("rw-"), "d")
                    shutil.copytree(src, dst, symlinks=True) if os.path.isdir(src) else shutil.copy2(src, dst)
                    src = dst
                return runc.Mount(m.target, src, "bind", ["rbind", "ro" if m.readonly else "rw"])
            case CacheMount():
                if m.from_stage is not None or m.from_image:
                    raise BuildError(f"line {line}: RUN --mount=type=cache,from= is not supported by lazybuild "
                                     "build yet")
                path = os.path.join(self.cache_mounts, hashlib.sha256(m.id.encode()).hexdigest()[:24])
                if not os.path.isdir(path):
                    os.makedirs(path)
                    os.chown(path, m.uid, m.gid)
                    os.chmod(path, m.mode)
                return runc.Mount(m.target, path, "bind", ["rbind", "ro" if m.readonly else "rw"])
            case TmpfsMount():
                return runc.Mount(m.target, "tmpfs", "tmpfs", ["nosuid", "nodev"] +
                                  ([f"size={m.size_bytes}"] if m.size_bytes else []))
            case SecretMount():
                if m.env:
                    raise BuildError(f"line {line}: secret env= is not supported by lazybuild build yet")
                src = self.opts.secrets.get(m.id)
                if src is None:
                    if m.required:
                        raise BuildError(f"line {line}: secret {m.id!r} is required but was not given "
                                         f"(--secret id={m.id},src=FILE)")
                    return None
                path = os.path.join(scratch("secret-"), "s")
                shutil.copyfile(src, path)
                os.chown(path, m.uid, m.gid)
                os.chmod(path, m.mode)
                return runc.Mount(m.target, path, "bind", ["rbind", "ro"])
            case SshMount():
                upstream = self.opts.ssh.get(m.id)
                if upstream is None:
                    if m.required:
                        raise BuildError(f"line {line}: ssh agent {m.id!r} is required but was not given "
                                         f"(--ssh {m.id}=SOCKET, or --ssh {m.id} for $SSH_AUTH_SOCK)")
                    return None  # as BuildKit: an optional agent that was not given is no mount
                path = os.path.join(scratch("ssh-"), "agent.sock")
                self.relays.append(AgentRelay(upstream, path, m.uid, m.gid, m.mode))
                return runc.Mount(m.target, path, "bind", ["rbind", "rw"])
        raise BuildError(f"line {line}: RUN --mount of {type(m).__name__} is not supported by lazybuild build")


def _missing_paths(root: str, paths: list[str]) -> list[str]:
    """The mount targets (and their parents) that do not exist yet, as paths relative to ROOT with
    symlinks resolved inside it (where runc, which resolves them the same way, will make the stubs)."""
    out = []
    for p in paths:
        rel = os.path.relpath(inroot.resolve(root, p), root)
        if rel == ".":
            continue
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            if not os.path.lexists(os.path.join(root, *parts[:i])):
                out += ["/".join(parts[:j]) for j in range(i, len(parts) + 1)]
                break
    return out


def _remove_stubs(root: str, stubs: list[str]) -> None:
    """Remove mount stubs the run left behind (empty files or directories), deepest first.

    The step may have put a symlink where a stub's parent was; a stub is removed only where its path
    still resolves to itself inside ROOT, so nothing outside the root is ever removed."""
    for rel in sorted(set(stubs), key=lambda s: -s.count("/")):
        path = os.path.join(root, rel)
        if inroot.resolve(root, rel, follow_last=False) != path:
            continue
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(path)
        except OSError:
            pass


def _read_text(path: str, context: str) -> str | None:
    """PATH as text, or None. A path inside the context is a name in an untrusted tree and is read
    inside it (a `Dockerfile -> /etc/shadow` link reads the context's own etc/shadow, if any); a path
    elsewhere is the user's own choice and is read as it is."""
    rel = os.path.relpath(os.path.abspath(path), context)
    try:
        if rel != ".." and not rel.startswith("../"):
            data = inroot.read_file(context, rel, 16 << 20)
            return None if data is None else data.decode("utf-8", errors="replace")
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _dockerignore_text(context: str, dockerfile: str) -> str:
    """The ignore patterns: `<Dockerfile>.dockerignore` when there is one, else the context's."""
    own = _read_text(dockerfile + ".dockerignore", context)
    return own if own is not None else (_read_text(os.path.join(context, ".dockerignore"), context) or "")
