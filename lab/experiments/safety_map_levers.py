"""The safety map's levers (docs/experiments.md): the CLS design (shared or decoupled path, its feature, its
semantic target, its distance), `lambda_semantic`, K and D_map's size, each setting measured end to end
(features -> stage 1 [+ the CLS head] -> Algorithm 1 and the toxic-share rule -> DSR / FPR) by running the
pipelines' own nodes under the changed parameters. Run on demand (`python lab/safety_map_levers.py
--help`): a sweep trains one stage 1 per setting."""

from __future__ import annotations

import itertools
import logging
import tempfile

import pandas as pd

from qmllm_pipeline.dotted import lookup, with_overrides
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.pipelines import data, features, pretrain, safety_map

logger = logging.getLogger(__name__)

# what the sweep reads from a trained project (catalogue entries)
INPUTS = ("emoji_catalogue", "caption_corpus", "caption_features", "caption_targets", "dmap_validation", "eval_toxic",
          "eval_neutral", "eval_hard_negative", "clip_model", "clip_image_processor", "tokenizer", "llm",
          "clip_tokenizer")

# named CLS designs: parameter overrides on top of the configured run (`--design`)
DESIGNS: dict[str, dict] = {
    "configured": {},
    "shared": {"pretrain.model.cls_path": "shared"},
    "decoupled": {"pretrain.model.cls_path": "decoupled"},
}
DESIGNS["decoupled_cosine"] = {**DESIGNS["decoupled"], "pretrain.model.cls_distance": "cosine"}
DESIGNS["decoupled_patch_only"] = {**DESIGNS["decoupled"], "pretrain.cls_head.stage1": "patch_only"}
FEATURE_KEYS = {"caption_features": ("features.vision_tower", "features.cls_head.cls_source"),
                "caption_targets": ("features.semantic_target_source", "features.semantic_target_text",
                                    "features.cls_head.semantic_target_source",
                                    "features.cls_head.semantic_target_text")}


def _decoupled(params: dict) -> bool:
    return lookup(params, "pretrain.model").get("cls_path") == "decoupled"


def _source_key(params: dict) -> str:
    """Where the CLS feature the safety map reads is set: the CLS head's on the decoupled path."""
    return "features.cls_head.cls_source" if _decoupled(params) else "features.vision_tower.cls_source"


