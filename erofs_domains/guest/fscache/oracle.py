"""A pure model of erofs' fscache volume/cookie rules in Linux 6.12 (shared domains).

The model follows fs/erofs/fscache.c and fs/erofs/super.c of 6.12, as
docs/domains.md describes them: it predicts, for a sequence of ``mount``/``umount``
calls, which mounts fail with which errno, which fscache volumes and cookies
are live, how many OPEN/CLOSE requests a well-behaved daemon sees, and which
cache files exist afterwards.

Assumptions: a cache is bound, the daemon answers every OPEN with a size and
every READ with data, and it closes anon fds on CLOSE (so a released volume
is gone before the next mount). Failure modes that depend on the daemon or on
image contents (bad ``copen``, wrong ``device=`` count, unreadable images) are
not modelled.
"""

from __future__ import annotations

import errno as _errno
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from erofs_domains.guest.mounts import SYSFS_NAME_MAX, sysfs_name
from erofs_domains.guest.observe.cachedir import KEY_MAX, cook_key, predict_path

__all__ = ["KernelBug", "MountResult", "Oracle", "volume_key_for"]

CookieId = tuple[str, str]  # (volume key, cookie key)

#: fscache refuses cookie keys longer than this (fscache_acquire_cookie(): index_key_len > 255).
_FSCACHE_KEY_MAX = 255
#: fscache refuses volume keys longer than NAME_MAX (fscache_acquire_volume()).
_VOLUME_KEY_MAX = 255
_NAME_MAX = 255


class KernelBug(RuntimeError):
    """The modelled mount would oops the kernel (cookie key of 253..255 bytes hits
    ``BUG_ON(keylen > NAME_MAX - 3)`` in cachefiles_cook_key() and the mount hangs)."""


def volume_key_for(fsid: str, domain: str | None = None) -> str:
    """``erofs,<domain_id>`` or ``erofs,<fsid>`` (erofs_fscache_register_volume())."""
    return "erofs," + (domain if domain is not None else fsid)


