"""Render a record with the model's chat template and mark the tokens to train.

Records come in four shapes (`data.schema`, or `auto`: by the fields present; `data.fields` maps
other field names onto these; with a mapping set, a record field that no mapping reads is an error
unless `data.ignore_fields` names it, since it would silently be left out):
  prompt/completion  strings (the prompt is the user turn, the completion the assistant turn) or
                     message lists; the completion is trained
  messages           a conversation (optional system message, tool calls, a `tools` column);
                     every assistant turn is trained. Roles are system, user, assistant, tool
                     and any the chat template compares a role with (Llama 3's `ipython`); any
                     other (`assitant`, `moderator`) is an error
  text               plain language modelling: every token is trained

The trained tokens are found without `{% generation %}` markers, with any chat template: for each
trained turn the conversation up to it is rendered alone (with the generation prompt: exactly what
the model sees before it answers) and the conversation up to its end is rendered; the trained
tokens are the difference, i.e. the turn's content and everything the template closes it with (the
end-of-turn token and, for example, ChatML's newline after it), which is also what TRL's
`completion_only_loss` trains. Each rendered prefix must tokenize to a prefix of the whole
conversation's tokens, or the record is refused with a `DataError` naming it.

Without a chat template, prompt/completion is `prompt + completion + eos` (the tokenizer's special
tokens, such as bos, before the prompt) with the completion and eos trained, and text is
`text + eos`.

`fit` applies `data.overlong` to an example longer than `data.seq_len`: it never keeps a trained
turn without its end (see its docstring).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import numpy as np

from jaxsft.config import DataConfig, FieldsConfig
from jaxsft.data.tokens import Tokens, Whole
from jaxsft.errors import DataError, ModelError

ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT's speaker names
ROLES = ("system", "user", "assistant", "tool")
# `message.role == "ipython"`, `message['role'] != 'tool'`: the roles a chat template itself handles.
_TEMPLATE_ROLE = re.compile(r"""role['"]?\]?\s*[=!]=\s*['"]([A-Za-z_][\w-]*)['"]""")

try:  # what apply_chat_template renders with, minus its per-call argument handling
    from transformers.utils.chat_template_utils import _compile_jinja_template
    from transformers.utils.chat_template_utils import render_jinja_template as _render_jinja_template
except ImportError:  # pragma: no cover - older or newer transformers: fall back to the public API
    _render_jinja_template = None


# Files that hold a tokenizer's vocabulary: a directory without any of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(path: str):
    """The model directory's tokenizer, with a clear error when it has none."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
                         f"tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{path}: could not load the tokenizer ({e.__class__.__name__}: {first_line})") from None


def known_roles(tokenizer) -> tuple[str, ...]:
    """The message roles records may use: `ROLES`, then any other the chat template compares a role with."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template] if isinstance(template, str) else []
    extra = sorted({r for t in texts for r in _TEMPLATE_ROLE.findall(t)} - set(ROLES))
    return ROLES + tuple(extra)


# --- records -> one canonical form -------------------------------------------------------------

def _field(record: dict, name: str, where: str):
    if name not in record:
        fields = ", ".join(k for k in record if k != "_where") or "nothing"
        raise DataError(f"{where}: record has no '{name}' field (it has: {fields})")
    return record[name]


def _unknown_role(role: str, roles: tuple[str, ...], where: str, at: str) -> DataError:
    close = difflib.get_close_matches(role.lower(), roles, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return DataError(f"{where}: {at} has the unknown role '{role}'{hint}; roles are {', '.join(roles)}")


def _messages(value, fields: FieldsConfig, where: str, name: str, roles: tuple[str, ...] | None = None) -> list[dict]:
    """The messages of `value`, checked (with `roles`: each role among them, after ShareGPT's aliases)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{name}' must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: '{name}'[{i}] must be a message object, got {type(message).__name__}")
        role = message.get(fields.role)
        if not isinstance(role, str):
            raise DataError(f"{where}: '{name}'[{i}] has no string '{fields.role}' (the speaker's role)")
        content = message.get(fields.content)
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{where}: '{name}'[{i}].{fields.content} must be a string, got {type(content).__name__}")
        # Arrow-backed datasets give every message every key (None where absent): keep only real ones,
        # since templates test for keys such as `tool_calls` (apply_chat_template drops them too).
        extra = {k: v for k, v in message.items() if k not in (fields.role, fields.content) and v is not None}
        role = ROLE_ALIASES.get(role, role)
        if roles is not None and role not in roles:
            raise _unknown_role(role, roles, where, f"'{name}'[{i}]")
        out.append({"role": role, **({"content": content} if content is not None else {}), **extra})
    return out


def _as_messages(value, role: str, fields: FieldsConfig, where: str, name: str,
                 roles: tuple[str, ...] | None = None) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, fields, where, name, roles)


