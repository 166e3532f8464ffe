"""The Human/Assistant dialogue format of HH-RLHF prompts, as chat messages and as plain text.

The HH format has no escape: a turn marker quoted inside a turn looks like a turn. The rule, in every RM
format alike: an HH dialogue (text holding "\\n\\nHuman:") is turns that alternate, Human first, and ends with
the empty "\\n\\nAssistant:" to be generated, after a human turn. Read left to right, a marker that does not
alternate (a second "\\n\\nHuman:" inside a human turn, a second "\\n\\nAssistant:" inside an assistant turn) is
text of the turn it is in, kept as written; an "\\n\\nAssistant:" after the last human turn, other than the
final one, is text of that human turn (a user quoting one). A quoted marker that does alternate cannot be told
from a turn, and is read as one. Any other text is one user turn, whatever it quotes.
"""
import re

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

_MARKERS = re.compile(r"(\n\nHuman:|\n\nAssistant:)")
_OPEN_TURN = re.compile(r"\n\nAssistant:\s*$")  # the final, empty assistant turn: the one to be generated


def prompt_to_messages(prompt):
    """Turn a prompt into chat messages (user/assistant) by the rule above; the final, empty assistant turn
    is the one to be generated and is dropped."""
    if HUMAN not in prompt:
        return [{"role": "user", "content": prompt.strip()}]
    open_turn = _OPEN_TURN.search(prompt)
    body = prompt[:open_turn.start()] if open_turn else prompt
    preamble, _, dialogue = body.partition(HUMAN)  # text before the first human turn belongs to it
    parts = _MARKERS.split(HUMAN + dialogue)
    turns = []  # [role, text as written]
    for marker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == HUMAN else "assistant"
        if turns and turns[-1][0] == role:
            turns[-1][1] += marker + text  # a marker that does not alternate is text of its turn
        else:
            turns.append([role, text])
    if open_turn and len(turns) > 1 and turns[-1][0] == "assistant":
        role, text = turns.pop()  # the turn before the generated one is a human turn: this marker was quoted
        turns[-1][1] += ASSISTANT + text
    messages = [{"role": role, "content": text.strip()} for role, text in turns]
    if preamble.strip():
        messages[0]["content"] = preamble.strip() + "\n\n" + messages[0]["content"]
    return messages


def render_plain(messages):
    """The plain rendering for tokenizers without a chat template: "Human: ...\\n\\nAssistant:"."""
    lines = [("Human: " if m["role"] == "user" else "Assistant: ") + m["content"] for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"
