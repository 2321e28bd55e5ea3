"""A conversation kept in the template's chat format, trimmed from the oldest turn when it would not fit."""
from __future__ import annotations

from .data import Template


class Conversation:
    def __init__(self, tok, template: Template, context: int, max_new_tokens: int):
        self.tok, self.template = tok, template
        self.context, self.max_new_tokens = context, max_new_tokens
        self.history: list[tuple[str, str]] = []
        self.trimmed = 0  # turns dropped so far to stay inside the context

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of the conversation plus the new message; oldest turns go first when it would overflow
        the context with room for max_new_tokens."""
        while True:
            ids = self.tok.encode(self.template.chat_prompt(self.history, message))
            if len(ids) + self.max_new_tokens <= self.context or not self.history:
                break
            self.history.pop(0)
            self.trimmed += 1
        if len(ids) >= self.context:
            raise ValueError(f"the message alone is {len(ids)} tokens; the model's context is {self.context}")
        return ids

    def add(self, message: str, answer: str):
        self.history.append((message, answer))

    def reset(self):
        self.history.clear()
