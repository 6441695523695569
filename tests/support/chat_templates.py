"""Tool-capable chat templates for the tiny tokenizers, modelled on the real Hub templates.

Each constant follows the structure of one family's template (where tools go, how a call and its
result are written, what re-renders differently), with the markers the tiny vocabulary has: its
only special tokens are ``<|endoftext|>`` (BOS), ``<|im_start|>`` and ``<|im_end|>`` (EOS), so
every template ends a turn with ``<|im_end|>``. Other markers (``[INST]``, ``<tool_call>``) are
plain text here. Instruction prose is shortened: the tiny models have a 512-token context and
their tokenizer spends about 170 tokens on one small tool's JSON.

Templates read ``message.content`` only when it is a string (an assistant tool-call message has
None, which transformers drops) and render ``tool_call.function.arguments`` with ``tojson``
(a mapping, HF's convention).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import MappingProxyType

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.support.tiny_models import build_tiny_model

PLAIN_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ message['content'] if message['content'] is string else '' }}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The tiny tokenizers' own ChatML (``tokenizer_builder.CHAT_TEMPLATE``, same text for string
contents) that also takes a missing content. No tool support: ``tools`` and calls are ignored."""

QWEN_TOOLS = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tools>\nCall one as <tool_call>\n"
        + "{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first)
        or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if content %}
            {{- '\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": '
                + (tool_call.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
"""Qwen2.5 / Hermes: tools in the system turn inside ``<tools>``, calls as ``<tool_call>`` JSON
blocks (one per call, joined by a newline), tool results as one user turn of ``<tool_response>``s."""

QWEN3_THINKING = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tools>\nCall one as <tool_call>\n"
        + "{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{#- The last real user query: tool results (user turns of <tool_response>) do not count. #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages | length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages | length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string
        and not (message.content.startswith('<tool_response>')
                 and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content =
                content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {#- Thinking is kept only after the last user query: earlier turns lose it. #}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'
                + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
"""Qwen3: as Qwen2.5 for tools, plus ``<think>`` reasoning. An assistant turn after the last user
query shows its ``reasoning_content`` (the final one always gets a think block, empty or not);
turns before it are re-rendered without their thinking, so the history a client sends back after
a new user message no longer extends the earlier prompt. ``enable_thinking=False`` writes an
empty think block after the generation prompt."""

LLAMA3_TOOLS = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = '26 Jul 2024' %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|im_start|>system\n\n' }}
{%- if tools is not none %}
    {{- 'Environment: ipython\n' }}
{%- endif %}
{{- 'Today Date: ' + date_string + '\n\n' }}
{%- if tools is not none and not tools_in_user_message %}
    {{- 'Call a function with JSON {"name": <name>, "parameters": <object>}.\n\n' }}
    {%- for t in tools %}
        {{- (t | tojson) + '\n\n' }}
    {%- endfor %}
{%- endif %}
{{- system_message + '<|im_end|>' }}
{%- if tools is not none and tools_in_user_message %}
    {%- if messages | length == 0 %}
        {{- raise_exception('Cannot put tools in the first user message when there is no user message!') }}
    {%- endif %}
    {%- set first_user_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|im_start|>user\n\n' }}
    {{- 'Call a function with JSON {"name": <name>, "parameters": <object>}.\n\n' }}
    {%- for t in tools %}
        {{- (t | tojson) + '\n\n' }}
    {%- endfor %}
    {{- first_user_message + '<|im_end|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|im_start|>' + message.role + '\n\n'
            + ((message.content if message.content is string else '') | trim) + '<|im_end|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception('This model only supports single tool-calls at once!') }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|im_start|>assistant\n\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + (tool_call.arguments | tojson) + '}' }}
        {{- '<|im_end|>' }}
    {%- else %}
        {{- '<|im_start|>ipython\n\n' }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|im_end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n\n' }}
{%- endif %}"""
"""Llama 3.1 (JSON tool calls): tools as JSON (one line each, where Llama indents by 4, to fit the
tiny context) in the first user message (or the system
message with ``tools_in_user_message=False``), one call per assistant turn as
``{"name": ..., "parameters": ...}``, results under role ``ipython`` (a string result is
``tojson``-quoted: a string is ``iterable`` in Jinja, as in the original). Header markers are
``<|im_start|>role\n\n``; end of turn ``<|im_end|>`` with no newline."""

MISTRAL_TOOLS = r"""{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if not (message.role == 'tool'
                or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message.role == 'user') != (ns.index % 2 == 0) %}
            {{- raise_exception('After the optional system message, conversation roles must alternate '
                                + 'user/assistant/user/assistant/...') }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {#- Tools and the system prompt go with the last user message, as mistral-common does. #}
        {%- if tools is not none and message == user_messages[-1] %}
            {{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if message == user_messages[-1] and system_message is defined %}
            {{- '[INST]' + system_message + '\n\n' + message.content + '[/INST]' }}
        {%- else %}
            {{- '[INST]' + message.content + '[/INST]' }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- '[TOOL_CALLS][' }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.id is not string or tool_call.id | length != 9 %}
                {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
            {%- endif %}
            {%- set out = tool_call.function | tojson %}
            {{- out[:-1] + ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ', ' }}
            {%- endif %}
        {%- endfor %}
        {{- ']' + eos_token }}
    {%- elif message.role == 'assistant' %}
        {{- (message.content if message.content is string else '') + eos_token }}
    {%- elif message.role == 'tool' %}
        {%- if message.tool_call_id is not string or message.tool_call_id | length != 9 %}
            {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + (message.content | tojson)
            + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported, '
                            + 'after an optional system message!') }}
    {%- endif %}
{%- endfor %}"""
"""Mistral (Nemo-style markers): ``[AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS]`` before the last
user message, calls as ``[TOOL_CALLS][{...function | tojson minus its brace, "id": ...}]`` + EOS
(so the function's key order shows: name, then arguments), results as
``[TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS]``; call ids must be 9 characters.
No generation prompt: the reply follows ``[/INST]`` or ``[/TOOL_RESULTS]`` directly."""

TOOL_TEMPLATES: MappingProxyType[str, str] = MappingProxyType(
    {
        "qwen": QWEN_TOOLS,
        "qwen3": QWEN3_THINKING,
        "llama3": LLAMA3_TOOLS,
        "mistral": MISTRAL_TOOLS,
    }
)
"""Name -> tool-capable template."""


def with_template(tokenizer: PreTrainedTokenizerBase, template: str) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` whose ``chat_template`` is ``template`` (the original is unchanged)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


def save_tiny_model_with_template(
    kind: str, template: str, path: Path, *, seed: int = 0, max_positions: int | None = None
) -> Path:
    """Build the tiny model ``kind`` (see ``tiny_models.TINY_MODELS``) into ``path`` with ``template``
    as its saved chat template, and return ``path``."""
    build_tiny_model(kind, path, seed=seed, max_positions=max_positions)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path
