"""The jailbreak attack on the smoke models: PGD stays in its budget, the deployed Q-MLLM gives it no
gradient, straight-through (BPDA) does, and on the continuous baseline PGD lowers the target loss; the
per-instruction attack crafts each image by its own instruction's loss alone."""

import pandas as pd
import pytest
import torch

from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.attack import (
    JailbreakObjective,
    PerInstructionObjective,
    attack_term,
    first_target_tokens,
    per_instruction_pgd,
    refusal_logprob,
    refusal_start_ids,
    sequence_nll,
    step_sizes,
    target_logits,
    target_margin,
    target_sequences,
    universal_pgd,
)
from qmllm_pipeline.models.clip import normalise_pixels


def _objective(system, text_corpus: pd.DataFrame, straight_through: bool) -> JailbreakObjective:
    harmful = text_corpus[(text_corpus["kind"] == "harmful") & (text_corpus["split"] == "train")].head(4)
    sequences = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, None)
    # the whole set every step: the loss is then a deterministic function of the image
    return JailbreakObjective(system.model, system.processor, sequences, len(sequences), straight_through)


@pytest.fixture(scope="module")
def start(evaluation) -> torch.Tensor:
    return evaluation["jailbreak_start"]["image"].float() / 255


def test_the_deployed_qmllm_gives_pgd_no_gradient(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["qmllm"], world["text_corpus"], straight_through=False)
    image, history = universal_pgd(objective, start, eps=16 / 255, steps=3, desc=None)
    assert history["grad_abs_mean"] == [0.0]  # measured once: with no gradient PGD stops
    assert torch.equal(image, start)  # the argmin blocks every step: the image never moves


def test_straight_through_reaches_the_pixels_and_pgd_keeps_its_budget(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["qmllm"], world["text_corpus"], straight_through=True)
    image, history = universal_pgd(objective, start, eps=4 / 255, steps=6, desc=None)
    assert min(history["grad_abs_mean"]) > 0
    assert (image - start).abs().max() <= 4 / 255 + 1e-6
    assert torch.equal(image, (image * 255).round() / 255) and 0 <= image.min() and image.max() <= 1


def test_white_box_pgd_lowers_the_target_loss_of_the_baseline(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], straight_through=False)
    generator = torch.Generator().manual_seed(0)
    image, history = universal_pgd(objective, start, eps=32 / 255, steps=20, desc=None)
    with torch.no_grad():
        assert float(objective(image[None], generator)) < history["loss"][0]


def test_unconstrained_pgd_starts_from_noise(evaluation, world, start):
    objective = _objective(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], straight_through=False)
    image, _ = universal_pgd(objective, start, eps=None, steps=1, desc=None)
    assert (image - start).abs().max() > 0.5


def test_the_loss_can_be_kept_on_the_affirmative_opening_only():
    ids, labels = [1, 2, 3, 4, 5, 6], [-100, -100, 13, 14, 15, 16]
    assert first_target_tokens(ids, labels, None) == (ids, labels)
    assert first_target_tokens(ids, labels, 2) == (ids[:4], [-100, -100, 13, 14])  # nothing after them matters


def test_an_attacker_config_that_cannot_work_is_refused(evaluation, smoke_params):
    import dataclasses

    from qmllm_pipeline.models.params import parse
    from qmllm_pipeline.pipelines.evaluate import attackers
    from qmllm_pipeline.pipelines.evaluate.settings import Budget, EvaluateSettings

    settings = parse(EvaluateSettings, smoke_params["evaluate"], "evaluate")
    common = (evaluation["evaluation_systems"], evaluation["jailbreak_instructions"], evaluation["jailbreak_start"],
              settings, Budget("eps16", 16), 0)
    whitebox = dataclasses.replace(settings.attackers["baseline_whitebox"], cls_weight=1.0)
    with pytest.raises(ValueError, match="needs a system with a safety map"):
        attackers.craft("baseline_whitebox", whitebox, *common)
    with pytest.raises(ValueError, match="unknown system"):
        attackers.craft("qmllm_plain", dataclasses.replace(settings.attackers["qmllm_plain"], system="llava"), *common)
    with pytest.raises(ValueError, match="unknown kind 'gcg'"):
        attackers.craft("qmllm_plain", dataclasses.replace(settings.attackers["qmllm_plain"], kind="gcg"), *common)


