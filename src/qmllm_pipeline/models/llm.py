"""A tiny transformers `LlamaForCausalLM` for the embedded world: config, chat training, batched answers.

Trained on text only, it plays the aligned chat LLM (Vicuna's role): it answers benign instructions and
refuses harmful ones, so that the only way to a harmful answer is through the image.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qmllm_pipeline.constants import IGNORE_INDEX
from qmllm_pipeline.models.tokenizer import encode_prompt
from qmllm_pipeline.models.training import TrainingConfig, train_loop
from qmllm_pipeline.tracking import StepLogger


def build_llm(tokenizer, hidden_size: int, intermediate_size: int, layers: int, heads: int,
              max_position_embeddings: int) -> LlamaForCausalLM:
    """A freshly initialised Llama over `tokenizer`'s vocabulary and special ids, embeddings tied."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs into input_ids, attention_mask and labels tensors."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_causal_lm(model, examples: list[tuple[list[int], list[int]]], pad_id: int, training: TrainingConfig,
                    seed: int, step_logger: StepLogger | None = None, desc: str = "train LLM"):
    """Next-token loss on the labelled tokens of randomly drawn examples; returns the model in eval mode."""

    def step(generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(examples), (training.batch_size,), generator=generator).tolist()
        return {"loss": model(**pad_batch([examples[i] for i in picks], pad_id)).loss}

    train_loop({"llm": model}, step, training, seed, step_logger, desc=desc)
    return model


@torch.no_grad()
def answer_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy answers to single-turn text prompts, batched with left padding."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        longest = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(output[:, longest:], skip_special_tokens=True)
    return answers
