"""Small chat templates written for the tests, one per behaviour of published templates.

Each reproduces one family's behaviour (learned from the published templates, not copied):
reasoning kept only after the last user turn (Qwen3), everything up to </think> dropped
(DeepSeek-R1 distills), a terminator after the last turn (Phi-3.5), system prompt and tool
list placed at the last user turn (Mistral-Nemo), one turn split into channel messages with
a different closer for the last one (gpt-oss harmony), trimmed content (Llama 3), and
tool-call-only turns in all those that call tools; tool-call sections closed by several
special tokens or by a tag, a newline and the end-of-turn token; a generation prompt that
opens the reasoning; block tokens after the role header that depend on the turn. `TOKENS`
are the added tokens each needs: (text, special).
"""

from __future__ import annotations

QWEN3 = r"""
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages[0].role == 'system' -%}{{- messages[0].content + '\n\n' -}}{%- endif -%}
  {{- 'Tools you may call:' -}}
  {%- for t in tools -%}{{- '\n' + (t | tojson) -}}{%- endfor -%}
  {{- '<|im_end|>\n' -}}
{%- elif messages[0].role == 'system' -%}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' -}}
  {%- elif m.role == 'assistant' -%}
    {%- set text = m.content if m.content is string else '' -%}
    {%- set thought = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if '</think>' in text -%}
      {%- set thought = text.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
      {%- set text = text.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if loop.index0 > ns.last_user and (loop.last or thought) -%}
      {{- '<think>\n' + thought.strip('\n') + '\n</think>\n\n' -}}
    {%- endif -%}
    {{- text -}}
    {%- for call in m.tool_calls or [] -%}
      {%- if text or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + call.function.arguments + '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""

R1 = r"""
{{- '<｜begin▁of▁sentence｜>' -}}
{%- for m in messages -%}{%- if m.role == 'system' -%}{{- m.content -}}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {{- '<｜User｜>' + m.content -}}
  {%- elif m.role == 'assistant' -%}
    {%- set text = m.content -%}
    {%- if '</think>' in text -%}{%- set text = text.split('</think>')[-1] -%}{%- endif -%}
    {{- '<｜Assistant｜>' + text + '<｜end▁of▁sentence｜>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\n' -}}{%- endif -%}
