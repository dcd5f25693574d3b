"""Stage 2 with LoRA (`peft`): the LLM's weights stay as they are and low-rank adapters on chosen modules
train instead, as LLaVA-1.5's LoRA recipe does (r=128, alpha=256 on every linear layer of a 7B LLM). The
miniature trains its LLM fully; the real environment's default is LoRA.

    with_lora(llm, LoraSettings(...))  ->  a peft model: the base frozen, the adapters trainable
    merged(model)                      ->  the plain LLM with the adapters folded into its weights
    adapter_files(model)               ->  the adapters alone, as `save_pretrained` writes them

Why `peft` rather than a hand-written adapter: it is the library LLaVA, the Hugging Face stack and every
reader of this code already use, and its adapters load with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model


@dataclass(frozen=True)
class LoraSettings:
    """`finetune.stage2.lora` in conf/: rank, alpha (the update is scaled by alpha / rank), dropout, and the
    module names the adapters go on (`all-linear`: every linear layer but the output head)."""
    rank: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM", bias="none")


def with_lora(llm, settings: LoraSettings) -> PeftModel:
    """`llm` wrapped with fresh adapters (the B matrices start at zero: the wrapped model answers as `llm`
    did); only the adapters require gradients."""
    if settings.rank < 1 or settings.alpha <= 0 or not 0 <= settings.dropout < 1:
        raise ValueError(f"LoRA rank {settings.rank}, alpha {settings.alpha}, dropout {settings.dropout}: expected "
                         "rank >= 1, alpha > 0 and dropout in [0, 1)")
    return get_peft_model(llm, settings.config())


def merged(model):
    """The plain LLM with the adapters folded into its weights (what `save_pretrained` of a whole model writes);
    a model without adapters is returned as it is."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def adapter_files(model) -> dict[str, bytes]:
    """The adapters of a peft model as peft saves them (`adapter_config.json`, `adapter_model.safetensors`:
    `PeftModel.from_pretrained(base_llm, folder)` loads them onto the base LLM again); {} for a plain model."""
    if not isinstance(model, PeftModel):
        return {}
    with tempfile.TemporaryDirectory(prefix="qmllm-adapter-") as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
