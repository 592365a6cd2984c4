"""EROFS images built with mkfs.erofs from seeded trees, and cached.

`ImageFactory` turns content trees (erofs_domains/guest/content_tree.py) into EROFS images (single,
blobdev, layered, compressed) and caches them under a key of what determines their bytes;
each `ErofsImage` carries what a test needs to serve and mount it in fscache on-demand mode:
the primary cookie name (`fsid`), the blob of every cookie name, the on-disk device tags,
the `device=` options and the `Manifest` (erofs_domains/guest/manifest.py) of its content.

Cookie names (docs/domains.md#cookies, erofs_init_device()): the primary blob is looked
up by `fsid`; each extra device by its `device=` option if any is given, else by its
on-disk device tag.  `mkfs.erofs --blobdev` writes an empty tag, so blobdev images need
`device=`.  mkfs.erofs' rebuild mode (`mkfs.erofs merged.erofs base.erofs app.erofs`)
writes the layer images' UUIDs as tags (32 hex digits), so merged images name their
layer blobs themselves and two merged images sharing a layer share its cookie in a
domain.  The kernel trusts those names blindly, hence every layer gets its own UUID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from erofs_domains.base import erofs_tools
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.file_digest import sha256_file
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.guest.content_tree import BLOCK_SIZE, PROFILES, ContentTree
from erofs_domains.guest.erofs_format import read_superblock
from erofs_domains.guest.manifest import Manifest, Mismatch

# Bump to invalidate cached images when what the builders produce changes.
IMAGE_FORMAT = 1
_UUID_NAMESPACE = uuid.UUID("6f0c5a8e-33c1-4b1e-9d4a-0e5f2b7c9a10")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")



def image_cache_dir() -> Path:
    """Where a run's images are built, shared by all its VMs (the controller prebuilds them)."""
    return cache_root() / "images"

class ImageBuildError(RuntimeError):
    pass


class Blob(NamedTuple):
    path: Path
    size: int


