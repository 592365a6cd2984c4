#!/usr/bin/env bash
# Reproducer: erofs page-cache sharing (7.0+) -- `mount -o remount,inode_share` of a mount made
# without inode_share/domain_id (docs/known-bugs/erofs-7.2-remount-inode-share.md). Run as root
# in a throwaway guest whose kernel has CONFIG_EROFS_FS_PAGE_CACHE_SHARE, e.g. from the suite:
#
#   tools/vm-run --kernel-version 7.2 -- bash docs/known-bugs/erofs-7.2-remount-inode-share.sh
#
# Needs mkfs.erofs with --xattr-inode-digest (erofs-utils 1.9+, $MKFS_EROFS) and losetup. On an
# affected kernel the read after the remount oopses (NULL pointer dereference in strlen() from
# erofs_xattr_fill_inode_fingerprint()) and the reader is killed; on a fixed kernel the script
# prints "RESULT read after the remount: ok" and "RESULT unmounted, the kernel survived".
set -uo pipefail
MKFS=${MKFS_EROFS:-mkfs.erofs}
W=$(mktemp -d /tmp/erofs-remount-share.XXXXXX)
mkdir -p "$W/tree" "$W/probe" "$W/plain"
head -c 65536 /dev/urandom > "$W/tree/a"
"$MKFS" --xattr-inode-digest "$W/img.erofs" "$W/tree" > /dev/null || { echo "RESULT mkfs.erofs failed"; exit 2; }
LOOP=$(losetup -f --show -r "$W/img.erofs")
opts() { awk -v m="$1" '$5 == m { print $NF }' /proc/self/mountinfo; }

# 1. The kernel shares page cache at all: a mount in a domain works.
if ! err=$(mount -t erofs -o inode_share,domain_id=probe "$LOOP" "$W/probe" 2>&1); then
    echo "RESULT no page-cache sharing in this kernel: $err"; losetup -d "$LOOP"; exit 3
fi
umount "$W/probe"

# 2. A mount without inode_share and without domain_id; no file looked up yet.
mount -t erofs -o ro "$LOOP" "$W/plain"
echo "RESULT plain mount: $(opts "$W/plain")"

# 3. Remount with inode_share. erofs_fc_reconfigure() copies the new options (INODE_SHARE too);
#    "domain_id is needed when inode_ishare is on" is checked only in erofs_fc_fill_super().
mount -o remount,inode_share "$W/plain"
echo "RESULT remount exit $?: $(opts "$W/plain")"

# 4. The first lookup of a file: erofs_iget() -> erofs_ishare_fill_inode() ->
#    erofs_xattr_fill_inode_fingerprint(fp, inode, sbi->domain_id) -> strlen(NULL).
if cmp -s "$W/tree/a" "$W/plain/a"; then
    echo "RESULT read after the remount: ok"
else
    echo "RESULT read after the remount: failed (exit $?)"
fi
umount "$W/plain" && losetup -d "$LOOP" && rm -rf "$W" && echo "RESULT unmounted, the kernel survived"
