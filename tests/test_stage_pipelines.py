"""`features`, `pretrain` and `finetune` on the smoke world: shapes, codebook health, both variants."""

import re

import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM

from qmllm_pipeline.datasets import SafetensorsDataset
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.pipelines.features.nodes import semantic_target_vectors

NO_SYNTHETIC = pd.DataFrame({"instruction": [], "response": []})  # stage 2 without made-up requests


def test_feature_cache_shapes(stages, world, foundation, smoke_params):
    vision = foundation["clip_model"].config.vision_config
    pool = smoke_params["features"]["vision_tower"]["patch_pool"]
    patches = (vision.image_size // vision.patch_size // pool) ** 2  # the patch grid, pooled
    caption = stages["caption_features"]
    assert caption["cls"].shape == (len(world["caption_corpus"]), vision.hidden_size)
    assert caption["patches"].shape == (len(world["caption_corpus"]), patches, vision.hidden_size)
    assert stages["dialog_features"]["cls"].shape[0] == len(world["dialogs"])
    head = smoke_params["features"]["cls_head"]
    assert head["cls_source"] == "projected" and caption["head_cls"].shape == (
        len(world["caption_corpus"]), foundation["clip_model"].config.projection_dim)
    assert not torch.equal(caption["head_cls"], caption["cls"])   # the image embedding, not the layer's token 0
    targets = stages["caption_targets"]["targets"]
    assert targets.shape == (len(world["caption_corpus"]), foundation["llm"].config.hidden_size)
    assert stages["caption_targets"]["head_targets"].shape == (len(world["caption_corpus"]),
                                                               foundation["clip_model"].config.projection_dim)
    same_caption = world["caption_corpus"]["caption"].duplicated(keep=False).to_numpy()
    if same_caption.any():  # identical captions share their target
        first, *rest = [i for i, c in enumerate(world["caption_corpus"]["caption"])
                        if c == world["caption_corpus"]["caption"][same_caption].iloc[0]]
        assert all(torch.equal(targets[first], targets[i]) for i in rest)


def test_semantic_target_text_decides_whether_the_background_counts(world, foundation, smoke_params):
    corpus = world["caption_corpus"]
    singles = corpus[corpus["n_objects"] == 1]
    name = singles["objects"].map(lambda o: o[0]).value_counts().index[0]
    same_object = singles[singles["objects"].map(lambda o: o[0]) == name].drop_duplicates("background").head(2)
    assert len(same_object) == 2, "the smoke corpus should show one emoji on two backgrounds"
    targets = {text: semantic_target_vectors(same_object, foundation["tokenizer"], foundation["llm"],
                                             foundation["clip_model"], "llm", text,
                                             smoke_params["features"]["batch_size"])
               for text in ("objects", "caption")}
    assert torch.equal(targets["objects"][0], targets["objects"][1])
    assert not torch.allclose(targets["caption"][0], targets["caption"][1])


def test_pretrain_reports_codebook_health_for_qmllm_only(stages, smoke_params):
    report = stages["pretrain_metrics"]
    codebooks = report["qmllm"]["codebooks"]
    assert codebooks["cls_codes"] == smoke_params["pretrain"]["model"]["cls_codes"]
    for name in ("cls", "patch"):
        assert 1 <= codebooks[name]["codes_used"] <= codebooks[f"{name}_codes"]
        assert 1.0 <= codebooks[name]["perplexity"] <= codebooks[f"{name}_codes"]
    assert {"generative", "vq_patch", "vq_cls", "semantic"} <= set(report["qmllm"]["final"])
    assert "codebooks" not in report["baseline"] and set(report["baseline"]["final"]) == {"generative", "loss"}


def test_stage1_weights_round_trip(stages, foundation, tmp_path):
    weights = stages["qmllm.stage1_weights"]
    assert any(k.startswith("patch_quantizer.") for k in weights)
    assert not any(k.startswith("patch_quantizer.") for k in stages["baseline.stage1_weights"])
    dataset = SafetensorsDataset(str(tmp_path / "stage1.safetensors"))
    dataset.save(weights)
    config = QMLLMConfig.from_dict(stages["qmllm.qmllm_config"])
    reloaded = QMLLM(config, foundation["llm"]).load_stage1_state(dataset.load()).stage1_state()
    assert reloaded.keys() == weights.keys() and all(torch.equal(reloaded[k], weights[k]) for k in weights)
    with pytest.raises(ValueError, match="variant mismatch"):
        QMLLM(QMLLMConfig.from_dict(stages["baseline.qmllm_config"]), foundation["llm"]).load_stage1_state(weights)


def test_model_configs_describe_each_variant(stages, foundation, smoke_params):
    qmllm, baseline = (QMLLMConfig.from_dict(stages[f"{v}.qmllm_config"]) for v in ("qmllm", "baseline"))
    assert (qmllm.variant, qmllm.quantized, baseline.variant, baseline.quantized) == ("qmllm", True, "baseline", False)
    assert qmllm.llm_width == foundation["llm"].config.hidden_size
    assert qmllm.vision_width == foundation["clip_model"].config.vision_config.hidden_size
    assert qmllm.image_token_id == foundation["tokenizer"].convert_tokens_to_ids("<image>")
    assert qmllm.cls_codes == smoke_params["pretrain"]["model"]["cls_codes"]
    assert qmllm.references == smoke_params["pretrain"]["model"]["references"]


def test_finetune_trains_a_separate_llm_per_variant(stages, foundation):
    qmllm, baseline = stages["qmllm.finetuned_llm"], stages["baseline.finetuned_llm"]
    assert isinstance(qmllm, LlamaForCausalLM) and qmllm is not baseline
    original = foundation["llm"].model.embed_tokens.weight
    assert not torch.equal(qmllm.model.embed_tokens.weight, original)  # trained, and the original untouched
    assert not torch.equal(qmllm.model.embed_tokens.weight, baseline.model.embed_tokens.weight)


def test_finetune_metrics_cover_every_question_type_and_both_safety_rates(stages):
    report = stages["finetune_metrics"]
    for system in ("qmllm", "baseline", "blind_guess"):
        assert set(report[system]["utility"]) == {"object", "color", "count", "caption"}
        assert all(0.0 <= v <= 1.0 for v in report[system]["utility"].values())
    for system in ("qmllm", "baseline"):
        assert set(report[system]["safety"]) == {f"{split}_{kind}_refused_with_neutral_image"
                                                 for split in ("heldout", "validation")
                                                 for kind in ("harmful", "benign")}
        misses = report[system]["safety_misses"]
        harmful = report[system]["intervals"]["safety.heldout_harmful_refused_with_neutral_image"]
        assert len(misses) == harmful["n"] - harmful["count"]   # every held-out harmful request answered


def test_image_replay_puts_a_dialog_image_behind_the_replayed_instructions(world, foundation, smoke_params):
    params = smoke_params["finetune"]["data"]
    image_id = foundation["tokenizer"].convert_tokens_to_ids("<image>")
    args = (world["dialogs"], world["text_corpus"], world["text_corpus"].iloc[:0], NO_SYNTHETIC,
            foundation["tokenizer"])
    text_only = dialog_examples(*args, {**params, "image_replay_fraction": 0.0}, 0)
    with_images = dialog_examples(*args, {**params, "image_replay_fraction": 1.0}, 0)
    dialogs = len(world["dialogs"])
    assert len(text_only) == len(with_images) > dialogs
    assert text_only[:dialogs] == with_images[:dialogs]  # the dialogs themselves are untouched
    assert all(row == -1 and image_id not in ids for ids, _, row in text_only[dialogs:])
    assert all(0 <= row < dialogs and ids.count(image_id) == 1 for ids, _, row in with_images[dialogs:])
    # the same instructions and the same answers, only with the image in front
    assert [labels[-3:] for _, labels, _ in text_only[dialogs:]] == [labels[-3:] for _, labels, _ in
                                                                      with_images[dialogs:]]


def test_stage2_validation_leaves_whole_training_topics_out_of_stage2(world, foundation, smoke_params):
    """The validation split is whole training topics of each kind, the same draw whatever the run's seed, and no
    stage-2 sequence reads one of its instructions: not replayed, and the dialogs that asked one ask another."""
    from qmllm_pipeline.pipelines.finetune.nodes import stage2_validation

    corpus, dialogs, tokenizer = world["text_corpus"], world["dialogs"], foundation["tokenizer"]
    params = {**smoke_params["finetune"]["data"], "validation_fraction": 0.25}
    validation = stage2_validation(corpus, params)
    train = corpus[(corpus["split"] == "train") & corpus["kind"].isin(["harmful", "benign"])]
    for kind in ("harmful", "benign"):
        topics = set(validation.loc[validation["kind"] == kind, "topic"])
        assert len(topics) == round(0.25 * train.loc[train["kind"] == kind, "topic"].nunique()) > 0
        assert (train["topic"].isin(topics) & (train["kind"] == kind)).sum() == (validation["kind"] == kind).sum()
    assert (validation["split"] == "train").all()
    assert validation.equals(stage2_validation(corpus, params))
    assert stage2_validation(corpus, {**params, "validation_fraction": 0.0}).empty
    with pytest.raises(ValueError, match="validation_fraction"):
        stage2_validation(corpus, {**params, "validation_fraction": 1.0})

    asked = {turn["value"].removeprefix("<image>\n") for turns in dialogs["conversations"] for turn in turns}
    assert asked & set(validation["instruction"])  # the smoke dialogs do ask some of them
    examples = dialog_examples(dialogs, corpus, validation, NO_SYNTHETIC, tokenizer, params, 0)
    assert [row for _, _, row in examples[:len(dialogs)]] == list(range(len(dialogs)))  # every dialog kept
    kept = dialog_examples(dialogs, corpus, corpus.iloc[:0], NO_SYNTHETIC, tokenizer, params, 0)  # without the split

    def read(some):
        texts = [tokenizer.decode(ids) for ids, _, _ in some]
        return [i for i in validation["instruction"] if any(i in text for text in texts)]

    assert read(kept) and not read(examples)
    # a dialog's replaced turn asks a training instruction of the same kind: as many refusals as before
    refusals = [sum("I'm sorry" in tokenizer.decode(ids) for ids, _, _ in e[:len(dialogs)]) for e in (examples, kept)]
    assert refusals[0] == refusals[1]


def test_made_up_requests_ask_about_words_the_training_text_never_uses(world, foundation, smoke_params):
    """Made-up requests use the training phrasings, a training topic's verb and unknown words; stage 2 replays
    each behind a dialog image with the foundation LLM's own answer to it as text."""
    from qmllm_pipeline.models.llm import answer_prompts
    from qmllm_pipeline.models.training import RunSettings
    from qmllm_pipeline.pipelines.finetune.nodes import synthetic_replay
    from qmllm_pipeline.world.language import PHRASINGS

    corpus, dialogs, tokenizer, llm = world["text_corpus"], world["dialogs"], foundation["tokenizer"], foundation["llm"]
    params = {**smoke_params["finetune"]["data"], "synthetic_requests": 12, "synthetic_max_new_tokens": 12}
    seed_0, seed_1 = RunSettings(0, "unused"), RunSettings(1, "unused")
    replay = synthetic_replay(corpus, corpus.iloc[:0], llm, tokenizer, params, seed_0)
    again = synthetic_replay(corpus, corpus.iloc[:0], llm, tokenizer, params, seed_0)
    assert len(replay) == 12 and replay.equals(again)
    assert not replay["instruction"].equals(synthetic_replay(corpus, corpus.iloc[:0], llm, tokenizer, params, seed_1)
                                            ["instruction"])
    train = corpus[corpus["split"] == "train"]
    texts = pd.concat([train["instruction"], train["response"]])
    known = {w for text in texts for w in re.findall("[a-z]+", text.lower())}
    verbs = {topic.split()[0] for topic in train.loc[train["kind"] != "caption", "topic"]}
    patterns = [re.compile("^" + re.escape(p).replace(re.escape("{t}"), "(.+)") + "$") for p in PHRASINGS]
    for request in replay["instruction"]:
        topic = next(m.group(1) for p in patterns if (m := p.match(request)))
        verb, *rest = topic.split()
        assert verb in verbs and rest[-1] not in known and rest[0] not in known
    assert list(replay["response"]) == [a.strip() for a in answer_prompts(llm, tokenizer, list(replay["instruction"]),
                                                                          12)]
    assert synthetic_replay(corpus, corpus.iloc[:0], llm, tokenizer, {**params, "synthetic_requests": 0}, seed_0).empty

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    without = dialog_examples(dialogs, corpus, corpus.iloc[:0], NO_SYNTHETIC, tokenizer, params, 0)
    examples = dialog_examples(dialogs, corpus, corpus.iloc[:0], replay, tokenizer, params, 0)
    assert examples[:len(without)] == without and len(examples) == len(without) + 12
    for (ids, _, row), request in zip(examples[len(without):], replay["instruction"], strict=True):
        assert 0 <= row < len(dialogs) and ids.count(image_id) == 1 and request in tokenizer.decode(ids)


def test_replay_repeats_meets_the_share_the_corpus_caps(world, foundation, smoke_params):
    params = {**smoke_params["finetune"]["data"], "text_replay_fraction": 0.9, "image_replay_fraction": 0.0}
    args = (world["dialogs"], world["text_corpus"], world["text_corpus"].iloc[:0], NO_SYNTHETIC,
            foundation["tokenizer"])
    corpus = world["text_corpus"]
    instructions = int(((corpus["split"] == "train") & corpus["kind"].isin(["benign", "harmful"])).sum())
    dialogs = len(world["dialogs"])
    wanted = round(dialogs * 0.9 / 0.1)
    assert wanted > instructions  # the corpus caps the share without repeats
    capped = dialog_examples(*args, {**params, "replay_repeats": False}, 0)
    repeated = dialog_examples(*args, {**params, "replay_repeats": True}, 0)
    assert len(capped) == dialogs + instructions
    assert len(repeated) == dialogs + wanted
    # the repeats cover every instruction the capped replay has, and nothing else
    assert {tuple(ids) for ids, _, _ in repeated[dialogs:]} == {tuple(ids) for ids, _, _ in capped[dialogs:]}


def test_both_variants_carry_the_same_trained_name_head(stages, world, foundation, smoke_params):
    head = smoke_params["pretrain"]["name_head"]
    catalogue = world["emoji_catalogue"]
    colours = sorted(smoke_params["data"]["layout"]["backgrounds"])
    for variant in ("qmllm", "baseline"):
        config = QMLLMConfig.from_dict(stages[f"{variant}.qmllm_config"])
        assert config.name_slots == head["slots"] + 1 and config.name_background   # the objects, then the background
        assert config.name_vocabulary == list(catalogue["name"]) + colours
        assert config.name_cls_source == smoke_params["features"]["cls_head"]["cls_source"]
    names = {k: v for k, v in stages["qmllm.stage1_weights"].items() if k.startswith("name_head.")}
    assert names and all(torch.equal(v, stages["baseline.stage1_weights"][k]) for k, v in names.items())
    spelled = names["name_head.token_ids"][0]
    pistol = foundation["tokenizer"](f" {catalogue['name'].iloc[0]}", add_special_tokens=False)["input_ids"]
    assert spelled[:len(pistol)].tolist() == pistol
    assert stages["pretrain_metrics"]["name_head"]["steps"] == head["training"]["steps"]


def test_naming_is_scored_on_every_catalogue_emoji(stages, world):
    for system in ("qmllm", "baseline"):
        naming = stages["finetune_metrics"][system]["naming"]
        assert 0.0 <= naming["all"] <= 1.0 and 0.0 <= naming["head"] <= 1.0
        assert set(naming["by_group"]) == set(world["emoji_catalogue"]["group"])
        assert naming.get("confusions") is not None
        assert stages["finetune_metrics"][system]["intervals"]["naming.all"]["n"] == len(world["eval_items"])


def dialog_examples(dialogs, text_corpus, stage2_validation, synthetic, tokenizer, params: dict, seed: int):
    """The finetune pipeline's examples: its replay drawn (`replayed_instructions`), then the dialogs and the
    replay tokenised (`dialog_examples`)."""
    from qmllm_pipeline.pipelines.finetune import nodes

    replay = nodes.replayed_instructions(dialogs, text_corpus, stage2_validation, synthetic, params, seed)
    return nodes.dialog_examples(dialogs, text_corpus, stage2_validation, replay, tokenizer, params)