@dataclass
class ErofsImage:
    """A built image and everything needed to serve and mount it in on-demand mode.

    `blobs` maps every cookie name the kernel will look up (the fsid first, then the extra
    devices in device-table order) to the file a daemon serves for it."""

    name: str
    layout: str  # single | blobdev | layer | layered | compressed
    fsid: str
    blobs: dict[str, Blob]
    devices: list[str]  # device= options to pass ([] when the on-disk tags name the blobs)
    device_tags: list[str]  # on-disk tags in device-table order ("" = empty tag)
    uuid: str
    manifest: Manifest
    key: str
    layers: list[str] = field(default_factory=list)  # layered: layer names, bottom first
    cached: bool = False  # loaded from the cache rather than built by this call

    @property
    def path(self) -> Path:
        """The primary (bootstrap) image."""
        return self.blobs[self.fsid].path

    @property
    def device_cookies(self) -> list[str]:
        """Cookie names of the extra devices, in device-table order."""
        return list(self.devices) if self.devices else list(self.device_tags)

    @property
    def device_paths(self) -> list[Path]:
        """Blob files of the extra devices in device-table order (for `--device=` of
        fsck.erofs / dump.erofs)."""
        return [self.blobs[c].path for c in self.device_cookies]

    def mount_options(self, domain_id: str | None = None, *, fsid: str | None = None,
                      devices: Iterable[str] | None = None) -> str:
        """`fsid=F[,domain_id=D][,device=X...]` for `mount -t erofs none DIR -o ...`."""
        opts = [f"fsid={fsid or self.fsid}"]
        if domain_id is not None:
            opts.append(f"domain_id={domain_id}")
        opts += [f"device={d}" for d in (self.devices if devices is None else devices)]
        return ",".join(opts)

    def link_blobs(self, dest: str | os.PathLike, *, copy: bool = False) -> dict[str, Path]:
        """Make `dest/<cookie name>` for every blob (hard link, else copy); a blob directory
        for a daemon that serves files by cookie name."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        out = {}
        for cookie, blob in self.blobs.items():
            target = dest / cookie
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            if copy:
                shutil.copyfile(blob.path, target)
            else:
                try:
                    os.link(blob.path, target)
                except OSError:
                    shutil.copyfile(blob.path, target)
            out[cookie] = target
        return out

    def verify(self, root: str | os.PathLike) -> list[Mismatch]:
        return self.manifest.verify(root)

    # -- cache record ------------------------------------------------------------

    def to_json(self, base: Path) -> dict:
        return {
            "name": self.name, "layout": self.layout, "fsid": self.fsid,
            "blobs": {c: [os.path.relpath(b.path, base), b.size] for c, b in self.blobs.items()},
            "devices": self.devices, "device_tags": self.device_tags, "uuid": self.uuid,
            "key": self.key, "layers": self.layers, "manifest": self.manifest.to_json(),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict, base: Path) -> ErofsImage:
        blobs = {c: Blob(Path(os.path.normpath(base / p)), s) for c, (p, s) in data["blobs"].items()}
        fields = {k: v for k, v in data.items() if k not in ("blobs", "manifest")}
        return cls(blobs=blobs, manifest=Manifest.from_json(data["manifest"]), cached=True, **fields)


def check_name(name: str) -> str:
    """Names become fsids and cookie names: no '/' (cachefiles path), no ',' (mount option
    separator), short enough for the volume/cookie key limits."""
    if not _NAME_RE.match(name):
        raise ValueError(f"bad image/layer name {name!r} (want {_NAME_RE.pattern})")
    return name


def _uuid_of(key: str) -> str:
    return str(uuid.uuid5(_UUID_NAMESPACE, key))


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        with contextlib.suppress(OSError):  # no flock (9p): the atomic rename still protects
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


class ImageFactory:
    """Builds images from seeded trees and caches them in `cache_dir`.

    An image is identified by (seed, profile, layout, names, options, the mkfs.erofs command
    line and the mkfs binary's content hash, `erofs_tools.identity()`): a rebuilt mkfs gives
    new images even when its version string is the same, an unchanged one reuses them;
    it is built once into a private directory which is renamed into place when complete,
    so processes and VMs sharing the cache (also over 9p) reuse it.  Records store paths
    relative to `cache_dir`, so the cache may be mounted elsewhere.  `builds` and `hits`
    count what this factory did."""

    def __init__(self, cache_dir: str | os.PathLike, mkfs: str | os.PathLike, seed: object, *,
                 profile: str = "small", tmp_dir: str | os.PathLike | None = None):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
        self.cache_dir = Path(cache_dir).resolve()
        self.mkfs_path = str(mkfs)
        self.mkfs_identity = erofs_tools.identity(self.mkfs_path)
        self.seed = str(seed)
        self.profile = profile
        self.tmp_dir = tmp_dir
        self.builds = 0
        self.hits = 0

    # -- public builders -----------------------------------------------------------

    def single(self, name: str, *, inline_data: bool = True) -> ErofsImage:
        """Metadata and data in one image; fsid = name.  `inline_data=False` passes
        -Enoinline_data (no tail packing into the inode)."""
        extra = [] if inline_data else ["-Enoinline_data"]
        return self._image("single", name, {"inline_data": inline_data}, lambda work, tree, uuid_:
                           self._mkfs_plain(work, tree, name, uuid_, extra))

    def compressed(self, name: str, *, algorithm: str = "lz4hc") -> ErofsImage:
        """Compressed (default lz4hc: -zlz4hc); fsid = name."""
        return self._image("compressed", name, {"algorithm": algorithm}, lambda work, tree, uuid_:
                           self._mkfs_plain(work, tree, name, uuid_, [f"-z{algorithm}"]))

    def blobdev(self, name: str, blob_name: str | None = None, *, chunksize: int = BLOCK_SIZE) -> ErofsImage:
        """Metadata image + chunked data in a separate blob (`--blobdev --chunksize`).
        mkfs.erofs leaves the device tag empty, so it is mounted with `device=<blob_name>`;
        the default blob name is derived from the blob's sha256 (name blobs by content)."""
        if blob_name is not None:
            check_name(blob_name)

        def build(work: Path, tree: Path, uuid_: str) -> tuple[dict[str, Path], list[str]]:
            blob = work / "blob.bin"
            image = work / f"{name}.erofs"
            self._run_mkfs(*self._common(uuid_), f"--blobdev={blob}", f"--chunksize={chunksize}", image, tree)
            cookie = blob_name or f"blob-{sha256_file(blob)[:32]}"
            return {name: image, cookie: blob}, [cookie]

        return self._image("blobdev", name, {"blob_name": blob_name, "chunksize": chunksize}, build)

    def layer(self, name: str) -> ErofsImage:
        """One container layer built with -Enoinline_data (its data blocks can be referenced
        from a merged image).  Also mountable by itself with fsid = name."""
        return self._image("layer", name, {}, lambda work, tree, uuid_:
                           self._mkfs_plain(work, tree, name, uuid_, ["-Enoinline_data"]),
                           tree_layer=name)

    def layered(self, base: str, *apps: str, name: str | None = None) -> ErofsImage:
        """The container case: layers (bottom first) merged by mkfs.erofs' rebuild mode into a
        metadata-only image whose device tags are the layers' UUIDs (hex).  The cookie names
        of the layer blobs are those tags and the blobs are the layer images, so two merged
        images with a common layer share its cookie in a domain, with no device= option.
        fsid = name (default "<base>+<app>+...")."""
        layer_names = [check_name(n) for n in (base, *apps)]
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"a layer appears twice in {layer_names}")
        name = name or "+".join(layer_names)
        layers = [self.layer(n) for n in layer_names]

        def build(work: Path, tree: Path | None, uuid_: str) -> tuple[dict[str, Path], list[str]]:
            merged = work / f"{name}.erofs"
            self._run_mkfs(*self._common(uuid_), merged, *[lay.path for lay in layers])
            tags = read_superblock(merged).device_tags
            want = [uuid.UUID(lay.uuid).hex for lay in layers]
            if tags != want:
                raise ImageBuildError(f"{merged}: device tags {tags}, expected the layer UUIDs {want}")
            return {name: merged, **{t: lay.path for t, lay in zip(tags, layers)}}, []

        return self._image("layered", name, {"layers": [lay.key for lay in layers]}, build,
                           manifest=Manifest.overlay([lay.manifest for lay in layers]), layers=layer_names)

    # -- machinery -------------------------------------------------------------------

    def uuid_for(self, layout: str, name: str, options: dict | None = None) -> str:
        """The image's UUID, derived from its cache key (seed, profile, layout, name, options,
        the mkfs binary: what determines its bytes).  Reproducible, and different for
        every layer that differs, so device tags (= layer UUIDs) never name two blobs."""
        return _uuid_of(self._key(layout, name, options or {}))

    def _common(self, uuid_: str) -> list[str]:
        return ["--quiet", "-T0", "--all-root", f"-b{BLOCK_SIZE}", f"-U{uuid_}"]

    def _run_mkfs(self, *args: object) -> None:
        try:
            cmd([self.mkfs_path, *args])
        except CmdError as e:
            raise ImageBuildError(str(e)) from e

    def _mkfs_plain(self, work: Path, tree: Path, name: str, uuid_: str,
                    extra: list[str]) -> tuple[dict[str, Path], list[str]]:
        image = work / f"{name}.erofs"
        self._run_mkfs(*self._common(uuid_), *extra, image, tree)
        return {name: image}, []

    def _key(self, layout: str, name: str, options: dict) -> str:
        ident = {"format": IMAGE_FORMAT, "seed": self.seed, "profile": self.profile, "layout": layout,
                 "name": name, "options": options, "args": self._common("UUID"), "mkfs": self.mkfs_identity}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def _load(self, entry: Path) -> ErofsImage | None:
        try:
            img = ErofsImage.from_json(json.loads((entry / "image.json").read_text()), self.cache_dir)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(b.path.is_file() and b.path.stat().st_size == b.size for b in img.blobs.values()):
            return None  # e.g. a layer it refers to was removed
        return img

    def _image(self, layout: str, name: str, options: dict, build, *, manifest: Manifest | None = None,
               layers: list[str] | None = None, tree_layer: str | None = None) -> ErofsImage:
        check_name(name)
        key = self._key(layout, name, options)
        entry = self.cache_dir / f"{layout}-{name}-{key[:16]}"
        img = self._load(entry)
        if img is None:
            with _flock(self.cache_dir / ".locks" / f"{key[:16]}.lock"):
                img = self._load(entry)
                if img is None:
                    self._build(entry, layout, name, key, build, manifest, layers or [], tree_layer)
                    img = self._load(entry)
                    if img is None:
                        raise ImageBuildError(f"{entry}: built but cannot be loaded")
                    img.cached = False
                    self.builds += 1
                    return img
        self.hits += 1
        return img

    def _build(self, entry: Path, layout: str, name: str, key: str, build, manifest: Manifest | None,
               layers: list[str], tree_layer: str | None) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=self.cache_dir))
        try:
            uuid_ = _uuid_of(key)
            if manifest is None:
                with tempfile.TemporaryDirectory(prefix="erofs-tree-", dir=self.tmp_dir) as tmp:
                    tree = ContentTree.generate(Path(tmp) / "root", f"{self.seed}/{name}", self.profile,
                                                layer=tree_layer)
                    files, devices = build(work, tree.root, uuid_)
                    manifest = tree.manifest
            else:
                files, devices = build(work, None, uuid_)
            sb = read_superblock(files[name])
            if sb.uuid != uuid_ or sb.block_size != BLOCK_SIZE:
                raise ImageBuildError(f"{files[name]}: uuid {sb.uuid} block size {sb.block_size}, "
                                      f"expected {uuid_} and {BLOCK_SIZE}")
            img = ErofsImage(
                name=name, layout=layout, fsid=name,
                blobs={c: Blob(entry / p.relative_to(work) if p.is_relative_to(work) else p, p.stat().st_size)
                       for c, p in files.items()},
                devices=devices, device_tags=sb.device_tags, uuid=sb.uuid, manifest=manifest, key=key,
                layers=layers,
            )  # fmt: skip
            if len(img.device_cookies) != sb.extra_devices or set(img.blobs) != {name, *img.device_cookies}:
                raise ImageBuildError(f"{name}: blobs {sorted(img.blobs)} do not match the {sb.extra_devices} "
                                      f"extra devices (tags {sb.device_tags}, device= {devices})")
            (work / "image.json").write_text(json.dumps(img.to_json(self.cache_dir), indent=1) + "\n")
            os.chmod(work, 0o755)
            if entry.exists() and self._load(entry) is None:
                # broken (e.g. a layer it names was removed); never half-built: those are not renamed in
                old = Path(tempfile.mkdtemp(prefix=".old-", dir=self.cache_dir))
                os.rename(entry, old / "e")
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(work, entry)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise  # else another process (without a shared lock, e.g. over 9p) won
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run_fsck(fsck: str | os.PathLike, image: ErofsImage, *, extract: str | os.PathLike | None = None) -> str:
    """fsck.erofs the image (with its extra devices), optionally extracting it with xattrs
    and exact permissions; returns its stdout and stderr, raises CmdError on failure."""
    args = [f"--device={p}" for p in image.device_paths]
    if extract is not None:
        Path(extract).mkdir(parents=True, exist_ok=True)  # fsck.erofs does not create parents
        args += [f"--extract={extract}", "--xattrs", "--preserve-perms"]
    r = cmd([fsck, *args, image.path])
    return r.stdout + r.stderr
