"""Where server-held state lives: sessions (an opaque JSON dict per conversation) and voice prompts (bytes keyed
by content hash). Two implementations behind one interface:

- `EmbeddedStore` (default, single server): files in the pipeline's `sessions_dir` (voices in its `voices/`
  subfolder), so every pipeline instance (a separate process) sees the same sessions; per-session `flock` leases serialise requests of one session.
- `RedisStore` (`redis://HOST:PORT/DB`): shared by every replica behind a load balancer, survives pod restarts;
  leases are `SET NX PX` keys released by token.

A request on a session holds its lease from the first read to the last write, so two requests of one session
never interleave their history: the second one is refused (`SessionBusyError`, UNAVAILABLE) while the first runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stepaudio2.errors import InvalidInputError, UnavailableError

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
VOICE_KEY = re.compile(r"^[0-9A-Za-z_.-]{1,128}$")


class SessionBusyError(UnavailableError):
    """Another request of the same session is running; retry when it has finished."""


class StoreUnavailableError(UnavailableError):
    """The session store cannot be reached."""


def unknown_session(session_id: str) -> InvalidInputError:
    return InvalidInputError(f"session_id '{session_id[:64]}' does not exist (never opened or expired)")


@dataclass
class Lease:
    """A session held by one request: `state` as read; `commit` writes it back; `release` lets the next one in."""

    session_id: str
    state: dict[str, Any]
    token: Any = None
    released: bool = field(default=False)


class StateStore(ABC):
    def __init__(self, max_sessions: int = 1024, ttl_s: float = 1800.0, max_voices: int = 256,
                 voice_ttl_s: float = 86400.0) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_voices = max_voices
        self.voice_ttl_s = voice_ttl_s

    @abstractmethod
    def create(self, state: dict[str, Any]) -> str:
        """Store a new session; returns its id."""

    @abstractmethod
    def acquire(self, session_id: str) -> Lease:
        """Hold the session for one request (SessionBusyError if held; InvalidInputError if unknown/expired)."""

    @abstractmethod
    def commit(self, lease: Lease, state: dict[str, Any]) -> None:
        """Replace the held session's state (atomic: readers see the old or the new state)."""

    @abstractmethod
    def release(self, lease: Lease) -> None: ...

    @abstractmethod
    def count(self) -> int:
        """Live sessions (for the sessions gauge)."""

    @abstractmethod
    def put_voice(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_voice(self, key: str) -> bytes | None: ...

    @staticmethod
    def _check_id(session_id: str) -> None:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise unknown_session(str(session_id))


# ---- embedded: files ------------------------------------------------------------------------------------------


class EmbeddedStore(StateStore):
    def __init__(self, folder: str | Path, **limits: Any) -> None:
        super().__init__(**limits)
        self.sessions = Path(folder)
        self.voices = Path(folder) / "voices"
        self.sessions.mkdir(parents=True, exist_ok=True)
        self.voices.mkdir(parents=True, exist_ok=True)

    def _path(self, session_id: str, suffix: str = ".json") -> Path:
        return self.sessions / f"{session_id}{suffix}"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic

    def create(self, state: dict[str, Any]) -> str:
        session_id = uuid.uuid4().hex
        self._write(self._path(session_id), json.dumps(state, ensure_ascii=False).encode())
        self._prune()
        return session_id

    def acquire(self, session_id: str) -> Lease:
        self._check_id(session_id)
        path = self._path(session_id)
        if not path.exists():
            raise unknown_session(session_id)
        fd = os.open(self._path(session_id, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if the process dies
        except BlockingIOError:
            os.close(fd)
            raise SessionBusyError(f"session '{session_id}' is busy with another request; retry when it ends") from None
        try:
            if time.time() - path.stat().st_mtime > self.ttl_s:
                raise FileNotFoundError
            state = json.loads(path.read_text(encoding="utf-8"))
            os.utime(path)  # touched: least recently used goes first
        except (FileNotFoundError, json.JSONDecodeError):
            os.close(fd)
            raise unknown_session(session_id) from None
        return Lease(session_id, state, fd)

    def commit(self, lease: Lease, state: dict[str, Any]) -> None:
        self._write(self._path(lease.session_id), json.dumps(state, ensure_ascii=False).encode())

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            os.close(lease.token)  # closing the descriptor drops the flock

    def count(self) -> int:
        return sum(1 for _ in self.sessions.glob("*.json"))

    def _prune(self) -> None:
        """Drop expired sessions, then the least recently used beyond the bound (never one a request holds)."""
        now, live = time.time(), []
        for path in self.sessions.glob("*.json"):
            try:
                live.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # another instance removed it meanwhile
                continue
        live.sort()
        excess = max(0, len(live) - self.max_sessions)
        for i, (mtime, path) in enumerate(live):
            if i >= excess and now - mtime <= self.ttl_s:
                continue
            lock = path.with_suffix(".lock")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use right now: its request keeps it alive
            finally:
                os.close(fd)
            path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)

    def put_voice(self, key: str, data: bytes) -> None:
        if not VOICE_KEY.match(key):
            raise InvalidInputError(f"voice_id '{key[:80]}' is not a valid key")
        self._write(self.voices / f"{key}.bin", data)
        files = sorted(self.voices.glob("*.bin"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
        for path in files[: max(0, len(files) - self.max_voices)]:
            path.unlink(missing_ok=True)

    def get_voice(self, key: str) -> bytes | None:
        if not VOICE_KEY.match(key):
            return None
        path = self.voices / f"{key}.bin"
        try:
            if time.time() - path.stat().st_mtime > self.voice_ttl_s:
                return None
            data = path.read_bytes()
            os.utime(path)
            return data
        except FileNotFoundError:
            return None


# ---- Redis ----------------------------------------------------------------------------------------------------

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"


class RedisStore(StateStore):
    """Sessions as `PREFIX:session:ID` JSON strings with a TTL, an LRU index in the sorted set `PREFIX:sessions`
    (score = last use), leases as `PREFIX:lock:ID`; voices as `PREFIX:voice:KEY` with their own TTL."""

    def __init__(self, url: str, prefix: str = "stepaudio2", lease_s: float = 600.0, **limits: Any) -> None:
        super().__init__(**limits)
        try:
            import redis
        except ImportError as exc:
            raise StoreUnavailableError("a redis:// session store needs the 'redis' extra (pip install redis)") \
                from exc
        self.url = _redacted(url)  # for messages: never print a password
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        # Short timeouts: a store that is down gives a clear error at once, never a hang.
        self.db = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
        self._errors = (redis.exceptions.RedisError, OSError)
        self._release = self.db.register_script(_RELEASE)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self._errors as exc:
            raise StoreUnavailableError(f"session store {self.url} is unreachable: {exc}") from exc

    def _store(self, session_id: str, state: dict[str, Any]) -> None:
        now = time.time()
        index = f"{self.prefix}:sessions"
        pipe = self.db.pipeline(transaction=True)
        pipe.set(self._key("session", session_id), json.dumps(state, ensure_ascii=False), px=int(self.ttl_s * 1000))
        pipe.zadd(index, {session_id: now})
        pipe.zremrangebyscore(index, "-inf", now - self.ttl_s)
        pipe.zcard(index)
        count = pipe.execute()[-1]
        if count > self.max_sessions:  # least recently used out
            for old, _ in self.db.zpopmin(index, count - self.max_sessions):
                name = old.decode() if isinstance(old, bytes) else old
                self.db.delete(self._key("session", name))

    def create(self, state: dict[str, Any]) -> str:
        session_id = uuid.uuid4().hex
        self._call(self._store, session_id, state)
        return session_id

    def acquire(self, session_id: str) -> Lease:
        self._check_id(session_id)
        token = uuid.uuid4().hex
        if not self._call(self.db.set, self._key("lock", session_id), token, nx=True, px=self.lease_ms):
            raise SessionBusyError(f"session '{session_id}' is busy with another request; retry when it ends")
        lease = Lease(session_id, {}, token)
        try:
            raw = self._call(self.db.get, self._key("session", session_id))
            if raw is None:
                raise unknown_session(session_id)
            lease.state = json.loads(raw)
            self._call(self.db.zadd, f"{self.prefix}:sessions", {session_id: time.time()})
        except BaseException:
            self.release(lease)
            raise
        return lease

    def commit(self, lease: Lease, state: dict[str, Any]) -> None:
        self._call(self._store, lease.session_id, state)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        try:  # only our own lease: one that outlived lease_s may belong to the next request by now
            self._release(keys=[self._key("lock", lease.session_id)], args=[lease.token])
        except self._errors:
            pass  # the store is down: the lease expires by itself

    def count(self) -> int:
        return int(self._call(self.db.zcount, f"{self.prefix}:sessions", time.time() - self.ttl_s, "+inf"))

    def put_voice(self, key: str, data: bytes) -> None:
        if not VOICE_KEY.match(key):
            raise InvalidInputError(f"voice_id '{key[:80]}' is not a valid key")
        self._call(self.db.set, self._key("voice", key), data, px=int(self.voice_ttl_s * 1000))

    def get_voice(self, key: str) -> bytes | None:
        if not VOICE_KEY.match(key):
            return None
        return self._call(self.db.getex, self._key("voice", key), px=int(self.voice_ttl_s * 1000))


def open_store(spec: str, folder: str | Path, **limits: Any) -> StateStore:
    """`""`/`"embedded"`: files in `folder`; `redis://...` / `rediss://...` / `unix://...`: Redis."""
    spec = (spec or "").strip()
    if spec in ("", "embedded"):
        return EmbeddedStore(folder, **limits)
    if spec.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return RedisStore(spec, **limits)
    raise InvalidInputError(f"session_store '{_redacted(spec) if '://' in spec else spec}' is neither "
                            "'embedded' nor a redis:// URL")
