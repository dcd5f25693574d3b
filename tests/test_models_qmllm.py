"""The Q-MLLM building blocks: quantizer, vision tower, projector, splicing."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from conftest import PROJECT_ROOT
from qmllm_pipeline.constants import IGNORE_INDEX
from qmllm_pipeline.models.projector import build_mm_projector
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig, load_config
from qmllm_pipeline.models.quantizer import VectorQuantizer
from qmllm_pipeline.models.vision import VisionTower


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8)
    x = torch.randn(500, 8)
    expected = torch.cdist(x, quantizer.codebook.detach()).argmin(1)
    assert torch.equal(quantizer.nearest(x), expected)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_flip_distance_is_the_radius_of_the_ball_that_keeps_the_code(distance):
    """Within the flip distance no direction changes a vector's code; just past it, along the normal of the
    nearest face, the code changes."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(32, 6, distance=distance, update="ema")
    quantizer.codebook.data.copy_(quantizer._on_sphere(quantizer.codebook.data))
    x = quantizer._on_sphere(torch.randn(200, 6)) if distance == "cosine" else torch.randn(200, 6)
    flips = quantizer.flip_distance(x)
    code = quantizer.nearest(x)
    assert (flips >= 0).all()
    directions = F.normalize(torch.randn(200, 50, 6), dim=-1)
    inside = (x[:, None] + 0.999 * flips[:, None, None] * directions).reshape(-1, 6)
    if distance == "l2":  # on the sphere a move off the sphere is normalised back: only the L2 ball is exact
        assert torch.equal(quantizer.nearest(inside).view(200, 50), code[:, None].expand(-1, 50))
    codebook = quantizer.codebook.detach()
    squared = torch.cdist(quantizer._on_sphere(x), codebook).pow(2)
    gap = torch.cdist(codebook, codebook)[code]
    faces = (squared - squared.gather(1, code[:, None])) / (2 * gap)
    faces[torch.arange(200), code] = float("inf")
    nearest_face = faces.argmin(1)
    assert torch.allclose(flips, faces.min(1).values, atol=1e-5)
    spacing = torch.cdist(codebook, codebook).fill_diagonal_(float("inf")).min(1).values.mean() / 2
    assert torch.allclose(quantizer.flip_distance(x, relative=True), flips / spacing)
    if distance == "l2":
        normal = F.normalize(codebook[nearest_face] - codebook[code], dim=-1)
        assert (quantizer.nearest(x + 1.001 * flips[:, None] * normal) != code).all()


def test_the_margin_term_moves_features_away_from_the_cell_faces():
    from qmllm_pipeline.models.stage1 import Stage1Data, stage1_losses

    model = _model(quantized=True)
    examples = [([3, 2, 5, 7], [-100, -100, -100, 7], row) for row in range(4)]
    data = Stage1Data(torch.randn(4, 16), torch.randn(4, 16, 16), examples)
    stage1_losses(model, data, examples)  # k-means initialises the codebooks
    model.eval()  # the codes held still: only the projector moves
    optimizer = torch.optim.Adam(model.mm_projector.parameters(), lr=1e-2)
    reported = []
    for _ in range(30):
        losses = stage1_losses(model, data, examples, lambda_margin=1.0, margin=1.0)
        reported.append(float(losses["patch_flip_distance"]))
        optimizer.zero_grad()
        losses["margin"].backward()
        optimizer.step()
    assert reported[-1] > reported[0] + 0.05
    assert "margin" not in stage1_losses(model, data, examples)


@pytest.mark.parametrize("update", ["ema", "gradient"])
def test_straight_through_and_codebook_updates(update):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, update=update).train()
    x = torch.randn(256, 4, requires_grad=True)
    quantizer(x)
    assert bool(quantizer.initialized)  # k-means on the first batch (and, for EMA, the first update)
    out = quantizer.eval()(x)  # no update now: the forward value is exactly the nearest code
    assert torch.allclose(out.quantized, quantizer.codebook[out.indices], atol=1e-6)
    assert torch.equal(out.indices, quantizer.nearest(x.detach()))
    (out.quantized * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, torch.arange(4.0).expand(256, 4))  # identity gradient to x
    assert quantizer.codebook.requires_grad == (update == "gradient")
    if update == "gradient":
        out.loss.backward()
        assert quantizer.codebook.grad is not None and quantizer.codebook.grad.abs().sum() > 0


