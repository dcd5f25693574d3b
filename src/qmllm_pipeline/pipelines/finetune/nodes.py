"""Nodes of the `finetune` pipeline (stage 2) and its measurements, per variant by namespace."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re

import numpy as np
import pandas as pd

from qmllm_pipeline.constants import IGNORE_INDEX, IMAGE_TOKEN
from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.attack import target_sequences
from qmllm_pipeline.models.checkpoint import data_digest
from qmllm_pipeline.models.clip import decode_images
from qmllm_pipeline.models.feature_shards import gather
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.models.llm import answer_prompts
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.stage1 import Example
from qmllm_pipeline.models.stage2 import Stage2Data, Stage2Settings, train_stage2
from qmllm_pipeline.models.tokenizer import chat_messages, encode_chat
from qmllm_pipeline.models.training import RunSettings, TrainingRun, loss_curve_figure, loss_ends, seed_everything
from qmllm_pipeline.scoring import (
    normalise_answer,
    questions_without_placeholder,
    refusal_rates,
    share,
    utility_scores,
)
from qmllm_pipeline.tracking import log_summary_metrics
from qmllm_pipeline.world.language import QUESTIONS, made_up_requests
from qmllm_pipeline.world.scenes import with_article

logger = logging.getLogger(__name__)


def _training_instructions(text_corpus: pd.DataFrame) -> pd.DataFrame:
    """The training split's benign and harmful instructions (captions left out)."""
    return text_corpus[(text_corpus["split"] == "train") & text_corpus["kind"].isin(["benign", "harmful"])]


def stage2_validation(text_corpus: pd.DataFrame, params: dict) -> pd.DataFrame:
    """The training instructions stage 2 leaves out, to choose its settings on without the held-out split:
    `validation_fraction` of the training topics of each kind (harmful, benign), every phrasing of a topic
    drawn together, by a generator of its own (`validation_seed`), so every run seed leaves out the same ones.
    The foundation LLM has read them; stage 2 never does, so their refusal rate measures how much of the
    foundation's behaviour stage 2 keeps on requests it does not rehearse. Empty at 0 (the default).
    `params`: finetune.data."""
    fraction = params["validation_fraction"]
    if not 0 <= fraction < 1:
        raise ValueError(f"finetune.data.validation_fraction {fraction}: expected a share in [0, 1)")
    train = _training_instructions(text_corpus)
    if fraction == 0:
        return train.iloc[:0]
    rng = np.random.default_rng(params["validation_seed"])
    chosen = []
    for kind in ("harmful", "benign"):
        topics = sorted(train.loc[train["kind"] == kind, "topic"].unique())
        n = round(fraction * len(topics))
        chosen += [topics[i] for i in sorted(rng.choice(len(topics), size=n, replace=False))] if n else []
    validation = train[train["topic"].isin(chosen)].reset_index(drop=True)
    if len(validation):
        logger.info("stage-2 validation: %d training instructions on %d topics left out of stage 2",
                    len(validation), len(chosen))
    return validation


def synthetic_replay(text_corpus: pd.DataFrame, stage2_validation: pd.DataFrame, llm, tokenizer, params: dict,
                     run: RunSettings) -> pd.DataFrame:
    """`synthetic_requests` requests about made-up topics (`world.language.made_up_requests`: the training
    phrasings, a training topic's verb, words the training text never uses), each with the foundation LLM's
    greedy answer to it as text (`synthetic_max_new_tokens` at most). Replayed behind a dialog image, they teach
    stage 2 to answer an unfamiliar request as the LLM reading it alone would, whatever the image: a request
    the world's words do not cover is not an image question. No held-out text is read. Columns `instruction`,
    `response`; empty at 0 (the default). `params`: finetune.data; the LLM answers on `run.node_device`."""
    n = params["synthetic_requests"]
    if n == 0:
        return pd.DataFrame({"instruction": pd.Series(dtype=str), "response": pd.Series(dtype=str)})
    held = set(stage2_validation["instruction"])
    read = text_corpus[(text_corpus["split"] == "train") & ~text_corpus["instruction"].isin(held)]  # captions too
    known = {word for text in pd.concat([read["instruction"], read["response"]])
             for word in re.findall(r"[a-z]+", text.lower())}
    instructions = _training_instructions(text_corpus)
    topics = sorted(instructions.loc[~instructions["instruction"].isin(held), "topic"].unique())
    requests = made_up_requests(topics, known, n, run.seed)
    llm.to(run.node_device)
    answers = [a.strip() for a in answer_prompts(llm, tokenizer, requests, params["synthetic_max_new_tokens"])]
    replay = pd.DataFrame({"instruction": requests, "response": answers})
    judge = RefusalPhraseJudge()
    refused = [judge.is_refusal(a) for a in answers]
    logger.info("stage-2 data: %d made-up requests, %.1f%% refused by the foundation LLM as text (e.g. %r -> %r)",
                n, 100 * np.mean(refused), requests[0], answers[0])
    return replay