def _blen(s: str) -> int:
    return len(s.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class MountResult:
    """Outcome of :meth:`Oracle.mount`.

    ``opened`` lists the cookies this call newly acquired whose cache lookup
    sends an OPEN (also for a mount that then fails: its cookies get OPEN,
    then CLOSE at kill_sb). ``shared`` lists names that reused a live domain
    cookie (no OPEN, no ``Acquire`` stats change).
    """

    mount_id: Hashable
    errno: int
    volume: str | None
    opened: tuple[CookieId, ...] = ()
    shared: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def errname(self) -> str:
        return "OK" if self.errno == 0 else _errno.errorcode.get(self.errno, str(self.errno))


@dataclass
class _Ctx:
    """An ``erofs_fscache`` context: one fscache cookie, refcounted by registrations."""

    volume: str
    name: str
    domain: str | None
    looked_up: bool  # the cachefiles lookup succeeds, i.e. an OPEN is sent
    users: Counter = field(default_factory=Counter)  # mount_id -> registrations

    @property
    def ref(self) -> int:
        return sum(self.users.values())


@dataclass
class _Mount:
    mount_id: Hashable
    fsid: str
    domain: str | None
    blobs: tuple[str, ...]
    volume: str
    sysfs_name: str
    registrations: list[str]  # cookie names in registration order (primary first)


class Oracle:
    """Expected fscache state for erofs mounts with and without ``domain_id`` (6.12 rules).

    ``mount()`` returns a :class:`MountResult`; a failed mount never changes
    the live state (:meth:`volumes`, :meth:`cookies`), but cookies it acquired
    before failing still count in :meth:`expected_opens` and leave cache
    files, as in the kernel (erofs_kill_sb() relinquishes them).
    """

    def __init__(self, sysfs_name_max: int | None = SYSFS_NAME_MAX):
        self.sysfs_name_max = sysfs_name_max
        self._mounts: dict[Hashable, _Mount] = {}
        self._ctx: dict[CookieId, _Ctx] = {}
        self._domain_ref: Counter = Counter()  # erofs_domain.ref: mounts + ctxs of the domain
        self._opens: Counter = Counter()
        self._closes: Counter = Counter()
        self._opened_ever: set[CookieId] = set()
        self._released: set[CookieId] = set()
        self.history: list[MountResult] = []

    # ------------------------------------------------------------------ queries
    def volumes(self) -> frozenset[str]:
        """Live fscache volume keys."""
        vols = {f"erofs,{d}" for d, ref in self._domain_ref.items() if ref > 0}
        vols.update(m.volume for m in self._mounts.values() if m.domain is None)
        return frozenset(vols)

    def cookies(self) -> frozenset[CookieId]:
        """Live ``(volume key, cookie key)`` pairs."""
        return frozenset(self._ctx)

    def expected_opens(self) -> Counter:
        """``(volume, cookie) -> number of OPEN requests`` the daemon should have seen so far:
        one per new cookie acquisition whose lookup succeeds. Device-blob OPENs are
        asynchronous and may arrive after mount(2) returned (docs/domains.md#cookies)."""
        return Counter(self._opens)

    def expected_closes(self) -> Counter:
        """``(volume, cookie) -> number of CLOSE requests`` (one per release of an opened cookie)."""
        return Counter(self._closes)

    def cache_files(self) -> frozenset[str]:
        """Predicted data-file paths once every cookie acquired so far has been released."""
        return frozenset(predict_path(v, c) for v, c in self._opened_ever)

    def committed_files(self) -> frozenset[str]:
        """Predicted data-file paths that exist now (released at least once; a first-time
        object is an unlinked tmpfile until it is withdrawn)."""
        return frozenset(predict_path(v, c) for v, c in self._released)

    def shared_users(self, volume: str, cookie: str) -> int:
        """Registrations holding the cookie (``erofs_fscache.ref``); 0 if it is not live."""
        ctx = self._ctx.get((volume, cookie))
        return 0 if ctx is None else ctx.ref

    def cookie_mounts(self, volume: str, cookie: str) -> frozenset[Hashable]:
        """Mount ids currently using the cookie."""
        ctx = self._ctx.get((volume, cookie))
        return frozenset() if ctx is None else frozenset(ctx.users)

    def mounts(self) -> frozenset[Hashable]:
        """Ids of the live mounts."""
        return frozenset(self._mounts)

    def volume_of(self, mount_id: Hashable) -> str:
        return self._mounts[mount_id].volume

    def domain_cookies(self, domain: str) -> frozenset[str]:
        """Cookie names live in ``erofs,<domain>``."""
        vol = f"erofs,{domain}"
        return frozenset(c for v, c in self._ctx if v == vol)

    # ------------------------------------------------------------------ helpers
    def _sysfs_name(self, fsid: str, domain: str | None) -> str:
        # the kobject name: byte-truncated where the kernel truncates (rule sysfs_name_truncated)
        return sysfs_name(fsid, domain, self.sysfs_name_max)

    @staticmethod
    def _volume_dir_ok(vkey: str) -> bool:
        # cachefiles_acquire_volume() looks up "I" + key unencoded: '/' gives EACCES,
        # a 256-byte name ENAMETOOLONG; the cookie lookups then all fail.
        return "/" not in vkey and 1 + _blen(vkey) <= _NAME_MAX

    @staticmethod
    def _check_key(name: str) -> str | None:
        n = _blen(name)
        if n > _FSCACHE_KEY_MAX:
            return f"failed to get cookie for {name}"
        if n > KEY_MAX:
            raise KernelBug(f"cookie key of {n} bytes: kernel BUG at fs/cachefiles/key.c (BUG_ON) and a hung mount")
        return None

    def _lookup_ok(self, vkey: str, name: str) -> bool:
        return self._volume_dir_ok(vkey) and len(cook_key(name)) <= _NAME_MAX

    def _fail(self, mount_id, err, vkey, msg, opened=(), shared=()) -> MountResult:
        # Cookies acquired by the failing mount were looked up (OPEN) and are
        # relinquished again by erofs_kill_sb() (CLOSE, file committed).
        for cid in opened:
            self._opens[cid] += 1
            self._closes[cid] += 1
            self._opened_ever.add(cid)
            self._released.add(cid)
        res = MountResult(mount_id, err, vkey, tuple(opened), tuple(shared), msg)
        self.history.append(res)
        return res

    # ------------------------------------------------------------------ actions
    def mount(self, mount_id: Hashable, fsid: str, domain: str | None = None,
              blobs: Iterable[str] = ()) -> MountResult:
        """Model ``mount -t erofs none <mnt> -o fsid=<fsid>[,domain_id=<domain>][,device=<b>]...``.

        ``blobs`` are the extra-device cookie names (``device=`` values, or the
        on-disk device tags when no ``device=`` is given), in device-table order.
        """
        if mount_id in self._mounts:
            raise ValueError(f"mount id {mount_id!r} is already mounted")
        if fsid is None:
            raise ValueError("fsid is required: without it erofs does not use fscache")
        blobs = tuple(blobs)

        # fs_parser: string options may not be empty ("Bad value for 'fsid'")
        for opt, val in (("fsid", fsid), ("domain_id", domain), *(("device", b) for b in blobs)):
            if val == "":
                return self._fail(mount_id, _errno.EINVAL, None, f"Bad value for '{opt}'")

        vkey = volume_key_for(fsid, domain)
        live_domain = domain is not None and self._domain_ref[domain] > 0
        if not live_domain:
            if _blen(vkey) > _VOLUME_KEY_MAX:
                return self._fail(mount_id, _errno.ENOMEM, vkey, f"failed to register volume for {vkey}")
            if vkey in self.volumes():
                # fscache_hash_volume(): an unrelinquished volume with the same key
                return self._fail(mount_id, _errno.EBUSY, vkey, f"failed to register volume for {vkey}")

        # Primary blob. In a domain it is registered with EROFS_REG_COOKIE_NEED_NOEXIST
        # (erofs_fscache_register_fs()), so any live cookie name of the domain,
        # primary or device blob, makes it fail before anything is acquired.
        if domain is not None and (vkey, fsid) in self._ctx:
            return self._fail(mount_id, _errno.EEXIST, vkey, f"{fsid} already exists in domain {domain}")
        msg = self._check_key(fsid)
        if msg:
            return self._fail(mount_id, _errno.EINVAL, vkey, msg)
        if not self._lookup_ok(vkey, fsid):
            # the superblock read finds the cookie FAILED: no OPEN, ENOBUFS (docs/domains.md#volume-key)
            return self._fail(mount_id, _errno.ENOBUFS, vkey, "cannot read erofs superblock")

        new: list[str] = [fsid]  # cookies this mount acquires, in order
        shared: list[str] = []
        registrations = [fsid]

        def opened() -> list[CookieId]:
            return [(vkey, n) for n in new if self._lookup_ok(vkey, n)]

        # Extra devices: acquired while parsing the superblock, after the primary.
        for blob in blobs:
            if domain is not None:
                # erofs_domain_register_cookie(): same (domain, name) -> share the ctx,
                # including this mount's own primary or an earlier device of it
                if (vkey, blob) in self._ctx or blob in new:
                    shared.append(blob)
                    registrations.append(blob)
                    continue
            elif blob in new:
                # fscache_hash_cookie(): "Duplicate cookie detected" -> NULL -> EINVAL
                return self._fail(mount_id, _errno.EINVAL, vkey, f"failed to get cookie for {blob}",
                                  opened(), shared)
            msg = self._check_key(blob)
            if msg:
                return self._fail(mount_id, _errno.EINVAL, vkey, msg, opened(), shared)
            new.append(blob)
            registrations.append(blob)

        sysfs = self._sysfs_name(fsid, domain)
        if any(m.sysfs_name == sysfs for m in self._mounts.values()):
            # erofs_register_sysfs() runs last in erofs_fc_fill_super()
            return self._fail(mount_id, _errno.EEXIST, vkey,
                              f"sysfs: cannot create duplicate filename '/fs/erofs/{sysfs}'", opened(), shared)

        # commit
        joined = [n for n in shared if (vkey, n) in self._ctx]  # other mounts' live cookies
        m = _Mount(mount_id, fsid, domain, blobs, vkey, sysfs, registrations)
        self._mounts[mount_id] = m
        if domain is not None:
            self._domain_ref[domain] += 1
        for name in registrations:
            cid = (vkey, name)
            ctx = self._ctx.get(cid)
            if ctx is None:
                ctx = self._ctx[cid] = _Ctx(vkey, name, domain, self._lookup_ok(vkey, name))
                if domain is not None:
                    self._domain_ref[domain] += 1
                if ctx.looked_up:
                    self._opens[cid] += 1
                    self._opened_ever.add(cid)
            ctx.users[mount_id] += 1
        msg = "mounted"
        if joined:
            msg += (f"; {', '.join(joined)} joins the live cookie of domain {domain} "
                    "(erofs_domain_register_cookie() finds the same domain and name and takes a reference)")
        res = MountResult(mount_id, 0, vkey, tuple(opened()), tuple(shared), msg)
        self.history.append(res)
        return res

    def umount(self, mount_id: Hashable) -> tuple[CookieId, ...]:
        """Unmount; returns the cookies relinquished (those whose last user went away)."""
        m = self._mounts.pop(mount_id)
        released = []
        # erofs_fscache_unregister_fs() drops the primary, the device contexts go
        # with the device table; the order does not matter for the model.
        for name in m.registrations:
            cid = (m.volume, name)
            ctx = self._ctx[cid]
            ctx.users[mount_id] -= 1
            if not ctx.users[mount_id]:
                del ctx.users[mount_id]
            if ctx.ref == 0:
                del self._ctx[cid]
                released.append(cid)
                if ctx.looked_up:
                    self._closes[cid] += 1
                    self._released.add(cid)
                if m.domain is not None:
                    self._domain_ref[m.domain] -= 1
        if m.domain is not None:
            self._domain_ref[m.domain] -= 1
            if self._domain_ref[m.domain] == 0:
                del self._domain_ref[m.domain]
        return tuple(released)

    def umount_all(self) -> None:
        for mid in list(self._mounts):
            self.umount(mid)
