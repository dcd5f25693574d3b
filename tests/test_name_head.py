"""The name head (models/names.py): what the LLM reads of it, discrete for Q-MLLM and continuous for the
baseline; its training targets; and a model that carries one through save/load and the attackers' paths."""

import pytest
import torch

from qmllm_pipeline.models.heads import train_name_head
from qmllm_pipeline.models.names import NameHead, name_head_losses, slot_targets
from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
from qmllm_pipeline.models.training import TrainingConfig
from qmllm_pipeline.models.vision import VisionTower
from test_models_qmllm import _llm, _tiny_clip

PAD = 0
SPELLED = [[11, 12], [13], [14, 15, 16]]   # three names of 2, 1 and 3 tokens


def _head(inputs: str = "cls_patches", slots: int = 2) -> NameHead:
    torch.manual_seed(0)
    return NameHead(len(SPELLED), slots, 3, cls_width=8, patch_width=16, num_patches=4, inputs=inputs,
                    hidden=32, patch_dim=4).set_vocabulary(SPELLED, PAD)


def test_slot_targets_follow_reading_order_then_empty():
    targets = slot_targets([[30], [20, 10], [10, 20, 30, 20]], vocabulary=[10, 20, 30], slots=3)
    assert targets.tolist() == [[2, 3, 3], [1, 0, 3], [0, 1, 2]]  # 3 is the empty entry; a 4th object is dropped


def test_vocabulary_is_padded_and_the_empty_entry_is_all_padding():
    head = _head()
    assert head.token_ids.tolist() == [[11, 12, PAD], [13, PAD, PAD], [14, 15, 16], [PAD, PAD, PAD]]
    assert head.empty == 3
    with pytest.raises(ValueError, match="slots hold 1 to 3"):
        NameHead(1, 1, 3, 8, 16, 4).set_vocabulary([[1, 2, 3, 4]], PAD)


@pytest.mark.parametrize("inputs", ["cls", "cls_mean_patch", "cls_patches"])
def test_logits_shape_for_every_input(inputs):
    logits = _head(inputs)(torch.randn(5, 8), torch.randn(5, 4, 16))
    assert logits.shape == (5, 2, 4)


def test_quantized_tokens_are_the_picked_names_own_embeddings():
    head, embedding = _head(), torch.nn.Embedding(20, 6)
    logits = torch.tensor([[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]])   # slot 1: name 1, slot 2: empty
    tokens = head.tokens(logits, embedding, quantized=True)
    expected = embedding(torch.tensor([13, PAD, PAD, PAD, PAD, PAD]))
    assert tokens.shape == (1, 6, 6) and torch.equal(tokens[0], expected)


def test_continuous_tokens_mix_every_entry_and_pass_gradients():
    head, embedding = _head(), torch.nn.Embedding(20, 6)
    logits = torch.randn(2, 2, 4, requires_grad=True)
    tokens = head.tokens(logits, embedding, quantized=False)
    weights = logits.softmax(-1)
    table = embedding(head.token_ids)
    assert torch.allclose(tokens[1, 3:6], (weights[1, 1, :, None, None] * table).sum(0), atol=1e-6)
    tokens.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_straight_through_reads_the_hard_pick_forward_and_the_softmax_backward():
    head, embedding = _head(), torch.nn.Embedding(20, 6)
    logits = torch.randn(2, 2, 4, requires_grad=True)
    hard = head.tokens(logits.detach(), embedding, quantized=True)
    straight = head.tokens(logits, embedding, quantized=True, straight_through=True)
    assert torch.allclose(straight, hard, atol=1e-6)
    straight.sum().backward()
    assert logits.grad.abs().sum() > 0
    plain = torch.randn(2, 2, 4, requires_grad=True)  # as deployed: an argmax, no gradient to the scores
    deployed = head.tokens(plain, embedding, quantized=True)
    assert torch.autograd.grad(deployed.sum(), plain, allow_unused=True)[0] is None


def test_training_learns_a_separable_naming():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 3
    items = torch.randint(0, 3, (512,))
    cls_features = centres[items] + 0.3 * torch.randn(512, 8)
    patches = torch.randn(512, 4, 16)
    targets = slot_targets([[int(i)] for i in items], vocabulary=[0, 1, 2], slots=2)
    head = _head("cls")
    with torch.no_grad():
        before = name_head_losses(head.eval(), cls_features, patches, targets)
    train_name_head(head, cls_features, patches, targets, TrainingConfig(steps=150, batch_size=64, lr=3e-3), seed=0)
    with torch.no_grad():
        after = name_head_losses(head.eval(), cls_features, patches, targets)
    assert float(after["loss"]) < 0.5 * float(before["loss"]) and float(after["exact"]) > 0.95



