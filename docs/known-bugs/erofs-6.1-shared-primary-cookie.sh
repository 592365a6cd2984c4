#!/usr/bin/env bash
# Reproducer: erofs shared domain on 6.1.y — a member whose device= names another member's fsid.
# (docs/known-bugs/erofs-6.1-shared-primary-cookie.md). Run as root in a throwaway guest whose
# kernel has CONFIG_EROFS_FS_ONDEMAND and CONFIG_CACHEFILES_ONDEMAND, e.g. from the suite:
#
#   tools/vm-run --kernel-version 6.1 -- bash docs/known-bugs/erofs-6.1-shared-primary-cookie.sh
#
# Needs mkfs.erofs (erofs-utils 1.8+, $MKFS_EROFS) and python3; the on-demand daemon is the
# suite's (tools/ondemand-daemon). On an affected kernel the second umount oopses and the
# guest dies; on a fixed kernel the script prints "RESULT no busy inodes after A's umount" and
# "RESULT both unmounted, the kernel survived".
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
MKFS=${MKFS_EROFS:-mkfs.erofs}
W=$(mktemp -d /tmp/erofs-primary-cookie.XXXXXX)

# 1. Two images: a layer L (its blob is also mountable on its own) and an image M whose only
#    extra device is that layer (mkfs.erofs rebuild mode: M holds metadata, L the data).
mkdir -p "$W/tree/d" "$W/cache" "$W/a" "$W/b"
for i in 1 2 3 4; do head -c 65536 /dev/urandom > "$W/tree/d/f$i"; done
"$MKFS" -Enoinline_data "$W/L.erofs" "$W/tree" > /dev/null
"$MKFS" "$W/M.erofs" "$W/L.erofs" > /dev/null

# 2. An ext4 cache (cachefiles refuses tmpfs) and the on-demand daemon serving both blobs.
truncate -s 64M "$W/cache.img"
mkfs.ext4 -q "$W/cache.img"
LOOP=$(losetup -f --show "$W/cache.img")
mount "$LOOP" "$W/cache"
python3 "$REPO/tools/ondemand-daemon" --cache "$W/cache" --tag primcookie \
    --blob "L=$W/L.erofs" --blob "M=$W/M.erofs" --log "$W/requests.jsonl" &
for _ in $(seq 100); do grep -qs primcookie /proc/fs/fscache/caches && break; sleep 0.1; done
grep -qs primcookie /proc/fs/fscache/caches || { echo "RESULT daemon did not bind"; exit 2; }

# 3. Member A mounts L as its primary (fsid=L); member B names L as its device, so both use
#    the one domain cookie "L" (erofs_domain_register_cookie() finds it in the domain).
mount -t erofs -o fsid=L,domain_id=D none "$W/a"
mount -t erofs -o fsid=M,domain_id=D,device=L none "$W/b"
cmp "$W/a/d/f1" "$W/b/d/f1"
echo "RESULT both members mounted and read the same data"

# 4. A leaves first. 6.1.y: the cookie's anonymous inode was allocated on A's superblock, and
#    B still holds the cookie: "VFS: Busy inodes after unmount of erofs" (WARNING, fs/super.c).
umount "$W/a"
if dmesg | grep -q "Busy inodes after unmount of erofs"; then
    echo "RESULT busy inodes after A's umount (the known bug); B's umount now oopses in iput()"
else
    echo "RESULT no busy inodes after A's umount"
fi
# 5. B leaves: erofs_kill_sb -> erofs_release_device_info -> erofs_fscache_unregister_cookie ->
#    erofs_fscache_relinquish_cookie -> iput() of the inode of A's freed superblock.
umount "$W/b"
echo "RESULT both unmounted, the kernel survived"
kill %1; wait || true
umount "$W/cache"; losetup -d "$LOOP"; rm -rf "$W"
