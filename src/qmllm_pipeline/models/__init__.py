"""Torch modules and their training loops, usable without Kedro.

- `tokenizer`: byte-level BPE with `<image>` and the chat template
- `clip`: the tiny `CLIPModel` (F_v's role) and its contrastive training
- `llm`: the tiny aligned `LlamaForCausalLM` (Vicuna's role)
"""
