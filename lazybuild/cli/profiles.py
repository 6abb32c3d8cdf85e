"""`lazybuild profile ls|show|push|rm`: build profiles (lazybuild/profiles.py), the files builds read from a
base image, kept in the state dir by base manifest digest and pushed beside the base."""

from __future__ import annotations

import logging

from ..digest import check_digest, is_digest
from ..errors import InputError
from ..defaults import STATE_DIR
from ..image import size_text
from . import output
from .options import platform_of

# lazybuild.profiles (and the registry client under it) is imported by the commands that use it, so that
# every other command starts without them.

STATE_DIR_HELP = "where `lazybuild build` keeps its state, profiles in profiles/ (default %(default)s)"


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="build profiles: the base-image files builds read, prefetched by later builds")
    psub = p.add_subparsers(dest="profile_command", required=True)

    ls = psub.add_parser("ls", help="list the local profiles: base manifest digest, files, size")
    ls.add_argument("--json", action="store_true", help="deprecated: --format json (a JSON array of the profiles)")
    ls.set_defaults(func=list_profiles)

    show = psub.add_parser("show", help="print a profile (all of it with --format json): the local one, else the "
                                        "registry's for a reference")
    show.add_argument("what", metavar="REF|DIGEST", help="an image reference, or a base manifest digest (local only)")
    show.set_defaults(func=show_profile)

    push = psub.add_parser("push", help="push the local profile of an image beside it in its registry")
    push.add_argument("ref", metavar="REF")
    push.set_defaults(func=push_local)

    rm = psub.add_parser("rm", help="delete the local profile of a base manifest digest")
    rm.add_argument("digest", metavar="DIGEST")
    rm.set_defaults(func=remove)

    for c in (ls, show, push, rm):
        c.add_argument("--state-dir", default=STATE_DIR, help=STATE_DIR_HELP)
    for c in (show, push):
        c.add_argument("--platform", metavar="P",
                       help="os/arch[/variant] of a multi-platform image (default: this machine's)")
        c.add_argument("--insecure", action="store_true", help="skip TLS verification of the registry")


def list_profiles(args) -> int:
    from ..profiles import ProfileStore

    rows, lines = [], []
    for sp in ProfileStore(args.state_dir).list():
        files = sp.profile.file_count if sp.profile else None
        rows.append({"base": sp.base, "files": files, "size": sp.size, "path": sp.path,
                     **({"error": sp.error} if sp.error else {})})
        lines.append(f"{sp.base}  {files if files is not None else '?':>6} files  {size_text(sp.size):>9}"
                     + (f"  (unusable: {sp.error})" if sp.error else ""))
    output.emit(args, output.Result(rows, "\n".join(lines)))
    return 0


def _resolve(args, text: str):
    from ..registry import Registry
    from ..transfer import registry_reference

    ref = registry_reference(text, f"lazybuild profile {args.profile_command}")
    registry = Registry(ref.host, insecure=args.insecure)
    try:
        return ref, registry, registry.resolve(ref, platform_of(args))
    except BaseException:
        registry.close()
        raise


def show_profile(args) -> int:
    from ..profiles import ProfileStore, find_profile

    store = ProfileStore(args.state_dir)
    if is_digest(args.what):
        profile = store.load(args.what)
        if profile is None:
            raise InputError(f"no local profile of {args.what} in {store.dir}",
                             hint="`lazybuild profile ls` lists them; give an image reference to look in its registry")
    else:
        ref, registry, resolved = _resolve(args, args.what)
        with registry:
            base = resolved.manifest.digest
            profile = store.load(base)
            if profile is None:
                found = find_profile(registry, ref.repository, base)
                if found is None:
                    raise InputError(f"no profile of {ref} ({base}), neither in {store.dir} nor in its registry",
                                     hint="`lazybuild build` records one for each base image it mounts")
                profile = found[0]
                logging.getLogger(__name__).info("profile from %s", found[1])
    document = profile.to_json()
    output.emit(args, output.Result(document, _profile_text(document)))
    return 0


def _profile_text(document: dict) -> str:
    """The base, then per layer its files in the order builds read them."""
    lines = [f"profile of {document.get('base', '?')}"]
    for layer in document.get("layers", []):
        files = layer.get("files", [])
        lines.append(f"  layer {layer.get('digest', '?')}: {len(files)} files")
        lines += [f"    {f}" for f in files]
    return "\n".join(lines)


def push_local(args) -> int:
    from ..profiles import ProfileStore, Subject, profile_tag, push_profile

    store = ProfileStore(args.state_dir)
    ref, registry, resolved = _resolve(args, args.ref)
    with registry:
        manifest = resolved.manifest
        profile = store.load(manifest.digest)
        if profile is None:
            raise InputError(f"no local profile of {ref} ({manifest.digest}) in {store.dir}",
                             hint="build on the image first (`lazybuild build` records its profile), or "
                                  "`lazybuild profile ls`")
        digest = push_profile(registry, ref.repository, profile,
                              Subject(manifest.media_type, manifest.digest, len(manifest.raw)))
    pushed = f"{ref.host}/{ref.repository}:{profile_tag(manifest.digest)}"
    output.emit(args, output.Result({"base": manifest.digest, "files": profile.file_count, "pushed": pushed,
                                     "digest": digest}, f"{pushed}@{digest}", primary=digest))
    return 0


def remove(args) -> int:
    from ..profiles import ProfileStore

    store = ProfileStore(args.state_dir)
    digest = check_digest(args.digest, "profile rm DIGEST")
    if not store.remove(digest):
        raise InputError(f"no local profile of {digest} in {store.dir}", hint="`lazybuild profile ls` lists them")
    output.emit(args, output.Result({"removed": digest}, f"removed the profile of {digest}"))
    return 0