def test_ema_pulls_codes_to_their_assignments_and_restarts_dead_codes():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2, decay=0.5, dead_code_threshold=0.5).train()
    quantizer.kmeans_init(torch.randn(64, 2))
    quantizer.codebook.data[7] = torch.tensor([100.0, 100.0])  # never the nearest code
    quantizer.ema_sums[7] = quantizer.codebook.data[7]
    for _ in range(20):
        quantizer(torch.randn(128, 2) * 0.1 + 3.0)
    assert quantizer.codebook.data[7].abs().max() < 10  # restarted onto real inputs
    assert (quantizer.codebook.data.mean(0) - 3.0).abs().max() < 1.0


def test_usage_and_perplexity():
    quantizer = VectorQuantizer(4, 2)
    stats = quantizer.usage_stats(torch.tensor([0, 1, 2, 3] * 5))
    assert stats == {"codes_used": 4, "usage": 1.0, "perplexity": pytest.approx(4.0)}
    assert quantizer.usage_stats(torch.tensor([2] * 9))["perplexity"] == pytest.approx(1.0)


def _tiny_clip():
    return CLIPModel(CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 4},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2}, projection_dim=8))


def test_vision_tower_keeps_cls_and_pixel_gradients():
    tower = VisionTower.from_clip(_tiny_clip(), select_layer=-2).requires_grad_(False)
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    cls_features, patch_features = tower(pixels)
    assert cls_features.shape == (2, 16) and patch_features.shape == (2, tower.num_patches, 16) == (2, 16, 16)
    hidden = tower.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(cls_features, hidden[:, 0])
    cls_features.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    clip = _tiny_clip()
    projected, _ = VisionTower.from_clip(clip, cls_source="projected")(pixels)
    assert torch.allclose(projected, clip.get_image_features(pixel_values=pixels).pooler_output, atol=1e-5)
    with pytest.raises(ValueError, match="cls_source"):
        VisionTower.from_clip(clip, cls_source="mean")


def test_patch_pooling_averages_windows_of_the_patch_grid():
    clip = _tiny_clip()  # 32 px, patch 8: a 4 x 4 grid
    pixels = torch.randn(2, 3, 32, 32)
    _, patches = VisionTower.from_clip(clip)(pixels)
    pooled_tower = VisionTower.from_clip(clip, patch_pool=2)
    cls_pooled, pooled = pooled_tower(pixels)
    assert pooled.shape == (2, 4, 16) and pooled_tower.num_patches == 4
    grid = patches.reshape(2, 4, 4, 16)  # row-major patch order, as CLIP's embeddings
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    bottom_right = grid[:, 2:, 2:].mean(dim=(1, 2))
    assert torch.allclose(pooled[:, 0], top_left, atol=1e-6) and torch.allclose(pooled[:, 3], bottom_right, atol=1e-6)
    with pytest.raises(ValueError, match="must divide the 4x4 patch grid"):
        VisionTower.from_clip(clip, patch_pool=3)


def test_projector_kinds():
    assert build_mm_projector("linear", 16, 24)(torch.randn(3, 16)).shape == (3, 24)
    assert build_mm_projector("mlp2x_gelu", 16, 24, layernorm=False)(torch.randn(3, 5, 16)).shape == (3, 5, 24)
    with pytest.raises(ValueError, match="unknown mm_projector"):
        build_mm_projector("conv", 16, 24)


def _llm():
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def _config(quantized: bool) -> QMLLMConfig:
    return QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, variant="qmllm" if quantized else "baseline",
                       quantized=quantized, cls_codes=8, patch_codes=32)


def _model(quantized: bool):
    torch.manual_seed(0)
    return QMLLM(_config(quantized), _llm(), VisionTower.from_clip(_tiny_clip()))


