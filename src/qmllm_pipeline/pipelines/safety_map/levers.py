"""The safety map's levers (DESIGN.md section 5): where the CLS comes from, `lambda_semantic`, K and D_map's
size, each setting measured end to end (features -> stage 1 -> Algorithm 1 -> DSR / FPR) with the same
nodes `kedro run` uses. Not a pipeline: a sweep trains one stage 1 per setting, so it is run on demand
(`python notebooks/safety_map_levers.py --help`)."""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile

import pandas as pd

from qmllm_pipeline.pipelines.data.nodes import render_dmap
from qmllm_pipeline.pipelines.features.nodes import extract_caption_features
from qmllm_pipeline.pipelines.pretrain.nodes import pretrain_variant
from qmllm_pipeline.pipelines.safety_map.nodes import cls_codes, detection_rates, fit_safety_map, qmllm_refusals

logger = logging.getLogger(__name__)


def lever_sweep(inputs: dict, params: dict, cls_sources: list[str], lambdas: list[float], cls_codes_options: list[int],
                dmap_sizes: list[tuple[int, int]]) -> pd.DataFrame:
    """One row per combination: CLS codes used, codes D_map reached, the chosen tau, qmllm's DSR and FPR.

    `inputs` holds the catalogue entries the safety-map pipeline reads (plus `emoji_catalogue`,
    `caption_corpus`, `caption_features`, `caption_targets`); `params` the whole parameter tree.
    D_map sizes are (images per toxic category, neutral images), rendered from D_map's own seed."""
    dmaps = {}
    for per_category, neutral in dmap_sizes:
        data_params = copy.deepcopy(params["data"])
        data_params["dmap"].update(per_toxic_category=per_category, neutral=neutral)
        dmaps[(per_category, neutral)] = render_dmap(inputs["emoji_catalogue"], data_params)
    evaluation = [inputs[name] for name in ("eval_toxic", "eval_neutral", "eval_hard_negative")]
    models = [inputs[name] for name in ("clip_model", "clip_image_processor", "tokenizer", "llm")]
    rows = []
    for source in cls_sources:
        feature_params = {**params["features"], "cls_source": source}
        features = inputs["caption_features"] if source == params["features"]["cls_source"] else \
            extract_caption_features(inputs["caption_corpus"], *models[:2], feature_params)
        for weight, codes_k in itertools.product(lambdas, cls_codes_options):
            pretrain_params = copy.deepcopy(params["pretrain"])
            pretrain_params["codebooks"]["cls_codes"] = codes_k
            pretrain_params["training"]["lambda_semantic"] = weight
            with tempfile.TemporaryDirectory(prefix="levers-") as scratch:   # never resume the real run's checkpoint
                pretrain_params["checkpoint_dir"] = scratch
                weights, summary, _ = pretrain_variant(features, inputs["caption_targets"], inputs["caption_corpus"],
                                                       *models[2:], pretrain_params, params["variants"]["qmllm"])
            for (per_category, neutral), dmap in dmaps.items():
                codes = cls_codes(dmap, inputs["dmap_validation"], *evaluation, *models, weights, pretrain_params,
                                  feature_params)
                table, _, choice = fit_safety_map(codes, dmap, inputs["dmap_validation"], params["safety_map"])
                rates = detection_rates(qmllm_refusals(table, codes), *evaluation)
                row = {"cls_source": source, "lambda_semantic": weight, "cls_codes": codes_k,
                       "dmap": f"{per_category}/{neutral}",
                       "cls_codes_used": summary["codebooks"]["cls"]["codes_used"],
                       "codes_reached_by_dmap": int(table["seen"].sum()), "tau": choice["tau_used"],
                       "unseen_policy": choice["unseen_policy_used"], "dsr_single": rates["dsr"]["single"],
                       "dsr_distractors": rates["dsr"]["distractors"], "fpr_neutral": rates["fpr_neutral"],
                       "fpr_hard_negative": rates["fpr_hard_negative"]}
                logger.info("levers: %s", row)
                rows.append(row)
    return pd.DataFrame(rows)