def _per_instruction(system, text_corpus: pd.DataFrame, n: int = 4, **switches) -> PerInstructionObjective:
    harmful = text_corpus[(text_corpus["kind"] == "harmful") & (text_corpus["split"] == "heldout")].head(n)
    sequences = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, 5)
    return PerInstructionObjective(system.model, system.processor, sequences, **switches)


def test_cutting_the_sequence_after_the_target_opening_leaves_its_loss_as_it_was(evaluation, world, start):
    system = evaluation["evaluation_systems"]["baseline"]
    harmful = world["text_corpus"][world["text_corpus"]["kind"] == "harmful"].head(3)
    full = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, None)
    cut = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, 5)
    with torch.no_grad():
        tokens = system.model.encode_images(normalise_pixels(start[None], system.processor)).image_tokens
        for (ids, labels), (short, short_labels) in zip(full, cut, strict=True):
            assert len(short) < len(ids) and short == ids[:len(short)]
            opening = first_target_tokens(ids, labels, 5)[1] + [-100] * (len(ids) - len(short))
            assert float(system.model([short], [short_labels], tokens).loss) == pytest.approx(
                float(system.model([ids], [opening], tokens).loss), rel=1e-5)


def test_each_sequence_loss_is_its_own_and_matches_the_llm_loss(evaluation, world, start):
    system = evaluation["evaluation_systems"]["baseline"]
    objective = _per_instruction(system, world["text_corpus"], n=3)
    images = start.expand(3, -1, -1, -1).clone()
    with torch.no_grad():
        loss, nll = objective(images, [0, 1, 2])
        alone = system.model.encode_images(normalise_pixels(images[:1], system.processor)).image_tokens
        for row, (ids, labels) in enumerate(objective.sequences):  # batched and padded = each sequence alone
            assert float(nll[row]) == pytest.approx(float(system.model([ids], [labels], alone).loss), rel=1e-4)
        images[0] = torch.rand_like(images[0])  # another instruction's image: this row's loss does not move
        moved, _ = objective(images, [0, 1, 2])
    assert torch.equal(loss, nll)  # no CLS term without an anchor
    assert float(moved[0]) != float(loss[0])
    assert torch.allclose(moved[1:], loss[1:], atol=1e-5)


def test_per_instruction_pgd_keeps_its_budget_and_lowers_each_instructions_loss(evaluation, world, start):
    objective = _per_instruction(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], n=4)
    images, history = per_instruction_pgd(objective, start, eps=16 / 255, steps=8, step_size=2, schedule="linear",
                                          batch_size=3, momentum=0.9, desc=None)  # two batches: 3 + 1
    assert images.shape == (4, *start.shape)
    assert (images - start).abs().max() <= 16 / 255 + 1e-6
    assert torch.equal(images, (images * 255).round() / 255) and 0 <= images.min() and images.max() <= 1
    with torch.no_grad():
        reached, _ = objective(images, [0, 1, 2, 3])
    assert (reached < torch.tensor(history["start_loss"])).all()  # every instruction's own loss went down
    assert torch.allclose(reached, torch.tensor(history["best_loss"]), atol=1e-4)  # the kept image is the best one
    assert len(history["loss"]) == 9


def test_per_instruction_restarts_never_lose_the_best_image(evaluation, world, start):
    objective = _per_instruction(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], n=2)
    _, one = per_instruction_pgd(objective, start, eps=8 / 255, steps=3, step_size=1, desc=None)
    _, three = per_instruction_pgd(objective, start, eps=8 / 255, steps=3, step_size=1, restarts=3, desc=None)
    assert all(b <= a + 1e-6 for a, b in zip(one["best_loss"], three["best_loss"], strict=True))


