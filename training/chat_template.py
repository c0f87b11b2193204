"""Training chat templates: the serving template plus {% generation %} markers.

TRL's ``assistant_only_loss=True`` needs a chat template whose assistant turns are wrapped in
``{% generation %} ... {% endgeneration %}``. SmolLM2's stock template has none and TRL cannot patch it (it
patches only a list of known templates), so this module carries a training twin of it that renders byte-identical text
(``renders_identically`` checks that) and marks ``<assistant text><|im_end|>`` as the trained span, so the
model also learns to stop. Only the LAST assistant turn is marked: earlier ones are the conversation's history
as it was served (answers the user disliked or edited among them), context for the answer, never targets.

In: a tokenizer. Out: the template to train with (``training_template_for``), or None when the
tokenizer's own template already has the markers or is not one we know (then TRL tries its own patches).
"""

from __future__ import annotations

from typing import Any

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Same text as SmolLM2-Instruct's template; only the generation markers are added.
SMOLLM2_TRAINING_TEMPLATE = (
    # The last assistant turn is the row's own answer (in a training row it is also the last message). Marking
    # "the last assistant turn" rather than "the last message" lets TRL's check that the stop token is trained
    # (it renders user, assistant, user) see <|im_end|> inside the marked span.
    "{% set ns = namespace(last=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set ns.last = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' and loop.index0 == ns.last %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def is_smollm2_template(template: str | None) -> bool:
    """The stock SmolLM2-Instruct template (ChatML with SmolLM's default system prompt)."""
    return bool(template) and "<|im_start|>" in template and SMOLLM2_DEFAULT_SYSTEM in template


def training_template_for(tokenizer: Any) -> str | None:
    """The template to train `tokenizer`'s model with, or None to keep the tokenizer's own."""
    template = getattr(tokenizer, "chat_template", None)
    if has_generation_markers(template):
        return None
    if is_smollm2_template(template):
        return SMOLLM2_TRAINING_TEMPLATE
    return None


def renders_identically(tokenizer: Any, template: str, conversations: list[list[dict[str, str]]]) -> bool:
    """True when `template` renders every conversation exactly like the tokenizer's own template."""
    for messages in conversations:
        for gen_prompt in (False, True):
            ours = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt
            )
            theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
            if ours != theirs:
                return False
    return True