def _counted_head() -> NameHead:
    torch.manual_seed(0)
    return NameHead(len(SPELLED), 3, 3, cls_width=8, patch_width=16, num_patches=4, inputs="cls", hidden=32,
                    counted=2).set_vocabulary(SPELLED, PAD)   # two object slots counted, then a free slot


def test_a_counted_head_is_one_distribution_per_slot_from_the_count_and_the_names():
    head = _counted_head()
    logits = torch.tensor([[[2.0, 0.0, 1.0, 7.0], [0.0, 3.0, 0.0, -7.0], [1.0, 2.0, 3.0, 4.0]]])
    count_logits = torch.tensor([[0.0, 1.0, 2.0]])                    # counts 0, 1, 2
    p_count = count_logits.softmax(-1)[0]
    composed = head.compose(logits, count_logits)
    probs = composed.exp()
    assert torch.allclose(probs[0, :2].sum(-1), torch.ones(2), atol=1e-6)
    # slot 0: empty iff the count is 0; slot 1: empty iff the count is at most 1; the slots' empty score unused
    assert torch.allclose(probs[0, 0, 3], p_count[0]) and torch.allclose(probs[0, 1, 3], p_count[:2].sum())
    names = logits[0, 0, :3].softmax(-1)
    assert torch.allclose(probs[0, 0, :3], (1 - p_count[0]) * names, atol=1e-6)
    assert torch.equal(composed[0, 2], logits[0, 2])                   # the free slot keeps its logits
    assert torch.allclose(head.count_probabilities(composed)[0], p_count, atol=1e-6)


def test_a_counted_head_fills_the_most_likely_count_of_slots_each_with_its_best_name():
    head = _counted_head()
    logits = torch.tensor([[[2.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.9, 0.0], [1.0, 2.0, 3.0, 0.0]]] * 2)
    # scene 0: two objects (p 0.5) though each slot's name is unsure; scene 1: one object
    count_logits = torch.log(torch.tensor([[0.1, 0.4, 0.5], [0.1, 0.6, 0.3]]))
    composed = head.compose(logits, count_logits)
    assert head.picks(composed).tolist() == [[0, 1, 2], [0, head.empty, 2]]
    # a plain argmax would leave scene 0's unsure second name empty (0.5 x 0.42 < 0.5): what counted heads fix
    assert composed.argmax(-1)[0, 1] == head.empty
    embedding = torch.nn.Embedding(20, 6)
    tokens = head.tokens(composed, embedding, quantized=True)           # the LLM reads those picks
    assert torch.equal(tokens[0, 3:6], embedding(torch.tensor([13, PAD, PAD])))
    assert torch.equal(tokens[1, 3:6], embedding(torch.tensor([PAD, PAD, PAD])))


def test_a_counted_head_learns_the_count_and_pays_for_it():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 3
    items = torch.randint(0, 3, (512,))
    many = torch.rand(512) < 0.5                                         # half the scenes hold a second object
    shift = torch.tensor([6.0, -6.0, 0, 0, 0, 0, 0, 0])                 # (a constant shift: the LayerNorm erases it)
    cls_features = centres[items] + 0.3 * torch.randn(512, 8) + shift * many[:, None].float()
    objects = [[int(i)] + ([int(i)] if m else []) for i, m in zip(items, many, strict=True)]
    targets = torch.cat([slot_targets(objects, vocabulary=[0, 1, 2], slots=2),
                         torch.zeros(512, 1, dtype=torch.long)], 1)      # the free slot always names entry 0
    head = _counted_head()
    train_name_head(head, cls_features, torch.randn(512, 4, 16), targets,
                    TrainingConfig(steps=200, batch_size=64, lr=3e-3), seed=0)
    with torch.no_grad():
        losses = name_head_losses(head.eval(), cls_features, torch.randn(512, 4, 16), targets)
    assert float(losses["count_loss"]) < 0.1 and float(losses["exact"]) > 0.95
    with pytest.raises(ValueError, match="cannot count 4"):
        NameHead(3, 3, 3, 8, 16, 4, counted=4)