def test_per_instruction_success_test_keeps_won_images_and_only_attacks_the_rest(evaluation, world, start):
    objective = _per_instruction(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], n=4)
    plain, plain_history = per_instruction_pgd(objective, start, eps=16 / 255, steps=4, step_size=2, batch_size=3,
                                               desc=None)
    never, never_history = per_instruction_pgd(objective, start, eps=16 / 255, steps=4, step_size=2, batch_size=3,
                                               succeeded=lambda x, rows: torch.zeros(len(rows), dtype=torch.bool),
                                               check_every=1, desc=None)
    assert torch.equal(plain, never) and plain_history["best_loss"] == never_history["best_loss"]  # checks only look
    assert never_history["won_step"] == [-1] * 4
    asked = []

    def succeeded(images, rows):  # row 1 already succeeds at the start, row 2 after two steps
        asked.append(list(rows))
        return torch.tensor([r == 1 or (r == 2 and len(asked) >= 2) for r in rows])

    images, history = per_instruction_pgd(objective, start, eps=16 / 255, steps=4, step_size=2, batch_size=3,
                                          succeeded=succeeded, check_every=2, desc=None)
    assert asked[:3] == [[0, 1, 2], [0, 2], [0]]  # steps 0, 2, 4 of the first batch, won rows left out
    assert history["won_step"][:3] == [-1, 0, 2]
    assert torch.equal(images[1], (start * 255).round() / 255)  # a success at the start keeps the clean image
    assert torch.equal(images[0], plain[0])  # the rows still lost descend as without the test
    assert (images[2] - start).abs().max() <= 16 / 255 + 1e-6


def test_the_step_schedule_stays_on_the_grid():
    assert step_sizes(4, 3, "constant") == [3, 3, 3, 3]
    assert step_sizes(4, 4, "linear") == [4, 3, 2, 1]
    assert min(step_sizes(100, 4, "linear")) == 1
    with pytest.raises(ValueError, match="step schedule"):
        step_sizes(4, 4, "cosine")


def test_target_logits_are_the_models_own_at_the_target_positions(evaluation, world, start):
    system = evaluation["evaluation_systems"]["qmllm"]
    model = system.model
    harmful = world["text_corpus"][world["text_corpus"]["kind"] == "harmful"].head(4)
    # unequal lengths (the batch is padded) and unequal target counts (one row keeps 2 targets, the rest 5)
    sequences = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, 5)
    short = target_sequences(system.tokenizer, list(harmful["instruction"])[:1], list(harmful["target"])[:1], 96, 2)
    sequences = short + sequences[1:]
    ids, labels = map(list, zip(*sequences, strict=True))
    assert len({len(row) for row in ids}) > 1
    with torch.no_grad():
        tokens = model.encode_images(normalise_pixels(start.expand(4, -1, -1, -1), system.processor)).image_tokens
        logits, targets = target_logits(model, ids, labels, tokens)
        assert targets.shape == (4, 5) and (targets[0, 2:] == -100).all() and (targets[1:] != -100).all()
        nll = sequence_nll(model, ids, labels, tokens)
        for row in range(4):
            batch = model.splice([ids[row]], [labels[row]], tokens[row:row + 1])
            out = model.llm(inputs_embeds=batch["inputs_embeds"], labels=batch["labels"])
            shifted = batch["labels"][0, 1:]
            at = (shifted != -100).nonzero().flatten()
            kept = targets[row] != -100
            torch.testing.assert_close(logits[row, kept], out.logits[0, :-1][at].float(), atol=1e-4, rtol=1e-4)
            assert torch.equal(targets[row, kept], shifted[at])
            assert float(nll[row]) == pytest.approx(float(out.loss), abs=1e-5)
        # the universal attack's batch loss: the token mean, as the LLM's own loss over the padded batch
        batch_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)
        assert float(batch_loss) == pytest.approx(float(model(ids, labels, tokens).loss), abs=1e-5)


def test_the_refusal_objective_is_the_log_probability_of_opening_with_a_refusal(evaluation, world, start):
    system = evaluation["evaluation_systems"]["baseline"]
    # the shipped refusals open with "I" ("I cannot ...", "I'm sorry ..."): that token is among the starts
    starts = refusal_start_ids(system.tokenizer, RefusalPhraseJudge().phrases)
    assert system.tokenizer.convert_tokens_to_ids("I") in starts and len(starts) == len(set(starts))
    harmful = world["text_corpus"][(world["text_corpus"]["kind"] == "harmful")].head(3)
    sequences = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, 1)
    images = start.expand(3, -1, -1, -1)
    first = [next(label for label in labels if label != -100) for _, labels in sequences]
    with torch.no_grad():
        tokens = system.model.encode_images(normalise_pixels(images, system.processor)).image_tokens
        ids, labels = map(list, zip(*sequences, strict=True))
        # with the target's own first token as the one "refusal" token it is -nll of that token, row by row
        for row in range(3):
            own = refusal_logprob(system.model, ids, labels, tokens, [first[row]])[row]
            assert float(own) == pytest.approx(-float(sequence_nll(system.model, ids, labels, tokens)[row]), abs=1e-5)
        # several tokens: their probabilities add up (log-sum-exp), so it is never below any one of them
        both = refusal_logprob(system.model, ids, labels, tokens, starts)
        alone = torch.stack([refusal_logprob(system.model, ids, labels, tokens, [s]) for s in starts])
        torch.testing.assert_close(both, alone.logsumexp(0))
    objective = PerInstructionObjective(system.model, system.processor, sequences, refusal_ids=starts)
    crafted, history = per_instruction_pgd(objective, start, eps=16 / 255, steps=4, step_size=2, desc=None)
    assert all(b <= a + 1e-6 for a, b in zip(history["start_loss"], history["best_loss"], strict=True))
    assert (crafted - start).abs().max() <= 16 / 255 + 1e-6