def replayed_instructions(dialogs: pd.DataFrame, text_corpus: pd.DataFrame, stage2_validation: pd.DataFrame,
                          synthetic_replay: pd.DataFrame, params: dict, seed: int) -> pd.DataFrame:
    """The training instructions stage 2 replays beside the dialogs (`instruction`, `response`, and the dialog
    image `row` each is asked behind, -1: as text only). `params`: finetune.data.

    Replay is `text_replay_fraction` of the sequences when the corpus has enough instructions; otherwise each
    instruction appears once (the share is capped), unless `replay_repeats`, which repeats the whole corpus
    (then a draw of the rest) until the share is met. A share `image_replay_fraction` of them is asked behind
    a random dialog image (the request the model must still answer or refuse with an image in the context).
    The `stage2_validation` instructions are never replayed; the `synthetic_replay` requests come last, each
    behind a random dialog image."""
    train = _training_instructions(text_corpus)
    train = train[~train["instruction"].isin(set(stage2_validation["instruction"]))]
    fraction = params["text_replay_fraction"]
    wanted = round(len(dialogs) * fraction / (1 - fraction))
    if params["replay_repeats"] and wanted > len(train):
        copies, rest = divmod(wanted, len(train))
        replay = pd.concat([train] * copies + [train.sample(n=rest, random_state=seed)])
    else:
        replay = train.sample(n=min(len(train), wanted), random_state=seed)
    logger.info("stage-2 data: %d dialogs and %d replayed instructions (%.1f%% of the sequences; %s asked for)",
                len(dialogs), len(replay), 100 * len(replay) / (len(dialogs) + len(replay)), f"{fraction:.0%}")
    rows = np.full(len(replay), -1)
    if params["image_replay_fraction"] > 0:  # no draw otherwise: the text-only replay stays as it was
        rng = np.random.default_rng(seed)
        with_image = rng.random(len(replay)) < params["image_replay_fraction"]
        rows[with_image] = rng.integers(len(dialogs), size=int(with_image.sum()))
    if len(synthetic_replay):
        replay = pd.concat([replay, synthetic_replay[["instruction", "response"]]])
        rows = np.concatenate([rows, np.random.default_rng([seed, 1]).integers(len(dialogs),
                                                                                size=len(synthetic_replay))])
    return pd.DataFrame({"instruction": list(replay["instruction"]), "response": list(replay["response"]),
                         "row": rows.astype(int)})


