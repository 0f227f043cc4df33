"""Trained-token masks with real-shaped chat templates: ChatML/Qwen 2.5 (with tools), Llama 3.1, Gemma, Mistral.

Each family gets a small byte-level BPE tokenizer with its real special tokens and a template
written the way the family's own is. The tests check the exact trained text of every trained span
(prompt/completion, multi-turn with a system message, tool calls), that the end-of-turn token is
trained, that nothing of the prompt, the system message or a tool response is, and that the ids are
exactly what `apply_chat_template(tokenize=True)` gives.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import demo_texts
from jaxsft.config import DataConfig
from jaxsft.data.render import Renderer
from jaxsft.data.tokens import Tokens, Whole
from jaxsft.errors import DataError

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

LLAMA3 = """{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" }}
{%- if tools is not none %}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\\n\\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}{{- message.content }}{{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""

# Mistral v0.1 style: the system prompt joins the first user turn.
MISTRAL = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}
{%- endfor %}"""

# Mistral v0.3 style: the system prompt joins the *last* message if it is a user turn, so a
# conversation's prefix renders differently from the conversation: the trained span cannot be found.
MISTRAL_V3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}
    {%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}
{%- endfor %}"""

# name: (template, special tokens, bos, eos, end-of-turn text closing an assistant turn)
FAMILIES = {
    "chatml": (QWEN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"],
               None, "<|im_end|>", "<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", "<end_of_turn>\n"),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
}
END_OF_TURN_TOKEN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}


def family_tokenizer(name: str, template: str | None = None):
    """A byte-level BPE tokenizer with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    default_template, specials, bos, eos, _ = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    if name == "mistral":  # SentencePiece-style: spaces as "▁", one prepended to the start of a text
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    else:  # byte-level, like Llama 3's, Qwen's, GPT's
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(demo_texts(300) + ["What is the weather in Paris?", "get_weather city"], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, clean_up_tokenization_spaces=False)
    hf.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos)]})
    hf.chat_template = template or default_template
    return hf


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, family_tokenizer(request.param)


def spans(tok, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each maximal run of trained tokens (decoded in context: SentencePiece-style
    decoders drop the space of a text's first token)."""
    def text(n: int) -> str:
        return tok.decode(ids[:n].tolist(), skip_special_tokens=False)

    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append(text(i)[len(text(start)):])
            start = None
    return out


def check_ids(tok, renderer, record: dict, messages: list[dict], tools=None) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = renderer.render(record)
    assert ids.tolist() == tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
    assert mask.dtype == np.int32 and set(np.unique(mask)) <= {0, 1}
    return ids, mask


SYSTEM = "You extract orders as JSON."
P1, C1 = "Order: 3 teal mugs for Ana Silva.", '{"name": "Ana Silva", "item": "mug", "quantity": 3}'
P2, C2 = "And the color?", "teal"


def test_prompt_completion_strings(family):
    name, tok = family
    eot = FAMILIES[name][4]
    messages = [{"role": "user", "content": P1}, {"role": "assistant", "content": C1}]
    ids, mask = check_ids(tok, Renderer(tok), {"prompt": P1, "completion": C1}, messages)
    assert spans(tok, ids, mask) == [C1 + eot]
    # The end-of-turn token is trained: the model learns to stop.
    eot_id = tok.convert_tokens_to_ids(END_OF_TURN_TOKEN[name])
    assert mask[np.flatnonzero(ids == eot_id)[-1]] == 1
    # Everything before the completion is the prompt as rendered alone with the generation prompt.
    prompt = tok.apply_chat_template(messages[:1], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    assert ids[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any() and mask[len(prompt)] == 1


def test_prompt_completion_message_lists_with_system(family):
    name, tok = family
    eot = FAMILIES[name][4]
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": P1}]
    record = {"prompt": prompt, "completion": [{"role": "assistant", "content": C1}]}
    ids, mask = check_ids(tok, Renderer(tok), record, prompt + record["completion"])
    assert spans(tok, ids, mask) == [C1 + eot]
    # the system prompt column of a string record renders the same conversation
    ids2, mask2 = Renderer(tok).render({"prompt": P1, "completion": C1, "system": SYSTEM})
    assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()


def test_multi_turn_messages_with_system(family):
    name, tok = family
    eot = FAMILIES[name][4]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": P1},
                {"role": "assistant", "content": C1}, {"role": "user", "content": P2},
                {"role": "assistant", "content": C2}]
    ids, mask = check_ids(tok, Renderer(tok), {"messages": messages}, messages)
    assert spans(tok, ids, mask) == [C1 + eot, C2 + eot]
    untrained = tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)
    for text in (SYSTEM, P1, P2):
        assert text in untrained
    # train_on_prompt: every token (the first is never a target, so its mask does not matter)
    _, all_mask = Renderer(tok, DataConfig(train_on_prompt=True)).render({"messages": messages})
    assert all_mask.all()


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CONVERSATION = [{"role": "user", "content": "What is the weather in Paris?"},
                     {"role": "assistant", "tool_calls": [CALL]},
                     {"role": "tool", "content": "18C and sunny"},
                     {"role": "assistant", "content": "It is 18C and sunny in Paris."}]