def _greedy_sequence(model, ids: list[int], labels: list[int], tokens: torch.Tensor) -> tuple[list[int], list[int]]:
    """The sequence with its target tokens replaced by what greedy decoding says there, one token at a time."""
    ids = list(ids)
    positions = [at for at, label in enumerate(labels) if label != -100]
    for at in positions:
        with torch.no_grad():
            batch = model.splice([ids[:at]], None, tokens)
            ids[at] = int(model.llm(inputs_embeds=batch["inputs_embeds"]).logits[0, -1].argmax())
    return ids, [token if at in positions else -100 for at, token in enumerate(ids)]


def test_the_target_margin_is_won_exactly_where_greedy_decoding_opens_with_the_target(evaluation, world, start):
    system = evaluation["evaluation_systems"]["baseline"]
    model = system.model
    harmful = world["text_corpus"][world["text_corpus"]["kind"] == "harmful"].head(3)
    shipped = target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, 3)
    with torch.no_grad():
        tokens = model.encode_images(normalise_pixels(start[None], system.processor)).image_tokens
        greedy = [_greedy_sequence(model, ids, labels, tokens) for ids, labels in shipped]
        # the first target token swapped for another: greedy decoding no longer opens with this target
        lost = []
        for ids, labels in greedy:
            first = next(at for at, label in enumerate(labels) if label != -100)
            other = (ids[first] + 1) % model.llm.config.vocab_size
            lost.append((ids[:first] + [other] + ids[first + 1:], labels[:first] + [other] + labels[first + 1:]))
        rows = greedy + lost
        ids, labels = map(list, zip(*rows, strict=True))
        images = tokens.expand(len(rows), -1, -1)
        won = target_margin(model, ids, labels, images, kappa=0.0)
        assert torch.equal(won[:3], torch.zeros(3)) and (won[3:] > 0).all()
        # kappa large: the plain mean margin, checked one sequence and one position at a time
        for row, (row_ids, row_labels) in enumerate(rows):
            batch = model.splice([row_ids], [row_labels], tokens)
            logits = model.llm(inputs_embeds=batch["inputs_embeds"]).logits[0, :-1]
            margins = [float(torch.cat([logits[t, :y], logits[t, y + 1:]]).max() - logits[t, y])
                       for t, y in enumerate(batch["labels"][0, 1:].tolist()) if y != -100]
            assert float(target_margin(model, ids, labels, images, kappa=1e9)[row]) == pytest.approx(
                sum(margins) / len(margins), abs=1e-4)
        # kappa caps what a won position contributes: the greedy rows sit at -kappa or above
        assert (target_margin(model, ids, labels, images, kappa=0.5)[:3] >= -0.5 - 1e-6).all()
    with pytest.raises(ValueError, match="not both"):
        attack_term(model, ids, labels, images, refusal_ids=[1], kappa=1.0)


def test_the_margin_objective_is_descended_within_the_budget(evaluation, world, start):
    objective = _per_instruction(evaluation["evaluation_systems"]["baseline"], world["text_corpus"], n=3, kappa=2.0)
    crafted, history = per_instruction_pgd(objective, start, eps=16 / 255, steps=4, step_size=2, desc=None)
    assert all(b <= a + 1e-6 for a, b in zip(history["start_loss"], history["best_loss"], strict=True))
    assert min(b - a for a, b in zip(history["start_loss"], history["best_loss"], strict=True)) < 0
    assert (crafted - start).abs().max() <= 16 / 255 + 1e-6
    assert torch.equal(crafted, (crafted * 255).round() / 255)