def _tools(record: dict, fields: FieldsConfig, where: str):
    tools = record.get(fields.tools)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: '{fields.tools}' is a string but not JSON ({e.msg})") from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: '{fields.tools}' must be a list of tool definitions, got {type(tools).__name__}")
    return tools or None


def _blank(content) -> bool:
    return content is None or (isinstance(content, str) and not content.strip())


def _nothing(value) -> bool:
    """Whether leaving a field out loses nothing (absent in Arrow rows, or blank, as Alpaca's empty inputs)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, dict)) and not value)


def _check_fields_read(record: dict, kind: str, fields: FieldsConfig, ignore: tuple[str, ...], where: str) -> None:
    """A `DataError` for record fields that hold something but no `data.fields` key of the schema reads."""
    read = {"text": {fields.text}, "messages": {fields.messages, fields.tools},
            "prompt_completion": {fields.prompt, fields.completion, fields.input, fields.system, fields.tools}}[kind]
    unread = [k for k, v in record.items() if k != "_where" and k not in read and k not in ignore and not _nothing(v)]
    if not unread:
        return
    names = ", ".join(f"'{k}'" for k in unread)
    what = f"field {names} is" if len(unread) == 1 else f"fields {names} are"
    if kind == "prompt_completion" and not fields.input and isinstance(record.get(fields.prompt), str):
        hint = f"map it with data.fields.input={unread[0]} (appended to the prompt after a blank line)"
    else:
        hint = f"the {kind} schema reads {', '.join(repr(k) for k in sorted(read) if k)}; map it with data.fields.*"
    raise DataError(f"{where}: record {what} read by no data.fields mapping and would be left out of the example; "
                    f"{hint}, or say it is meant with data.ignore_fields=[{','.join(unread)}]")


def normalize(record: dict, schema: str = "auto", fields: FieldsConfig = FieldsConfig(), *,
              roles: tuple[str, ...] | None = None, ignore: tuple[str, ...] | None = None) -> dict:
    """The record as `{"kind": "prompt_completion" | "messages" | "text", ...}`, checked; errors name `_where`.

    With `roles`, a message role outside them is an error; with `ignore` (the fields meant to be
    left out), so is a record field that holds something no `data.fields` key reads.
    """
    where = record.get("_where", "record")
    if schema == "auto":
        if fields.messages in record:
            schema = "messages"
        elif fields.prompt in record or fields.completion in record:
            schema = "prompt_completion"
        elif fields.text in record:
            schema = "text"
        else:
            have = ", ".join(k for k in record if k != "_where") or "nothing"
            raise DataError(f"{where}: record has none of the fields '{fields.prompt}'/'{fields.completion}', "
                            f"'{fields.messages}' or '{fields.text}' (it has: {have}); map yours with data.fields")
    if ignore is not None:
        _check_fields_read(record, schema, fields, ignore, where)
    if schema == "text":
        text = _field(record, fields.text, where)
        if not isinstance(text, str):
            raise DataError(f"{where}: '{fields.text}' must be a string, got {type(text).__name__}")
        return {"kind": "text", "text": text, "blank": not text.strip()}
    if schema == "messages":
        messages = _messages(_field(record, fields.messages, where), fields, where, fields.messages, roles)
        blank = all(_blank(m.get("content")) and not m.get("tool_calls") for m in messages if m["role"] == "assistant")
        return {"kind": "messages", "messages": messages, "tools": _tools(record, fields, where), "blank": blank}
    prompt, completion = _field(record, fields.prompt, where), _field(record, fields.completion, where)
    for name, value in ((fields.prompt, prompt), (fields.completion, completion)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: '{name}' must be a string or a list of messages, got {type(value).__name__}")
    extra = record.get(fields.input) if fields.input else None
    if isinstance(extra, str) and extra.strip():
        if not isinstance(prompt, str):
            raise DataError(f"{where}: '{fields.input}' can only extend a string '{fields.prompt}'")
        prompt = f"{prompt}\n\n{extra}"
    system = record.get(fields.system)
    blank = _blank(completion) if isinstance(completion, str) else all(
        _blank(m.get(fields.content)) and not m.get("tool_calls") for m in completion if isinstance(m, dict))
    return {"kind": "prompt_completion", "prompt": prompt, "completion": completion,
            "system": system if isinstance(system, str) and system.strip() else None,
            "tools": _tools(record, fields, where), "blank": blank}


# --- rendering ---------------------------------------------------------------------------------

class Renderer:
    """Turns records into token ids and a trained-token mask with one tokenizer and one data config."""

    def __init__(self, tokenizer, cfg: DataConfig = DataConfig()):
        self.tokenizer = tokenizer
        self.schema, self.fields, self.train_on_prompt = cfg.schema, cfg.fields, cfg.train_on_prompt
        self.seq_len, self.overlong = cfg.seq_len, cfg.overlong
        # Unread record fields are refused once a mapping says which fields matter.
        self.ignore = tuple(cfg.ignore_fields) if cfg.fields != FieldsConfig() else None
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.roles = known_roles(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError("the tokenizer has no eos_token: the model could never learn to stop")
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.tokens = Tokens(tokenizer)
        self._templates: dict[bool, str] = {}  # the template to use without / with tools
        self._special = dict(tokenizer.special_tokens_map)  # bos_token, eos_token, ...: template variables

    def render(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)` for one record: int32 token ids and 1 where the token is trained.

        A blank completion (or a conversation whose assistant turns say nothing) gets an all-zero
        mask: it has nothing to train, which the pipeline treats per `data.empty`.
        """
        return self.render_many([record])[0]

    def render_many(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`render` of each record. Chat records are templated one by one, then tokenized together
        (one batch of whole conversations, one of prefix tails), which is most of the work saved."""
        xs = [normalize(record, self.schema, self.fields, roles=self.roles, ignore=self.ignore) for record in records]
        wheres = [record.get("_where", "record") for record in records]
        chats = [i for i, x in enumerate(xs) if x["kind"] != "text" and self.has_template]
        rendered = iter(self._render_chats([xs[i] for i in chats], [wheres[i] for i in chats]))
        chat = set(chats)
        out = []
        for i, (x, where) in enumerate(zip(xs, wheres)):
            ids, mask = next(rendered) if i in chat else self._render_plain(x, where)
            if self.train_on_prompt:
                mask[:] = 1
            if x["blank"]:
                mask[:] = 0
            out.append((np.asarray(ids, np.int32), mask))
        return out

    def _render_plain(self, x: dict, where: str) -> tuple[list[int], np.ndarray]:
        """Text records, and prompt/completion without a chat template."""
        if x["kind"] == "text":
            ids = self.tokens.encode(x["text"], special=True) + [self.eos_id]
            return ids, np.ones(len(ids), np.int32)
        if x["kind"] == "messages" or not isinstance(x["prompt"], str) or not isinstance(x["completion"], str):
            raise DataError(f"{where}: this record holds messages, but the tokenizer has no chat template to "
                            f"render them with")
        prompt = f"{x['system']}\n\n{x['prompt']}" if x["system"] else x["prompt"]
        prompt_ids = self.tokens.encode(prompt, special=True)
        ids = prompt_ids + self.tokens.encode(x["completion"]) + [self.eos_id]
        mask = np.zeros(len(ids), np.int32)
        mask[len(prompt_ids):] = 1
        return ids, mask

    def _apply(self, messages: list[dict], tools, generation_prompt: bool, where: str) -> str:
        """What `apply_chat_template(..., tokenize=False)` renders, at a fraction of its per-call cost.

        Plain conversations (role and string content only, no tools) go straight to the compiled
        template, with the variables apply_chat_template gives it; others through the function
        apply_chat_template renders with (which also converts and aliases message fields).
        """
        try:
            if _render_jinja_template is None:
                return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=generation_prompt)
            with_tools = tools is not None
            if with_tools not in self._templates:
                self._templates[with_tools] = self.tokenizer.get_chat_template(None, tools)
            template = self._templates[with_tools]
            if not with_tools and all(m.keys() <= {"role", "content"} and isinstance(m.get("content"), str)
                                      for m in messages):
                return _compile_jinja_template(template).render(
                    messages=messages, tools=None, documents=None, add_generation_prompt=generation_prompt,
                    **self._special)
            (text,), _ = _render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                                add_generation_prompt=generation_prompt, **self._special)
            return text
        except Exception as e:  # noqa: BLE001 - template errors come as many exception types
            raise DataError(f"{where}: the chat template failed to render this record: {e}") from None

    def _render_chats(self, xs: list[dict], wheres: list[str]) -> list[tuple[list[int], np.ndarray]]:
        """Chat records: each one's text and the texts of its prefixes at the trained turns' edges
        (templated), then the tokens of every text and prefix tail in two batches, then the masks."""
        plans = [self._chat_texts(x, where) for x, where in zip(xs, wheres)]
        whole_ids = self.tokens.encode_many([text for text, _ in plans])
        splits = [[self.tokens.split(cut[0]) if cut is not None else None for cut in cuts] for _, cuts in plans]
        tails = iter(self.tokens.encode_many([sp[2] for cut_splits in splits for sp in cut_splits if sp is not None]))
        out = []
        for (text, cuts), cut_splits, ids, where in zip(plans, splits, whole_ids, wheres):
            whole = Whole(text, ids)
            ends = []  # token index of each cut: the end of the rendered prefix, or of the whole
            for cut, sp in zip(cuts, cut_splits):
                if cut is None:
                    ends.append(len(ids))
                    continue
                prefix, n_messages = cut
                n = self.tokens.prefix_len(whole, prefix, sp, next(tails) if sp is not None else None)
                if n is None:
                    raise DataError(
                        f"{where}: the tokens of the rendered first {n_messages} message(s) are not a prefix of the "
                        f"whole conversation's tokens (the text at the boundary, {prefix[-20:]!r} + "
                        f"{text[len(prefix):len(prefix) + 20]!r}, tokenizes differently), so the trained tokens "
                        f"cannot be found")
                ends.append(n)
            mask = np.zeros(len(ids), np.int32)
            for a, b in zip(ends[::2], ends[1::2]):
                mask[a:b] = 1
            out.append((ids, mask))
        return out

    def _chat_texts(self, x: dict, where: str) -> tuple[str, list[tuple[str, int] | None]]:
        """The whole conversation's text and, for each trained turn, the texts it starts and ends
        after: the conversation before it with the generation prompt (what the model sees before it
        answers) and the conversation through it (None: the whole), each with its message count."""
        tools = x["tools"]
        messages, spans = self._chat_messages(x, where)
        text = self._apply(messages, tools, False, where)
        cuts: list[tuple[str, int] | None] = []
        for start, end in spans:
            cuts.append((self._prefix_text(messages[:start], tools, True, text, where), start))
            cuts.append(None if end == len(messages) else
                        (self._prefix_text(messages[:end], tools, False, text, where), end))
        return text, cuts

    def _chat_messages(self, x: dict, where: str) -> tuple[list[dict], list[tuple[int, int]]]:
        """A chat record's messages and the `(start, end)` message indices of its trained turns."""
        if x["kind"] == "messages":
            messages = x["messages"]
            return messages, [(i, i + 1) for i, m in enumerate(messages) if m["role"] == "assistant"]
        system = [{"role": "system", "content": x["system"]}] if x["system"] else []
        prompt = system + _as_messages(x["prompt"], "user", self.fields, where, self.fields.prompt, self.roles)
        completion = _as_messages(x["completion"], "assistant", self.fields, where, self.fields.completion, self.roles)
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]

    def head(self, record: dict, ids: np.ndarray) -> int:
        """How many of the rendered record's first tokens `truncate_prompt` never cuts: bos, and with a
        chat template an opening system message (when it renders alone as a token prefix of the whole)."""
        bos = int(self.bos_id is not None and len(ids) > 0 and int(ids[0]) == self.bos_id)
        x = normalize(record, self.schema, self.fields)
        if not self.has_template or x["kind"] == "text":
            return bos
        where = record.get("_where", "record")
        messages, _ = self._chat_messages(x, where)
        if messages[0]["role"] != "system" or len(messages) < 2:
            return bos
        try:  # a template that refuses a lone system message (Mistral's alternation check): bos only
            text = self._apply(messages, x["tools"], False, where)
            prefix = self._apply(messages[:1], x["tools"], False, where)
        except DataError:
            return bos
        n = self.tokens.prefix_len(Whole(text, [int(i) for i in ids]), prefix) if text.startswith(prefix) else None
        return max(n or 0, bos)

    def fit(self, record: dict, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, str]:
        """`fit` of the rendered record with the data config's `seq_len` and `overlong` (and its `head`)."""
        keep = self.head(record, ids) if self.overlong == "truncate_prompt" and len(ids) - 1 > self.seq_len else 0
        return fit(ids, mask, self.seq_len, self.overlong, keep)

    def _prefix_text(self, messages: list[dict], tools, generation_prompt: bool, full_text: str, where: str) -> str:
        """The rendering of the conversation's first messages, checked to start the whole's text."""
        text = self._apply(messages, tools, generation_prompt, where)
        if not full_text.startswith(text):
            raise DataError(
                f"{where}: the chat template renders the first {len(messages)} message(s) differently alone "
                f"than inside the whole conversation, so the trained tokens cannot be found "
                f"(alone it ends {text[-40:]!r})")
        return text