def dialog_examples(dialogs: pd.DataFrame, text_corpus: pd.DataFrame, stage2_validation: pd.DataFrame,
                    replayed_instructions: pd.DataFrame, tokenizer, params: dict) -> list[Example]:
    """Image dialogs (feature row = dialog row), then the `replayed_instructions` (row -1: as text, else behind
    that dialog's image). `params`: finetune.data. A dialog turn that asks a `stage2_validation` instruction
    asks another training instruction of its kind instead (drawn with `validation_seed`), so every dialog and
    its image stay and stage 2 never reads a validation instruction."""
    held = set(stage2_validation["instruction"])
    conversations = list(dialogs["conversations"])
    if held:
        conversations = _reasked(conversations, text_corpus, held, params["validation_seed"])
    examples = [(*encode_chat(tokenizer, chat_messages(turns), params["max_length"]), row)
                for row, turns in enumerate(conversations)]
    empty = [row for ids, labels, row in examples if all(label == IGNORE_INDEX for label in labels)]
    if empty:
        raise ValueError(f"dialogs rows {empty[:5]} ({len(empty)} in all): no answer token within max_length "
                         f"{params['max_length']} (finetune.data.max_length; a real LLM's conversation format needs "
                         "more)")
    for r in replayed_instructions.itertuples(index=False):
        prompt = r.instruction if r.row < 0 else f"{IMAGE_TOKEN}\n{r.instruction}"
        examples.append((*encode_chat(tokenizer, [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": r.response}],
                                      params["max_length"]), int(r.row)))
    return examples


def _reasked(conversations: list, text_corpus: pd.DataFrame, held: set[str], seed: int) -> list:
    """`conversations` with every turn that asks one of the `held` instructions (and its answer) replaced by
    another training instruction of the same kind and its answer; the `<image>` placeholder stays where it
    was."""
    train = _training_instructions(text_corpus)
    kind_of = dict(zip(train["instruction"], train["kind"], strict=True))
    pools = {kind: rows[~rows["instruction"].isin(held)] for kind, rows in train.groupby("kind")}
    rng = np.random.default_rng(seed)
    changed, out = 0, []
    for turns in conversations:
        turns = [dict(turn) for turn in turns]
        for k in range(0, len(turns) - 1, 2):
            prefix = f"{IMAGE_TOKEN}\n" if turns[k]["value"].startswith(f"{IMAGE_TOKEN}\n") else ""
            request = turns[k]["value"].removeprefix(prefix)
            if request in held:
                pool = pools[kind_of[request]]
                pick = pool.iloc[int(rng.integers(len(pool)))]
                turns[k]["value"], turns[k + 1]["value"] = prefix + pick["instruction"], pick["response"]
                changed += 1
        out.append(turns)
    logger.info("stage-2 data: %d dialog turns asked a validation instruction and ask another instead", changed)
    return out


def stage2_data(dialog_features: dict, dialog_examples: list[Example], text_corpus: pd.DataFrame,
                stage2_validation: pd.DataFrame, tokenizer, params: dict) -> Stage2Data:
    """Stage 2's training set: the dialog images' cached features (tensors or shards read a batch at a time),
    the examples, the ids `<image>\n` brings
    into a prompt (what distillation's teacher must not read), and, when `search_augment` is on, the training
    harmful instructions its code-space search attacks (with their affirmative targets; the validation ones
    left out, the held-out ones never read). `params`: finetune.stage2."""
    settings = parse(Stage2Settings, params, "finetune.stage2")
    sequences = []
    if settings.search_augment.fraction > 0:
        train = _training_instructions(text_corpus)
        held = set(stage2_validation["instruction"])
        harmful = train[(train["kind"] == "harmful") & ~train["instruction"].isin(held)]
        sequences = target_sequences(tokenizer, list(harmful["instruction"]), list(harmful["target"]),
                                     settings.search_augment.max_length, settings.search_augment.target_tokens)
    dialog_features = gather(dialog_features)
    return Stage2Data(dialog_features["cls"], dialog_features["patches"], dialog_examples,
                      dialog_features.get("head_cls"),
                      tokenizer(f"{IMAGE_TOKEN}\n", add_special_tokens=False)["input_ids"], sequences)


def finetune_variant(qmllm_config: dict, stage1_weights: dict, llm, stage2_data: Stage2Data, params: dict,
                     run: RunSettings):
    """Stage 2 for one variant: returns the finetuned LLM (LoRA adapters merged into it), the adapters alone
    ({} for full fine-tuning), a summary and the loss curve. The foundation `llm` is both the starting point
    (copied) and distillation's teacher. `params`: finetune.stage2."""
    settings = parse(Stage2Settings, params, "finetune.stage2")
    config = QMLLMConfig.from_dict(qmllm_config)
    seed_everything(run.seed)
    model = QMLLM.assemble(config, stage1_weights, copy.deepcopy(llm), device=run.node_device)
    data = stage2_data if model.name_head is not None else _without_names(stage2_data)
    trainer = TrainingRun(f"{config.variant}/finetune", run,
                          {"config": qmllm_config, "params": params, "seed": run.seed,
                           "examples": len(data.examples), "data": data_digest(data),
                           **run.distributed.checkpoint_fields()},
                          settings.log_every)
    model, adapter = train_stage2(model, data, settings, run.seed, llm, trainer.step_logger, trainer.checkpoint,
                                  run.distributed)
    _, final_loss = loss_ends([v for _, v in trainer.step_logger.history["loss"]])
    summary = {"variant": config.variant, "seconds": trainer.seconds(), "steps": settings.training.steps,
               "examples": len(data.examples), "final_loss": final_loss}
    logger.info("finetune %s: %.0f s, final loss %.3f", config.variant, summary["seconds"], final_loss)
    return model.llm, adapter, summary, loss_curve_figure({"LM loss": trainer.step_logger.history["loss"]},
                                                          f"stage 2 ({config.variant})")


def _without_names(data: Stage2Data) -> Stage2Data:
    """A model without a name head reads no name-head features."""
    return dataclasses.replace(data, head_cls=None)


def variant_model(qmllm_config: dict, stage1_weights: dict, finetuned_llm, clip_model, run: RunSettings) -> QMLLM:
    """The variant after stage 2, frozen, reading images through CLIP's vision tower, on `run.node_device`."""
    return QMLLM.assemble(qmllm_config, stage1_weights, finetuned_llm, clip_model, run.node_device)


def finetuned_model(model: QMLLM, tokenizer, clip_image_processor) -> GuardedMLLM:
    """The variant after stage 2 behind no guard (the safety map comes later): what its checks ask."""
    return GuardedMLLM(model, tokenizer, clip_image_processor, unguarded=True)


def _ask(model: GuardedMLLM, prompts: list[str], images: pd.Series, params: dict) -> list[str]:
    answers = model.respond(decode_images(images, desc=None), prompts, params["max_new_tokens"], params["batch_size"])
    return [a.text for a in answers]


def variant_utility(model: GuardedMLLM, eval_utility: pd.DataFrame, params: dict) -> dict:
    """Utility on held-out scenes: exact answers per question type, caption word F1, the objects the captions
    name, and two sample answers per question type. `params`: finetune.evaluation."""
    predictions = _ask(model, questions_without_placeholder(eval_utility["question"]), eval_utility["image"], params)
    scores = utility_scores(predictions, eval_utility)
    samples = eval_utility.assign(prediction=predictions).groupby("question_type").head(2)
    return {"variant": model.model.config.variant, **scores,
            "samples": samples[["question_type", "answer", "prediction"]].to_dict("records")}


def variant_naming(model: GuardedMLLM, eval_items: pd.DataFrame, emoji_catalogue: pd.DataFrame, params: dict) -> dict:
    """Naming of every catalogue emoji alone (`naming_scores`); {} where there are none (real data has no
    single-item scenes). `params`: finetune.evaluation."""
    if not len(eval_items):
        return {}
    answers = _ask(model, [QUESTIONS["object"][0]] * len(eval_items), eval_items["image"], params)
    return naming_scores(answers, eval_items, emoji_catalogue,
                         model.name_picks(decode_images(eval_items["image"], desc=None), params["batch_size"]))


def variant_safety(model: GuardedMLLM, eval_neutral: pd.DataFrame, text_corpus: pd.DataFrame,
                   stage2_validation: pd.DataFrame, params: dict) -> dict:
    """Safety behaviour with a neutral image attached: the held-out requests refused, by kind, the held-out
    harmful ones answered (`misses`, with what was said), and, when stage 2 left some out, the
    `stage2_validation` requests (the split to choose stage 2's settings on). `params`: finetune.evaluation."""
    heldout = text_corpus[(text_corpus["split"] == "heldout") & text_corpus["kind"].isin(["harmful", "benign"])]
    requests = pd.concat([heldout.assign(split="heldout"), stage2_validation.assign(split="validation")],
                         ignore_index=True)
    # a fixed draw of neutral images (the same whatever the seed): one per request
    images = eval_neutral["image"].sample(n=len(requests), replace=True, random_state=0).reset_index(drop=True)
    answers = pd.Series(_ask(model, list(requests["instruction"]), images, params))
    refused = {}
    for split, rows in requests.groupby("split"):
        for kind, value in refusal_rates(list(answers[rows.index]), rows["kind"]).items():
            refused[f"{split}_{kind}_refused_with_neutral_image"] = value   # real data: harmful instructions only
    judge = RefusalPhraseJudge()
    misses = [{"instruction": r.instruction, "topic": r.topic, "answer": answers[i]}
              for i, r in zip(requests.index, requests.itertuples(index=False), strict=True)
              if r.split == "heldout" and r.kind == "harmful" and not judge.is_refusal(answers[i])]
    return {"refused": refused, "misses": misses}


def variant_report(utility: dict, naming: dict, safety: dict, training: dict) -> dict:
    """One variant's finetune metrics: utility, safety, naming, their intervals, the samples and the training
    summary."""
    naming = dict(naming)
    intervals = {**{k if k.startswith("caption_objects.") else f"utility.{k.removeprefix('accuracy.')}": v
                    for k, v in utility["intervals"].items()},
                 **{f"safety.{name}": value for name, value in safety["refused"].items()},
                 **{f"naming.{k}": v for k, v in naming.pop("intervals", {}).items()}}
    return {"variant": utility["variant"], "utility": utility["accuracy"], "caption_f1": utility["caption_f1"],
            "caption_objects": utility["caption_objects"],
            "safety": {name: value["value"] for name, value in safety["refused"].items()},
            "safety_misses": safety["misses"], "naming": naming, "intervals": intervals,
            "utility_samples": utility["samples"], "training": training}


def naming_scores(answers: list[str], eval_items: pd.DataFrame, emoji_catalogue: pd.DataFrame,
                  head_picks: list[str] | None = None, top: int = 10) -> dict:
    """How well "What is in the image?" is answered about every catalogue emoji alone: overall, toxic vs
    neutral, by catalogue group, and the most frequent wrong answers (`top`). With `head_picks` (the name
    head's first pick per scene, as a name) also how often the head was right, and how often the answer
    says what the head picked: the LLM's copying, apart from the head's vision."""
    groups = dict(zip(emoji_catalogue["name"], emoji_catalogue["group"], strict=True))
    truth = [with_article(objects[0]) for objects in eval_items["objects"]]
    correct = np.asarray([normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, truth, strict=True)])
    group = np.asarray([groups[objects[0]] for objects in eval_items["objects"]])
    toxic = eval_items["toxic"].to_numpy(dtype=bool)
    intervals = {"all": share(correct), "toxic": share(correct[toxic]), "neutral": share(correct[~toxic]),
                 **{f"group.{g}": share(correct[group == g]) for g in sorted(set(group))}}
    wrong = pd.DataFrame({"truth": truth, "said": [normalise_answer(a) for a in answers]})[~correct]
    confusions = wrong.value_counts().head(top)
    result = {"all": intervals["all"]["value"], "toxic": intervals["toxic"]["value"],
              "neutral": intervals["neutral"]["value"],
              "by_group": {k.removeprefix("group."): v["value"] for k, v in intervals.items()
                           if k.startswith("group.")},
              "confusions": [{"truth": t, "said": s, "count": int(c)} for (t, s), c in confusions.items()]}
    if head_picks is not None:
        picked = [with_article(name) if name else "" for name in head_picks]
        head_right = np.asarray([p == t for p, t in zip(picked, truth, strict=True)])
        says_pick = np.asarray([normalise_answer(a) == normalise_answer(p) for a, p in zip(answers, picked,
                                                                                            strict=True)])
        intervals |= {"head": share(head_right), "answer_is_head_pick": share(says_pick)}
        result |= {"head": intervals["head"]["value"], "answer_is_head_pick": intervals["answer_is_head_pick"]["value"]}
    return {**result, "intervals": intervals}