def lever_sweep(inputs: dict, params: dict, cls_sources: list[str] | None, lambdas: list[float],
                cls_codes_options: list[int], dmap_sizes: list[tuple[int, int]],
                designs: list[str] = ("configured",)) -> pd.DataFrame:
    """One row per combination: CLS codes used, codes D_map reached, the chosen tau with its recall and FPR on
    the validation split (what a choice between settings may read), qmllm's held-out DSR and FPR under the
    deployed rule and the toxic-share rule.

    `inputs` holds the catalogue entries of `INPUTS`; `params` the whole parameter tree; `designs` names
    entries of `DESIGNS`; `cls_sources` set the CLS feature the safety map reads (stage 1's on the shared
    path, the CLS head's on the decoupled one; None: each design's configured one) and `lambdas` the weight
    of L_semantic there. D_map sizes are (images per toxic category, neutral images), rendered from D_map's
    own seed."""
    dmaps = {}
    for per_category, neutral in dmap_sizes:
        sized = with_overrides(params, **{"data.dmap.per_toxic_category": per_category, "data.dmap.neutral": neutral})
        dmaps[(per_category, neutral)] = run_in_memory(data.create_pipeline().only_nodes("render_dmap"),
                                                       {"emoji_catalogue": inputs["emoji_catalogue"]}, sized)["dmap"]
    stage1 = pretrain.create_pipeline(params).only_nodes("run_settings", "stage1_data", "model_inputs",
                                                        "qmllm.model_config", "qmllm.pretrain_variant")
    with tempfile.TemporaryDirectory(prefix="levers-") as scratch:  # the name head stage 1 reads, trained once
        names = run_in_memory(pretrain.create_pipeline(params).only_nodes(
            "run_settings", "stage1_data", "name_vocabulary", "model_inputs", "name_head"), inputs,
            with_overrides(params, checkpoint_dir=scratch))
    inputs = {**inputs, "name_vocabulary": names["name_vocabulary"], "name_head_weights": names["name_head_weights"]}
    rows = []
    designed = {design: with_overrides(params, **DESIGNS[design]) for design in designs}
    settings = [(design, source) for design in designs
                for source in cls_sources or [lookup(designed[design], _source_key(designed[design]))]]
    for design, source in settings:
        sourced = with_overrides(designed[design], **{_source_key(designed[design]): source})
        cached = _features(inputs, params, sourced)
        weight_key = "pretrain.cls_head.lambda_semantic" if _decoupled(sourced) else "pretrain.stage1.lambda_semantic"
        for weight, codes_k in itertools.product(lambdas, cls_codes_options):
            with tempfile.TemporaryDirectory(prefix="levers-") as scratch:   # never resume the real run's checkpoint
                setting = with_overrides(sourced, **{"pretrain.model.cls_codes": codes_k, weight_key: weight,
                                                     "checkpoint_dir": scratch})
                trained = run_in_memory(stage1, {**inputs, **cached}, setting)
            summary = trained["qmllm.pretrain_summary"]
            for (per_category, neutral), dmap in dmaps.items():
                measured = run_in_memory(
                    safety_map.create_pipeline().to_outputs("safety_metrics"),
                    {**inputs, "dmap": dmap, "qmllm.qmllm_config": trained["qmllm.qmllm_config"],
                     "qmllm.stage1_weights": trained["qmllm.stage1_weights"]}, setting)
                rates, table = measured["safety_metrics"], measured["safety_map"]
                qmllm, choice = rates["qmllm"], rates["safety_map"]
                row = {"design": design, "cls_source": source, "lambda_semantic": weight, "cls_codes": codes_k,
                       "dmap": f"{per_category}/{neutral}",
                       "cls_codes_used": summary["codebooks"]["cls"]["codes_used"],
                       "codes_reached_by_dmap": int(table["seen"].sum()),
                       "tau": choice["tau_used"], "unseen_policy": choice["unseen_policy_used"],
                       "validation_recall": choice["toxic_recall"], "validation_fpr": choice["neutral_fpr"],
                       "dsr_single": qmllm["dsr"]["single"], "dsr_distractors": qmllm["dsr"]["distractors"],
                       "fpr_neutral": qmllm["fpr_neutral"], "fpr_hard_negative": qmllm["fpr_hard_negative"]}
                unseen = choice["unseen"]   # the unseen-code policy against the paper's `neutral`, same rule and tau
                row.update(codes_unseen=unseen["codes_unseen"],
                           **{f"on_unseen_{split.removeprefix('eval_')}": count
                              for split, count in unseen["heldout_images_on_unseen"].items()},
                           **{f"unseen_cost_{key}": value for key, value in unseen["against_neutral"].items()})
                share = rates["qmllm_rules"].get("toxic_share")
                if share is not None:
                    row.update(share_dsr_single=share["dsr"]["single"], share_fpr_neutral=share["fpr_neutral"],
                               share_fpr_hard_negative=share["fpr_hard_negative"])
                logger.info("levers: %s", row)
                rows.append(row)
    return pd.DataFrame(rows)


def _features(inputs: dict, configured: dict, setting: dict) -> dict:
    """The cached caption features and semantic targets under `setting`: the trained project's where the
    parameters they depend on are the configured ones, else extracted anew."""
    cached = {}
    for name, keys in FEATURE_KEYS.items():
        if all(lookup(setting, key) == lookup(configured, key) for key in keys):
            cached[name] = inputs[name]
        else:
            node = "extract_caption_features" if name == "caption_features" else "caption_semantic_targets"
            cached[name] = run_in_memory(features.create_pipeline().only_nodes(node), inputs, setting)[name]
    return cached