# --- one unpacked example ----------------------------------------------------------------------

def nothing_to_train(where: str) -> DataError:
    """The error for an example without trained tokens (with `data.empty=error`)."""
    return DataError(f"{where}: the example has no trained tokens (a blank completion, or no assistant turn); "
                     f"set data.empty=drop to drop such records")


KEPT, TRUNCATED, PROMPT_TRUNCATED, OVERLONG, EMPTY = "kept", "truncated", "truncated_prompt", "overlong", "empty"


def trained_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """`(start, end)` of each run of trained ids (a turn with its end-of-turn token); the first id
    never counts, as it is no token's target."""
    m = np.asarray(mask[1:]) != 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))) + 1
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def fit(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str,
        keep: int = 0) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Applies the length policy: `(ids, mask, status)` with at most `seq_len + 1` ids (`seq_len` targets).

    A trained turn is never kept without its end. An example of more ids is, by `overlong`:
      drop             dropped (status `overlong`)
      truncate         cut after the last trained turn that fits whole (`truncated`); none fits: dropped.
                       An example trained on every token (text, train_on_prompt) is cut at seq_len.
      truncate_prompt  as truncate when the last trained turn fits whole; else what precedes that
                       turn is cut from the left, after its first `keep` ids (bos, a system message),
                       so the turn fits whole (`truncated_prompt`); an earlier trained turn cut into
                       is no longer trained. The turn alone too long: dropped.
    Status `kept`, `truncated` or `truncated_prompt` with the arrays; `overlong` or `empty` (nothing
    trained at all) with Nones.
    """
    spans = trained_spans(mask)
    if not spans:
        return None, None, EMPTY
    n = seq_len + 1  # the ids of seq_len targets
    if len(ids) <= n:
        return ids, mask, KEPT
    if overlong == "drop":
        return None, None, OVERLONG
    if spans == [(1, len(ids))]:  # every token trained: no prompt to cut, no turn to keep whole
        return ids[:n], mask[:n], TRUNCATED
    start, end = spans[-1]
    if overlong == "truncate" or end <= n:
        ends = [b for _, b in spans if b <= n]
        return (ids[:ends[-1]], mask[:ends[-1]], TRUNCATED) if ends else (None, None, OVERLONG)
    cut = end - n  # ids to remove after the first `keep`, all before the last turn; its first
    if cut > start - max(keep, 1):  # token must stay a target (at index 1 or later)
        return None, None, OVERLONG
    kept = np.r_[0:keep, keep + cut:end]
    new_mask = mask[kept].copy()
    for a, b in spans[:-1]:  # an earlier trained turn partly cut off: trained without its start
        if a < keep + cut and b > keep:
            new_mask[(kept >= a) & (kept < b)] = 0
    return ids[kept], new_mask, PROMPT_TRUNCATED


def shift(ids: np.ndarray, mask: np.ndarray) -> dict:
    """One unpacked example of the batch contract's per-token fields: `tokens[i]` is the input,
    `targets[i]` the next token, `loss_mask[i]` whether that target is trained."""
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def to_example(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str,
               keep: int = 0) -> tuple[dict | None, str]:
    """`fit` then `shift`: `(example or None, status)`."""
    ids, mask, status = fit(ids, mask, seq_len, overlong, keep)
    return (shift(ids, mask) if ids is not None else None), status
