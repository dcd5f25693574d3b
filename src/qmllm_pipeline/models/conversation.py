"""Conversation formats and the `<image>` placeholder for a real LLM's tokenizer: `prepare_for_images` gives a
tokenizer that lacks them (Vicuna's has no `<image>` and no chat template) the placeholder and a
conversation format, and its LLM the embedding row the new token needs. The embedded world's own tokenizer
(`models/tokenizer.py`) is trained with both."""

from __future__ import annotations

import torch

from qmllm_pipeline.constants import IMAGE_TOKEN
from qmllm_pipeline.models.tokenizer import CHAT_TEMPLATE

# LLaVA-1.5's `conv_vicuna_v1`: "<system> USER: <prompt> ASSISTANT: <answer></s>USER: ..."; generation
# starts after "ASSISTANT:". `{% generation %}` marks the answer as above.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}" + VICUNA_V1_SYSTEM + " {% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CONVERSATION_FORMATS = {"chat": CHAT_TEMPLATE, "vicuna_v1": VICUNA_V1_TEMPLATE}


def prepare_for_images(tokenizer, llm=None, conversation_format: str | None = None) -> dict:
    """Make `tokenizer` (and `llm`, in place) read LLaVA-style prompts: `<image>` added as a special token
    where the vocabulary lacks it, a pad token where there is none (the unknown token, as LLaVA pads Llama),
    the chat template of `conversation_format` (one of CONVERSATION_FORMATS; None keeps the tokenizer's own,
    which must then exist), and the LLM's token embeddings resized to the tokenizer, each new row (input
    and, when untied, output) set to the mean of the old rows. Returns what was done."""
    if conversation_format is not None and conversation_format not in CONVERSATION_FORMATS:
        raise ValueError(f"conversation format {conversation_format!r}: expected one of {sorted(CONVERSATION_FORMATS)}")
    done = {"added_tokens": [], "conversation_format": conversation_format}
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        done["added_tokens"].append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if conversation_format is not None:
        tokenizer.chat_template = CONVERSATION_FORMATS[conversation_format]
    elif not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template: name a conversation format "
                         f"({sorted(CONVERSATION_FORMATS)})")
    if llm is not None:
        old = llm.get_input_embeddings().weight.shape[0]
        done["embedding_rows"] = [old, old]
        if len(tokenizer) > old:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for layer in {id(e): e for e in (llm.get_input_embeddings(), llm.get_output_embeddings())
                              if e is not None}.values():
                    layer.weight[old:] = layer.weight[:old].mean(0)
            done["embedding_rows"][1] = len(tokenizer)
    return done


def conversation_format_of(tokenizer) -> str | None:
    """The name of the conversation format `tokenizer`'s chat template is (None: a template of its own, as
    the embedded world's tokenizer has, which it keeps when saved)."""
    for name, template in CONVERSATION_FORMATS.items():
        if tokenizer.chat_template == template:
            return name
    return None
