"""erofs_domains/guest/images.py (with content_tree.py, manifest.py, dump_erofs.py) on the host: seeded
trees, manifests, and images checked with fsck.erofs / dump.erofs (no mounts, no special
kernel).

Tests that need erofs-utils use the erofs-utils under test (conftest.py resolve_mkfs: --mkfs
or $MKFS_EROFS with dump.erofs and fsck.erofs beside it, else --erofs-utils-src, else Debian's
build), and skip (fail in strict mode) when there is none.
"""

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from erofs_domains.base import erofs_tools
from erofs_domains.base.erofs_tools import Tools
from erofs_domains.base.proc import cmd
from erofs_domains.guest import images, manifest
from erofs_domains.guest.content_tree import BLOCK_SIZE, FIXED_MTIME, PROFILES, ContentTree
from erofs_domains.guest.dump_erofs import parse_dump_inode, parse_dump_ls, parse_dump_superblock
from erofs_domains.guest.erofs_format import EROFS_MAGIC, EROFS_SUPER_OFFSET, parse_superblock, read_superblock
from erofs_domains.guest.images import ErofsImage, ImageFactory, run_fsck
from erofs_domains.guest.manifest import REBUILD_ROOT_MODE, Entry, Manifest, Mismatch

REPO = Path(__file__).resolve().parents[2]
SEED = 20250520
PROFILE = "tiny"


@pytest.fixture(scope="session")
def tools(erofs_utils) -> Tools:
    return erofs_utils.tools()


@pytest.fixture(scope="session")
def fsck(tools) -> str:
    if not tools.fsck:
        pytest.skip(f"no fsck.erofs next to {tools.mkfs} (set FSCK_EROFS)")
    return tools.fsck


@pytest.fixture(scope="session")
def dump(tools) -> str:
    if not tools.dump:
        pytest.skip(f"no dump.erofs next to {tools.mkfs} (set DUMP_EROFS)")
    return tools.dump


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="session")
def factory(tools, image_cache) -> ImageFactory:
    return ImageFactory(image_cache, tools.mkfs, SEED, profile=PROFILE)


@pytest.fixture(scope="session")
def built(factory) -> dict[str, ErofsImage]:
    return {
        "single": factory.single("img-inline"),
        "noinline": factory.single("img-noinline", inline_data=False),
        "blobdev": factory.blobdev("img-blobdev", "blob-of-img-blobdev"),
        "compressed": factory.compressed("img-lz4hc"),
        "layered1": factory.layered("base", "app1"),
        "layered2": factory.layered("base", "app2"),
    }


LAYOUTS = ["single", "noinline", "blobdev", "compressed", "layered1", "layered2"]


# --------------------------------------------------------------------------- trees (no mkfs)


def test_tree_is_a_function_of_seed_and_profile(tmp_path):
    a = ContentTree.generate(tmp_path / "a", SEED, PROFILE)
    b = ContentTree.generate(tmp_path / "b", SEED, PROFILE)
    c = ContentTree.generate(tmp_path / "c", SEED + 1, PROFILE)
    assert a.manifest.to_json() == b.manifest.to_json()
    assert a.manifest.digest == b.manifest.digest
    assert a.manifest.digest != c.manifest.digest
    assert sorted(a.manifest.entries) == sorted(c.manifest.entries), "names do not depend on the seed"


