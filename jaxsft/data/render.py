"""Render a record with the model's chat template and mark the tokens to train.

For `{"prompt", "completion"}` the prompt is the user turn and the completion the assistant turn.
The prompt is rendered alone (with the generation prompt, exactly what the model sees at inference)
and tokenized; the rest of the full rendering is tokenized after it. The loss mask is 1 on that
rest (the completion and the end-of-turn token closing it), and 0 on anything the template adds
after the end-of-turn token (such as a trailing newline). Without a chat template the example is
`prompt + completion + eos`, with the completion and eos trained.
"""

from __future__ import annotations

import numpy as np

from jaxsft.errors import DataError


class Renderer:
    """Turns records into token ids and a trained-token mask with one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError("the tokenizer has no eos_token: the model could never learn to stop")

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def render(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)` for one record: int32 token ids and 1 where the token is trained."""
        where = record.get("_where", "record")
        prompt, completion = record["prompt"], record["completion"]
        if self.has_template:
            user = [{"role": "user", "content": prompt}]
            try:
                prompt_text = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
                full_text = self.tokenizer.apply_chat_template(
                    user + [{"role": "assistant", "content": completion}], tokenize=False)
            except Exception as e:  # noqa: BLE001 - template errors come as many exception types
                raise DataError(f"{where}: the chat template failed to render this record: {e}") from None
            if not full_text.startswith(prompt_text):
                raise DataError(f"{where}: the chat template renders the prompt differently alone than before "
                                f"its completion, so the trained tokens cannot be found")
            prompt_ids = self._encode(prompt_text, special=False)
            rest_ids = self._encode(full_text[len(prompt_text):], special=False)
            mask = [0] * len(prompt_ids) + [1] * len(rest_ids)
            ids = prompt_ids + rest_ids
            # Train up to and including the last end-of-turn token, not what the template adds after it.
            eos_at = [i for i in range(len(prompt_ids), len(ids)) if ids[i] == self.eos_id]
            if eos_at:
                for i in range(eos_at[-1] + 1, len(ids)):
                    mask[i] = 0
        else:
            prompt_ids = self._encode(prompt, special=True)
            completion_ids = self._encode(completion, special=False) + [self.eos_id]
            ids = prompt_ids + completion_ids
            mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def to_example(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str) -> dict | None:
    """Shifts `(ids, mask)` into one unpacked example of the batch contract's per-token fields.

    `tokens[i]` is the input and `targets[i]` the next token; `loss_mask[i]` says whether that
    target is trained. Returns None when the example must be dropped (too long with
    `overlong="drop"`, or nothing left to train after truncation).
    """
    tokens, targets, loss_mask = ids[:-1], ids[1:], mask[1:]
    if len(tokens) > seq_len:
        if overlong == "drop":
            return None
        tokens, targets, loss_mask = tokens[:seq_len], targets[:seq_len], loss_mask[:seq_len]
    if not loss_mask.any():
        return None
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