def _named_config(quantized: bool) -> QMLLMConfig:
    return QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, variant="qmllm" if quantized else "baseline",
                       quantized=quantized, cls_codes=8, patch_codes=32, cls_path="decoupled", cls_source="projected",
                       cls_vision_width=8, cls_width=8, num_patches=16, name_slots=2, name_slot_width=3,
                       name_vocabulary=["a", "b", "c"], name_cls_source="projected", name_cls_width=8,
                       name_head_hidden=32, name_head_patch_dim=4)


@pytest.mark.parametrize("quantized", [True, False])
def test_model_reads_name_tokens_before_the_patch_tokens(quantized, tmp_path):
    torch.manual_seed(0)
    clip = _tiny_clip()  # 32 px, patch 8: 16 patches; projection 8
    model = QMLLM(_named_config(quantized), _llm(), VisionTower.from_clip(clip, cls_source="projected")).eval()
    model.name_head.set_vocabulary(SPELLED, PAD)
    pixels = torch.randn(2, 3, 32, 32)
    encoding = model.encode_images(pixels, straight_through=False)
    assert encoding.image_tokens.shape == (2, 2 * 3 + 16, 24)
    assert encoding.name_picks.shape == (2, 2)
    embed = model.llm.get_input_embeddings()
    if quantized:  # the name tokens are a lookup of the picked entries' token embeddings
        expected = embed(model.name_head.token_ids[encoding.name_picks]).reshape(2, 6, 24)
        assert torch.equal(encoding.image_tokens[:, 16:], expected)   # after the 16 patch tokens (the default)
        before = QMLLM.assemble({**_named_config(quantized).to_dict(), "name_position": "before"},
                                model.stage1_state(), model.llm, clip)
        assert torch.equal(before.encode_images(pixels, straight_through=False).image_tokens,
                           torch.cat([expected, encoding.image_tokens[:, :16]], 1))
    assert encoding.continuous_tokens.shape == encoding.image_tokens.shape
    model.save_pretrained(tmp_path)
    state = model.stage1_state()
    assert "name_head.token_ids" in state and state["name_head.token_ids"].tolist()[0] == [11, 12, PAD]
    reloaded = QMLLM.assemble(_named_config(quantized), state, model.llm, clip)
    assert torch.equal(reloaded.name_head.token_ids, model.name_head.token_ids)


def test_a_name_head_needs_its_vocabulary_and_the_patch_count():
    with pytest.raises(ValueError, match="name_vocabulary"):
        QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, name_slots=2, name_slot_width=3)
    with pytest.raises(ValueError, match="num_patches"):
        QMLLMConfig(vision_width=16, llm_width=24, image_token_id=2, name_slots=2, name_slot_width=3,
                    name_vocabulary=["a"])


def _stage1_data(rows: int = 64):
    generator = torch.Generator().manual_seed(1)
    cls_features = torch.randn(rows, 8, generator=generator)
    patches = torch.randn(rows, 16, 16, generator=generator)
    examples = [([3, 2, 5, 6], [-100, -100, 5, 6], row) for row in range(rows)]
    return cls_features, patches, examples


def test_stage1_without_the_name_tokens_is_the_papers_bit_for_bit():
    """`pretrain.name_head.in_stage1: false`: the projector and patch codebook train exactly as a model without
    a name head; with the name tokens in the captions' context they train otherwise."""
    from qmllm_pipeline.models.stage1 import Stage1Data, Stage1Settings, train_stage1

    cls_features, patches, examples = _stage1_data()
    data = Stage1Data(cls_features, patches, examples, head_cls=cls_features)
    training = TrainingConfig(steps=4, batch_size=8, lr=1e-3)
    plain = {f: v for f, v in _named_config(True).to_dict().items() if not f.startswith("name_")}
    trained = {}
    for label, config, names in (("paper", QMLLMConfig(**plain), False),
                                 ("names beside", _named_config(True), False),
                                 ("names read", _named_config(True), True)):
        torch.manual_seed(0)
        model = QMLLM(config, _llm())
        if model.name_head is not None:
            model.name_head.set_vocabulary(SPELLED, PAD)
        train_stage1(model, data, Stage1Settings(training, usage_every=2), 0, names=names)
        trained[label] = {k: v for k, v in model.stage1_state().items() if k.startswith(("mm_projector", "patch_"))}
    assert all(torch.equal(trained["paper"][k], v) for k, v in trained["names beside"].items())
    assert not all(torch.equal(trained["paper"][k], v) for k, v in trained["names read"].items())


