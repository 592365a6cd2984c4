"""erofs_domains/guest/race.py: overlap of spans, and retrying a race until it happened."""

import threading
import time

import pytest

from erofs_domains.guest.race import Attempts, Span, Timeline, overlaps, render_spans


def test_overlap_seconds():
    a = Span("t1", "umount m1", 1.0, 2.0)
    assert a.overlap(Span("t2", "mount m2", 1.5, 3.0)) == pytest.approx(0.5)
    assert a.overlap(Span("t2", "mount m2", 2.0, 3.0)) == 0.0  # touching is not overlapping
    assert a.overlap(Span("t2", "mount m2", 0.0, 5.0)) == pytest.approx(1.0)
    assert a.contains(1.5) and not a.contains(2.5)


def test_overlaps_only_between_different_sides():
    spans = [Span("t1", "mount a", 0, 2), Span("t1", "umount a", 1, 3), Span("t2", "mount b", 2.5, 4)]
    pairs = overlaps(spans, spans)
    assert [(x.what, y.what) for x, y, _ in pairs] == [("umount a", "mount b"), ("mount b", "umount a")]
    assert overlaps(spans[:1], spans[2:]) == []


def test_timeline_records_spans_from_threads_and_errors():
    tl = Timeline()
    barrier = threading.Barrier(2)

    def side(name):
        barrier.wait()
        with tl.span(name, f"mount {name}"):
            time.sleep(0.2)

    threads = [threading.Thread(target=side, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(OSError), tl.span("c", "umount c"):
        raise OSError(16, "busy")
    assert len(tl.of("mount")) == 2 and tl.of("umount")[0].error.startswith("OSError")
    assert overlaps(tl.of("mount"), tl.of("mount"))
    text = tl.render()
    assert "mount a" in text and "OSError" in text and "took s" in text


def test_attempts_retry_until_enough_raced():
    said = []
    race = Attempts("x vs y", wanted=2, limit=5, say=said.append)
    outcomes = iter([False, True, False, True, True])
    while race.more():
        race.record(next(outcomes), "evidence")
    assert (race.raced, race.tried) == (2, 4)
    assert said == ["attempt 1: x vs y: the two sides did not overlap; retrying",
                    "attempt 3: x vs y: the two sides did not overlap; retrying"]
    race.check()


def test_attempts_fail_with_the_evidence_when_the_race_never_happened():
    said = []
    race = Attempts("last umount vs new mount", wanted=1, limit=3, say=said.append)
    while race.more():
        race.record(False, render_spans([Span("leave", "umount m1", 0, 1), Span("join", "mount m2", 2, 3)]))
    assert race.tried == 3
    assert said[-1] == "attempt 3: last umount vs new mount: the two sides did not overlap; no attempts left"
    with pytest.raises(AssertionError) as ei:
        race.check()
    msg = str(ei.value)
    assert "the race did not happen: last umount vs new mount: raced in 0 of 3 attempts (wanted 1)" in msg
    assert "umount m1" in msg and "mount m2" in msg
