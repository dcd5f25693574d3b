"""The Q-MLLM model: encode, project, quantize, splice the image tokens into the LLM input, generate.

    cls_features, patch_features = vision_tower(image)          # F_v, frozen
    h_cls, H_v = mm_projector(cls_features), mm_projector(patch_features)   # F_h, shared
    cls_index = argmin ||h_cls - C_cls||^2 ; patch_indices = argmin ||H_v - C_patch||^2
    LLM([C_patch[patch_indices] ; embed(text)])                 # spliced at the <image> token

That is the paper's `shared` CLS path. With `cls_path="decoupled"` the CLS token has its own
`cls_projector` (h_cls = cls_projector(cls_features)), trained after stage 1 on L_vq_cls + lambda L_semantic
alone: the safety signal can then read a different feature (CLIP's image embedding) into a codebook of
the semantic target's width, and nothing the LLM reads depends on it. The LLM reads the patch codes only,
in both paths.

With `name_slots > 0` a `name_head` (models/names.py) also names up to that many objects, left to right, from
a closed vocabulary, and the LLM reads each name as its own token embeddings in front of the patch tokens:
the argmax pick for Q-MLLM (discrete, like a codebook lookup), the softmax mixture for the baseline.

The continuous `baseline` is the same class with no quantizers: its patch tokens are H_v itself.
Everything here works on cached features too (`encode_features`), so stage 1 never touches pixels.

A model is described by a `QMLLMConfig` and saved the Hugging Face way: `save_pretrained(dir)` writes
`config.json` and `stage1.safetensors` (what stage 1 trains: `mm_projector`, `cls_quantizer`,
`patch_quantizer`, and `cls_projector` on the decoupled path); the vision tower, the LLM, the tokenizer and
the image processor are referenced by path, as LLaVA's config names its `mm_vision_tower`, and
`from_pretrained(dir)` loads them from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qmllm_pipeline.constants import IGNORE_INDEX
from qmllm_pipeline.models.device import resolve_device
from qmllm_pipeline.models.names import NameHead
from qmllm_pipeline.models.projector import build_mm_projector
from qmllm_pipeline.models.quantizer import QuantizerOutput, VectorQuantizer
from qmllm_pipeline.models.vision import VisionTower

CONFIG_FILE, WEIGHTS_FILE = "config.json", "stage1.safetensors"
STAGE1_MODULES = ("mm_projector", "cls_projector", "cls_quantizer", "patch_quantizer", "name_head")
CLS_PATHS = ("shared", "decoupled")


@dataclass
class QMLLMConfig:
    """The architecture around a vision tower of width `vision_width` and an LLM of width `llm_width`.
    `quantized=False` is the continuous baseline (no codebooks). The four references are paths, relative to
    the model directory or absolute, of what the model reads but does not own."""
    vision_width: int                      # d_v
    llm_width: int                         # d_h
    image_token_id: int                    # the tokenizer's id of `<image>`
    variant: str = "qmllm"                 # the name it is trained and reported under
    quantized: bool = True
    mm_projector_type: str = "linear"      # linear (LLaVA-1) or mlp2x_gelu (LLaVA-1.5)
    mm_projector_layernorm: bool = True
    mm_vision_select_layer: int = -2       # hidden_states index of the vision tower's features
    cls_source: str = "layer"              # see VisionTower
    mm_patch_pool: int = 1                 # average the patch grid over windows of this side (see VisionTower)
    cls_codes: int = 128                   # K
    patch_codes: int = 256                 # P
    codebook_update: str = "ema"           # see VectorQuantizer
    codebook_decay: float = 0.99
    commitment: float = 0.25
    dead_code_threshold: float = 1e-3
    kmeans_iters: int = 10
    cls_path: str = "shared"               # shared: mm_projector reads CLS too (the paper); decoupled: cls_projector
    cls_vision_width: int | None = None    # width of the CLS feature (decoupled; None: vision_width)
    cls_width: int | None = None           # width of h_cls and the CLS codes (decoupled; None: llm_width)
    cls_distance: str = "l2"               # l2 (the paper) or cosine (the released v2 code), CLS codebook only
    num_patches: int | None = None         # N, the patch tokens the LLM reads (after pooling)
    name_slots: int = 0                    # picks of the name head, objects then the background (0: no name head,
                                           # the paper's model)
    name_background: bool = False          # whether the last pick names the background colour
    name_position: str = "after"           # where the name tokens go: before or after the patch tokens
    name_slot_width: int = 0               # tokens per named object (the longest name's)
    name_vocabulary: list[str] = field(default_factory=list)   # the names, in the head's order
    name_cls_source: str = "projected"     # the CLS feature the name head reads (see VisionTower)
    name_cls_width: int | None = None      # its width (None: vision_width)
    name_head_inputs: str = "cls_patches"  # see NameHead
    name_head_hidden: int = 512
    name_head_patch_dim: int = 32
    name_counted: int = 0                  # object slots filled by the head's count pick (0: each slot on its own)
    conversation_format: str | None = None  # the tokenizer prepared for images with this format when loaded
                                           # (models/conversation.py; None: the tokenizer reads images as saved)
    references: dict[str, str] = field(default_factory=dict)  # vision_tower, image_processor, tokenizer, llm

    def __post_init__(self):
        if self.cls_path not in CLS_PATHS:
            raise ValueError(f"cls_path must be one of {CLS_PATHS}, got {self.cls_path!r}")
        if self.cls_path == "shared" and (self.cls_vision_width or self.vision_width) != self.vision_width:
            raise ValueError(f"the shared CLS path reads CLS features through mm_projector, so they need the patch "
                             f"width {self.vision_width}, not {self.cls_vision_width}; use cls_path 'decoupled'")
        if self.name_slots and (not self.name_vocabulary or self.name_slot_width < 1):
            raise ValueError(f"a name head of {self.name_slots} slots needs a name_vocabulary and a name_slot_width")
        if self.name_position not in ("before", "after"):
            raise ValueError(f"name_position must be 'before' or 'after' the patch tokens, got {self.name_position!r}")
        if self.name_slots and self.name_head_inputs == "cls_patches" and not self.num_patches:
            raise ValueError("a name head reading the patches (name_head_inputs 'cls_patches') needs num_patches")
        if self.cls_path == "shared" and (self.cls_width or self.llm_width) != self.llm_width:
            raise ValueError(f"the shared CLS path puts h_cls in the LLM's width {self.llm_width}, not {self.cls_width}"
                             " (a semantic target of another width needs cls_path 'decoupled')")

    @classmethod
    def from_dict(cls, values: dict, source: str = "QMLLMConfig") -> QMLLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown QMLLMConfig keys {unknown}")
        missing = sorted({"vision_width", "llm_width", "image_token_id"} - set(values))
        if missing:
            raise ValueError(f"{source}: QMLLMConfig needs {missing}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def reference(self, name: str, directory: str | Path) -> Path:
        """Where the referenced `name` (vision_tower, image_processor, tokenizer, llm) lies, seen from the model
        directory."""
        if name not in self.references:
            raise FileNotFoundError(f"{Path(directory) / CONFIG_FILE}: no '{name}' reference; pass it explicitly")
        return (Path(directory) / self.references[name]).resolve()


@dataclass
class ImageEncoding:
    h_cls: torch.Tensor | None               # (B, d_cls) projected CLS (Q-MLLM only)
    patch_hidden: torch.Tensor               # (B, N, d_h) projected patches H_v
    image_tokens: torch.Tensor               # (B, N + M, d_h) what the LLM reads: the patch tokens, quantized
                                             # or H_v, and the name tokens (M = name slots x slot width, 0
                                             # without a name head) after them (or before: name_position)
    cls: QuantizerOutput | None = None       # cls_index is cls.indices
    patches: QuantizerOutput | None = None   # patch_indices is patches.indices
    name_logits: torch.Tensor | None = None  # (B, slots, names + 1) the name head's scores
    name_picks: torch.Tensor | None = None   # (B, slots) the entry named in each slot (empty past the last object)
    continuous_tokens: torch.Tensor | None = None  # (B, N + M, d_h) Q-MLLM's continuous twin: H_v, soft names


class QMLLM(nn.Module):
    def __init__(self, config: QMLLMConfig, llm=None, vision_tower: VisionTower | None = None):
        """Builds `mm_projector` and, for the quantized variant, both codebooks, around a given LLM and vision
        tower. `llm=None` gives the safety check's path only (vision tower, projector, CLS code)."""
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.mm_projector = build_mm_projector(config.mm_projector_type, config.vision_width, config.llm_width,
                                               config.mm_projector_layernorm)
        self.cls_projector = self.cls_quantizer = self.patch_quantizer = None
        if config.quantized:
            common = {"commitment": config.commitment, "update": config.codebook_update,
                      "decay": config.codebook_decay, "dead_code_threshold": config.dead_code_threshold,
                      "kmeans_iters": config.kmeans_iters}
            if config.cls_path == "shared":
                self.cls_quantizer = VectorQuantizer(config.cls_codes, config.llm_width, **common,
                                                     distance=config.cls_distance)
                self.patch_quantizer = VectorQuantizer(config.patch_codes, config.llm_width, **common)
            else:
                self.patch_quantizer = VectorQuantizer(config.patch_codes, config.llm_width, **common)
                with torch.random.fork_rng():  # the CLS head's shape leaves the patch path's random stream alone
                    width = config.cls_width or config.llm_width
                    self.cls_projector = build_mm_projector(config.mm_projector_type,
                                                            config.cls_vision_width or config.vision_width, width,
                                                            config.mm_projector_layernorm)
                    self.cls_quantizer = VectorQuantizer(config.cls_codes, width, **common,
                                                         distance=config.cls_distance)
        with torch.random.fork_rng():  # leaves the projector's and codebooks' random stream alone
            self.name_head = NameHead.from_config(config)
        self.llm = llm
        self.image_token_id = config.image_token_id

    # -- building, saving, loading ----------------------------------------------------------------
    @classmethod
    def assemble(cls, config: QMLLMConfig | dict, stage1_state: dict[str, torch.Tensor], llm=None,
                 clip_model=None, device: str | torch.device | None = None) -> QMLLM:
        """A trained model, frozen in eval mode, from its parts: the config, the stage-1 weights, the LLM and
        the CLIP model whose vision tower it reads (`None`: cached features only), moved to `device` (the
        `device` setting: `auto`, `cpu`, `cuda`; None: left where the parts are). A Kedro node as it is."""
        if isinstance(config, dict):
            config = QMLLMConfig.from_dict(config)
        tower = None
        if clip_model is not None:
            tower = VisionTower.from_clip(clip_model, select_layer=config.mm_vision_select_layer,
                                          cls_source=config.cls_source, patch_pool=config.mm_patch_pool).eval()
        model = cls(config, llm, tower).load_stage1_state(stage1_state)
        if device is not None:
            model.to(resolve_device(device))
        return model.requires_grad_(False).eval()

    def stage1_state(self) -> dict[str, torch.Tensor]:
        """Everything stage 1 trains, as one flat dict: mm_projector.*, cls_quantizer.*, patch_quantizer.* (and
        cls_projector.* on the decoupled path)."""
        state = {}
        for name in STAGE1_MODULES:
            module = getattr(self, name)
            if module is not None:
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return state

    def load_stage1_state(self, state: dict[str, torch.Tensor]) -> QMLLM:
        for name in STAGE1_MODULES:
            module = getattr(self, name)
            part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}.")}
            if module is not None:
                try:
                    module.load_state_dict(part)
                except RuntimeError as error:  # missing, unexpected or misshapen tensors: say which, briefly
                    detail = " ".join(str(error).split())
                    raise ValueError(f"stage-1 weights do not fit the config's {name}: "
                                     f"{detail[detail.find(':') + 1:][:300].strip()}") from None
            elif part:
                raise ValueError(f"stage-1 weights contain {name} but the model has none (variant mismatch?)")
        return self.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """`config.json` and `stage1.safetensors`; the vision tower and the LLM stay where the references say."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file({k: v.detach().contiguous().clone() for k, v in self.stage1_state().items()},
                  directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, llm=None, clip_model=None,
                        device: str | torch.device | None = None) -> QMLLM:
        """Load a saved model, reading the LLM and the CLIP model from the config's references unless given
        (local files only, safetensors only), onto `device` (None: where they load, the CPU)."""
        from transformers import AutoModelForCausalLM, CLIPModel

        from qmllm_pipeline.models.lora import ADAPTED_FILE, load_adapted_llm

        directory = Path(directory)
        config = load_config(directory)
        if llm is None and (config.reference("llm", directory) / ADAPTED_FILE).is_file():
            llm = load_adapted_llm(config.reference("llm", directory))  # a LoRA stage 2: base + adapters
        elif llm is None:
            llm = AutoModelForCausalLM.from_pretrained(config.reference("llm", directory), local_files_only=True,
                                                       use_safetensors=True)
        if clip_model is None:
            clip_model = CLIPModel.from_pretrained(config.reference("vision_tower", directory),
                                                   local_files_only=True, use_safetensors=True)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no stage-1 weights (run `kedro run --pipelines pretrain`)")
        try:
            state = load_file(weights)
        except SafetensorError as error:
            raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
        try:
            return cls.assemble(config, state, llm.eval(), clip_model.eval(), device)
        except ValueError as error:
            raise ValueError(f"{weights}: {error}") from None

    @property
    def device(self) -> torch.device:
        """Where the model runs (its projector's device): inputs are moved here, results stay here."""
        return next(self.mm_projector.parameters()).device

    @property
    def quantized(self) -> bool:
        return self.patch_quantizer is not None

    @property
    def decoupled(self) -> bool:
        return self.cls_projector is not None

    # -- image side -------------------------------------------------------------------------------
    def encode_features(self, cls_features: torch.Tensor, patch_features: torch.Tensor,
                        straight_through: bool = True, with_cls: bool = True,
                        name_features: torch.Tensor | None = None, with_names: bool = True) -> ImageEncoding:
        """`straight_through=False` is the model as deployed: the image tokens are a codebook lookup at the
        argmin (and the name head's argmax pick), with no gradient to the features (what a plain gradient
        attacker meets). The CLS path runs for Q-MLLM only (the baseline has no safety signal), and not at all
        with `with_cls=False`. `name_features` is the CLS feature the name head reads (`name_cls_source`);
        the name tokens need the LLM (its input embeddings) and are left out without one, or with
        `with_names=False` (the codes alone)."""
        device = self.device  # features come in on the CPU (cached, or a batch's rows)
        cls_features, patch_features = cls_features.to(device), patch_features.to(device)
        name_features = None if name_features is None else name_features.to(device)
        h_cls = cls = None
        if with_cls and self.cls_quantizer is not None:
            h_cls = self.cls_head(cls_features)
            cls = self.cls_quantizer(h_cls)
        patch_hidden = self.mm_projector(patch_features)
        patches = self.patch_quantizer(patch_hidden) if self.patch_quantizer is not None else None
        if patches is None:
            image_tokens = patch_hidden
        elif straight_through:
            image_tokens = patches.quantized
        else:
            image_tokens = self.patch_quantizer.lookup(patches.indices)
        encoding = ImageEncoding(h_cls, patch_hidden, image_tokens, cls, patches, continuous_tokens=patch_hidden)
        if self.name_head is not None and self.llm is not None and with_names:
            if name_features is None:
                raise ValueError("this model has a name head: pass name_features (its CLS feature)")
            logits = self.name_head(name_features, patch_features)
            embed = self.llm.get_input_embeddings()
            names = self.name_head.tokens(logits, embed, quantized=self.quantized, straight_through=straight_through)
            soft_names = names if not self.quantized else self.name_head.tokens(logits, embed, quantized=False)
            encoding.name_logits, encoding.name_picks = logits, self.name_head.picks(logits.detach())
            encoding.image_tokens = self._with_names(names.to(image_tokens.dtype), image_tokens)
            encoding.continuous_tokens = self._with_names(soft_names.to(patch_hidden.dtype), patch_hidden)
        return encoding

    def _with_names(self, names: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        parts = [names, patches] if self.config.name_position == "before" else [patches, names]
        return torch.cat(parts, 1)

    def name_tokens_of(self, image_tokens: torch.Tensor, patches: int) -> torch.Tensor | None:
        """The name head's tokens (B, M, d_h) among `image_tokens` (B, M + N, d_h) with N = `patches`, where
        `_with_names` put them; None without a name head (M = 0)."""
        names = image_tokens.shape[1] - patches
        if not names:
            return None
        return image_tokens[:, :names] if self.config.name_position == "before" else image_tokens[:, patches:]

    def patch_tokens_of(self, image_tokens: torch.Tensor, names: int) -> torch.Tensor:
        """The N patch tokens (B, N, d_h) among `image_tokens` (B, M + N, d_h) with M = `names` name tokens."""
        patches = image_tokens.shape[1] - names
        return image_tokens[:, names:] if self.config.name_position == "before" else image_tokens[:, :patches]

    def encode_images(self, pixel_values: torch.Tensor, straight_through: bool = True) -> ImageEncoding:
        if self.vision_tower is None:
            raise ValueError("this QMLLM has no vision tower (built for cached features)")
        if self.name_head is None:
            return self.encode_features(*self.vision_tower(pixel_values), straight_through=straight_through)
        sources = tuple(dict.fromkeys((self.config.cls_source, self.config.name_cls_source)))
        cls_features, patch_features = self.vision_tower.features(pixel_values, sources)
        return self.encode_features(cls_features[self.config.cls_source], patch_features,
                                    straight_through=straight_through,
                                    name_features=cls_features[self.config.name_cls_source])

    def cls_head(self, cls_features: torch.Tensor) -> torch.Tensor:
        """h_cls: the CLS feature through its projector (`mm_projector` shared, or `cls_projector`), on the unit
        sphere for the cosine distance."""
        projector = self.cls_projector if self.cls_projector is not None else self.mm_projector
        h_cls = projector(cls_features)
        return F.normalize(h_cls, dim=-1) if self.config.cls_distance == "cosine" else h_cls

    def cls_index(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The safety check's path only: vision tower, the CLS token's projector, nearest semantic code."""
        cls_features, _ = self.vision_tower(pixel_values)
        return self.cls_quantizer.nearest(self.cls_head(cls_features))

    # -- text side --------------------------------------------------------------------------------
    def splice(self, input_ids: list[list[int]], labels: list[list[int]] | None,
               image_tokens: torch.Tensor | None, padding: str = "right") -> dict[str, torch.Tensor]:
        """Replace each sequence's `<image>` token by its N image tokens (labels IGNORE_INDEX there) and pad.

        Sequences without `<image>` (text-only replay) pass through; `image_tokens` row i belongs to the
        i-th sequence that has one. Returns inputs_embeds, attention_mask and (if given) labels.
        """
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        rows, row_labels = [], []
        next_image = 0
        for i, ids in enumerate(input_ids):
            ids_tensor = torch.tensor(ids, dtype=torch.long, device=device)
            target = torch.tensor(labels[i], dtype=torch.long, device=device) if labels is not None else None
            positions = (ids_tensor == self.image_token_id).nonzero().flatten()
            if len(positions) > 1:
                raise ValueError(f"sequence {i} has {len(positions)} {self.image_token_id} tokens; one image each")
            if len(positions) == 0:
                rows.append(embed(ids_tensor))
                row_labels.append(target)
                continue
            if image_tokens is None or next_image >= len(image_tokens):
                raise ValueError("more <image> placeholders than images")
            at = int(positions[0])
            image = image_tokens[next_image].to(device=device, dtype=embed.weight.dtype)
            next_image += 1
            rows.append(torch.cat([embed(ids_tensor[:at]), image, embed(ids_tensor[at + 1:])]))
            if target is not None:
                ignore = torch.full((image.shape[0],), IGNORE_INDEX, dtype=torch.long, device=device)
                row_labels.append(torch.cat([target[:at], ignore, target[at + 1:]]))
        return _pad(rows, row_labels if labels is not None else None, padding)

    def forward(self, input_ids: list[list[int]], labels: list[list[int]], image_tokens: torch.Tensor | None):
        batch = self.splice(input_ids, labels, image_tokens)
        return self.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], image_tokens: torch.Tensor | None, max_new_tokens: int,
                 pad_token_id: int, eos_token_id: int, min_new_tokens: int = 0) -> torch.Tensor:
        """Greedy continuation of each prompt (token ids, `<image>` spliced), left-padded; returns new ids.
        `min_new_tokens` forces a length (benchmarks compare equal work)."""
        batch = self.splice(prompts, None, image_tokens, padding="left")
        return self.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                 pad_token_id=pad_token_id, eos_token_id=eos_token_id)


def _pad(rows: list[torch.Tensor], labels: list[torch.Tensor] | None, padding: str) -> dict[str, torch.Tensor]:
    longest = max(r.shape[0] for r in rows)
    width = rows[0].shape[1]
    embeds = rows[0].new_zeros((len(rows), longest, width))
    mask = torch.zeros((len(rows), longest), dtype=torch.long, device=embeds.device)
    out_labels = (torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
                  if labels is not None else None)
    for i, row in enumerate(rows):
        span = slice(0, row.shape[0]) if padding == "right" else slice(longest - row.shape[0], longest)
        embeds[i, span] = row
        mask[i, span] = 1
        if out_labels is not None:
            out_labels[i, span] = labels[i]
    batch = {"inputs_embeds": embeds, "attention_mask": mask}
    if out_labels is not None:
        batch["labels"] = out_labels
    return batch


def load_config(directory: str | Path) -> QMLLMConfig:
    """The `QMLLMConfig` of a saved model directory, with an error that names the file and the problem."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Q-MLLM config here (run `kedro run --pipelines pretrain`)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return QMLLMConfig.from_dict(values, source=str(path))
