"""msgspec encoding for every internal socket, signed with HMAC-SHA256 when a shared secret is set.

Without a secret (the default, with everything bound to 127.0.0.1) a message
is plain msgpack. With one, each message is ``msgpack | timestamp (8 bytes) |
HMAC-SHA256(secret, msgpack | timestamp)``; a message whose tag does not
verify, or whose timestamp is more than ``max_age`` seconds away, is refused,
so a stranger on the network can neither submit work nor ask for KV blocks.
A receiver also remembers the tags it accepted until their timestamps go
stale, and refuses a message it has seen: a captured message sent again (a
submit run twice, a pull that would hand someone the same KV blocks) is
refused even within ``max_age``. Nothing received is ever unpickled or
evaluated.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import threading
import time
from typing import Any

import msgspec

_TAG = 32
_TS = 8


class AuthError(ValueError):
    pass


class Codec:
    def __init__(self, msg_type: Any, secret: bytes | None = None, max_age: float = 60.0) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(msg_type)
        self.secret = secret or None
        self.max_age = max_age
        self._seen: set[bytes] = set()  # tags accepted whose timestamps are not yet stale
        self._expiry: list[tuple[float, bytes]] = []  # heap: (when a tag's message goes stale, tag)
        self._lock = threading.Lock()

    def encode(self, msg: Any) -> bytes:
        payload = self._enc.encode(msg)
        if self.secret is None:
            return payload
        signed = payload + time.time_ns().to_bytes(_TS, "little")
        return signed + hmac.new(self.secret, signed, hashlib.sha256).digest()

    def decode(self, raw: bytes) -> Any:
        """Raises AuthError (bad or missing signature, stale) or msgspec errors (malformed)."""
        if self.secret is not None:
            if len(raw) < _TAG + _TS:
                raise AuthError("unsigned message")
            signed, tag = raw[:-_TAG], raw[-_TAG:]
            if not hmac.compare_digest(tag, hmac.new(self.secret, signed, hashlib.sha256).digest()):
                raise AuthError("bad signature")
            sent = int.from_bytes(signed[-_TS:], "little") / 1e9
            now = time.time()
            if abs(now - sent) > self.max_age:
                raise AuthError("stale message")
            self._remember(tag, sent + self.max_age, now)
            raw = signed[:-_TS]
        return self._dec.decode(raw)

    def _remember(self, tag: bytes, stale_at: float, now: float) -> None:
        with self._lock:
            seen, expiry = self._seen, self._expiry
            while expiry and expiry[0][0] < now:  # past its max_age: the timestamp check refuses it now
                seen.discard(heapq.heappop(expiry)[1])
            if tag in seen:
                raise AuthError("replayed message")
            seen.add(tag)
            heapq.heappush(expiry, (stale_at, tag))
