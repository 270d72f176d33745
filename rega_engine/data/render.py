"""Chat rendering: (messages, system prompt) -> token ids and an assistant-only loss mask.

Two templates:
- the tokenizer's own chat template (`data.chat_template = "auto"` when it has one), so a model is
  trained in the format it is served in;
- a built-in plain one (`"plain"`, or a tokenizer without a template), line by line:
      <bos>System: {system}
      User: {user}
      Assistant: {answer}<eos>User: {next question}
      Assistant: ...
  The generation point (`render_prompt`) is right after "Assistant:".

The loss covers each assistant turn's content and the token(s) that close the turn (EOS,
`<|im_end|>`, ...), so the model learns to stop; the newline some templates write after the
closing token is left out. Assistant spans are found without assuming a template: the text of the
conversation up to turn i with the generation prompt is where turn i's answer starts, the text up
to and including turn i is where it ends; both must be prefixes of the whole rendering, or the
template renders a turn differently depending on what follows, which is reported as an error.
Tokens are then masked by their character offsets, from one tokenization of the whole text.

The REGA system prompt (role or central) becomes the system message. A sample's own leading system
turn is kept after it, separated by a blank line: "{role prompt}\\n\\n{sample system}".

Special-token strings inside message contents (e.g. a literal "</s>") would be read as control
tokens by the tokenizer; such samples are refused with a `RenderError` rather than trained on.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..config import CHAT_TEMPLATES as TEMPLATES
from ..errors import ConfigError, RenderError

PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def with_system(messages: Sequence[dict], system: str | None) -> list[dict]:
    """The conversation with the REGA system prompt first (merged with a leading system turn)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0]['content']}"},
                *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


