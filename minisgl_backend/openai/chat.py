"""Chat prompts through the tokenizer's own chat template, and token strings for logprobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minisgl_backend.openai.errors import invalid
from minisgl_backend.openai.protocol import ChatMessage
from minisgl_backend.tokenizer import load_tokenizer


class ChatRenderer:
    """Renders messages with `apply_chat_template(..., add_generation_prompt=True)` (or with the
    final message left open: `continue_final_message`).

    The text goes to Triton as `text_input`, which the model tokenizes again with its special
    tokens: a leading BOS that the template writes and the tokenizer would add anyway is cut
    here, so the prompt does not get two.
    """

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None) or None
        bos = getattr(tokenizer, "bos_token", None)
        self._bos_to_strip = bos if bos and self._encode_adds_bos() else None

    @classmethod
    def from_folder(cls, tokenizer_dir: str, chat_template_file: str | None = None) -> "ChatRenderer":
        template = Path(chat_template_file).read_text() if chat_template_file else None
        return cls(load_tokenizer(tokenizer_dir), template)

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None) -> str:
        if self.template is None:
            raise invalid("the model's tokenizer has no chat template: start the server with --chat-template FILE, "
                          "or send a raw prompt to /v1/completions", "messages", "no_chat_template")
        turns = [m.for_template() for m in messages]
        try:
            extra: dict[str, Any] = {"continue_final_message": True} if continue_final_message else {}
            if tools:
                extra["tools"] = tools
            text = self.tokenizer.apply_chat_template(turns, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **extra)
        except Exception as exc:  # templates raise on message orders they do not allow
            raise invalid(f"the chat template refused the messages: {exc}", "messages") from None
        if self._bos_to_strip and text.startswith(self._bos_to_strip):
            text = text[len(self._bos_to_strip):]
        return text

    def token_strings(self, text: str, count: int) -> list[str]:
        """`count` token strings that concatenate to `text` (one response's tokens).

        The tensor contract sends one text per response and one logprob per token, not the
        tokens' own texts: re-tokenizing the piece gives them when it yields `count` ids that
        decode back to the same text; otherwise the whole piece goes to the first token.
        """
        if count <= 0:
            return []
        if count == 1:
            return [text]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == count:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            if "".join(pieces) == text:
                return pieces
        return [text] + [""] * (count - 1)

    def _encode_adds_bos(self) -> bool:
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        if bos_id is None:
            return False
        try:
            with_special = self.tokenizer.encode("a", add_special_tokens=True)
        except Exception:
            return False
        return bool(with_special) and with_special[0] == bos_id
