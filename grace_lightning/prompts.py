"""The policy prompt: chat template with GRACE's system prompt and the raw text as the user turn.

Upstream (process_data.py, rl_dataset.py, grace.py, eval_mteb.py) uses one system prompt and no
task instruction; the paper's printed prompt was not found (notes §3.1). The embedding pools over
everything after the system prompt: user text, assistant header and rationale (notes §3.3), so we
also need ``system_len``, the number of leading template tokens that pooling skips.
"""

from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within "
    "<think></think> tags. Finally, generate a comprehensive understanding of this text."
)

_SENTINEL = "\u2063GRACE_TEXT\u2063"


class ChatPrompter:
    """Turn texts into chat-templated prompt token ids (generation prompt appended).

    Texts longer than ``max_prompt_tokens`` (template included) are cut inside the user text, so
    the template, and with it the assistant header, stays intact (upstream's eval instead decodes
    a truncated prompt with ``skip_special_tokens=True``, which drops the header: notes §4).
    """

    def __init__(
        self,
        tokenizer,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_prompt_tokens: int = 1024,
    ):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        rendered = self._render(_SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("chat template must contain the user text exactly once")
        head, tail = rendered.split(_SENTINEL)
        self._head_ids = self._ids(head)
        self._tail_ids = self._ids(tail)
        budget = max_prompt_tokens - len(self._head_ids) - len(self._tail_ids)
        if budget < 1:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} leaves no room for text: the template "
                f"alone takes {len(self._head_ids) + len(self._tail_ids)} tokens"
            )
        self._text_budget = budget

    def _render(self, text: str) -> str:
        messages = [{"role": "user", "content": text}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _ids(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"]

    @property
    def system_len(self) -> int:
        """Leading tokens excluded from pooling: template header + system prompt + user header."""
        return len(self._head_ids)

    @property
    def tail_len(self) -> int:
        """Trailing template tokens after the user text: end of turn + assistant header."""
        return len(self._tail_ids)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text's prompt; the text alone is tokenised, then framed."""
        body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self._head_ids + ids[: self._text_budget] + self._tail_ids for ids in body]

    def lengths(self, texts: list[str]) -> list[int]:
        """Untruncated prompt lengths (for the paper's <= 1024-token data filter)."""
        body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(self._head_ids) + len(ids) + len(self._tail_ids) for ids in body]
