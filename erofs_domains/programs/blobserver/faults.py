"""The fault table: the ways the blob server misbehaves on purpose (`FAULT_MODES`, each
with its parameters, checked when a fault is added) and which requests a fault hits
(`Faults.take`: by method and blob, after `skip` matching requests, `count` times). What each
mode does to an answer is `_Handler._faulty` in erofs_domains/programs/blobserver/server.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

FAULT_MODES = {
    "status": "answer with HTTP `status` (default 503) and a small body",
    "short_body": "correct headers, then only `fraction` (default 0.5) of the body, then close",
    "wrong_length": "Content-Length and body off by `delta` bytes (default -512) from the range",
    "wrong_range": "206 for another range: start shifted by `shift` (default 4096), size by `total_delta`",
    "stall": "send nothing (or headers and `after_bytes` of body) for `seconds` (default 3600), then close",
    "close": "close the connection without an answer",
}


@dataclass
class Fault:
    mode: str
    methods: tuple[str, ...] = ("GET",)
    digest: str | None = None     # only requests for this blob ("sha256:..."); None: all blobs
    skip: int = 0                 # let this many matching requests through first
    count: int | None = None      # then misbehave this many times (None: until cleared)
    params: dict[str, Any] = field(default_factory=dict)
    matched: int = 0
    applied: int = 0

    @classmethod
    def from_json(cls, data: dict) -> Fault:
        data = dict(data)
        mode = data.pop("mode", None)
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; known: {', '.join(FAULT_MODES)}")
        methods = data.pop("methods", ["GET"])
        if isinstance(methods, str):
            methods = [methods]
        methods = tuple(m.upper() for m in methods)
        if not set(methods) <= {"GET", "HEAD"}:
            raise ValueError(f"methods must be GET and/or HEAD, got {methods}")
        digest = data.pop("digest", None)
        if digest is not None and not digest.startswith("sha256:"):
            digest = "sha256:" + digest
        skip = int(data.pop("skip", 0))
        count = data.pop("count", None)
        count = None if count is None else int(count)
        if skip < 0 or (count is not None and count < 1):
            raise ValueError("skip must be >= 0 and count >= 1 (or null)")
        allowed = {"status": {"status"}, "short_body": {"fraction"}, "wrong_length": {"delta"},
                   "wrong_range": {"shift", "total_delta"}, "stall": {"seconds", "after_bytes"},
                   "close": set()}[mode]
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"fault {mode} takes {sorted(allowed) or 'no parameters'}, not {sorted(unknown)}")
        if mode == "status" and not 100 <= int(data.get("status", 503)) <= 599:
            raise ValueError("status must be 100..599")
        if mode == "short_body" and not 0 <= float(data.get("fraction", 0.5)) < 1:
            raise ValueError("fraction must be in [0, 1)")
        if mode == "wrong_length" and int(data.get("delta", -512)) == 0:
            raise ValueError("delta must not be 0")
        return cls(mode, methods, digest, skip, count, data)

    def to_json(self) -> dict:
        return {"mode": self.mode, "methods": list(self.methods), "digest": self.digest, "skip": self.skip,
                "count": self.count, **self.params, "matched": self.matched, "applied": self.applied}


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._release = threading.Event()  # set to end current stalls

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._release.set()
            self._release = threading.Event()

    def take(self, method: str, digest: str) -> tuple[Fault, threading.Event] | None:
        """The fault to apply to this request (counting it), with the event that ends a stall."""
        with self._lock:
            for f in self._faults:
                if method not in f.methods or (f.digest and f.digest != digest):
                    continue
                f.matched += 1
                if f.matched <= f.skip or (f.count is not None and f.applied >= f.count):
                    continue
                f.applied += 1
                return f, self._release
        return None

    def list(self) -> list[dict]:
        with self._lock:
            return [f.to_json() for f in self._faults]