class ChatRenderer:
    """Renders conversations for one tokenizer; build once, use for many samples."""

    def __init__(self, tokenizer, template: str = "auto"):
        if template not in TEMPLATES:   # for callers in code; a run's config is checked before
            raise ConfigError(f"data.chat_template = {template!r}: expected one of "
                              f"{', '.join(TEMPLATES)}")
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.kind = "tokenizer" if template == "auto" and has_template else "plain"
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token
        if self.kind == "plain" and not self.eos:
            raise ConfigError("the plain chat template ends each answer with the tokenizer's EOS "
                              "token, and this tokenizer has none; set one (eos_token) or use a "
                              "tokenizer with a chat template")
        specials = sorted({t for t in tokenizer.all_special_tokens if t}
                          | {t.content for t in tokenizer.added_tokens_decoder.values()
                             if t.special and t.content},
                          key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        # The Rust tokenizer behind a fast tokenizer, called directly: the same encoding as
        # `tokenizer(text, add_special_tokens=False)` without the Python wrapper's cost per call.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "split_special_tokens", False) else backend
        # Masks from span edges (char_to_token) equal those from every token's offsets when no
        # token is zero-width; checked once on a probe text, else every sample takes the offsets.
        self._fast_masks = self._backend is not None and self._no_zero_width_tokens()

    # -- text ---------------------------------------------------------------------------------
    def _apply(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 raises its own types, templates raise_exception() theirs
            raise RenderError(f"the tokenizer's chat template failed: {e}; "
                              "set data.chat_template = \"plain\" to use the built-in template",
                              "chat template failed") from None

    def _plain(self, conversation: list[dict], add_generation_prompt: bool) -> tuple[str, list]:
        parts, spans, length = [self.bos], [], len(self.bos)
        for m in conversation:
            name = PLAIN_ROLE_NAMES[m["role"]]
            if m["role"] == "assistant":
                head, body = f"{name}:", f" {m['content']}{self.eos}"
                # The space before the answer belongs to the answer: most tokenizers glue it to the
                # first word, and the prompt then ends on a clean token boundary at "Assistant:".
                spans.append((length + len(head), length + len(head) + len(body)))
                text = head + body
            else:
                text = f"{name}: {m['content']}\n"
            parts.append(text)
            length += len(text)
        if add_generation_prompt:
            parts.append(f"{PLAIN_ROLE_NAMES['assistant']}:")
        return "".join(parts), spans

    def _templated(self, conversation: list[dict]) -> tuple[str, list]:
        full = self._apply(conversation, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(conversation):
            if m["role"] != "assistant":
                continue
            turn = f"assistant turn {len(spans) + 1}"
            start = self._apply(conversation[:i], add_generation_prompt=True)
            through = self._apply(conversation[: i + 1], add_generation_prompt=False)
            if not (through.startswith(start) and full.startswith(through)):
                raise RenderError(f"the chat template renders {turn} differently depending on the "
                                  "turns after it, so its tokens cannot be located; set "
                                  "data.chat_template = \"plain\"",
                                  "chat template not prefix-stable")
            end = len(through.rstrip())
            if end <= len(start):
                raise RenderError(f"the chat template renders {turn} as nothing",
                                  "empty assistant turn")
            spans.append((len(start), end))
        return full, spans

    def text(self, messages: Sequence[dict], system: str | None,
             add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans [start, end) the loss covers."""
        conversation = with_system(messages, system)
        if self._specials is not None:
            for m in conversation:
                found = self._specials.search(m["content"])
                if found:
                    raise RenderError(f"a {m['role']} turn contains the special token "
                                      f"{found.group()!r} as text",
                                      "special token in text")
        if self.kind == "plain":
            return self._plain(conversation, add_generation_prompt)
        if add_generation_prompt:
            return self._apply(conversation, add_generation_prompt=True), []
        return self._templated(conversation)

    def _no_zero_width_tokens(self) -> bool:
        probe = (f"{self.bos}System: x\nUser: What is 12 + 30?\nAssistant: 12 + 30 = 42. "
                 f"The capital is Lowmere.{self.eos or ''}")
        try:
            offsets = self._backend.encode(probe, add_special_tokens=False).offsets
        except Exception:
            return False
        return all(e > s for s, e in offsets)

    # -- tokens -------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _offsets(self, text: str):
        """(ids, [(start, end)] character offsets), or None for tokenizers without offsets."""
        if self._backend is not None:
            encoding = self._backend.encode(text, add_special_tokens=False)
            return encoding.ids, encoding.offsets
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError):   # a Python (slow) tokenizer
            return None
        return encoded["input_ids"], encoded["offset_mapping"]

    def _span_mask(self, encoding, spans) -> np.ndarray | None:
        """The loss mask from the tokens at the spans' first and last characters (a few lookups
        instead of converting every offset); None where a span edge has no token of its own."""
        mask = np.zeros(len(encoding.ids), dtype=np.uint8)
        at = encoding.char_to_token
        for s, e in spans:
            first, last = at(s), at(e - 1)
            if first is None:   # e.g. a space the normaliser folded into the next token
                first = next((t for t in map(at, range(s + 1, min(e, s + 8))) if t is not None),
                             None)
            if last is None:
                last = next((t for t in map(at, range(e - 2, max(s, e - 8) - 1,
                                                      -1)) if t is not None), None)
            if first is None or last is None or last < first:
                return None
            mask[first:last + 1] = 1
        return mask

    def render_arrays(self, messages: Sequence[dict], system: str | None) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
        """`render` as numpy arrays: ids int32, mask uint8."""
        text, spans = self.text(messages, system)
        if self._fast_masks and self._backend is not None:
            encoding = self._backend.encode(text, add_special_tokens=False)
            mask = self._span_mask(encoding, spans)
            if mask is not None:
                return np.asarray(encoding.ids, dtype=np.int32), mask
        encoded = self._offsets(text)
        if encoded is not None:
            ids, offsets = encoded
            ids = np.asarray(ids, dtype=np.int32)
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            start, end = offsets[:, 0], offsets[:, 1]
            mask = np.zeros(len(ids), dtype=bool)
            for s, e in spans:
                # A token overlapping an answer span is the model's to produce (e.g. "▁Paris" holds
                # the prompt's space); a zero-width token counts where it sits.
                mask |= ((start < e) & (end > s)) | ((start == end) & (start >= s) & (start < e))
            return ids, mask.astype(np.uint8)
        # Without offsets: tokenize the prompt and answer pieces separately, cut at span edges.
        ids, mask, cursor = [], [], 0
        for s, e in [*spans, (len(text), len(text))]:
            for piece, target in ((text[cursor:s], 0), (text[s:e], 1)):
                if piece:
                    piece_ids = self._encode(piece)
                    ids += piece_ids
                    mask += [target] * len(piece_ids)
            cursor = e
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)

    def render_text_arrays(self, text: str, prompt: str | None = None) -> tuple[np.ndarray,
                                                                                np.ndarray]:
        """A plain-text document (a {"text": ...} row of data.pretrain or data.corpora): BOS, the
        prompt and a blank line when given (no loss), the text, EOS (each where the tokenizer has
        one); a loss on every token of the text and the EOS (the first token of a document
        without a prompt carries none: nothing predicts it)."""
        if self._specials is not None:
            for part in (text, prompt or ""):
                found = self._specials.search(part)
                if found:
                    raise RenderError(f"the text contains the special token {found.group()!r} as "
                                      "text",
                                      "special token in text")
        ids = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        if prompt:
            ids += self._encode(f"{prompt}\n\n")
        unmasked = max(len(ids), 1)
        ids += self._encode(text)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        mask = np.ones(len(ids), dtype=np.uint8)
        mask[:unmasked] = 0
        return np.asarray(ids, dtype=np.int32), mask

    def render(self, messages: Sequence[dict], system: str | None) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and its loss mask (1 on assistant tokens)."""
        ids, mask = self.render_arrays(messages, system)
        return ids.tolist(), mask.tolist()

    def render_prompt(self, messages: Sequence[dict], system: str | None) -> list[int]:
        """Token ids of the conversation up to the point where the assistant answers."""
        text, _ = self.text(messages, system, add_generation_prompt=True)
        return self._encode(text)


def render(tokenizer, messages: Sequence[dict], system: str | None,
           template: str = "auto") -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation under a system prompt; see the module notes."""
    return ChatRenderer(tokenizer, template).render(messages, system)


def render_prompt(tokenizer, messages: Sequence[dict], system: str | None,
                  template: str = "auto") -> list[int]:
    """The prompt up to the generation point, as the same rendering trains it."""
    return ChatRenderer(tokenizer, template).render_prompt(messages, system)