def test_naming_scores_count_exact_names_by_group_and_the_heads_picks():
    import pandas as pd

    from qmllm_pipeline.pipelines.finetune.nodes import naming_scores

    catalogue = pd.DataFrame({"name": ["pistol", "cat", "apple"], "group": ["weapon", "animal", "food"]})
    items = pd.DataFrame({"objects": [["pistol"], ["cat"], ["cat"], ["apple"]], "toxic": [True, False, False, False]})
    answers = ["A pistol.", "a dog", "a cat", "an apple"]
    scores = naming_scores(answers, items, catalogue, head_picks=["pistol", "cat", "cat", "cat"])
    assert scores["all"] == 0.75 and scores["toxic"] == 1.0 and scores["neutral"] == pytest.approx(2 / 3)
    assert scores["by_group"] == {"animal": 0.5, "food": 1.0, "weapon": 1.0}
    assert scores["confusions"] == [{"truth": "a cat", "said": "a dog", "count": 1}]
    assert scores["head"] == 0.75                  # the head named the apple a cat
    assert scores["answer_is_head_pick"] == 0.5    # the LLM said what the head picked twice ("a pistol", "a cat")
    assert scores["intervals"]["all"]["n"] == 4 and "head" not in naming_scores(answers, items, catalogue)


def test_slot_targets_name_the_background_last_when_asked():
    targets = slot_targets([[30], [20, 10]], vocabulary=[10, 20, 30], slots=2, backgrounds=["red", "blue"],
                           background_names=["blue", "red"])
    assert targets.tolist() == [[2, 5, 4], [1, 0, 3]]   # names 0-2, colours 3-4, the empty pick 5


SEARCHED = [([3, 2, 5, 9, 4], [-100, -100, -100, 9, 4]), ([3, 2, 6, 8, 4], [-100, -100, -100, 8, 4])]


def _stage2_data():
    from qmllm_pipeline.models.stage2 import Stage2Data

    generator = torch.Generator().manual_seed(2)
    cls_features, patches = torch.randn(3, 16, generator=generator), torch.randn(3, 16, 16, generator=generator)
    name_features = torch.randn(3, 8, generator=generator)
    dialogs = [([3, 2, 5, 7], [-100, -100, -100, 7], row) for row in range(3)]
    replay = [([3, 9, 4], [-100, 9, 4], -1), ([3, 2, 6, 8, 4], [-100, -100, -100, 8, 4], 1)]
    return Stage2Data(cls_features, patches, dialogs + replay, head_cls=name_features, search_sequences=SEARCHED)


