"""Issue 14 item 3 on a real tritonserver: a conversation with several audio turns over gRPC (all clips in the
`audio` tensor, audio items by index), through the client library's Session and a server-held session; the
served tokens equal the reference pipeline's on the same messages and clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepaudio2.pipeline import ReferencePipeline
from stepaudio2.request import request_from_json

from .conftest import ASSETS

pytest.importorskip("pytriton", reason="serving tests need the 'serve' extra (nvidia-pytriton)")
from stepaudio2.serving.launcher import ServerConfig  # noqa: E402
from stepaudio2_client import Session, StepAudio2Client  # noqa: E402

SAMPLING = {"temperature": 0.0, "max_new_tokens": 4}
A, B = (ASSETS / "hello_en.wav").read_bytes(), (ASSETS / "weather_en.wav").read_bytes()
TEXT_ONLY = {"speech_output": "none"}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_full: Path) -> ReferencePipeline:
    return ReferencePipeline(tiny_checkpoint_full)


@pytest.fixture()
def client(server: ServerConfig):
    with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
        yield c


def _reference_tokens(reference: ReferencePipeline, wire: dict, clips: list[bytes]) -> list[int]:
    return reference.generate(request_from_json(wire, clips)).token_ids


def test_session_keeps_audio_turns(client, reference) -> None:
    session = Session(client)
    first = session.ask({"task": "chat", "sampling": SAMPLING}, A)
    second = session.follow_up({"role": "human", "content": [{"type": "audio"}]}, SAMPLING, audio=B)
    audio_items = [i for m in second["messages"] if isinstance(m["content"], list)
                   for i in m["content"] if i.get("type") == "audio"]
    assert audio_items == [{"type": "audio", "index": 0}, {"type": "audio", "index": 1}]
    wire = {"messages": [*first["messages"], first["assistant_turn"],
                         {"role": "human", "content": [{"type": "audio"}]}],
            "generation": "text", "sampling": SAMPLING}
    assert second["token_ids"] == _reference_tokens(reference, wire, [A, B])


def test_server_held_session_with_a_second_audio_turn(client, reference) -> None:
    first = client.generate({"task": "chat", "session_id": "new", "sampling": SAMPLING}, A)
    turn = {"role": "human", "content": [{"type": "audio"}]}
    held = client.generate({"session_id": first["session_id"], "messages": [turn], "sampling": SAMPLING}, B)
    wire = {"messages": [*first["messages"], first["assistant_turn"], turn], "generation": "text",
            "sampling": SAMPLING}
    assert held["token_ids"] == _reference_tokens(reference, wire, [A, B])


def test_indexed_audio_over_grpc(client, reference) -> None:
    wire = {"messages": [{"role": "human", "content": [{"type": "audio", "index": 1},
                                                       {"type": "audio", "index": 0}]}],
            "generation": "text", "sampling": SAMPLING}
    got = client.generate(wire, [A, B])
    assert got["token_ids"] == _reference_tokens(reference, wire, [A, B])
