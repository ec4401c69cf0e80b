"""Protocol constants the gateway writes into pipeline requests.

Copies of the server's values (stepaudio2.text): the gateway must not import the server package (no torch in its
container), and a test checks that every copy equals the server's, byte for byte. Prompts are what the model was
trained on, so a different wording would be a prompt it never saw.
"""

from __future__ import annotations

# stepaudio2.text.tasks: CHAT_PROMPT, VOICE_CHAT_PROMPT, TOOL_ABILITY_PROMPT
CHAT_PROMPT = "You are a helpful assistant."
VOICE_CHAT_PROMPT = "请用语音与我交流。"
TOOL_ABILITY_PROMPT = (
    "你具备调用工具解决问题的能力，你需要根据用户的需求和上下文情景，自主选择是否调用系统提供的工具来协助用户。"
)
# stepaudio2.text.history.DEFAULT_TOOL_RESULT_INSTRUCTION: appended to a tool result (upstream example)
TOOL_RESULT_INSTRUCTION = "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"
# stepaudio2.text.tokens: TTS_START, TTS_END (a spoken assistant turn that only called a tool)
TTS_START = "<tts_start>"
TTS_END = "<tts_end>"
# Default sampling per reply kind: the `chat` and `voice-chat` task presets (stepaudio2.text.TASKS).
SAMPLING_DEFAULTS = {
    "text": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.05, "max_new_tokens": 1024},
    "speech": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.05, "max_new_tokens": 4096},
}
