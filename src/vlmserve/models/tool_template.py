"""The chat template for conversations with tools, for checkpoints whose own template has none.

Released Qwen2.5-VL checkpoints ship a chat template that ignores `tools`, assistant `tool_calls` and the
`tool` role. The Qwen2.5 language models the VL models are built on were trained on Hermes-style tool use,
and their template writes it: tool signatures in the system turn inside <tools></tools>, calls as
<tool_call>{"name": ..., "arguments": ...}</tool_call>, results as a user turn of <tool_response> blocks.
`QWEN2_5_VL_TOOLS_CHAT_TEMPLATE` is that template (Qwen2.5-7B-Instruct's, verbatim in what it writes) with the
VL template's handling of image and video parts, so a conversation without tools renders exactly as the VL
template renders it.

Does not know: when it is used (engine/input_processor.py picks it for a conversation with tools or tool
messages, chat_template.py when the checkpoint's template does not mention tools), how calls are parsed back
(api/tools.py).
"""

from __future__ import annotations

_CONTENT = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

QWEN2_5_VL_TOOLS_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    + _CONTENT
    + "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- render_content(messages[0]['content']) -}}"
    "{%- else -%}{{- 'You are a helpful assistant.' -}}{%- endif -%}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" -}}'
    '{%- for tool in tools -%}{{- "\\n" -}}{{- tool | tojson -}}{%- endfor -%}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" -}}'
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0]['content']) + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>' + message.role -}}"
    "{%- if message.content -%}{{- '\\n' + render_content(message.content) -}}{%- endif -%}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    '{{- \'\\n<tool_call>\\n{"name": "\' -}}{{- tool_call.name -}}{{- \'", "arguments": \' -}}'
    "{{- tool_call.arguments | tojson -}}{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') -%}"
    "{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' -}}{{- render_content(message.content) -}}{{- '\\n</tool_response>' -}}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def template_handles_tools(source: str) -> bool:
    """Whether a checkpoint's own chat template renders tools (then it is used as it is)."""
    return "tools" in source and "tool_call" in source
