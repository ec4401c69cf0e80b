"""Session/voice state stores: the embedded one (files) and Redis (a real redis-server on a loopback port), same
tests for both: leases refuse a second request of a session, TTL and LRU bounds, voices, Redis down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.errors import InvalidInputError, UnavailableError
from stepaudio2.serving.session_store import (
    EmbeddedStore,
    RedisStore,
    SessionBusyError,
    StoreUnavailableError,
    open_store,
)
from stepaudio2.serving.sessions import NEW, SessionStore
from stepaudio2.serving.shared_voices import decode_prompt, encode_prompt
from stepaudio2.serving.topology import parse_models, parse_remotes, topology

from .conftest import free_port, require_module
from .redis_process import REDIS_EXTRA, RedisProcess


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    require_module("redis", REDIS_EXTRA)
    proc = RedisProcess(free_port(), tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc.url
    proc.stop()


_prefixes = iter(range(10**6))


@pytest.fixture(params=["embedded", "redis"])
def make_store(request, tmp_path: Path):
    def make(**limits):
        if request.param == "embedded":
            return EmbeddedStore(tmp_path / f"rt{next(_prefixes)}", **limits)
        url = request.getfixturevalue("redis_url")
        return RedisStore(url, prefix=f"t{next(_prefixes)}", **limits)  # a fresh namespace per store

    return make


def test_create_acquire_commit_release(make_store) -> None:
    store = make_store()
    sid = store.create({"messages": [{"role": "human", "content": "hi"}], "n": 1})
    lease = store.acquire(sid)
    assert lease.state == {"messages": [{"role": "human", "content": "hi"}], "n": 1}
    store.commit(lease, {**lease.state, "n": 2})
    store.release(lease)
    again = store.acquire(sid)
    assert again.state["n"] == 2
    store.release(again)
    assert store.count() == 1


def test_second_request_on_a_held_session_is_refused(make_store) -> None:
    store = make_store()
    sid = store.create({"n": 0})
    lease = store.acquire(sid)
    with pytest.raises(SessionBusyError, match=sid):
        store.acquire(sid)
    store.release(lease)
    store.release(lease)  # twice is harmless
    store.release(store.acquire(sid))


def test_concurrent_updates_are_serialised(make_store) -> None:
    """Eight writers each add their mark through read-modify-write; refused ones retry. No update is lost."""
    store = make_store()
    sid = store.create({"marks": []})
    refusals = []

    def writer(i: int) -> None:
        while True:
            try:
                lease = store.acquire(sid)
            except SessionBusyError:
                refusals.append(i)
                time.sleep(0.01)
                continue
            try:
                marks = list(lease.state["marks"])
                time.sleep(0.02)  # a request's generation time: others arrive meanwhile
                store.commit(lease, {"marks": [*marks, i]})
            finally:
                store.release(lease)
            return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.acquire(sid)
    assert sorted(final.state["marks"]) == list(range(8))
    assert refusals, "no writer ever met a held session: the test did not exercise the lease"


def test_ttl_expiry(make_store) -> None:
    store = make_store(ttl_s=1.0)
    sid = store.create({"n": 0})
    store.release(store.acquire(sid))
    time.sleep(1.3)
    with pytest.raises(InvalidInputError, match="session_id"):
        store.acquire(sid)


def test_bound_drops_least_recently_used(make_store) -> None:
    store = make_store(max_sessions=3)
    ids = []
    for i in range(3):
        ids.append(store.create({"i": i}))
        time.sleep(0.02)  # distinct use times
    store.release(store.acquire(ids[0]))  # ids[0] is now the most recently used
    time.sleep(0.02)
    ids.append(store.create({"i": 3}))
    assert store.count() == 3
    with pytest.raises(InvalidInputError):
        store.acquire(ids[1])
    for sid in (ids[0], ids[2], ids[3]):
        store.release(store.acquire(sid))


def test_unknown_and_malformed_ids_name_the_field(make_store) -> None:
    store = make_store()
    for bad in ("0" * 32, "no-such-session", "../../etc/passwd"):
        with pytest.raises(InvalidInputError, match="session_id"):
            store.acquire(bad)


def test_voices_round_trip(make_store) -> None:
    store = make_store()
    prompt = {"prompt_tokens": np.arange(7, dtype=np.int64), "prompt_mel": np.random.rand(14, 80).astype(np.float32),
              "prompt_xvector": np.random.rand(192).astype(np.float32),
              "voice_id": np.array([b"abc123"], dtype=np.object_)}
    store.put_voice("abc123", encode_prompt(prompt))
    back = decode_prompt("abc123", store.get_voice("abc123"))
    for name in ("prompt_tokens", "prompt_mel", "prompt_xvector"):
        np.testing.assert_array_equal(back[name], prompt[name])
        assert back[name].dtype == prompt[name].dtype
    assert back["voice_id"].tolist() == [b"abc123"]
    assert store.get_voice("never-registered") is None
    assert store.get_voice("../bad key") is None


def test_conversation_through_a_lease(make_store) -> None:
    """sessions.SessionStore on either store: a follow-up gets the stored turns, and its save is what the next
    follow-up reads."""
    sessions = SessionStore(make_store())
    assert sessions.begin(NEW) is None
    sid = sessions.save(None, [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                        "text", [b"RIFF-audio"])
    lease = sessions.begin(sid)
    try:  # the session's clips first, the follow-up's new clip after them
        obj, audio = sessions.continue_request(lease, {"text": "and then?"}, [b"RIFF-clip2"])
        assert [m["content"] for m in obj["messages"]] == ["hi", "hello", "and then?"]
        assert audio == [b"RIFF-audio", b"RIFF-clip2"]
        with pytest.raises(SessionBusyError):
            sessions.begin(sid)
        sessions.save(lease, [*obj["messages"], {"role": "assistant", "content": "then this"}], "text", audio)
    finally:
        sessions.end(lease)
    lease = sessions.begin(sid)
    assert len(lease.state["messages"]) == 4 and lease.state["voice_id"] is None
    assert sessions.continue_request(lease, {"text": "x"}, [])[1] == [b"RIFF-audio", b"RIFF-clip2"]
    sessions.save(lease, lease.state["messages"], "speech", [], voice_id="abc123")
    sessions.end(lease)
    lease = sessions.begin(sid)
    assert lease.state["voice_id"] == "abc123" and lease.state["generation"] == "speech"
    assert lease.state["audios"] == []
    sessions.end(lease)


def test_redis_lease_expires_and_a_stale_release_keeps_the_new_holder(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="lease", lease_s=0.5)
    sid = store.create({"n": 0})
    stale = store.acquire(sid)  # its request dies without releasing
    time.sleep(0.7)
    fresh = store.acquire(sid)
    store.release(stale)  # late release of the old lease must not free the new one
    with pytest.raises(SessionBusyError):
        store.acquire(sid)
    store.release(fresh)


def test_redis_down_is_a_clear_unavailable_error(tmp_path: Path) -> None:
    require_module("redis", REDIS_EXTRA)
    proc = RedisProcess(free_port(), tmp_path / "r")
    proc.start()
    store = open_store(proc.url, tmp_path)
    sid = store.create({"n": 0})
    proc.stop()
    for call in (lambda: store.acquire(sid), lambda: store.create({}), store.count):
        with pytest.raises(StoreUnavailableError, match="session store redis://127.0.0.1") as err:
            call()
        assert isinstance(err.value, UnavailableError)


def test_open_store_specs_and_password_redaction(tmp_path: Path) -> None:
    assert isinstance(open_store("", tmp_path), EmbeddedStore)
    assert isinstance(open_store("embedded", tmp_path), EmbeddedStore)
    with pytest.raises(InvalidInputError, match="session_store"):
        open_store("memcached://x:1", tmp_path)
    require_module("redis", REDIS_EXTRA)
    port = free_port()  # nothing listens here
    store = open_store(f"redis://:s3cret@127.0.0.1:{port}/2", tmp_path)
    with pytest.raises(StoreUnavailableError) as err:
        store.count()
    assert "s3cret" not in str(err.value) and f"127.0.0.1:{port}/2" in str(err.value)


def test_topology_options() -> None:
    assert parse_models(None) is None
    assert parse_models("pipeline, audio_encoder") == ["pipeline", "audio_encoder"]
    with pytest.raises(InvalidInputError, match="--models"):
        parse_models("pipeline,vocoder")
    assert parse_remotes(["llm=10.0.0.1:8001", "token2wav=t2w.speech.svc:8001"]) == {
        "llm": "10.0.0.1:8001", "token2wav": "t2w.speech.svc:8001"}
    for bad in ("llm", "pipeline=h:1", "llm=host"):
        with pytest.raises(InvalidInputError, match="--remote"):
            parse_remotes([bad])
    params, args = topology(["pipeline", "audio_encoder"], {"llm": "h:1"}, "redis://r:6379/0")
    assert params == {"pipeline": {"remote_llm": "h:1", "session_store": "redis://r:6379/0"}}
    assert args == ["--model-control-mode=explicit", "--load-model=pipeline", "--load-model=audio_encoder"]
    assert topology(None, {}, None) == ({}, [])
    # An LLM pool sends several tokens per response over its gRPC hop; an llm next to the pipeline does not.
    assert topology(["llm"], {}, None)[0] == {"llm": {"stream_interval": "4"}}
    assert topology(["pipeline", "audio_encoder", "llm"], {"token2wav": "h:1"}, None)[0] == {
        "pipeline": {"remote_token2wav": "h:1"}}
    from argparse import Namespace

    from stepaudio2.cli import _apply_topology

    settings = {"llm": {"stream_interval": "1", "max_num_seqs": "8"}}  # `serve --set` values win over the default
    _apply_topology(settings, Namespace(models="llm", remote=[], session_store=None))
    assert settings == {"llm": {"stream_interval": "1", "max_num_seqs": "8"}}
    with pytest.raises(InvalidInputError, match="--session-store"):
        topology(None, {}, 'redis://:pa"ss@r:6379/0')
    with pytest.raises(InvalidInputError, match="llm"):
        topology(["pipeline", "llm"], {"llm": "h:1"}, None)
