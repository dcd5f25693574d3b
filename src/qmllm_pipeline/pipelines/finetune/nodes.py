"""Nodes of the `finetune` pipeline (stage 2) and its measurements, per variant by namespace."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.clip import decode_images
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.models.stages import finetune
from qmllm_pipeline.models.tokenizer import IMAGE_TOKEN, chat_messages, encode_chat
from qmllm_pipeline.models.training import loss_curve_figure, seed_and_threads
from qmllm_pipeline.models.vision import VisionTower
from qmllm_pipeline.pipelines.pretrain.nodes import build_qmllm, load_stage1_state
from qmllm_pipeline.tracking import StepLogger, log_summary_metrics

logger = logging.getLogger(__name__)


def _examples(dialogs: pd.DataFrame, text_corpus: pd.DataFrame, tokenizer, params: dict, seed: int):
    """Image dialogs (feature row = dialog row) plus text-only replay of the training instructions."""
    examples = [(*encode_chat(tokenizer, chat_messages(turns), params["max_length"]), row)
                for row, turns in enumerate(dialogs["conversations"])]
    train = text_corpus[(text_corpus["split"] == "train") & text_corpus["kind"].isin(["benign", "harmful"])]
    fraction = params["text_replay_fraction"]
    n_replay = min(len(train), round(len(examples) * fraction / (1 - fraction)))
    replay = train.sample(n=n_replay, random_state=seed)
    examples += [(*encode_chat(tokenizer, [{"role": "user", "content": r.instruction},
                                           {"role": "assistant", "content": r.response}], params["max_length"]), -1)
                 for r in replay.itertuples(index=False)]
    return examples


def finetune_variant(dialog_features: dict, dialogs: pd.DataFrame, text_corpus: pd.DataFrame, tokenizer, llm,
                     stage1_weights: dict, pretrain_params: dict, params: dict, variant: dict):
    """Stage 2 for one variant: returns the finetuned LLM, a summary and the loss curve."""
    name, quantized = variant["name"], variant["quantized"]
    seed_and_threads(params["seed"], params["threads"])
    model = build_qmllm(copy.deepcopy(llm), tokenizer, pretrain_params, quantized, dialog_features["cls"].shape[-1])
    load_stage1_state(model, stage1_weights)
    examples = _examples(dialogs, text_corpus, tokenizer, params, params["seed"])
    checkpoint = TrainingCheckpoint(Path(params["checkpoint_dir"]) / f"{name}_finetune",
                                    {"variant": variant, "params": params, "examples": len(examples)})
    step_logger = StepLogger(f"{name}/finetune", every=params["log_every"])
    started = time.perf_counter()
    finetune(model, dialog_features["cls"], dialog_features["patches"], examples, params["training"],
             params["seed"], params["threads"], step_logger, checkpoint)
    seconds = time.perf_counter() - started
    losses = [v for _, v in step_logger.history["loss"]]
    summary = {"variant": name, "seconds": round(seconds, 1), "steps": params["training"]["steps"],
               "examples": len(examples), "final_loss": float(np.mean(losses[-20:]))}
    logger.info("finetune %s: %.0f s, final loss %.3f", name, seconds, summary["final_loss"])
    return model.llm, summary, loss_curve_figure({"LM loss": step_logger.history["loss"]}, f"stage 2 ({name})")


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def evaluate_variant(finetuned_llm, stage1_weights: dict, tokenizer, clip_model, clip_image_processor,
                     eval_utility: pd.DataFrame, eval_neutral: pd.DataFrame, text_corpus: pd.DataFrame,
                     pretrain_params: dict, feature_params: dict, params: dict, variant: dict) -> dict:
    """Utility (exact answers per question type) and safety behaviour with a neutral image attached."""
    torch.set_num_threads(params["threads"])
    evaluation = params["evaluation"]
    model = build_qmllm(finetuned_llm, tokenizer, pretrain_params, variant["quantized"],
                        clip_model.config.vision_config.hidden_size)
    load_stage1_state(model, stage1_weights)
    model.vision_tower = VisionTower.from_clip(clip_model, select_layer=feature_params["select_layer"],
                                               cls_source=feature_params["cls_source"]).eval()
    unguarded = GuardedMLLM(model, tokenizer, clip_image_processor)  # the model alone: no safety map yet

    def ask(prompts: list[str], images: pd.Series) -> list[str]:
        """`prompts` without the `<image>` placeholder: the model puts it in front."""
        answers = unguarded.respond(decode_images(images, desc=None), prompts, evaluation["max_new_tokens"],
                                    evaluation["batch_size"])
        return [a.text for a in answers]

    utility = eval_utility.copy()
    utility["prediction"] = ask([q.removeprefix(f"{IMAGE_TOKEN}\n") for q in utility["question"]], utility["image"])
    pairs = zip(utility["prediction"], utility["answer"], strict=True)
    utility["correct"] = [normalise_answer(p) == normalise_answer(a) for p, a in pairs]
    accuracy = {str(k): float(v) for k, v in utility.groupby("question_type")["correct"].mean().items()}

    judge = RefusalPhraseJudge()
    heldout = text_corpus[(text_corpus["split"] == "heldout") & text_corpus["kind"].isin(["harmful", "benign"])]
    images = eval_neutral["image"].sample(n=len(heldout), replace=True, random_state=0).reset_index(drop=True)
    refused = pd.Series([judge.is_refusal(a) for a in ask(list(heldout["instruction"]), images)], index=heldout.index)
    safety = {f"heldout_{kind}_refused_with_neutral_image": float(refused[heldout["kind"] == kind].mean())
              for kind in ("harmful", "benign")}
    samples = utility.groupby("question_type").head(2)[["question_type", "answer", "prediction"]]
    return {"variant": variant["name"], "utility": accuracy, "safety": safety,
            "utility_samples": samples.to_dict("records")}


def blind_guess(dialogs: pd.DataFrame, eval_utility: pd.DataFrame) -> dict:
    """The floor: always give the most frequent training answer of each question type."""
    from qmllm_pipeline.world.language import QUESTIONS

    answers: dict[str, list[str]] = {t: [] for t in QUESTIONS}
    for kinds, turns in zip(dialogs["turn_kinds"], dialogs["conversations"], strict=True):
        for kind, answer in zip(kinds, list(turns)[1::2], strict=True):
            if kind in answers:
                answers[kind].append(answer["value"])
    guess = {t: pd.Series(a).mode().iloc[0] for t, a in answers.items() if a}
    correct = eval_utility.apply(
        lambda r: normalise_answer(guess.get(r["question_type"], "")) == normalise_answer(r["answer"]), axis=1)
    return {"utility": {str(k): float(v) for k, v in correct.groupby(eval_utility["question_type"]).mean().items()},
            "guesses": guess}


def finetune_report(qmllm_metrics: dict, baseline_metrics: dict, guess: dict, qmllm_summary: dict,
                    baseline_summary: dict) -> dict:
    report = {"qmllm": {**qmllm_metrics, "training": qmllm_summary},
              "baseline": {**baseline_metrics, "training": baseline_summary}, "blind_guess": guess}
    log_summary_metrics({name: {"utility": report[name]["utility"], "safety": report[name].get("safety", {})}
                         for name in ("qmllm", "baseline")} | {"blind_guess": {"utility": guess["utility"]}},
                        prefix="finetune")
    logger.info("utility qmllm %s | baseline %s | blind %s", qmllm_metrics["utility"], baseline_metrics["utility"],
                guess["utility"])
    return report