def test_tree_has_every_kind_of_entry(tmp_path):
    tree = ContentTree.generate(tmp_path / "t", SEED, PROFILE)
    m, root = tree.manifest, tree.root
    kinds = {e.kind for e in m.entries.values()}
    assert kinds == {"dir", "file", "symlink"}
    sizes = [m[p].size for p in m.files()]
    assert max(sizes) > 256 * 1024, "a large file"
    assert 0 in sizes, "empty files"
    assert {4095, 4096, 4097} <= set(sizes), "block-boundary sizes"
    assert len([p for p in m if p.startswith("/many/")]) == PROFILES[PROFILE].many_files
    sparse = root / "sparse" / "sparse-0.img"
    assert sparse.stat().st_blocks * 512 < sparse.stat().st_size, "sparse file has holes"
    assert m["/links/hard-a"].link == m["/links/hard-b"].link == m["/small/hard-c"].link == "/links/hard-a"
    assert m["/links/hard-xattr-2"].link == "/links/hard-xattr"
    linked = {"user.linked": b"shared by both names".hex()}
    assert m["/links/hard-xattr"].xattrs == m["/links/hard-xattr-2"].xattrs == linked
    assert m["/links/sym-dangling"].target == "does/not/exist"
    assert m["/xattrs"].xattrs == {"user.dir": b"xattr on a directory".hex()}
    assert m["/xattrs/x0"].xattrs["user.empty"] == ""
    assert m["/empty/empty-dir"].kind == "dir" and not any((root / "empty" / "empty-dir").iterdir())
    assert m["/empty/sticky"].mode == 0o1777
    assert {m[p].mode for p in m.files()} >= {0o644, 0o600, 0o444, 0o755}
    for path in [root, *root.rglob("*")]:
        assert path.lstat().st_mtime == FIXED_MTIME, path


def test_layer_tree(tmp_path):
    tree = ContentTree.generate(tmp_path / "t", SEED, PROFILE, layer="base")
    m = tree.manifest
    assert "/base/many" in m and "/etc/layer-base" in m and "/shared/from-base.bin" in m
    assert b"LAYER=base" in (tree.root / "etc" / "os-release").read_bytes()


