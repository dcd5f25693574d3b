"""Checks of training that scales out (`qmllm scale-check`), on small random models with the real layout
(a Llama LLM, a Q-MLLM over it, cached features): stage 1 and stage 2 on 1 and N processes with the same
global batch, their losses side by side; and what gradient checkpointing saves in a stage-2 step. They need
no GPU and no weights: the same code the pipeline's nodes run, on models a CPU trains in seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qmllm_pipeline.models.distributed import DistributedSettings
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.stage1 import Example, Stage1Data, Stage1Settings, train_stage1
from qmllm_pipeline.models.stage2 import LoraSpec, Stage2Data, Stage2Settings, train_stage2
from qmllm_pipeline.models.training import TrainingConfig, activation_checkpointing
from qmllm_pipeline.tracking import StepLogger

IMAGE_TOKEN_ID = 2


def small_llama(vocab_size: int = 64, hidden: int = 16, layers: int = 1, seed: int = 0,
                initializer_range: float = 0.02) -> LlamaForCausalLM:
    """A random Llama with untied embeddings (a larger `initializer_range`: sharper, more decided logits)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=False, initializer_range=initializer_range))


@dataclass
class World:
    """Cached features and (ids, labels, row) examples, every example with the same number of labelled
    tokens (so a mean over one process's share and the mean over the batch weigh tokens alike)."""
    cls: torch.Tensor
    patches: torch.Tensor
    examples: list[Example]


def small_world(rows: int = 16, width: int = 8, patches: int = 5, seed: int = 1) -> World:
    generator = torch.Generator().manual_seed(seed)
    examples = [([3, IMAGE_TOKEN_ID, 5 + r % 7, 7, 9, 11], [-100, -100, -100, 7 + r % 5, 9, 11], r)
                for r in range(rows)]
    return World(torch.randn(rows, width, generator=generator),
                 torch.randn(rows, patches, width, generator=generator), examples)


def small_qmllm(llm: LlamaForCausalLM, width: int = 8, quantized: bool = True) -> QMLLM:
    config = QMLLMConfig(vision_width=width, llm_width=llm.config.hidden_size, image_token_id=IMAGE_TOKEN_ID,
                         variant="qmllm" if quantized else "baseline", quantized=quantized, cls_codes=4,
                         patch_codes=8)
    return QMLLM(config, llm)


def train_stage(stage: str, processes: int, steps: int = 20, batch_size: int = 8, seed: int = 0,
                lora: bool = False, settings: DistributedSettings | None = None) -> tuple[list[float], QMLLM, float]:
    """Stage 1 (`pretrain`) or stage 2 (`finetune`, full or LoRA) of a small Q-MLLM on `processes`
    processes (or as `settings` say: this machine's share of a run over several); returns the logged loss per
    step (the mean over the processes; none on a machine but the first), the model and the seconds."""
    world = small_world()
    model = small_qmllm(small_llama())
    logger = StepLogger(stage, every=steps)
    training = TrainingConfig(steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=2)
    settings = settings or DistributedSettings(num_processes=processes)
    started = time.perf_counter()
    if stage == "pretrain":
        train_stage1(model, Stage1Data(world.cls, world.patches, world.examples), Stage1Settings(training), seed,
                     step_logger=logger, distributed=settings)
    else:
        model, _ = train_stage2(model, Stage2Data(world.cls, world.patches, world.examples),
                                Stage2Settings(training, lora=LoraSpec(rank=4, alpha=8, dropout=0.0, enabled=lora)),
                                seed, step_logger=logger, distributed=settings)
    return [value for _, value in logger.history["loss"]], model, time.perf_counter() - started


def largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest absolute difference between the two modules' parameters and buffers."""
    other = b.state_dict()
    return max(float((value.float() - other[key].float()).abs().max()) for key, value in a.state_dict().items()
               if value.is_floating_point())


def ddp_rows(processes: int = 2, steps: int = 20) -> list[dict]:
    """One row per trainer: the loss at the first and last step on 1 and on `processes` processes, the
    largest per-step loss difference and the largest weight difference after training, and the seconds."""
    rows = []
    for stage, lora in (("pretrain", False), ("finetune", False), ("finetune", True)):
        one, model_one, seconds_one = train_stage(stage, 1, steps, lora=lora)
        many, model_many, seconds_many = train_stage(stage, processes, steps, lora=lora)
        name = {"pretrain": "stage 1", "finetune": "stage 2"}[stage] + (" (LoRA)" if lora else "")
        rows.append({"trainer": name, "steps": steps, "loss_first": one[0], "loss_last_1": one[-1],
                     f"loss_last_{processes}": many[-1],
                     "max_loss_difference": max(abs(x - y) for x, y in zip(one, many, strict=True)),
                     "max_weight_difference": largest_difference(model_one, model_many),
                     "seconds_1": seconds_one, f"seconds_{processes}": seconds_many})
    return rows


def saved_activation_bytes(llm: LlamaForCausalLM, batch: int, length: int, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one stage-2 step (forward + loss) of
    `llm` on a `batch` x `length` batch: the activation memory gradient checkpointing trades for a second
    forward pass. Each storage is counted once."""
    activation_checkpointing(llm, checkpointing)
    llm.train()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, llm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = llm(input_ids=ids, labels=ids).loss
    loss.backward()
    activation_checkpointing(llm, False)
    return sum(storages.values())


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _step_in_child(hidden: int, layers: int, batch: int, length: int, checkpointing: bool, queue) -> None:
    """One stage-2 step in a process of its own: the growth of its peak resident memory over what it
    held before the step (the model and its optimiser state included in neither), and the saved bytes."""
    llm = small_llama(vocab_size=512, hidden=hidden, layers=layers)
    before = _rss_mib()
    started = time.perf_counter()
    saved = saved_activation_bytes(llm, batch, length, checkpointing)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((saved, max(0.0, peak - before), seconds))


def checkpointing_rows(hidden: int = 256, layers: int = 4, batch: int = 8, length: int = 256) -> list[dict]:
    """Stage-2 step memory with and without gradient checkpointing on a Llama of the given size: the
    activations kept for the backward pass, the peak memory the step adds (CUDA's peak allocation where a GPU
    runs it; on a CPU the growth of a fresh process's peak resident memory), and the step time."""
    rows = []
    for checkpointing in (False, True):
        if torch.cuda.is_available():
            llm = small_llama(vocab_size=512, hidden=hidden, layers=layers).to("cuda")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            saved = saved_activation_bytes(llm, batch, length, checkpointing)
            seconds = time.perf_counter() - started
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            where = "CUDA peak allocated"
        else:
            context = multiprocessing.get_context("spawn")  # a fresh process: no inherited OpenMP pool, a clean peak
            queue = context.Queue()
            child = context.Process(target=_step_in_child,
                                    args=(hidden, layers, batch, length, checkpointing, queue))
            child.start()
            saved, peak, seconds = queue.get()
            child.join()
            where = "peak RSS growth"
        rows.append({"gradient_checkpointing": checkpointing, "llm": f"Llama {layers} x {hidden}",
                     "batch": f"{batch} x {length}", "saved_activations_mib": saved / 2 ** 20,
                     "step_peak_mib": peak, "measured_as": where, "step_seconds": seconds})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of `rows` (numbers to 4 significant digits)."""
    columns = list(rows[0])

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
