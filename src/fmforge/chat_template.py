"""Chat templates as data: render role/content messages to token ids, and say which id ends a turn.

A template is a small dataclass, not a Jinja program: each turn is
`<turn_start> + encode(role + "\\n" + content) + <turn_end> + encode("\\n")` (ChatML, used by
SmolLM2 and by fmforge's own tokenizers). Special tokens are inserted by id and content is encoded
as plain text, so a message that spells `<|im_end|>` cannot close its own turn. The rendered prompt
ends with the assistant turn open; the end-of-turn id is returned as a stop id, so generation never
runs past it. The Jinja form (`to_jinja`) is only written out for `transformers` compatibility.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fmforge.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """A ChatML-shaped template: special tokens around each turn, a role line, then content."""

    turn_start: str = "<|im_start|>"  # special token opening a turn
    turn_end: str = "<|im_end|>"  # special token closing a turn (the stop token)
    separator: str = "\n"  # text after the role name and after each closed turn
    default_system: str | None = None  # system prompt inserted when the messages have none

    def render(
        self, tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Return the token ids of `messages`, ending with an open assistant turn."""
        start, end = self.special_ids(tokenizer)
        check_messages(messages)
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        sep = tokenizer.encode(self.separator)
        ids: list[int] = []
        for message in messages:
            ids.append(start)
            ids += tokenizer.encode(message["role"] + self.separator + message["content"])
            ids.append(end)
            ids += sep
        if add_generation_prompt:
            ids.append(start)
            ids += tokenizer.encode("assistant" + self.separator)
        return ids

    def special_ids(self, tokenizer: Any) -> tuple[int, int]:
        """Return the ids of (turn_start, turn_end); UserError when the vocabulary lacks them."""
        start, end = tokenizer.token_to_id(self.turn_start), tokenizer.token_to_id(self.turn_end)
        if start is None or end is None:
            raise UserError(
                f"this tokenizer has no {self.turn_start} / {self.turn_end} tokens, so it cannot "
                "chat; use generate without --chat"
            )
        return start, end

    def stop_ids(self, tokenizer: Any) -> list[int]:
        """Return the ids that end the assistant's turn."""
        return [self.special_ids(tokenizer)[1]]

    def to_jinja(self) -> str:
        """Return the equivalent HF Jinja chat template (for tokenizer_config.json)."""
        s, e, sep = self.turn_start, self.turn_end, self.separator.replace("\n", "\\n")
        system = ""
        if self.default_system is not None:
            system = (
                "{% if loop.first and messages[0]['role'] != 'system' %}"
                f"{{{{ '{s}system{sep}{self.default_system}{e}{sep}' }}}}{{% endif %}}"
            )
        return (
            f"{{% for message in messages %}}{system}"
            f"{{{{ '{s}' + message['role'] + '{sep}' + message['content'] + '{e}' + '{sep}' }}}}"
            f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{s}assistant{sep}' }}}}"
            "{% endif %}"
        )


CHATML = ChatTemplate()


def check_messages(messages: list[dict[str, str]]) -> None:
    """Raise UserError unless `messages` is a non-empty list of {role, content} with known roles."""
    if not messages:
        raise UserError("chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"messages[{i}] must be a dict with a string 'content'")
        if message.get("role") not in ROLES:
            raise UserError(
                f"messages[{i}].role={message.get('role')!r} is unknown (choose from {ROLES})"
            )


def template_for(tokenizer: Any) -> ChatTemplate:
    """Return the chat template of `tokenizer`, reading its default system prompt if it has one.

    The tokenizer's Jinja template (from tokenizer_config.json or GGUF metadata) is read only for
    its default system prompt; the turn layout is ChatML, the only one fmforge speaks so far.
    """
    jinja = getattr(tokenizer, "chat_template", None)
    if jinja and "<|im_start|>" not in jinja:
        raise UserError("this model's chat template is not ChatML, which is all fmforge renders")
    default_system = None
    if jinja:
        match = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", jinja, flags=re.S)
        if match:
            default_system = match.group(1)
    return ChatTemplate(default_system=default_system)