def test_generate_refuses_a_non_empty_root(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(FileExistsError):
        ContentTree.generate(tmp_path, SEED, PROFILE)


# --------------------------------------------------------------------------- manifests (no mkfs)


def test_verify_returns_each_mismatch(tmp_path):
    tree = ContentTree.generate(tmp_path / "t", SEED, PROFILE)
    root = tree.root
    assert tree.manifest.verify(root) == []
    with open(root / "small" / "s001-17.dat", "r+b") as f:
        f.write(b"X")
    os.chmod(root / "small" / "s000-1.dat", 0o600)
    (root / "empty" / "empty-0").unlink()
    (root / "empty" / "new").write_bytes(b"")
    os.setxattr(root / "xattrs" / "x2", "user.common", b"changed")
    (root / "links" / "hard-b").unlink()
    shutil.copy(root / "links" / "hard-a", root / "links" / "hard-b")
    (root / "links" / "sym-rel").unlink()
    (root / "links" / "sym-rel").symlink_to("elsewhere")

    got = {(m.path, m.field) for m in tree.manifest.verify(root)}
    assert got == {
        ("/small/s001-17.dat", "sha256"),
        ("/small/s000-1.dat", "mode"),
        ("/empty/empty-0", "missing"),
        ("/empty/new", "unexpected"),
        ("/xattrs/x2", "xattrs"),
        ("/links/hard-b", "link"),  # no longer the same inode as hard-a and hard-c
        ("/links/sym-rel", "target"),
        ("/links/sym-rel", "size"),
    }
    by = {(m.path, m.field): m for m in tree.manifest.verify(root)}
    assert str(by[("/small/s000-1.dat", "mode")]) == "/small/s000-1.dat: mode: expected '0o644', got '0o600'"


def test_verify_reports_read_errors(tmp_path, monkeypatch):
    tree = ContentTree.generate(tmp_path / "t", SEED, PROFILE)
    real = manifest.sha256_file

    def failing(path):
        if str(path).endswith("large-0.bin"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(manifest, "sha256_file", failing)
    got = tree.manifest.verify(tree.root)
    assert [(m.path, m.field) for m in got] == [("/large/large-0.bin", "error")]
    assert "errno 5" in got[0].actual


def test_manifest_json_round_trip(tmp_path):
    m = ContentTree.generate(tmp_path / "t", SEED, PROFILE).manifest
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m and again.digest == m.digest


def test_overlay_follows_rebuild_rules():
    def man(entries):
        return Manifest({p: Entry(**e) for p, e in entries.items()})

    lower = man({
        "/": {"kind": "dir", "mode": 0o755, "xattrs": {}},
        "/etc": {"kind": "dir", "mode": 0o755, "xattrs": {"user.a": "01"}},
        "/etc/os-release": {"kind": "file", "mode": 0o644, "size": 1, "sha256": "lower"},
        "/etc/only-lower": {"kind": "file", "mode": 0o644, "size": 1, "sha256": "l"},
        "/opt": {"kind": "dir", "mode": 0o755},
        "/opt/tool": {"kind": "file", "mode": 0o755, "size": 1, "sha256": "t"},
        "/h1": {"kind": "file", "mode": 0o644, "size": 1, "sha256": "h", "link": "/h1"},
        "/h2": {"kind": "file", "mode": 0o644, "size": 1, "sha256": "h", "link": "/h1"},
        "/h3": {"kind": "file", "mode": 0o644, "size": 1, "sha256": "h", "link": "/h1"},
    })  # fmt: skip
    upper = man({
        "/": {"kind": "dir", "mode": 0o700, "xattrs": {"user.root": "00"}},
        "/etc": {"kind": "dir", "mode": 0o700, "xattrs": {}},
        "/etc/os-release": {"kind": "file", "mode": 0o600, "size": 2, "sha256": "upper"},
        "/opt": {"kind": "symlink", "mode": 0o777, "size": 3, "target": "usr"},
        "/h1": {"kind": "file", "mode": 0o644, "size": 1, "sha256": "new"},
    })  # fmt: skip
    m = Manifest.overlay([lower, upper])
    assert m["/"].mode == REBUILD_ROOT_MODE and m["/"].xattrs == {}
    assert m["/etc"] == Entry("dir", 0o700, xattrs={})
    assert m["/etc/os-release"].sha256 == "upper"
    assert "/etc/only-lower" in m
    assert m["/opt"].kind == "symlink" and "/opt/tool" not in m
    assert m["/h1"].sha256 == "new" and m["/h1"].link is None
    assert m["/h2"].link == m["/h3"].link == "/h2"


def test_mismatch_text():
    assert str(Mismatch("/a", "size", 3, 4)) == "/a: size: expected 3, got 4"


# --------------------------------------------------------------------------- parsers (pure)


def _fake_image(tags: list[bytes], uuid_: uuid.UUID) -> bytes:
    data = bytearray(4096)
    sb = EROFS_SUPER_OFFSET
    data[sb : sb + 4] = EROFS_MAGIC.to_bytes(4, "little")
    data[sb + 12] = 12
    data[sb + 48 : sb + 64] = uuid_.bytes
    data[sb + 64 : sb + 69] = b"label"
    data[sb + 80 : sb + 84] = (0x8).to_bytes(4, "little")
    data[sb + 86 : sb + 88] = len(tags).to_bytes(2, "little")
    data[sb + 88 : sb + 90] = (9).to_bytes(2, "little")
    for i, tag in enumerate(tags):
        off = 9 * 128 + i * 128
        data[off : off + len(tag)] = tag
        data[off + 64 : off + 68] = (100 + i).to_bytes(4, "little")
    return bytes(data)


def test_parse_superblock():
    u = uuid.UUID("11111111-2222-3333-4444-555555555555")
    sb = parse_superblock(_fake_image([u.hex.encode(), b""], u))
    assert sb.uuid == str(u) and sb.block_size == 4096 and sb.volume_name == "label"
    assert sb.extra_devices == 2 and sb.device_tags == [u.hex, ""] and sb.device_blocks == [100, 101]
    with pytest.raises(ValueError):
        parse_superblock(bytes(2048))


DUMP_INODE = """Path : /etc/hl
Size: 3  On-disk size: 3  regular file
NID: 61   Links: 2   Layout: 4   Compression ratio: 100.00%
Inode size: 32   Xattr size: 20
Uid: 0   Gid: 0  Access: 0644/rw-r--r--
Timestamp: 1970-01-01 00:00:00.000000000
"""
DUMP_LS = """       NID TYPE  FILENAME
        50    2  .
        44    2  ..
        57    1  with space.txt
        63    7  sym
"""


def test_parse_dump_outputs():
    assert parse_dump_inode(DUMP_INODE) == {"size": 3, "kind": "file", "nid": 61, "links": 2, "xattr_size": 20,
                                            "mode": 0o644}
    assert parse_dump_ls(DUMP_LS) == [(50, 2, "."), (44, 2, ".."), (57, 1, "with space.txt"), (63, 7, "sym")]
    sb = parse_dump_superblock("Filesystem blocksize:       4096\nFilesystem UUID:   abc\nnoise\n")
    assert sb == {"Filesystem blocksize": "4096", "Filesystem UUID": "abc"}
    with pytest.raises(ValueError):
        parse_dump_inode("garbage")


def test_names_are_checked():
    for bad in ["", "a/b", "a,b", "-x", "x" * 101, "a b"]:
        with pytest.raises(ValueError):
            images.check_name(bad)
    assert images.check_name("base+app1") == "base+app1"


# --------------------------------------------------------------------------- images (need erofs-utils)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsck_accepts(built, fsck, layout):
    run_fsck(fsck, built[layout])  # raises on a non-zero exit


def _split_known_fsck_bugs(img: ErofsImage, extracted: Path, mismatches: list[Mismatch]):
    """fsck.erofs 1.9.4 --extract bugs (the kernel reads the same images correctly):
    - an xattr with an empty value ends the xattr loop of erofsfsck_dump_xattrs() ("failed
      to get xattr value size"), so it and the inode's xattrs listed after it are lost;
    - a chunked file ending in a hole (null chunks) is extracted short: holes are lseek()ed
      over and the file is never extended to i_size."""
    known, other = [], []
    by_path: dict[str, list[Mismatch]] = {}
    for m in mismatches:
        by_path.setdefault(m.path, []).append(m)
    for path, ms in by_path.items():
        exp = img.manifest.entries.get(path)
        if (exp is not None and len(ms) == 1 and ms[0].field == "xattrs" and "" in exp.xattrs.values()
                and set(ms[0].actual.items()) < set(exp.xattrs.items())):
            known.append(("empty xattr value", ms[0]))
            continue
        if exp is not None and {m.field for m in ms} == {"size", "sha256"} and exp.kind == "file":
            data = (extracted / path.lstrip("/")).read_bytes()
            if len(data) < exp.size and hashlib.sha256(data.ljust(exp.size, b"\0")).hexdigest() == exp.sha256:
                known.extend(("trailing hole", m) for m in ms)
                continue
        other.extend(ms)
    return known, other


@pytest.mark.parametrize("layout", LAYOUTS)
def test_extracted_content_matches_manifest(built, fsck, layout, tmp_path):
    img = built[layout]
    run_fsck(fsck, img, extract=tmp_path / "x")
    mismatches = img.manifest.verify(tmp_path / "x")
    known, other = _split_known_fsck_bugs(img, tmp_path / "x", mismatches)
    assert other == [], "\n".join(map(str, other))
    assert len(img.manifest.files()) > 50


@pytest.mark.parametrize("bug,layout", [("empty xattr value", "single"), ("trailing hole", "blobdev")])
def test_known_fsck_extract_bugs(built, fsck, tmp_path, bug, layout):
    """xfails while the known bug is there (erofs_tools.KNOWN_TOOL_BUGS); fails once a release
    the table says has it extracts correctly (the table must then name the fixing release), and
    when a release after the fix shows it again."""
    img = built[layout]
    run_fsck(fsck, img, extract=tmp_path / "x")
    known, _ = _split_known_fsck_bugs(img, tmp_path / "x", img.manifest.verify(tmp_path / "x"))
    hits = [str(m) for kind, m in known if kind == bug]
    version = erofs_tools.version(fsck)
    if erofs_tools.has_known_bug(bug, version):
        if hits:
            pytest.xfail(f"fsck.erofs --extract bug ({bug}): {hits[0]}")
        pytest.fail(f"fsck.erofs {version} extracts correctly what the known bug ({bug}) lost: "
                    "record the release that fixed it in erofs_tools.KNOWN_TOOL_BUGS", pytrace=False)
    assert hits == [], f"fsck.erofs {version} has the bug ({bug}) KNOWN_TOOL_BUGS says it fixed"


@pytest.mark.parametrize("layout", ["single", "blobdev", "layered1"])
def test_dump_erofs_agrees_with_manifest(built, dump, layout, require_tool):
    require_tool("dump --cat")
    img = built[layout]
    from_dump = Manifest.from_dump(dump, img.path, img.device_paths)
    mismatches = img.manifest.compare(from_dump, mode_mask=0o777)
    assert mismatches == [], "\n".join(map(str, mismatches))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_superblock_agrees_with_dump_erofs(built, dump, layout):
    img = built[layout]
    info = parse_dump_superblock(cmd([dump, "-s", img.path]).stdout)
    sb = read_superblock(img.path)
    assert info["Filesystem UUID"] == sb.uuid == img.uuid
    assert int(info["Filesystem blocksize"]) == sb.block_size == BLOCK_SIZE
    # dump/main.c: since commit 119a054 (in 1.9.1) "Filesystem incompatible features:" has a line
    # of its own; 1.8.x and 1.9 list compatible and incompatible ones in "Filesystem features:".
    incompat = info.get("Filesystem incompatible features", info.get("Filesystem features"))
    assert incompat is not None, f"dump.erofs -s printed no features line: {sorted(info)}"
    assert ("device_table" in incompat) == bool(sb.extra_devices)
    assert sb.device_tags == img.device_tags


def test_single_images(built):
    for key in ("single", "noinline", "compressed"):
        img = built[key]
        assert list(img.blobs) == [img.fsid] == [img.name]
        assert img.devices == img.device_tags == []
        assert img.blobs[img.fsid].size == img.path.stat().st_size
        assert img.mount_options() == f"fsid={img.fsid}"
        assert img.mount_options("dom") == f"fsid={img.fsid},domain_id=dom"
    assert built["compressed"].path.stat().st_size < built["single"].path.stat().st_size


def test_blobdev_image(built, factory):
    img = built["blobdev"]
    assert img.device_tags == [""], "mkfs.erofs --blobdev writes an empty tag"
    assert img.devices == img.device_cookies == ["blob-of-img-blobdev"]
    assert set(img.blobs) == {"img-blobdev", "blob-of-img-blobdev"}
    assert img.mount_options("d") == "fsid=img-blobdev,domain_id=d,device=blob-of-img-blobdev"
    default = factory.blobdev("img-blobdev2")
    (blob_name,) = default.devices
    digest = hashlib.sha256(default.blobs[blob_name].path.read_bytes()).hexdigest()
    assert blob_name == f"blob-{digest[:32]}", "default blob names come from the content"


def test_layered_tags_are_layer_uuids(built, factory):
    img = built["layered1"]
    base, app = factory.layer("base"), factory.layer("app1")
    assert img.layers == ["base", "app1"] and img.fsid == "base+app1"
    assert read_superblock(base.path).uuid == base.uuid
    assert img.device_tags == [uuid.UUID(base.uuid).hex, uuid.UUID(app.uuid).hex]
    assert img.devices == [] and img.device_cookies == img.device_tags
    assert img.blobs == {"base+app1": img.blobs["base+app1"], img.device_tags[0]: base.blobs["base"],
                         img.device_tags[1]: app.blobs["app1"]}
    assert img.mount_options("dom") == "fsid=base+app1,domain_id=dom", "the tags name the blobs: no device="
    assert img.path.stat().st_size < base.path.stat().st_size, "metadata only"
    assert img.manifest["/etc/os-release"] == app.manifest["/etc/os-release"], "the upper layer wins"
    assert "/base/many" in img.manifest and "/app1/many" in img.manifest


def test_two_merged_images_share_the_base_blob(built):
    one, two = built["layered1"], built["layered2"]
    assert one.device_tags[0] == two.device_tags[0]
    assert one.blobs[one.device_tags[0]] == two.blobs[two.device_tags[0]]
    assert one.device_tags[1] != two.device_tags[1]
    assert one.fsid != two.fsid


def test_uuids_are_unique(built, factory, tools, image_cache):
    layers = [factory.layer(n) for n in ("base", "app1", "app2")]
    uuids = [i.uuid for i in layers] + [i.uuid for i in built.values()]
    assert len(set(uuids)) == len(uuids)
    other_seed = ImageFactory(image_cache, tools.mkfs, SEED + 1, profile=PROFILE)
    assert other_seed.uuid_for("layer", "base") != factory.uuid_for("layer", "base")
    assert factory.uuid_for("layer", "base") == layers[0].uuid, "derived, hence reproducible"


def test_layer_mistakes_are_refused(factory):
    with pytest.raises(ValueError):
        factory.layered("base", "base")
    with pytest.raises(ValueError):
        factory.layered("base", "a/b")


def test_cache_hit_in_a_new_factory(built, tools, image_cache):
    again = ImageFactory(image_cache, tools.mkfs, SEED, profile=PROFILE)
    mtimes = {k: {c: b.path.stat().st_mtime_ns for c, b in v.blobs.items()} for k, v in built.items()}
    imgs = {
        "single": again.single("img-inline"),
        "blobdev": again.blobdev("img-blobdev", "blob-of-img-blobdev"),
        "layered1": again.layered("base", "app1"),
    }
    assert again.builds == 0 and again.hits == 5  # 3 images + the 2 layers of layered1
    for k, img in imgs.items():
        assert img.cached
        assert img.blobs == built[k].blobs and img.manifest == built[k].manifest
        assert {c: b.path.stat().st_mtime_ns for c, b in img.blobs.items()} == mtimes[k]


def test_cache_is_shared_by_processes(tools, tmp_path):
    """Two processes asking for the same new image at once: one builds, both get it."""
    code = (
        "import json, sys; from erofs_domains.guest.images import ImageFactory\n"
        f"f = ImageFactory(sys.argv[1], {tools.mkfs!r}, 'procs', profile={PROFILE!r})\n"
        "img = f.layered('base', 'app')\n"
        "print(json.dumps({'builds': f.builds, 'path': str(img.path), 'tags': img.device_tags}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert results[0]["path"] == results[1]["path"] and results[0]["tags"] == results[1]["tags"]
    assert sum(r["builds"] for r in results) == 3, "3 images (2 layers + merged), each built once"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".build-")]


def test_builds_are_reproducible(built, tools, tmp_path):
    other = ImageFactory(tmp_path, tools.mkfs, SEED, profile=PROFILE)
    for img in (other.single("img-inline"), other.layered("base", "app1"),
                other.blobdev("img-blobdev", "blob-of-img-blobdev"), other.compressed("img-lz4hc")):
        ref = next(b for b in built.values() if b.name == img.name)
        assert not img.cached
        for cookie, blob in img.blobs.items():
            assert blob.path.read_bytes() == ref.blobs[cookie].path.read_bytes(), (img.name, cookie)


def test_link_blobs(built, tmp_path):
    img = built["layered1"]
    made = img.link_blobs(tmp_path / "blobs")
    assert sorted(made) == sorted(img.blobs)
    for cookie, path in made.items():
        assert path.name == cookie and path.read_bytes() == img.blobs[cookie].path.read_bytes()
        assert stat.S_ISREG(path.lstat().st_mode)
