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


ADAPTED_FILE = "adapted_llm.json"


def mark_adapted(llm, adapter: str = "../lora_adapter") -> None:
    """Record on a merged LLM's config that it is its base plus the LoRA adapters at `adapter` (relative to
    where the LLM would be saved), so a catalogue entry can save the pointer instead of the weights."""
    llm.config.qmllm_lora_adapter = adapter


def adapted_from(llm) -> str | None:
    """The adapter folder `mark_adapted` recorded (None: trained in full, or not by stage 2)."""
    return getattr(llm.config, "qmllm_lora_adapter", None)


def write_adapted_pointer(directory: Path, base: str, adapter: str, tokenizer: str | None,
                          conversation_format: str | None, dtype: str | None) -> None:
    """`directory/adapted_llm.json`: the LLM is `base` (prepared for images with `tokenizer` and
    `conversation_format`, loaded in `dtype`) with the adapters at `adapter` merged in (paths relative to
    `directory`). A few hundred bytes in place of a 13 GB copy of a 7B LLM."""
    import json

    pointer = {"base": base, "adapter": adapter, "tokenizer": tokenizer, "conversation_format": conversation_format,
               "dtype": dtype}
    (directory / ADAPTED_FILE).write_text(json.dumps(pointer, indent=2) + "\n")


def load_adapted_llm(directory: str | Path):
    """The LLM an `adapted_llm.json` in `directory` describes: the base from local safetensors, prepared for
    images as stage 2 read it, the adapters merged in. Raises FileNotFoundError / ValueError naming the file."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmllm_pipeline.models.conversation import prepare_for_images

    directory = Path(directory)
    pointer_file = directory / ADAPTED_FILE
    try:
        pointer = json.loads(pointer_file.read_text())
        base, adapter = (directory / pointer["base"]).resolve(), (directory / pointer["adapter"]).resolve()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{pointer_file}: not a readable pointer to a base LLM and its adapters ({error})") from None
    for path, what in ((base, "base LLM"), (adapter / "adapter_config.json", "LoRA adapter")):
        if not path.exists():
            raise FileNotFoundError(f"{pointer_file}: its {what} {path} is missing")
    args = {"local_files_only": True, "use_safetensors": True}
    if pointer.get("dtype"):
        args["dtype"] = getattr(torch, pointer["dtype"])
    llm = AutoModelForCausalLM.from_pretrained(str(base), **args)
    if pointer.get("conversation_format"):
        tokenizer = AutoTokenizer.from_pretrained(str((directory / pointer["tokenizer"]).resolve()),
                                                  local_files_only=True)
        prepare_for_images(tokenizer, llm, pointer["conversation_format"])
    return PeftModel.from_pretrained(llm, str(adapter)).merge_and_unload().eval()