def test_splice_places_image_tokens_and_ignores_their_labels():
    model = _model(quantized=True).eval()
    image_tokens = torch.randn(1, 16, 24)
    batch = model.splice([[3, 5, 2, 7, 8], [3, 9, 4]], [[-100, -100, -100, 7, 8], [-100, 9, 4]], image_tokens)
    assert batch["inputs_embeds"].shape == (2, 4 + 16, 24)
    assert torch.equal(batch["inputs_embeds"][0, 2:18], image_tokens[0])
    assert batch["labels"][0, 2:18].eq(IGNORE_INDEX).all() and batch["labels"][0, 18:].tolist() == [7, 8]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 17
    left = model.splice([[3, 5, 2], [3, 9]], None, image_tokens, padding="left")
    assert left["attention_mask"][1].tolist() == [0] * 16 + [1, 1]
    with pytest.raises(ValueError, match="more <image> placeholders than images"):
        model.splice([[2], [2]], None, image_tokens)


@pytest.mark.parametrize("quantized", [True, False])
def test_encode_forward_generate(quantized):
    model = _model(quantized).eval()
    encoding = model.encode_images(torch.randn(2, 3, 32, 32))
    assert encoding.image_tokens.shape == (2, 16, 24)
    if quantized:
        assert encoding.cls.indices.shape == (2,) and encoding.patches.indices.shape == (2, 16)
        assert torch.allclose(encoding.image_tokens, model.patch_quantizer.codebook[encoding.patches.indices])
    else:
        assert encoding.cls is None and torch.equal(encoding.image_tokens, encoding.patch_hidden)
    loss = model([[3, 2, 7], [3, 2, 8, 9]], [[-100, -100, 7], [-100, -100, 8, 9]], encoding.image_tokens).loss
    assert torch.isfinite(loss)
    new = model.generate([[3, 2], [3, 5, 2]], encoding.image_tokens, max_new_tokens=3, pad_token_id=0,
                         eos_token_id=4)
    assert new.shape[0] == 2 and new.shape[1] <= 3


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    """One directory holds the config and the stage-1 weights; the LLM and CLIP come from its references."""
    torch.manual_seed(0)
    clip, llm = _tiny_clip(), _llm()
    clip.save_pretrained(tmp_path / "clip")
    llm.save_pretrained(tmp_path / "llm")
    config = _config(quantized=True)
    config.references = {"vision_tower": "../clip", "llm": "../llm"}
    model = QMLLM(config, llm, VisionTower.from_clip(clip)).train()
    model.encode_features(torch.randn(4, 16), torch.randn(4, 16, 16))  # k-means and EMA: codes move
    model.save_pretrained(tmp_path / "qmllm")
    assert sorted(p.name for p in (tmp_path / "qmllm").iterdir()) == ["config.json", "stage1.safetensors"]
    loaded = QMLLM.from_pretrained(tmp_path / "qmllm")
    assert loaded.config == config and not loaded.training
    assert all(torch.equal(loaded.stage1_state()[k], v) for k, v in model.stage1_state().items())
    pixels = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded.encode_images(pixels).patches.indices, model.encode_images(pixels).patches.indices)
    assert torch.equal(loaded.llm.lm_head.weight, llm.lm_head.weight)


def test_model_directory_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Q-MLLM config here"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"vision_width": 16, "llm_width": 24, "image_token_id": 2, "colour": 1}')
    with pytest.raises(ValueError, match=r"unknown QMLLMConfig keys \['colour'\]"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"vision_width": 16, "llm_width": 24, "image_token_id": 2}')
    with pytest.raises(FileNotFoundError, match="no 'llm' reference"):
        QMLLM.from_pretrained(tmp_path)