TOOL_CALL_TEXT = {"chatml": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
                  "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'}


@pytest.mark.parametrize("name", sorted(TOOL_CALL_TEXT))
@pytest.mark.parametrize("tools_as_json_string", [False, True])
def test_tool_calls(name, tools_as_json_string):
    tok = family_tokenizer(name)
    eot = FAMILIES[name][4]
    tools = [WEATHER_TOOL]
    record = {"messages": TOOL_CONVERSATION, "tools": json.dumps(tools) if tools_as_json_string else tools}
    ids, mask = check_ids(tok, Renderer(tok), record, TOOL_CONVERSATION, tools=tools)
    # Both assistant turns are trained, the call included; the tool's answer and the tool list are not.
    assert spans(tok, ids, mask) == [TOOL_CALL_TEXT[name], "It is 18C and sunny in Paris." + eot]
    untrained = tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)
    assert "18C and sunny" in untrained and "get_weather" in untrained and "The weather in a city." in untrained


def test_template_rendering_prefixes_differently_is_refused():
    tok = family_tokenizer("mistral", MISTRAL_V3)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": P1},
                {"role": "assistant", "content": C1}, {"role": "user", "content": P2},
                {"role": "assistant", "content": C2}]
    with pytest.raises(DataError, match=r"data\.jsonl:7: the chat template renders the first 2 message"):
        Renderer(tok).render({"messages": messages, "_where": "data.jsonl:7"})
    # Even one turn: the template drops the system prompt once an answer follows the last user turn.
    with pytest.raises(DataError, match="differently alone"):
        Renderer(tok).render({"messages": messages[:3]})
    ids, mask = Renderer(tok).render({"messages": messages[1:]})  # without a system prompt all is well
    assert spans(tok, ids, mask) == [" " + C1 + "</s>", " " + C2 + "</s>"]


def test_token_boundary_that_merges_is_refused():
    # The generation prompt ends inside what, followed by the completion, tokenizes as one token.
    tok = family_tokenizer("chatml", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                     "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"x\.jsonl:3: the tokens of the rendered first 1 message\(s\) are not a prefix"):
        Renderer(tok).render({"prompt": "hi", "completion": "the order", "_where": "x.jsonl:3"})


def test_no_assistant_turn_trains_nothing(family):
    name, tok = family
    ids, mask = Renderer(tok).render({"messages": [{"role": "user", "content": P1}]})
    assert len(ids) and not mask.any()
    _, mask = Renderer(tok).render({"prompt": P1, "completion": "  "})
    assert not mask.any()  # a blank completion has nothing worth training


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prefix_check_from_the_tail_is_exact(name):
    """Checking only the text after a prefix's last added token gives what tokenizing it whole gives, at every cut."""
    tok = family_tokenizer(name)
    fast, slow = Tokens(tok), Tokens(tok)
    assert (fast.added_re is not None) == (name != "mistral")  # SentencePiece-style: always tokenize whole
    slow.added_re = None
    messages = [{"role": "system", "content": "Réponds  en JSON.\n\n"}, {"role": "user", "content": P1 + "  \n"},
                {"role": "assistant", "content": "日本 " + C1}, {"role": "user", "content": "\n\n" + P2}]
    texts = [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    if name in TOOL_CALL_TEXT:
        texts.append(tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL], tokenize=False))
    agree = 0
    for text in texts:
        whole, whole_slow = Whole(text, fast.encode(text)), Whole(text, slow.encode(text))
        for cut in range(len(text) + 1):
            n = fast.prefix_len(whole, text[:cut])
            assert n == slow.prefix_len(whole_slow, text[:cut]), (cut, text[:cut][-20:])
            agree += n is not None
    assert agree > 50  # many cuts are token boundaries, and those agree too


def test_rendering_many_records_at_once_equals_one_by_one(family):
    """`prepare` tokenizes chunks of records in one batch: the same ids and masks as one at a time,
    for a mix of shapes (blank, multi-turn, system, message lists) in one chunk."""
    name, tok = family
    records = [{"prompt": P1, "completion": C1}, {"prompt": P2, "completion": "  "},
               {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": P1},
                             {"role": "assistant", "content": C1}, {"role": "user", "content": P2},
                             {"role": "assistant", "content": C2}]},
               {"prompt": [{"role": "user", "content": P2}], "completion": [{"role": "assistant", "content": C2}],
                "system": SYSTEM},
               {"messages": [{"role": "user", "content": P1}]}]
    renderer = Renderer(tok)
    together = renderer.render_many(records)
    for record, (ids, mask) in zip(records, together):
        one_ids, one_mask = renderer.render(record)
        assert ids.tolist() == one_ids.tolist() and mask.tolist() == one_mask.tolist()
    assert sum(int(m.any()) for _, m in together) == 3
