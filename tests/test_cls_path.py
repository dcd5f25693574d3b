"""The decoupled CLS path (its own projector and codebook, trained apart), the cosine CLS distance, and the
`toxic_share` decision rule beside Algorithm 1's majority vote."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from qmllm_pipeline.dotted import with_overrides
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.models.heads import ClsHeadSettings, cls_head_losses, train_cls_head
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.quantizer import VectorQuantizer
from qmllm_pipeline.models.safety_map import build_safety_map, relabel, tau_trade_off
from qmllm_pipeline.models.stage1 import Stage1Data, Stage1Settings, train_stage1
from qmllm_pipeline.models.training import TrainingConfig
from qmllm_pipeline.models.vision import VisionTower
from qmllm_pipeline.pipelines import features, safety_map
from qmllm_pipeline.pipelines import pretrain as pretrain_pipeline


def test_cosine_codes_stay_on_the_sphere_and_nearest_is_the_cosine_argmax():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, distance="cosine").train()
    for _ in range(3):
        quantizer(torch.randn(128, 4) * 5)
    assert torch.allclose(quantizer.codebook.norm(dim=1), torch.ones(16), atol=1e-5)
    x = torch.randn(300, 4) * torch.rand(300, 1) * 10   # lengths vary: only the direction may count
    expected = (F.normalize(x, dim=1) @ quantizer.codebook.detach().T).argmax(1)
    assert torch.equal(quantizer.nearest(x), expected)
    assert torch.equal(quantizer.eval()(x).indices, expected)
    with pytest.raises(ValueError, match="use update='ema'"):
        VectorQuantizer(4, 2, update="gradient", distance="cosine")


def _llm():
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def _decoupled(cls_codes: int, cls_width: int, cls_distance: str = "l2", **settings) -> QMLLM:
    torch.manual_seed(0)
    config = QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, cls_codes=cls_codes, patch_codes=32,
                         cls_path="decoupled", cls_vision_width=8, cls_width=cls_width, cls_distance=cls_distance,
                         **settings)
    return QMLLM(config, _llm())


def _data(rows: int = 64):
    generator = torch.Generator().manual_seed(1)
    cls_features = torch.randn(rows, 8, generator=generator)
    patches = torch.randn(rows, 4, 16, generator=generator)
    examples = [([3, 2, 5, 6], [-100, -100, 5, 6], row) for row in range(rows)]
    return cls_features, patches, examples


def test_the_decoupled_cls_settings_leave_everything_the_llm_reads_bit_identical():
    cls_features, patches, examples = _data()
    training = TrainingConfig(steps=4, batch_size=8, lr=1e-3)
    trained = []
    for codes, width, distance in ((8, 6, "l2"), (12, 10, "cosine")):
        model = _decoupled(codes, width, distance)
        train_stage1(model, Stage1Data(cls_features, patches, examples), Stage1Settings(training, usage_every=2), 0)
        trained.append({k: v for k, v in model.stage1_state().items() if not k.startswith("cls_")})
        train_cls_head(model, cls_features, torch.randn(len(cls_features), width), ClsHeadSettings(training), 0)
        assert {k: v for k, v in model.stage1_state().items() if not k.startswith("cls_")}.keys() == trained[-1].keys()
        assert all(torch.equal(model.stage1_state()[k], v) for k, v in trained[-1].items())  # the head left them
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_the_cls_head_learns_its_semantic_target():
    cls_features = torch.randn(512, 8, generator=torch.Generator().manual_seed(2))
    targets = cls_features[:, :6] @ torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    model = _decoupled(16, 6)
    model.cls_quantizer.kmeans_init(model.cls_head(cls_features).detach())
    with torch.no_grad():
        before = float(cls_head_losses(model.eval(), cls_features, targets)["semantic"])
    train_cls_head(model, cls_features, targets, ClsHeadSettings(TrainingConfig(steps=300, batch_size=64, lr=1e-2),
                                                                 standardize_semantic_target=False), seed=0)
    with torch.no_grad():
        after = float(cls_head_losses(model.eval(), cls_features, targets)["semantic"])
    assert after < 0.5 * before
    assert len(torch.unique(model.cls_quantizer.nearest(model.cls_head(cls_features)))) > 8
    with pytest.raises(ValueError, match="decoupled"):
        train_cls_head(QMLLM(QMLLMConfig(vision_width=8, llm_width=24, image_token_id=2), _llm()), cls_features,
                       targets, ClsHeadSettings(TrainingConfig(steps=1, batch_size=4, lr=1e-3)), seed=0)


def test_the_deployed_check_reads_the_decoupled_head():
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 4},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2}, projection_dim=8))
    model = _decoupled(8, 6, cls_source="projected")
    model.vision_tower = VisionTower.from_clip(clip, cls_source="projected")
    model.cls_quantizer.kmeans_init(torch.randn(64, 6))
    rebuilt = QMLLM.assemble(model.config.to_dict(), model.stage1_state(), clip_model=clip)
    pixels = torch.randn(3, 3, 32, 32)
    embedding = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    expected = model.cls_quantizer.nearest(model.cls_projector(embedding))
    assert torch.equal(rebuilt.cls_index(pixels), expected)
    assert torch.equal(rebuilt.encode_images(pixels).cls.indices, expected)


def test_the_shared_path_refuses_widths_its_projector_cannot_read():
    with pytest.raises(ValueError, match="use cls_path 'decoupled'"):
        QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, cls_vision_width=8)
    with pytest.raises(ValueError, match="needs cls_path 'decoupled'"):
        QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, cls_width=8)
    with pytest.raises(ValueError, match="cls_path must be one of"):
        QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, cls_path="split")


CATEGORIES = ["weapon", "drugs", "neutral"]
# code 0: 2 weapon + 2 drugs + 1 neutral: majority weapon (tie -> first) at p .4, toxic share .8
# code 1: 3 weapon + 2 neutral: p .6, share .6; code 2: 1 drugs + 4 neutral: share .2; code 3: never seen
CODES = np.array([0] * 5 + [1] * 5 + [2] * 5)
LABELS = (["weapon"] * 2 + ["drugs"] * 2 + ["neutral"] + ["weapon"] * 3 + ["neutral"] * 2 + ["drugs"]
          + ["neutral"] * 4)
CODEBOOK = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [9.0, 0.0]])


def test_the_toxic_share_rule_counts_a_code_split_between_toxic_categories():
    majority = build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.6, unseen_policy="neutral")
    share = build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.6, unseen_policy="neutral", rule="toxic_share")
    assert majority["label"].tolist() == ["neutral", "weapon", "neutral", "neutral"]
    assert share["label"].tolist() == ["weapon", "weapon", "neutral", "neutral"]
    assert share["toxic_share"].tolist() == pytest.approx([0.8, 0.6, 0.2, 0.0])
    nearest = relabel(majority, CODEBOOK, 0.6, "nearest", "toxic_share")
    assert nearest["label"].tolist() == ["weapon", "weapon", "neutral", "weapon"]  # code 3 sits next to code 1
    assert relabel(majority, CODEBOOK, 0.6, "neutral", "toxic_share").equals(share)
    with pytest.raises(ValueError, match="decision rule"):
        build_safety_map(CODES, LABELS, CODEBOOK, CATEGORIES, tau=0.6, unseen_policy="neutral", rule="vote")
    trade = tau_trade_off(CODES, LABELS, np.array([0, 1, 2]), np.array([True, True, False]), CODEBOOK, CATEGORIES,
                          [0.6], ["neutral"], ("majority", "toxic_share"))
    assert trade.set_index("rule")["toxic_recall"].to_dict() == {"majority": 0.5, "toxic_share": 1.0}


def test_the_decoupled_path_runs_through_the_pipelines(world, foundation, smoke_params):
    """features (CLIP's image embedding, CLIP-text object targets for the head) -> the paper's stage 1 + the
    CLS head -> Algorithm 1; everything the LLM reads is the shared path's, bit for bit."""
    head = {"pretrain.model.cls_distance": "cosine", "pretrain.model.cls_codes": 32,   # the head's K only
            "features.cls_head.cls_source": "projected",
            "features.cls_head.semantic_target_source": "clip_text",
            "features.cls_head.semantic_target_text": "objects"}
    params = with_overrides(smoke_params, **{"pretrain.model.cls_path": "decoupled", **head,
                                             "safety_map.decision_rule": "majority", "safety_map.tau": "auto"})
    inputs = {name: world[name] for name in ("caption_corpus", "dialogs", "dmap", "dmap_validation", "eval_toxic",
                                              "eval_neutral", "eval_hard_negative", "emoji_catalogue")}
    inputs.update({name: foundation[name] for name in ("tokenizer", "clip_tokenizer", "clip_model",
                                                       "clip_image_processor", "llm")})
    chain = (features.create_pipeline() + pretrain_pipeline.create_pipeline(params)
             + safety_map.create_pipeline().to_outputs("safety_metrics"))
    out = run_in_memory(chain, inputs, params)
    clip = foundation["clip_model"]
    assert out["caption_targets"]["head_targets"].shape[-1] == clip.config.projection_dim
    assert out["caption_targets"]["targets"].shape[-1] == foundation["llm"].config.hidden_size
    config = out["qmllm.qmllm_config"]
    assert (config["cls_path"], config["cls_source"], config["cls_distance"]) == ("decoupled", "projected", "cosine")
    assert any(k.startswith("cls_projector.") for k in out["qmllm.stage1_weights"])
    assert not any(k.startswith("cls_") for k in out["baseline.stage1_weights"])
    summary = out["pretrain_metrics"]["qmllm"]
    assert summary["cls_head"]["steps"] == params["pretrain"]["cls_head"]["training"]["steps"]
    assert {"vq_cls", "semantic"} <= set(summary["cls_head"]["final"]) and "semantic" in summary["final"]
    report = out["safety_metrics"]
    assert set(report["qmllm_rules"]) == {"majority", "toxic_share"}
    assert report["qmllm_rules"]["majority"] == report["qmllm"]   # the deployed rule is the majority vote

    stage1 = pretrain_pipeline.create_pipeline(params).only_nodes("run_settings", "stage1_data", "model_inputs",
                                                                  "qmllm.model_config", "qmllm.pretrain_variant")
    cached = {name: out[name] for name in ("caption_features", "caption_targets", "name_vocabulary",
                                           "name_head_weights")}
    shared = run_in_memory(stage1, {**inputs, **cached}, with_overrides(smoke_params,
                                                                        **{"pretrain.model.cls_path": "shared"}))
    patch_only = run_in_memory(stage1, {**inputs, **cached}, with_overrides(params, **{
        "pretrain.cls_head.stage1": "patch_only"}))
    weights = out["qmllm.stage1_weights"]
    llm_side = [k for k in weights if k.startswith(("mm_projector.", "patch_quantizer."))]
    assert llm_side and all(torch.equal(weights[k], shared["qmllm.stage1_weights"][k]) for k in llm_side)
    assert not all(torch.equal(weights[k], patch_only["qmllm.stage1_weights"][k]) for k in llm_side)
    assert "semantic" not in patch_only["qmllm.pretrain_summary"]["final"]
