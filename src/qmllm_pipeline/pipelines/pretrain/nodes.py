"""Nodes of the `pretrain` pipeline (stage 1), the per-variant ones instantiated by namespace (one per entry of
`variants`). Each parses its settings where it starts and calls `models/`: `stage1.py`, `heads.py`."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import pandas as pd

from qmllm_pipeline.constants import IMAGE_TOKEN
from qmllm_pipeline.models.checkpoint import data_digest
from qmllm_pipeline.models.conversation import conversation_format_of
from qmllm_pipeline.models.heads import ClsHeadSettings, NameHeadSettings, train_cls_head, train_name_head
from qmllm_pipeline.models.names import NameHead, slot_targets
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.stage1 import (
    Stage1Data,
    Stage1Settings,
    caption_examples,
    code_indices,
    paper_stage1_config,
    train_stage1,
    with_stage1_patch_path,
)
from qmllm_pipeline.models.training import RunSettings, TrainingRun, loss_curve_figure, seed_everything
from qmllm_pipeline.tracking import log_summary_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    """`pretrain`: the architecture (`model`, QMLLMConfig's fields), the name head, stage 1, the decoupled CLS
    head, and how captions are read (`caption_instruction`, `max_length`)."""
    model: dict
    name_head: NameHeadSettings
    stage1: Stage1Settings
    cls_head: ClsHeadSettings
    caption_instruction: str = "Describe the image."
    max_length: int = 64


def stage1_data(caption_corpus: pd.DataFrame, caption_features: dict, caption_targets: dict, tokenizer,
                params: dict) -> Stage1Data:
    """Stage 1's training set: the cached features and targets of the caption corpus, and each caption as
    `<image>\\n{caption_instruction}` -> caption (loss on the caption only). `params`: pretrain."""
    settings = parse(PretrainSettings, params, "pretrain")
    examples = caption_examples(list(caption_corpus["caption"]), tokenizer, settings.caption_instruction,
                                settings.max_length)
    return Stage1Data.from_cache(caption_features, caption_targets, examples)


def name_vocabulary(emoji_catalogue: pd.DataFrame, tokenizer, backgrounds: dict, params: dict) -> dict:
    """The name head's closed vocabulary: every catalogue name, in catalogue order, then (with a background
    slot, `params`: pretrain.name_head) the background colours, sorted; each spelled in the LLM's tokens as it
    follows an article in an answer (' pistol', ' red'), and the widest spelling (a slot's width)."""
    names = [str(name) for name in emoji_catalogue["name"]]
    colours = sorted(backgrounds) if params["background"] else []
    token_ids = [tokenizer(f" {name}", add_special_tokens=False)["input_ids"] for name in names + colours]
    return {"names": names + colours, "item_ids": [int(i) for i in emoji_catalogue["item_id"]],
            "backgrounds": colours, "token_ids": token_ids, "slot_width": max(len(ids) for ids in token_ids),
            "pad_id": int(tokenizer.pad_token_id)}


def model_inputs(tokenizer, llm, stage1_data: Stage1Data, name_vocabulary: dict) -> dict:
    """What a Q-MLLM config reads from the models it sits between and the features it is trained on: the vision
    and LLM widths, the `<image>` id and conversation format, the patch tokens' count, the CLS head's feature
    and target widths, and the name vocabulary."""
    return {"vision_width": int(stage1_data.patches.shape[-1]), "llm_width": llm.config.hidden_size,
            "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            "conversation_format": conversation_format_of(tokenizer), "num_patches": int(stage1_data.patches.shape[1]),
            "head_cls_width": int(stage1_data.head_cls.shape[-1]),
            "head_target_width": int(stage1_data.head_targets.shape[-1]),
            "name_vocabulary": list(name_vocabulary["names"]), "name_slot_width": name_vocabulary["slot_width"]}


def model_config(model_inputs: dict, features: dict, params: dict, variant: dict) -> dict:
    """The variant's `QMLLMConfig`: the architecture in `pretrain.model`, the vision tower's settings
    (`features.vision_tower`; on the decoupled path the CLS source is `features.cls_head`'s), the name head's
    (`pretrain.name_head`, reading `features.cls_head`'s CLS feature; `slots: 0` leaves it out), and the
    widths of what it sits between (`model_inputs`)."""
    settings = parse(PretrainSettings, params, "pretrain")
    decoupled = variant["quantized"] and settings.model.get("cls_path", "shared") == "decoupled"
    tower, head = features["vision_tower"], features["cls_head"]
    config = QMLLMConfig(
        vision_width=model_inputs["vision_width"], llm_width=model_inputs["llm_width"],
        image_token_id=model_inputs["image_token_id"], variant=variant["name"],
        conversation_format=model_inputs["conversation_format"], quantized=variant["quantized"],
        mm_vision_select_layer=tower["select_layer"],
        cls_source=head["cls_source"] if decoupled else tower["cls_source"], mm_patch_pool=tower["patch_pool"],
        num_patches=model_inputs["num_patches"], **settings.model,
        **({"cls_vision_width": model_inputs["head_cls_width"], "cls_width": model_inputs["head_target_width"]}
           if decoupled else {}),
        **_name_head_fields(model_inputs, settings.name_head, head["cls_source"]))
    return config.to_dict()


def _name_head_config(model_inputs: dict, head: NameHeadSettings) -> QMLLMConfig:
    """A config that holds the name head alone (its shape is all the head's own training needs)."""
    return QMLLMConfig(vision_width=model_inputs["vision_width"], llm_width=model_inputs["llm_width"],
                       image_token_id=model_inputs["image_token_id"], num_patches=model_inputs["num_patches"],
                       **_name_head_fields(model_inputs, head, "projected"))


def _name_head_fields(model_inputs: dict, head: NameHeadSettings, cls_source: str) -> dict:
    """The config fields of the name head: the one place its settings become its shape."""
    if not head.slots:
        return {}
    return {"name_slots": head.slots + head.background, "name_background": head.background,
            "name_slot_width": model_inputs["name_slot_width"], "name_position": head.position,
            "name_vocabulary": model_inputs["name_vocabulary"], "name_cls_source": cls_source,
            "name_cls_width": model_inputs["head_cls_width"], "name_head_inputs": head.inputs,
            "name_head_hidden": head.hidden, "name_head_patch_dim": head.patch_dim,
            "name_counted": head.slots if head.count else 0}


def name_head_weights(model_inputs: dict, stage1_data: Stage1Data, caption_corpus: pd.DataFrame,
                      name_vocabulary: dict, params: dict, run: RunSettings) -> tuple[dict, dict]:
    """The name head, of the shape the models' configs give it, trained once on the caption corpus's cached
    features and object lists, for every variant (they read the same names: a quantized one its argmax, the
    baseline its softmax). `params`: pretrain.name_head; with `slots: 0` there is no head (empty weights)."""
    settings = parse(NameHeadSettings, params, "pretrain.name_head")
    if not settings.slots:
        return {}, {"slots": 0}
    if "item_ids" not in caption_corpus.columns:
        raise ValueError("caption_corpus has no item_ids column: its scenes name no catalogue objects (ingested "
                         "data), so there is nothing to train the name head on; set pretrain.name_head.slots: 0 "
                         "(as conf/real/parameters_pretrain.yml does)")
    seed_everything(run.seed)
    head = NameHead.from_config(_name_head_config(model_inputs, settings), settings.dropout)
    head.set_vocabulary(name_vocabulary["token_ids"], name_vocabulary["pad_id"]).to(run.node_device)
    targets = slot_targets(list(caption_corpus["item_ids"]), name_vocabulary["item_ids"], settings.slots,
                           list(caption_corpus["background"]) if settings.background else None,
                           name_vocabulary["backgrounds"])
    trainer = TrainingRun("name_head", run, {"params": params, "seed": run.seed, "rows": len(targets),
                                             "data": data_digest(stage1_data.head_cls, stage1_data.patches, targets)},
                          settings.log_every)
    train_name_head(head, stage1_data.head_cls, stage1_data.patches, targets, settings.training, run.seed,
                    trainer.step_logger, trainer.checkpoint)
    summary = {"slots": settings.slots, "background": settings.background, "count": settings.count,
               "inputs": settings.inputs, "names": len(name_vocabulary["names"]),
               "slot_width": name_vocabulary["slot_width"], **trainer.summary(settings.training)}
    logger.info("name head: %.0f s, final %s", summary["seconds"], summary["final"])
    return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}, summary


