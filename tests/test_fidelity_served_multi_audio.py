"""Issue 14 item 3 on a real tritonserver: a conversation with several audio turns over gRPC (all clips in the
`audio` tensor, audio items by index), through the client library's Session and a server-held session; the
served tokens equal the reference pipeline's on the same messages and clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepaudio2.engines.sampling import SamplingParams
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


def test_client_cli_takes_an_upstream_messages_file(server: ServerConfig, reference, tmp_path: Path, capsys) -> None:
    """`stepaudio2-client --messages` sends upstream's conversation format (relative audio paths, a spoken
    assistant turn as <tts_start> + speech tokens) and gets what the reference gives on the same file."""
    import json

    from stepaudio2.pipeline import GenerationRequest
    from stepaudio2.upstream_messages import load_messages_file
    from stepaudio2_client.cli import main as client_main

    sp = reference.tokenizer.special
    spoken = [*reference.tokenizer.encode("Hi"), sp.audio_0 + 5, sp.audio_0 + 6, sp.tts_end]
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "human", "content": [{"type": "audio", "audio": "a.wav"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<tts_start>"}, {"type": "token", "token": spoken}]},
        {"role": "human", "content": [{"type": "text", "text": "and now?"}, {"type": "audio", "audio": "b.wav"}]},
        {"role": "assistant", "content": None},
    ]
    (tmp_path / "a.wav").write_bytes(A)
    (tmp_path / "b.wav").write_bytes(B)
    (tmp_path / "conv.json").write_text(json.dumps(conversation), encoding="utf-8")
    code = client_main(["--url", f"127.0.0.1:{server.grpc_port}", "--messages", str(tmp_path / "conv.json"),
                        "--temperature", "0", "--max-new-tokens", "4", "--speech-output", "none", "--json"])
    assert code == 0
    served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    messages, generation, clips = load_messages_file(tmp_path / "conv.json")
    expected = reference.generate(GenerationRequest(task=None, messages=messages, generation=generation, audios=clips,
                                                    sampling=SamplingParams(temperature=0.0, max_new_tokens=4)))
    assert served["generation"] == "text" and served["token_ids"] == expected.token_ids
    assert [m["role"] for m in served["messages"]] == ["system", "human", "assistant", "human"]
    # A file that is not upstream's format is refused by the client before anything is sent.
    (tmp_path / "bad.json").write_text(json.dumps(conversation[:-1]), encoding="utf-8")
    assert client_main(["--url", f"127.0.0.1:{server.grpc_port}", "--messages", str(tmp_path / "bad.json")]) == 2
    assert "assistant opener" in capsys.readouterr().err
