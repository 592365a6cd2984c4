"""The leak check's readers of kernel state, against constructed sysfs trees."""

from erofs_domains.guest.leaks import SystemState, loop_devices, render


def make_loop(sys_block, name, backing=None):
    d = sys_block / name
    d.mkdir(parents=True)
    if backing is not None:
        (d / "loop").mkdir()
        (d / "loop" / "backing_file").write_text(backing + "\n")


def test_loop_devices_lists_bound_devices_only(tmp_path):
    make_loop(tmp_path, "loop0", "/tmp/a.erofs")
    make_loop(tmp_path, "loop1")  # unbound: no loop/ directory
    make_loop(tmp_path, "ram0", "/not/a/loop")
    assert loop_devices(tmp_path) == {"/dev/loop0 -> /tmp/a.erofs"}


def test_loop_device_cleared_while_listed_counts_as_unbound(tmp_path, monkeypatch):
    """__loop_clr_fd() may remove loop/ right before the read (a 7.2 CI run saw it)."""
    make_loop(tmp_path, "loop0", "/tmp/a.erofs")
    make_loop(tmp_path, "loop1", "/tmp/b.erofs")
    cleared = tmp_path / "loop1" / "loop"
    real_read_text = type(tmp_path).read_text

    def clear_then_read(self, *args, **kwargs):
        if self.parent == cleared and cleared.exists():
            self.unlink()
            cleared.rmdir()
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "read_text", clear_then_read)
    assert loop_devices(tmp_path) == {"/dev/loop0 -> /tmp/a.erofs"}


def test_leaked_since_names_only_what_is_new():
    empty = dict(erofs_mounts=frozenset(), loops=frozenset(), live_caches=frozenset(),
                 volumes=frozenset(), cookies=frozenset(), daemons=frozenset())
    before = SystemState(**{**empty, "loops": frozenset({"/dev/loop0 -> /old"})})
    after = SystemState(**{**empty, "loops": frozenset({"/dev/loop0 -> /old", "/dev/loop3 -> /new"}),
                           "erofs_mounts": frozenset({"/mnt/x"})})
    leaked = after.leaked_since(before)
    assert leaked == {"loops": {"/dev/loop3 -> /new"}, "erofs_mounts": {"/mnt/x"}}
    assert "/dev/loop3 -> /new" in render(leaked) and "/old" not in render(leaked)