def test_the_stage2_search_finds_sequences_in_range_that_score_no_worse_than_their_starts():
    """One round of the stage-2 code search: a sequence per drawn instruction joins the pool, every position a
    valid code (patch codes in [0, P), name picks in [0, E)), each found sequence's target loss at most its
    start's, and the loop's own random stream is not touched."""
    from qmllm_pipeline.models.code_search import CodeObjective, search_each
    from qmllm_pipeline.models.stage2 import SearchAugmentation, SearchAugmentSettings

    torch.manual_seed(0)
    model = QMLLM(_named_config(True), _llm()).eval()
    model.name_head.set_vocabulary(SPELLED, PAD)
    data = _stage2_data()
    cls_features, patches, name_features = data.cls, data.patches, data.head_cls
    augmentation = SearchAugmentation(model, data, SearchAugmentSettings(1.0, (1, 2), instructions=2, candidates=4),
                                      (1, 2), seed=0)
    pool = augmentation.pool
    state = torch.random.get_rng_state()
    augmentation.search(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert int(pool.size[0]) == 2 and not pool.codes[2:].any()
    found = pool.codes[:2]
    assert ((found[:, :16] >= 0) & (found[:, :16] < 32)).all() and ((found[:, 16:] >= 0) & (found[:, 16:] < 4)).all()
    objective = CodeObjective.over_codes(model, SEARCHED, 16)
    with torch.no_grad():
        encoding = model.encode_features(cls_features[:2], patches[:2], with_cls=False, name_features=name_features[:2])
    starts = torch.cat([encoding.patches.indices, encoding.name_picks], 1)
    best, history = search_each(objective, starts, candidates=4)
    assert (torch.tensor(history["best_loss"]) <= torch.tensor(history["start_loss"])).all()
    assert (torch.tensor(history["best_loss"]) < torch.tensor(history["start_loss"])).any()
    with torch.no_grad():
        assert torch.allclose(objective(best, [0, 1]), torch.tensor(history["best_loss"]), atol=1e-5)


@pytest.mark.parametrize("quantized", [True, False])
def test_search_augmentation_gives_replayed_image_instructions_the_found_codes(quantized):
    """The first stage-2 step with the search at step 1 and fraction 1: a replayed instruction behind an image
    reads a found sequence (patch tokens and name slots moved, both whole codebook rows / vocabulary entries),
    dialogs and text-only replay are left as they are; at fraction 0 nothing is drawn or searched (the run is
    the one without the setting, bit for bit); the baseline ignores it; bad settings are refused."""
    from qmllm_pipeline.models.stage2 import SearchAugmentSettings, Stage2Settings, train_stage2

    data = _stage2_data()
    training = TrainingConfig(steps=1, batch_size=32, lr=1e-3, warmup_steps=1, grad_clip=1.0)

    def SearchAugment(fraction, rounds, instructions, candidates=16):   # noqa: N802 (the settings, as before)
        return SearchAugmentSettings(fraction, rounds, instructions, candidates)

    def first_inputs(setting):
        torch.manual_seed(0)
        model = QMLLM(_named_config(quantized), _llm())
        model.name_head.set_vocabulary(SPELLED, PAD)
        seen = []
        model.llm.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["inputs_embeds"].detach()),
                                            with_kwargs=True)
        table = model.llm.get_input_embeddings()(model.name_head.token_ids).detach()   # (4 entries, 3, d_h)
        train_stage2(model, data, Stage2Settings(training, search_augment=setting or SearchAugmentSettings()), 0)
        return seen[0], model, table

    plain, model, table = first_inputs(None)
    off, _, _ = first_inputs(SearchAugment(0.0, (1,), instructions=2, candidates=4))
    assert torch.equal(plain, off)
    searched, _, _ = first_inputs(SearchAugment(1.0, (1,), instructions=2, candidates=4))
    embed = model.llm.get_input_embeddings().weight.detach()
    replayed = torch.isclose(plain[:, 1 + 22], embed[6]).all(1)   # the token after the 22 image tokens
    assert replayed.any() and (~replayed).any()
    moved = ~torch.isclose(plain, searched).all(-1)
    assert not moved[~replayed].any()
    if not quantized:
        assert not moved.any()
        return
    assert moved[replayed][:, 1:23].any() and not moved[replayed][:, 23:].any()
    codebook = model.patch_quantizer.codebook.detach()
    image = searched[replayed][:, 1:23]                            # 16 patch tokens and 2 slots x 3 name tokens
    for token in model.patch_tokens_of(image, 6).flatten(0, 1):
        assert torch.isclose(codebook, token).all(1).any()
    for slot in model.name_tokens_of(image, 16).reshape(-1, 3, 24):
        assert any(torch.allclose(slot, entry) for entry in table)
    later, _, _ = first_inputs(SearchAugment(1.0, (2,), instructions=2))   # past the last step: no search
    assert torch.equal(plain, later)
    with pytest.raises(ValueError, match="rounds"):
        first_inputs(SearchAugment(1.0, (0,), instructions=2))
    with pytest.raises(ValueError, match="fraction"):
        first_inputs(SearchAugment(-0.5, (1,), instructions=2))


def test_a_run_with_search_augmentation_resumes_with_its_pool(tmp_path):
    """Killed after the checkpoint at step 2 and started again, a run whose searches ran at steps 1 and 3 ends
    with the weights of an uninterrupted one: the pool found at step 1 and the step count travel in the
    checkpoint (a run that lost them would search at other steps, or replay another pool)."""
    from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
    from qmllm_pipeline.models.stage2 import SearchAugmentSettings, Stage2Settings, train_stage2

    data = _stage2_data()
    training = TrainingConfig(steps=4, batch_size=16, lr=1e-2, warmup_steps=1, grad_clip=1.0, checkpoint_every=2)
    settings = Stage2Settings(training, search_augment=SearchAugmentSettings(0.7, (1, 3), instructions=1,
                                                                             candidates=4))

    def run(checkpoint, stop_at=None):
        torch.manual_seed(0)
        model = QMLLM(_named_config(True), _llm())
        model.name_head.set_vocabulary(SPELLED, PAD)
        calls = []

        def stop(*_):
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt

        model.llm.register_forward_pre_hook(stop)
        model, _ = train_stage2(model, data, settings, 0, checkpoint=checkpoint)
        return model.llm.state_dict()

    reference = run(None)
    checkpoint = TrainingCheckpoint(tmp_path / "ckpt", {"test": 1})
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, stop_at=4)
    assert checkpoint.load()["step"] == 2
    assert int(checkpoint.load()["module_states"]["found_codes"]["size"][0]) == 1
    resumed = run(checkpoint)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