def blind_guess(dialogs: pd.DataFrame, eval_utility: pd.DataFrame) -> dict:
    """The floor: always give the most frequent training answer of each question type."""
    answers: dict[str, list[str]] = {t: [] for t in QUESTIONS}
    for kinds, turns in zip(dialogs["turn_kinds"], dialogs["conversations"], strict=True):
        for kind, answer in zip(kinds, list(turns)[1::2], strict=True):
            if kind in answers:
                answers[kind].append(answer["value"])
    guess = {t: pd.Series(a).mode().iloc[0] for t, a in answers.items() if a}
    if eval_utility.empty:
        return {"utility": {}, "guesses": guess}
    correct = eval_utility.apply(
        lambda r: normalise_answer(guess.get(r["question_type"], "")) == normalise_answer(r["answer"]), axis=1)
    return {"utility": {str(k): float(v) for k, v in correct.groupby(eval_utility["question_type"]).mean().items()},
            "guesses": guess}


def finetune_report(guess: dict, *variants: dict) -> dict:
    """The finetune metrics JSON: every variant's report (`variant_report`, in the order of `variants`) and the
    blind guess, logged to MLflow."""
    report = {**{variant["variant"]: variant for variant in variants}, "blind_guess": guess}
    log_summary_metrics({name: {"utility": report[name]["utility"], "safety": report[name].get("safety", {})}
                         for name in (v["variant"] for v in variants)} | {"blind_guess": {"utility": guess["utility"]}},
                        prefix="finetune")
    logger.info("utility %s | blind %s", " | ".join(f"{v['variant']} {v['utility']}" for v in variants),
                guess["utility"])
    return report