def pretrain_variant(qmllm_config: dict, llm, name_head_weights: dict, stage1_data: Stage1Data, params: dict,
                     run: RunSettings) -> tuple[dict, dict, object]:
    """Stage 1 for one variant, then on the decoupled CLS path its CLS head; returns its weights (projectors,
    codebooks and the name head, read frozen), a summary and the loss curve. `params`: pretrain.

    On the decoupled path with `cls_head.stage1: paper`, stage 1 is the shared path's, bit for bit: a
    training-only CLS codebook on `mm_projector` (`cls_head.stage1_cls_codes` codes) learns the paper's CLS
    terms and is dropped afterwards, so the LLM reads exactly the codes the paper's stage 1 gives it, whatever
    the head's K; `patch_only` drops the CLS terms."""
    settings = parse(PretrainSettings, params, "pretrain")
    config = QMLLMConfig.from_dict(qmllm_config)
    seed_everything(run.seed)
    paper_stage1 = config.quantized and config.cls_path == "decoupled" and settings.cls_head.stage1 == "paper"
    stage1_config = paper_stage1_config(config, settings.cls_head.stage1_cls_codes) if paper_stage1 else config
    model = _with_name_head(QMLLM(stage1_config, llm), name_head_weights)
    trainer = TrainingRun(f"{config.variant}/pretrain", run,
                          {"config": stage1_config.to_dict(), "params": params["stage1"], "seed": run.seed,
                           "rows": len(stage1_data.examples), "data": data_digest(stage1_data),
                           **run.distributed.checkpoint_fields()},
                          settings.stage1.log_every)
    train_stage1(model, stage1_data, settings.stage1, run.seed, settings.name_head.in_stage1, trainer.step_logger,
                 trainer.checkpoint, run.distributed)
    summary = {"variant": config.variant, "quantized": config.quantized, **trainer.summary(settings.stage1.training)}
    if paper_stage1:  # the deployed model: the stage-1 projector and patch codebook, a CLS head of its own
        model = with_stage1_patch_path(_with_name_head(QMLLM(config, llm), name_head_weights), model)
    if config.quantized:
        summary.update(_cls_head_and_codebooks(model.to(run.node_device), stage1_data, settings.cls_head, run))
    logger.info("pretrain %s: %.0f s, %s", config.variant, summary["seconds"],
                summary.get("codebooks", summary["final"]))
    curves = {k: v for k, v in trainer.step_logger.history.items()
              if k in ("generative", "vq_patch", "vq_cls", "semantic")}
    weights = {k: v.detach().cpu() for k, v in model.stage1_state().items()}
    return weights, summary, loss_curve_figure(curves, f"stage 1 ({config.variant})")