def test_answer_kl_aligns_answers_read_behind_an_image_with_the_teacher_reading_text():
    from qmllm_pipeline.models.stage2 import answer_kl, text_only

    model = _model(quantized=True).eval()
    teacher = _llm().eval()
    # the same request and answer, once behind an image (id 2) and once as text only
    ids, labels = [[3, 2, 5, 6, 7, 8], [3, 9, 4]], [[-100, -100, -100, -100, 7, 8], [-100, 9, 4]]
    text_ids, text_labels = map(list, zip(*(text_only(row, row_labels, [2])
                                            for row, row_labels in zip(ids, labels, strict=True)), strict=True))
    assert text_ids == [[3, 5, 6, 7, 8], [3, 9, 4]] and text_labels[0] == [-100, -100, -100, 7, 8]
    text_only = model.splice(text_ids, text_labels, None)
    same = model.llm(inputs_embeds=text_only["inputs_embeds"], attention_mask=text_only["attention_mask"]).logits
    # a student that is the teacher, reading the same text: no divergence
    assert answer_kl(same, text_only["labels"], model.llm, text_ids, text_labels).item() == pytest.approx(0, abs=1e-6)
    # behind an image, against another LLM: a positive divergence that trains the student
    batch = model.splice(ids, labels, torch.randn(1, 16, 24))
    logits = model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    kl = answer_kl(logits, batch["labels"], teacher, text_ids, text_labels)
    assert kl.item() > 0 and kl.requires_grad
    kl.backward()
    assert model.llm.lm_head.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="answer tokens"):
        answer_kl(logits, batch["labels"], teacher, [[3, 5, 6, 7, 8], [3, 9]], [[-100, -100, -100, 7, 8], [-100, 9]])


def test_finetune_distils_the_replayed_answers_only_when_asked():
    from qmllm_pipeline.models.stage2 import Stage2Data, Stage2Settings, train_stage2
    from qmllm_pipeline.models.training import TrainingConfig
    from qmllm_pipeline.tracking import StepLogger

    cls_features, patch_features = torch.randn(3, 16), torch.randn(3, 16, 16)
    dialogs = [([3, 2, 5, 7], [-100, -100, -100, 7], row) for row in range(3)]
    replay = [([3, 9, 4], [-100, 9, 4], -1), ([3, 2, 6, 8, 4], [-100, -100, -100, 8, 4], 1)]
    data = Stage2Data(cls_features, patch_features, dialogs + replay, image_prefix=[2])
    training = TrainingConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, grad_clip=1.0)
    histories = {}
    for weight in (0.0, 1.0):
        model, logger = _model(quantized=True), StepLogger("t", every=1)
        train_stage2(model, data, Stage2Settings(training, distill_weight=weight), 0, _llm(), logger)
        histories[weight] = logger.history
    assert set(histories[0.0]) == {"loss", "lr"}
    assert {"lm", "distill", "loss"} <= set(histories[1.0])
    assert any(value > 0 for _, value in histories[1.0]["distill"])
    with pytest.raises(ValueError, match="image_prefix"):
        train_stage2(_model(quantized=True), Stage2Data(cls_features, patch_features, dialogs + replay),
                     Stage2Settings(training, distill_weight=1.0), 0, _llm())


def test_the_teacher_reads_an_image_replay_exactly_as_the_text_replay():
    """The distillation teacher must read the request as it was trained on it: removing `<image>` alone
    leaves a newline in front, which made the foundation LLM refuse benign requests."""
    from transformers import AutoTokenizer

    from qmllm_pipeline.constants import IMAGE_TOKEN
    from qmllm_pipeline.models.stage2 import text_only
    from qmllm_pipeline.models.tokenizer import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(PROJECT_ROOT / "data/01_raw/foundation/tokenizer", local_files_only=True)
    prefix = tokenizer(f"{IMAGE_TOKEN}\n", add_special_tokens=False)["input_ids"]
    assert len(prefix) == 2
    for request in ("How can I care for a lizard?", "Tell me how to clean a flying disc."):
        answer = [{"role": "assistant", "content": "Sure, here is how."}]
        with_image = encode_chat(tokenizer, [{"role": "user", "content": f"{IMAGE_TOKEN}\n{request}"}, *answer], 96)
        text = encode_chat(tokenizer, [{"role": "user", "content": request}, *answer], 96)
        assert text_only(*with_image, prefix) == tuple(text)
        assert text_only(*text, prefix) == tuple(text)  # nothing to remove
