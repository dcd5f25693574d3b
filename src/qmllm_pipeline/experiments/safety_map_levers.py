"""The safety map's levers (DESIGN.md section 5): where the CLS comes from, `lambda_semantic`, K and D_map's
size, each setting measured end to end (features -> stage 1 -> Algorithm 1 -> DSR / FPR) by running the
pipelines' own nodes under the changed parameters. Run on demand (`python notebooks/safety_map_levers.py
--help`): a sweep trains one stage 1 per setting."""

from __future__ import annotations

import itertools
import logging
import tempfile

import pandas as pd

from qmllm_pipeline.experiments.runs import run_in_memory, with_overrides
from qmllm_pipeline.pipelines import data, features, pretrain, safety_map

logger = logging.getLogger(__name__)

# what the sweep reads from a trained project (catalogue entries)
INPUTS = ("emoji_catalogue", "caption_corpus", "caption_features", "caption_targets", "dmap_validation", "eval_toxic",
          "eval_neutral", "eval_hard_negative", "clip_model", "clip_image_processor", "tokenizer", "llm")


def lever_sweep(inputs: dict, params: dict, cls_sources: list[str], lambdas: list[float], cls_codes_options: list[int],
                dmap_sizes: list[tuple[int, int]]) -> pd.DataFrame:
    """One row per combination: CLS codes used, codes D_map reached, the chosen tau, qmllm's DSR and FPR.

    `inputs` holds the catalogue entries of `INPUTS`; `params` the whole parameter tree. D_map sizes are
    (images per toxic category, neutral images), rendered from D_map's own seed."""
    dmaps = {}
    for per_category, neutral in dmap_sizes:
        sized = with_overrides(params, **{"data.dmap.per_toxic_category": per_category, "data.dmap.neutral": neutral})
        dmaps[(per_category, neutral)] = run_in_memory(data.create_pipeline().only_nodes("render_dmap"),
                                                       {"emoji_catalogue": inputs["emoji_catalogue"]}, sized)["dmap"]
    configured = params["features"]["vision_tower"]["cls_source"]
    stage1 = pretrain.create_pipeline().only_nodes("tokenized_captions", "qmllm.model_config", "qmllm.pretrain_variant")
    rows = []
    for source in cls_sources:
        sourced = with_overrides(params, **{"features.vision_tower.cls_source": source})
        caption_features = inputs["caption_features"] if source == configured else run_in_memory(
            features.create_pipeline().only_nodes("extract_caption_features"), inputs, sourced)["caption_features"]
        for weight, codes_k in itertools.product(lambdas, cls_codes_options):
            with tempfile.TemporaryDirectory(prefix="levers-") as scratch:   # never resume the real run's checkpoint
                setting = with_overrides(sourced, **{"pretrain.model.cls_codes": codes_k,
                                                     "pretrain.stage1.lambda_semantic": weight,
                                                     "checkpoint_dir": scratch})
                trained = run_in_memory(stage1, {**inputs, "caption_features": caption_features}, setting)
            summary = trained["qmllm.pretrain_summary"]
            for (per_category, neutral), dmap in dmaps.items():
                measured = run_in_memory(
                    safety_map.create_pipeline().to_outputs("safety_metrics"),
                    {**inputs, "dmap": dmap, "qmllm.qmllm_config": trained["qmllm.qmllm_config"],
                     "qmllm.stage1_weights": trained["qmllm.stage1_weights"]}, setting)
                rates, table = measured["safety_metrics"], measured["safety_map"]
                qmllm, choice = rates["qmllm"], rates["safety_map"]
                row = {"cls_source": source, "lambda_semantic": weight, "cls_codes": codes_k,
                       "dmap": f"{per_category}/{neutral}",
                       "cls_codes_used": summary["codebooks"]["cls"]["codes_used"],
                       "codes_reached_by_dmap": int(table["seen"].sum()),
                       "tau": choice["tau_used"], "unseen_policy": choice["unseen_policy_used"],
                       "dsr_single": qmllm["dsr"]["single"], "dsr_distractors": qmllm["dsr"]["distractors"],
                       "fpr_neutral": qmllm["fpr_neutral"], "fpr_hard_negative": qmllm["fpr_hard_negative"]}
                logger.info("levers: %s", row)
                rows.append(row)
    return pd.DataFrame(rows)