def _cls_head_and_codebooks(model: QMLLM, data: Stage1Data, settings: ClsHeadSettings, run: RunSettings) -> dict:
    """A quantized model after stage 1: on the decoupled path its CLS head trained (it cannot touch what the LLM
    reads), then both codebooks' use over the whole caption corpus."""
    out = {}
    cls_features = data.cls
    if model.decoupled:
        cls_features = data.head_cls
        fingerprint = {"config": model.config.to_dict(), "params": dataclasses.asdict(settings), "seed": run.seed,
                       "data": data_digest(cls_features, data.head_targets)}
        trainer = TrainingRun(f"{model.config.variant}/cls_head", run, fingerprint, settings.log_every)
        train_cls_head(model, cls_features, data.head_targets, settings, run.seed, trainer.step_logger,
                       trainer.checkpoint)
        out["cls_head"] = {"seconds": trainer.seconds(), "steps": settings.training.steps,
                           "batch_size": settings.training.batch_size, "final": trainer.final_losses()}
    cls_index, patch_indices = code_indices(model, cls_features, data.patches)
    config = model.config
    out["codebooks"] = {"cls": model.cls_quantizer.usage_stats(cls_index),
                        "patch": model.patch_quantizer.usage_stats(patch_indices),
                        "cls_codes": config.cls_codes, "patch_codes": config.patch_codes,
                        "update": config.codebook_update}
    return out


def _with_name_head(model: QMLLM, weights: dict) -> QMLLM:
    """`model` with the trained name head loaded (a model without one takes no weights)."""
    if model.name_head is None:
        if weights:
            raise ValueError("name head weights for a model without a name head (pretrain.name_head.slots)")
        return model
    model.name_head.load_state_dict(weights)
    return model


def pretrain_report(name_head_summary: dict, *summaries: dict) -> dict:
    """Codebook health and final losses of every variant (`summaries`, in the order of `variants`) and the name
    head's training: the pretrain metrics JSON, logged to MLflow."""
    report = {**{summary["variant"]: summary for summary in summaries}, "name_head": name_head_summary}
    log_summary_metrics({k: {kk: vv for kk, vv in v.items() if kk != "variant"} for k, v in report.items()},
                        prefix="pretrain")
    return report
