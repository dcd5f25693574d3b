"""The code-space search on the smoke Q-MLLM (which has a name head): it scores code sequences (patch codes,
then name picks) as the deployed model reads an image, never proposes a code outside the codebook or a pick
outside the name vocabulary, and its best sequence is never worse than the clean image's."""

import pandas as pd
import pytest
import torch

from qmllm_pipeline.models.attack import PerInstructionObjective, target_sequences
from qmllm_pipeline.models.clip import pixel_values
from qmllm_pipeline.models.code_search import CodeObjective, code_space_search


def _sequences(system, text_corpus: pd.DataFrame, n: int):
    harmful = text_corpus[(text_corpus["kind"] == "harmful") & (text_corpus["split"] == "heldout")].head(n)
    return target_sequences(system.tokenizer, list(harmful["instruction"]), list(harmful["target"]), 96, 5)


class RecordingObjective(CodeObjective):
    """The real objective, keeping every code sequence it was asked to score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def __call__(self, codes, rows, tokens=None):
        self.seen.append(codes.clone())
        return super().__call__(codes, rows, tokens)


@pytest.fixture(scope="module")
def qmllm_start(evaluation):
    system = evaluation["evaluation_systems"]["qmllm"]
    image = evaluation["jailbreak_start"]["image"]
    with torch.no_grad():
        encoding = system.model.encode_images(pixel_values(image[None], system.processor))
    return system, image, encoding


def _objective(start, sequences, recording: bool = False, search_names: bool = True):
    system, _, encoding = start
    objective, codes = (RecordingObjective if recording else CodeObjective).from_encoding(
        system.model, sequences, encoding, search_names=search_names)
    return objective, codes


def _in_range(objective: CodeObjective, codes: torch.Tensor) -> bool:
    return bool(((codes >= 0) & (codes < objective.sizes(codes.shape[-1]))).all())


@pytest.mark.parametrize("search_names", [True, False])
def test_codes_are_scored_as_the_deployed_model_reads_the_image(qmllm_start, world, search_names):
    system, image, encoding = qmllm_start
    sequences = _sequences(system, world["text_corpus"], 3)
    objective, codes = _objective(qmllm_start, sequences, search_names=search_names)
    patches, slots = len(encoding.patches.indices[0]), encoding.name_picks.shape[1]
    assert codes.tolist() == (encoding.patches.indices[0].tolist()
                              + (encoding.name_picks[0].tolist() if search_names else []))
    assert len(codes) == patches + slots * search_names
    with torch.no_grad():
        from_codes = objective(codes.expand(3, -1), [0, 1, 2])
        from_image = PerInstructionObjective(system.model, system.processor, sequences)(
            (image.float() / 255).expand(3, -1, -1, -1), [0, 1, 2])[1]
        torch.testing.assert_close(objective.image_tokens(codes[None]), encoding.image_tokens)
    torch.testing.assert_close(from_codes, from_image)
    if search_names:  # a flipped name is read as that entry's tokens, in its slot
        flipped = codes.clone()
        flipped[patches] = (flipped[patches] + 1) % len(objective.name_table)
        width = system.model.name_head.slot_width
        names = system.model.name_tokens_of(objective.image_tokens(flipped[None]), patches)[0]
        torch.testing.assert_close(names[:width], objective.name_table[flipped[patches]])
        torch.testing.assert_close(names[width:], encoding.image_tokens[0, width:slots * width]
                                   if system.model.config.name_position == "before"
                                   else encoding.image_tokens[0, patches + width:])


@pytest.mark.parametrize("candidates, beam_width", [(None, 1), (4, 2)])
def test_the_search_stays_in_the_codebook_and_never_loses_to_the_clean_codes(qmllm_start, world, candidates,
                                                                            beam_width):
    system, _, encoding = qmllm_start
    objective, codes = _objective(qmllm_start, _sequences(system, world["text_corpus"], 2), recording=True)
    found, history = code_space_search(objective, codes, sweeps=2, beam_width=beam_width, candidates=candidates,
                                       batch_size=64, desc=None)
    num_codes, patches = system.model.patch_quantizer.num_codes, len(encoding.patches.indices[0])
    proposed = torch.cat(objective.seen)
    assert proposed.dtype == torch.long and _in_range(objective, proposed) and _in_range(objective, found)
    assert found.shape == (2, len(codes)) and len(codes) > patches   # the name picks are searched too
    scorer, _ = _objective(qmllm_start, objective.sequences)
    with torch.no_grad():
        rescored = scorer(found, [0, 1])
        clean = scorer(codes.expand(2, -1), [0, 1])
    assert (rescored <= clean + 1e-5).all()
    torch.testing.assert_close(rescored, torch.tensor(history["best_loss"]), atol=1e-5, rtol=0)
    assert all(b <= s for b, s in zip(history["best_loss"], history["start_loss"], strict=True))
    # the positions it reports changed are the ones that differ from the clean codes
    assert history["positions_changed"] == (found != codes).sum(1).float().tolist()
    if candidates is None:  # exhaustive: every code was tried at some position, every entry at some name slot
        assert set(proposed[:, :patches].flatten().tolist()) == set(range(num_codes))
        assert set(proposed[:, patches:].flatten().tolist()) == set(range(len(objective.name_table)))


def test_exhaustive_coordinate_search_beats_every_single_change_at_its_first_position(qmllm_start, world):
    system = qmllm_start[0]
    objective, codes = _objective(qmllm_start, _sequences(system, world["text_corpus"], 1))
    # with one position to move, an exhaustive search is the exact optimum over that position's P codes
    first = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))[0]
    found, history = code_space_search(objective, codes, sweeps=1, candidates=None, batch_size=64, desc=None)
    swaps = codes.expand(int(objective.sizes(len(codes))[first]), -1).clone()
    swaps[:, first] = torch.arange(len(swaps))
    with torch.no_grad():
        best_single = float(objective(swaps, [0] * len(swaps)).min())
    assert history["best_loss"][0] <= best_single + 1e-5


def test_a_start_better_than_the_clean_codes_is_where_the_search_begins(qmllm_start, world):
    system = qmllm_start[0]
    objective, codes = _objective(qmllm_start, _sequences(system, world["text_corpus"], 2))
    sizes = objective.sizes(len(codes))
    generator = torch.Generator().manual_seed(1)
    # candidate starts per instruction: random code sequences; the best of them (if it beats the clean codes)
    # must be where the beam begins, and the search must end no worse than it
    starts = [(torch.rand(6, len(codes), generator=generator) * sizes).long() for _ in range(2)]
    found, history = code_space_search(objective, codes, sweeps=1, candidates=4, batch_size=64, desc=None,
                                       starts=starts)
    with torch.no_grad():
        for row in range(2):
            losses = objective(torch.cat([codes[None], starts[row]]), [row] * 7)
            best = int(losses.argmin())
            assert history["started_from"][row] == best
            assert history["beam_start_loss"][row] == pytest.approx(float(losses.min()), abs=1e-5)
            assert history["start_loss"][row] == pytest.approx(float(losses[0]), abs=1e-5)
            assert history["best_loss"][row] <= float(losses.min()) + 1e-5
            assert float(objective(found[row:row + 1], [row])[0]) == pytest.approx(history["best_loss"][row], abs=1e-5)
    assert _in_range(objective, found)
    with pytest.raises(ValueError, match="1 start sets for 2 sequences"):
        code_space_search(objective, codes, desc=None, starts=starts[:1])


def test_the_bound_is_judged_and_compared_with_the_image_attacks(evaluation, smoke_params):
    metrics = evaluation["evaluation_metrics"]
    bound = metrics["code_space_bound"]
    assert bound["instructions"] == smoke_params["evaluate"]["code_search"]["instructions"]
    assert 0.0 <= bound["asr"] <= 1.0 and bound["loss_last"] <= bound["loss_start"] + 1e-6
    assert bound["loss_start"] <= bound["loss_first"] + 1e-6 and bound["start_from_attacks"]
    assert bound["asr_with_clean"] >= max(bound["asr"], bound["asr_clean_codes"])
    assert bound["asr_bound"] >= max(bound["asr_with_clean"], bound["asr_images"])
    assert "codes" not in bound and isinstance(bound["gain_over_clean"]["significant"], bool)
    # every qmllm case of every budget was a start, and its positions matched are reported
    assert bound["image_cases"] == 7 * len(metrics["jailbreak"])
    for budget in metrics["jailbreak"]:
        for case in ("qmllm_adaptive", "qmllm_adaptive_per_instruction", "qmllm_noise"):
            assert 0.0 <= bound["positions_matched"][budget][case] <= 1.0
        assert "baseline_whitebox" not in bound["positions_matched"][budget]
    answers = evaluation["code_space_bound_answers"]
    assert len(answers) == bound["instructions"] and answers["complied"].mean() == pytest.approx(bound["asr"])
    assert (answers["complied"] | answers["clean_complied"]).mean() == pytest.approx(bound["asr_with_clean"])
    assert answers["image_complied"].mean() == pytest.approx(bound["asr_images"])
    # an instruction some judged qmllm image jailbroke counts in the union; one none did does not
    details = [evaluation[f"jailbreak_{b}.jailbreak_results"]["instruction_detail"] for b in metrics["jailbreak"]]
    n = len(answers)
    expected = [any(d[case]["complied"][i] for d in details for case in d) for i in range(n)]
    assert answers["image_complied"].tolist() == expected
    assert all(len(d[case]["patch_codes"]) == len(d[case]["name_picks"]) == len(d[case]["complied"]) >= n
               for d in details for case in d)
    # the smoke model has a name head: its picks were searched, after the patch codes
    assert bound["names_searched"] and bound["positions"] == bound["patch_positions"] + bound["name_positions"]
    assert 0 <= bound["name_picks_changed"] <= bound["name_positions"]
    assert len(answers["codes"].iloc[0]) == bound["positions"]
    assert "## Code-space bound on Q-MLLM" in evaluation["evaluation_report"]
