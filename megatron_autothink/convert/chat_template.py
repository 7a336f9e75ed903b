"""Chat template written into exported HF directories: Qwen2.5-VL's, plus ``thinking_mode``.

The body is Qwen2-VL/Qwen2.5-VL's template (ChatML turns, default system prompt, images and
videos as ``<|vision_start|><|image_pad|><|vision_end|>``, optional ``add_vision_id``). What we
add is the R-4B inference switch, passed as a template argument
(``tokenizer.apply_chat_template(..., thinking_mode="long")``; vLLM: ``chat_template_kwargs``):

* ``auto`` (default): the generation prompt ends at ``<|im_start|>assistant\\n``; the model
  decides whether to think.
* ``long``: the assistant turn is prefilled with ``<think>\\n`` (forced thinking).
* ``short``: prefilled with an empty think block ``<think>\\n\\n</think>\\n\\n`` (forced direct
  answer), following Qwen3's convention.

Past assistant turns are rendered as given (think blocks included), matching how our SFT data
is rendered. An unknown mode raises through ``raise_exception`` (defined by transformers' and
vLLM's template environments).
"""

from __future__ import annotations

__all__ = ["THINKING_CHAT_TEMPLATE", "THINKING_PREFILLS"]

THINKING_PREFILLS = {"auto": "", "long": "<think>\n", "short": "<think>\n\n</think>\n\n"}
"""What follows ``<|im_start|>assistant\\n`` in the generation prompt, per mode."""

THINKING_CHAT_TEMPLATE = (
    "{%- if thinking_mode is not defined or thinking_mode is none %}"
    "{%- set thinking_mode = 'auto' %}{%- endif %}"
    "{%- if thinking_mode not in ['auto', 'long', 'short'] %}"
    "{{- raise_exception('thinking_mode must be auto, long or short, got ' ~ thinking_mode) }}"
    "{%- endif %}"
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if thinking_mode == 'long' %}<think>\n"
    "{% elif thinking_mode == 'short' %}<think>\n\n</think>\n\n"
    "{% endif %}"
    "{% endif %}"
)
