"""The embedded world's tokenizer: byte-level BPE (`tokenizers`) wrapped as a transformers fast tokenizer,
with LLaVA's `<image>` placeholder and a chat template that every prompt goes through."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from qmllm_pipeline.constants import IGNORE_INDEX, IMAGE_TOKEN

USER_TOKEN, ASSISTANT_TOKEN = "<|user|>", "<|assistant|>"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# Order fixes the ids: pad 0, unk 1, <image> 2, bos 3, eos 4. EOS must not be 2: CLIP's text tower
# treats eos_token_id == 2 as a legacy config and pools at argmax(input_ids) instead of at EOS.
SPECIAL_TOKENS = (PAD, UNK, IMAGE_TOKEN, BOS, EOS, USER_TOKEN, ASSISTANT_TOKEN)

# `{% generation %}` marks the assistant's tokens, so `return_assistant_tokens_mask=True` gives the
# loss mask of stage 2 and of the LLM's alignment training.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% else %}" + ASSISTANT_TOKEN + "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` and wrap it with the special tokens and the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN], chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def chat_messages(turns: list[dict]) -> list[dict]:
    """LLaVA `conversations` (`from`: human/gpt, `value`) -> chat messages (`role`: user/assistant)."""
    roles = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the assistant's tokens), cut to `max_length`."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])[:max_length]
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, encoded["assistant_masks"], strict=False)]
    return ids, labels


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A single user turn ready for generation: `<s><|user|>prompt<|assistant|>`."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                              add_generation_prompt=True, return_dict=True)["input_ids"])
