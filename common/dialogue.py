"""The Human/Assistant dialogue format of HH-RLHF prompts, as chat messages and as plain text."""
import re

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def prompt_to_messages(prompt):
    """Turn a prompt into chat messages.

    HH dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...") become alternating user/assistant messages; the
    final, empty assistant turn is the one to be generated and is dropped. Any other text is one user turn.
    """
    if HUMAN not in prompt:
        return [{"role": "user", "content": prompt.strip()}]
    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", prompt)
    messages = []
    for marker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == HUMAN else "assistant"
        text = text.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    preamble = parts[0].strip()
    if preamble and messages:
        messages[0]["content"] = preamble + "\n\n" + messages[0]["content"]
    while messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def render_plain(messages):
    """The plain rendering for tokenizers without a chat template: "Human: ...\\n\\nAssistant:"."""
    lines = [("Human: " if m["role"] == "user" else "Assistant: ") + m["content"] for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"