"""

PHI = r"""
{%- for m in messages -%}
  {%- if m.role == 'system' and m.content -%}{{- '<|system|>\n' + m.content + '<|end|>\n' -}}
  {%- elif m.role == 'user' -%}{{- '<|user|>\n' + m.content + '<|end|>\n' -}}
  {%- elif m.role == 'assistant' -%}{{- '<|assistant|>\n' + m.content + '<|end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- else -%}{{- '<|endoftext|>' -}}{%- endif -%}
"""

NEMO = r"""
{%- if messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user=-1, n=0) -%}
{%- for m in turns -%}
  {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
  {%- if m.role in ['user', 'assistant'] and not m.tool_calls -%}
    {%- if (m.role == 'user') != (ns.n % 2 == 0) -%}{{- raise_exception('roles must alternate') -}}{%- endif -%}
    {%- set ns.n = ns.n + 1 -%}
  {%- endif -%}
{%- endfor -%}
{{- '<s>' -}}
{%- for m in turns -%}
  {%- if m.role == 'user' -%}
    {%- if loop.index0 == ns.last_user -%}
      {%- if tools -%}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}
      {%- if system is defined -%}{{- '[INST]' + system + '\n\n' + m.content + '[/INST]' -}}
      {%- else -%}{{- '[INST]' + m.content + '[/INST]' -}}{%- endif -%}
    {%- else -%}
      {{- '[INST]' + m.content + '[/INST]' -}}
    {%- endif -%}
  {%- elif m.role == 'assistant' and m.tool_calls -%}
    {{- '[TOOL_CALLS][' -}}
    {%- for call in m.tool_calls -%}
      {%- if call.id | length != 9 -%}{{- raise_exception('tool call ids have 9 characters') -}}{%- endif -%}
      {{- '{"name": "' + call.function.name + '", "arguments": ' + call.function.arguments + ', "id": "' + call.id + '"}' -}}
      {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
    {%- endfor -%}
    {{- ']</s>' -}}
  {%- elif m.role == 'assistant' -%}
    {{- m.content | trim + '</s>' -}}
  {%- elif m.role == 'tool' -%}
    {{- '[TOOL_RESULTS]{"content": ' + (m.content | tojson) + ', "call_id": "' + m.tool_call_id + '"}[/TOOL_RESULTS]' -}}
  {%- endif -%}
{%- endfor -%}
"""

HARMONY = r"""
{{- '<|start|>system<|message|>Reasoning: medium<|end|>' -}}
{%- if tools -%}
  {{- '<|start|>developer<|message|>' -}}
  {%- if messages[0].role == 'system' -%}{{- messages[0].content + '\n' -}}{%- endif -%}
  {%- for t in tools -%}{{- 'tool ' + t.function.name + '\n' -}}{%- endfor -%}
  {{- '<|end|>' -}}
{%- elif messages[0].role == 'system' -%}
  {{- '<|start|>developer<|message|>' + messages[0].content + '<|end|>' -}}
{%- endif -%}
{%- set ns = namespace(call='') -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {{- '<|start|>user<|message|>' + m.content + '<|end|>' -}}
  {%- elif m.role == 'assistant' and m.tool_calls -%}
    {%- set later = namespace(final=false) -%}
    {%- for f in messages[loop.index:] -%}
      {%- if f.role == 'assistant' and not f.tool_calls -%}{%- set later.final = true -%}{%- endif -%}
    {%- endfor -%}
    {%- if m.thinking and not later.final -%}
      {{- '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' -}}
    {%- endif -%}
    {%- set call = m.tool_calls[0].function -%}
    {{- '<|start|>assistant to=functions.' + call.name + '<|channel|>commentary json<|message|>' -}}
    {{- call.arguments + '<|call|>' -}}
    {%- set ns.call = call.name -%}
  {%- elif m.role == 'assistant' -%}
    {%- if loop.last and not add_generation_prompt -%}
      {%- if m.thinking -%}{{- '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' -}}{%- endif -%}
      {{- '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|return|>' -}}
    {%- else -%}
      {{- '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' -}}
    {%- endif -%}
  {%- elif m.role == 'tool' -%}
    {{- '<|start|>functions.' + ns.call + ' to=assistant<|channel|>commentary<|message|>' + m.content + '<|end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
"""

TRIM = r"""
{{- '<|begin_of_text|>' -}}
{%- for m in messages -%}
  {%- set role = 'ipython' if m.role == 'tool' else m.role -%}
  {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}
  {%- if m.tool_calls -%}
    {%- set call = m.tool_calls[0].function -%}
    {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments + '}' -}}
  {%- else -%}
    {{- m.content | trim -}}
  {%- endif -%}
  {{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

# A template that quotes the user's words between the reply's reasoning and its answer: no
# mask can keep the reply trained and the user's text untrained, so the audit must refuse.
ECHO = r"""
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' + m.reasoning + ' (re: ' + messages[loop.index0 - 1].content + ') ' -}}
    {{- m.content + '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# No system role: the system text opens the first user turn; the reply role is "model";
# turns close with a special token and a newline; roles must alternate (Gemma 3).
GEMMA = r"""
{{- '<bos>' -}}
{%- if messages[0].role == 'system' -%}
  {%- set lead = messages[0].content + '\n\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set lead = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}{{- raise_exception('user and assistant must alternate') -}}{%- endif -%}
  {{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' -}}
  {{- (lead if loop.first else '') + (m.content | trim) + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

# A system header always rendered with date lines; tools as JSON inside the first user turn
# (unless tools_in_user_message is false); tool results under an "ipython" header; a call
# rendered as JSON and closed by <|eom_id|> when builtin_tools is given (Llama 3.1-3.3).
LLAMA = r"""
{{- '<|begin_of_text|>' -}}
{%- if messages[0].role == 'system' -%}
  {%- set sys = messages[0].content | trim -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set sys = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- set in_user = tools and (tools_in_user_message is not defined or tools_in_user_message) -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if tools -%}{{- 'Environment: ipython\n' -}}{%- endif -%}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' -}}
{%- if tools and not in_user -%}{%- for t in tools -%}{{- (t | tojson(indent=4)) + '\n\n' -}}{%- endfor -%}{%- endif -%}
{{- sys + '<|eot_id|>' -}}
{%- if in_user -%}
  {%- if turns[0].role != 'user' -%}{{- raise_exception('tools need a first user message') -}}{%- endif -%}
  {{- '<|start_header_id|>user<|end_header_id|>\n\nCall one of these functions, as JSON:\n\n' -}}
  {%- for t in tools -%}{{- (t | tojson(indent=4)) + '\n\n' -}}{%- endfor -%}
  {{- (turns[0].content | trim) + '<|eot_id|>' -}}
  {%- set turns = turns[1:] -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if m.tool_calls -%}
    {%- if m.tool_calls | length != 1 -%}{{- raise_exception('one tool call per turn') -}}{%- endif -%}
    {%- set call = m.tool_calls[0].function -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + call.name + '", "parameters": ' -}}
    {{- (call.arguments | tojson) + '}' + ('<|eom_id|>' if builtin_tools is defined else '<|eot_id|>') -}}
  {%- elif m.role in ['tool', 'ipython'] -%}
    {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + m.content + '<|eot_id|>' -}}
  {%- else -%}
    {{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + (m.content | trim) + '<|eot_id|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

# A system prompt block (a default one when the row has none), tools before the last user
# turn, calls as name + [ARGS], results in [TOOL_RESULTS]; replies close with </s>; no
# generation prompt at all (Mistral Small 3.x, v7 tekken).
MISTRAL = r"""
{%- if messages[0].role == 'system' -%}
  {%- set sys = messages[0].content -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set sys = 'You answer briefly. Today is 2025-01-01.' -%}{%- set turns = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in turns -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{{- '<s>[SYSTEM_PROMPT]' + sys + '[/SYSTEM_PROMPT]' -}}
{%- for m in turns -%}
  {%- if m.role == 'user' -%}
    {%- if tools and loop.index0 == ns.last_user -%}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}
    {{- '[INST]' + m.content + '[/INST]' -}}
  {%- elif m.role == 'assistant' -%}
    {%- if m.content -%}{{- m.content -}}{%- endif -%}
    {%- for call in m.tool_calls or [] -%}
      {{- '[TOOL_CALLS]' + call.function.name + '[ARGS]' + call.function.arguments -}}
    {%- endfor -%}
    {{- '</s>' -}}
  {%- elif m.role == 'tool' -%}
    {{- '[TOOL_RESULTS]' + m.content + '[/TOOL_RESULTS]' -}}
  {%- endif -%}
{%- endfor -%}
"""

# Role and text separated by a special token, no newlines between turns (Phi-4).
PHI4 = r"""
{%- for m in messages -%}{{- '<|im_start|>' + m.role + '<|im_sep|>' + m.content + '<|im_end|>' -}}{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}
"""

# DeepSeek-R1 distills with tools: calls in their own (plain-text) markers closed by the
# end-of-sentence token; results in output markers; the reply after results is opened by
# the outputs' closing marker instead of the assistant tag, and keeps its <think> text.
# With `unclosed` (older published versions), the closers follow each call but the first:
# a turn of one call ends at its plain-text call marker, with no special token after it.
R1TOOLS = r"""
{{- '<｜begin▁of▁sentence｜>' -}}
{%- for m in messages -%}{%- if m.role == 'system' -%}{{- m.content -}}{%- endif -%}{%- endfor -%}
{%- set ns = namespace(after_tool=false, first_output=true) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {%- set ns.after_tool = false -%}{%- set ns.first_output = true -%}
    {{- '<｜User｜>' + m.content -}}
  {%- elif m.role == 'assistant' and m.tool_calls -%}
    {%- set ns.after_tool = false -%}{%- set ns.first_output = true -%}
    {{- '<｜Assistant｜>' + (m.content or '') + '<｜tool▁calls▁begin｜>' -}}
    {%- for call in m.tool_calls -%}
      {%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call.function.name + '\n```json\n' -}}
      {{- call.function.arguments + '\n```<｜tool▁call▁end｜>' -}}
      {%- if unclosed is not defined or not loop.first -%}{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}{%- endif -%}
    {%- endfor -%}
  {%- elif m.role == 'assistant' -%}
    {%- if ns.after_tool -%}
      {{- '<｜tool▁outputs▁end｜>' + m.content + '<｜end▁of▁sentence｜>' -}}
      {%- set ns.after_tool = false -%}
    {%- else -%}
      {{- '<｜Assistant｜>' + m.content.split('</think>')[-1] + '<｜end▁of▁sentence｜>' -}}
    {%- endif -%}
  {%- elif m.role == 'tool' -%}
    {{- ('<｜tool▁outputs▁begin｜>' if ns.first_output else '\n') -}}
    {{- '<｜tool▁output▁begin｜>' + m.content + '<｜tool▁output▁end｜>' -}}
    {%- set ns.after_tool = true -%}{%- set ns.first_output = false -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {%- if ns.after_tool -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}
  {{- '<｜Assistant｜><think>\n' -}}
{%- endif -%}
"""

# A tool-call section made of special tokens: section open, per call an open / name / arguments
# marker / close, then section close, then the end-of-turn token (the shape of several 2025
# templates). A turn's calls end three special tokens before its turn does.
SECTIONS = r"""
{%- if tools -%}
  {{- '<|turn|>system<|sep|>Functions:' -}}{%- for t in tools -%}{{- ' ' + t.function.name -}}{%- endfor -%}{{- '<|eot|>' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|turn|>assistant<|sep|>' + (m.content or '') -}}
    {%- if m.tool_calls -%}
      {{- '<|calls|>' -}}
      {%- for c in m.tool_calls -%}
        {{- '<|call|>' + c.function.name + ':' + (loop.index0 | string) + '<|args|>' + c.function.arguments + '<|/call|>' -}}
      {%- endfor -%}
      {{- '<|/calls|>' -}}
    {%- endif -%}
    {{- '<|eot|>' -}}
  {%- else -%}
    {{- '<|turn|>' + m.role + '<|sep|>' + m.content + '<|eot|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn|>assistant<|sep|>' -}}{%- endif -%}
"""

# Calls as XML with one element per argument (arguments given as a mapping), the call block
# closed by a special "</tool_call>", then a newline, then the end-of-turn token.
XMLCALLS = r"""
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' + (m.content or '') -}}
    {%- for c in m.tool_calls or [] -%}
      {%- if m.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n<function=' + c.function.name + '>\n' -}}
      {%- for k, v in c.function.arguments | dictsort -%}{{- '<parameter=' + k + '>\n' + (v | string) + '\n</parameter>\n' -}}{%- endfor -%}
      {{- '</function>\n</tool_call>' -}}
    {%- endfor -%}
    {{- ('\n' if m.tool_calls else '') + '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# The generation prompt opens the reasoning ("<think>\n"); reasoning comes as
# reasoning_content or written inside the content, rendered as given, and is dropped from
# turns before the last user message (a 2025 reasoning-model shape).
THINKPROMPT = r"""
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {%- set text = m.content -%}
    {%- if loop.index0 < ns.last_user -%}{%- set text = text.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if m.reasoning_content and loop.index0 > ns.last_user -%}
      {{- '<think>\n' + m.reasoning_content + '\n</think>\n\n' -}}
    {%- endif -%}
    {{- text + '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}
"""

# The role header is followed by a block token that depends on the turn: reasoning, a call
# plan or an answer; the generation prompt holds the reasoning one only.
BLOCKS = r"""
{%- for m in messages -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|turn|>bot' -}}
    {%- if m.thinking -%}{{- '<|think|>' + m.thinking + '<|/think|>' -}}{%- endif -%}
    {%- if m.tool_calls -%}
      {{- '<|plan|>' -}}
      {%- for c in m.tool_calls -%}{{- c.function.name + ' ' + c.function.arguments + ';' -}}{%- endfor -%}
      {{- '<|/plan|>' -}}
    {%- endif -%}
    {%- if m.content -%}{{- '<|answer|>' + m.content + '<|/answer|>' -}}{%- endif -%}
    {{- '<|eot|>' -}}
  {%- else -%}
    {{- '<|turn|>' + m.role + '<|sep|>' + m.content + '<|eot|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn|>bot<|think|>' -}}{%- endif -%}
"""

TOKENS: dict[str, list[tuple[str, bool]]] = {
    "qwen3": [("<think>", False), ("</think>", False)],
    "r1": [
        ("<｜begin▁of▁sentence｜>", True),
        ("<｜end▁of▁sentence｜>", True),
        ("<｜User｜>", False),
        ("<｜Assistant｜>", False),
    ],
    "phi": [(t, True) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")],
    "nemo": [
        (t, True)
        for t in (
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        )
    ],
    "harmony": [(t, True) for t in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>")],
    "trim": [(t, True) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")],
    "echo": [],
    "gemma": [(t, True) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>")],
    "llama": [
        (t, True) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")
    ],
    "mistral": [
        (t, True)
        for t in (
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
            "[TOOL_CALLS]",
            "[ARGS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        )
    ],
    "phi4": [(t, True) for t in ("<|im_start|>", "<|im_sep|>", "<|im_end|>")],
    "r1tools": [
        ("<｜begin▁of▁sentence｜>", True),
        ("<｜end▁of▁sentence｜>", True),
        ("<｜User｜>", False),
        ("<｜Assistant｜>", False),
        ("<think>", False),
        ("</think>", False),
    ],
    "sections": [
        (t, True)
        for t in ("<|turn|>", "<|sep|>", "<|eot|>", "<|calls|>", "<|/calls|>", "<|call|>", "<|args|>", "<|/call|>")
    ],
    "xmlcalls": [("<tool_call>", True), ("</tool_call>", True)],
    "thinkprompt": [("<think>", False), ("</think>", False)],
    "blocks": [
        (t, True)
        for t in (
            "<|turn|>",
            "<|sep|>",
            "<|eot|>",
            "<|think|>",
            "<|/think|>",
            "<|plan|>",
            "<|/plan|>",
            "<|answer|>",
            "<|/answer|>",
        )
    ],
}

TEMPLATES = {
    "qwen3": QWEN3,
    "r1": R1,
    "phi": PHI,
    "nemo": NEMO,
    "harmony": HARMONY,
    "trim": TRIM,
    "echo": ECHO,
    "gemma": GEMMA,
    "llama": LLAMA,
    "mistral": MISTRAL,
    "phi4": PHI4,
    "r1tools": R1TOOLS,
    "sections": SECTIONS,
    "xmlcalls": XMLCALLS,
    "thinkprompt": THINKPROMPT,
    "blocks": BLOCKS,
}
