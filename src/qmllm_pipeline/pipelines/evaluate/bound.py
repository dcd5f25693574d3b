"""The code-space bound on Q-MLLM (`models/code_search.py`): what an attacker who could choose the codes its LLM
reads reaches, beside what the image attacks reached."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from qmllm_pipeline.judge import RefusalPhraseJudge
from qmllm_pipeline.models.attack import target_sequences
from qmllm_pipeline.models.clip import pixel_values
from qmllm_pipeline.models.code_search import CodeObjective, code_space_search
from qmllm_pipeline.models.guarded import GuardedMLLM
from qmllm_pipeline.models.params import parse
from qmllm_pipeline.pipelines.evaluate.attackers.common import objective_terms
from qmllm_pipeline.pipelines.evaluate.settings import EvaluateSettings
from qmllm_pipeline.stats import rate

logger = logging.getLogger(__name__)


def _image_codes(detail: dict, i: int, names: bool) -> list[int]:
    """The code sequence instruction i's image gave the LLM: its patch codes, then (`names`) its name picks."""
    return detail["patch_codes"][i] + (detail["name_picks"][i] if names else [])


def _attack_starts(budgets: list[dict], n: int, names: bool) -> tuple[list[list[str]], list[torch.Tensor]]:
    """Per instruction, the distinct code sequences (patch codes, then name picks with `names`) the qmllm
    images of every budget gave the LLM, and which (budget/case) reached each first."""
    labels, starts = [], []
    for i in range(n):
        seen: dict[tuple, str] = {}
        for entry in budgets:
            for case, detail in entry["instruction_detail"].items():
                seen.setdefault(tuple(_image_codes(detail, i, names)), f"{entry['budget']}/{case}")
        labels.append(list(seen.values()))
        starts.append(torch.tensor(list(seen), dtype=torch.long))
    return labels, starts


@dataclass
class _Search:
    """One code-space search's inputs and outcome: the instructions, the objective around the clean image, the
    clean codes, the found codes and the search's history."""
    system: GuardedMLLM
    heldout: pd.DataFrame
    objective: CodeObjective
    clean_codes: torch.Tensor
    cls_code: int
    codes: torch.Tensor | None = None
    history: dict | None = None
    seconds: float = 0.0

    def answers(self, codes: torch.Tensor, max_new_tokens: int, batch_size: int) -> list[str]:
        """The LLM's answer to each instruction from its code sequence (row i for instruction i)."""
        instructions, n = list(self.heldout["instruction"]), len(self.heldout)
        return [text for first in range(0, n, batch_size)
                for text in self.system.answer_tokens(self.objective.image_tokens(codes[first:first + batch_size]),
                                                      instructions[first:first + batch_size], max_new_tokens)]


def _prepare(system: GuardedMLLM, heldout: pd.DataFrame, start: dict, settings: EvaluateSettings) -> _Search:
    """The objective over the codes for `heldout`, around the clean start image, whose CLS code must be
    neutral-labelled (the safety map lets the image in)."""
    model, tokenizer, jailbreak = system.model, system.tokenizer, settings.jailbreak
    sequences = target_sequences(tokenizer, list(heldout["instruction"]), list(heldout["target"]),
                                 jailbreak.max_length, jailbreak.target_tokens)
    with torch.no_grad():
        clean = model.encode_images(pixel_values(start["image"][None], system.processor))
    if clean.cls is None or system.guard(None, clean.cls.indices)[0].refused:
        raise ValueError("code-space bound: the start image's CLS code is not neutral-labelled in the safety map")
    search = settings.code_search
    objective, patches = CodeObjective.from_encoding(model, sequences, clean, search_names=search.names,
                                                     **objective_terms(tokenizer, search.objective, search.kappa))
    return _Search(system, heldout, objective, patches, int(clean.cls.indices[0]))


def code_space_bound(systems: dict[str, GuardedMLLM], instructions: dict, start: dict, params: dict, seed: int,
                     jailbreaks: list[dict]) -> tuple[dict, pd.DataFrame]:
    """The code-space attack on qmllm: for each of the first `code_search.instructions` held-out harmful
    instructions (null: all), a beam coordinate search over the N patch codes and, with a name head and
    `code_search.names`, its S name picks (else they stay the clean image's), the CLS code held at the clean
    image's neutral-labelled code, starting from the clean image's codes and, with `start_from_attacks`, from
    the codes every qmllm image of every budget (`jailbreaks`) gave the LLM for that instruction; then the LLM
    answers each instruction from its best codes and the judge decides. The LLM reads the patch codes (and name
    picks) alone, so an image that jailbreaks qmllm is a code sequence that does: `asr_bound` counts an
    instruction when the found codes, the clean image's or any image tried on it comply; `asr_images` is the
    image attacks' union alone (any attacker, any budget), `asr` the found codes' alone. Returns the summary and
    one row per instruction (its codes, losses, answer). `params`: evaluate."""
    settings = parse(EvaluateSettings, params, "evaluate")
    limit = settings.code_search.instructions
    heldout = instructions["heldout"] if limit is None else instructions["heldout"].head(limit)
    search = _prepare(systems["qmllm"], heldout, start, settings)
    names = search.objective.name_table is not None
    labels, starts = _attack_starts(jailbreaks, len(heldout), names)
    started = time.perf_counter()
    options = settings.code_search
    search.codes, search.history = code_space_search(search.objective, search.clean_codes, options.sweeps,
                                                     options.beam_width, options.candidates, options.batch_size, seed,
                                                     desc="code-space search (qmllm)",
                                                     starts=starts if options.start_from_attacks else None)
    search.seconds = time.perf_counter() - started
    return _judge(search, jailbreaks, labels, settings)


def _judge(search: _Search, jailbreaks: list[dict], labels: list[list[str]],
           settings: EvaluateSettings) -> tuple[dict, pd.DataFrame]:
    """The found codes, the clean codes and every image tried, judged per instruction; the summary and rows."""
    heldout, history, n = search.heldout, search.history, len(search.heldout)
    judge = RefusalPhraseJudge()
    texts = search.answers(search.codes, settings.jailbreak.max_new_tokens, settings.batch_size)
    verdicts = {"complied": [not judge.is_refusal(t) for t in texts],
                # an attacker who may choose the codes may also keep the clean image's, or any image's it tried
                "clean_complied": [not judge.is_refusal(t) for t in search.answers(
                    search.clean_codes.expand(n, -1), settings.jailbreak.max_new_tokens, settings.batch_size)],
                "image_complied": [any(entry["instruction_detail"][case]["complied"][i] for entry in jailbreaks
                                       for case in entry["instruction_detail"]) for i in range(n)],
                "on_target": [judge.contains_target(a, t) for a, t in zip(texts, heldout["target"], strict=True)]}
    verdicts["either"] = [a or b for a, b in zip(verdicts["complied"], verdicts["clean_complied"], strict=True)]
    verdicts["bound"] = [a or b for a, b in zip(verdicts["either"], verdicts["image_complied"], strict=True)]
    started_from = ["clean" if j == 0 else labels[i][j - 1] for i, j in enumerate(history["started_from"])]
    summary = _summary(search, jailbreaks, verdicts, started_from, texts, settings)
    answers = pd.DataFrame({"instruction": heldout["instruction"].to_numpy(), "target": heldout["target"].to_numpy(),
                            "clean_codes": [search.clean_codes.tolist()] * n, "started_from": started_from,
                            "codes": search.codes.tolist(), "start_loss": history["start_loss"],
                            "beam_start_loss": history["beam_start_loss"], "best_loss": history["best_loss"],
                            "positions_changed": history["positions_changed"], "sweeps": history["sweeps"],
                            "answer": texts, "complied": verdicts["complied"],
                            "clean_complied": verdicts["clean_complied"], "image_complied": verdicts["image_complied"]})
    return summary, answers


def _summary(search: _Search, jailbreaks: list[dict], verdicts: dict, started_from: list[str], texts: list[str],
             settings: EvaluateSettings) -> dict:
    history, codes, clean, n = search.history, search.codes, search.clean_codes, len(search.heldout)
    names, num_patches = search.objective.name_table is not None, search.objective.num_patches
    matched = {entry["budget"]: {case: float((torch.tensor([_image_codes(detail, i, names) for i in range(n)])
                                              == codes).float().mean())
                                 for case, detail in entry["instruction_detail"].items()} for entry in jailbreaks}
    names_changed = (codes[:, num_patches:] != clean[num_patches:]).sum(1).float()   # none when names are held
    complied, bound = verdicts["complied"], verdicts["bound"]
    logger.info("code-space bound on qmllm: %d instructions, %.1f s, loss %.3f (clean) / %.3f (best start) -> %.3f, "
                "%.1f of %d codes changed, ASR %.3f, with every image tried %.3f", n, search.seconds,
                np.mean(history["start_loss"]), np.mean(history["beam_start_loss"]), np.mean(history["best_loss"]),
                np.mean(history["positions_changed"]), len(clean), np.mean(complied), np.mean(bound))
    counts = {key: sum(verdicts[flags]) for key, flags in (("asr", "complied"), ("asr_target", "on_target"),
                                                          ("asr_with_clean", "either"),
                                                          ("asr_images", "image_complied"), ("asr_bound", "bound"))}
    return {"instructions": n, "positions": len(clean), "patch_positions": num_patches,
            "name_positions": len(clean) - num_patches, "names_searched": names,
            "name_picks_changed": float(names_changed.mean()), "cls_code": search.cls_code,
            "start_from_attacks": bool(settings.code_search.start_from_attacks),
            "image_cases": sum(len(entry["instruction_detail"]) for entry in jailbreaks),
            "asr": float(np.mean(complied)), "asr_target": float(np.mean(verdicts["on_target"])),
            "asr_clean_codes": float(np.mean(verdicts["clean_complied"])),
            "asr_with_clean": float(np.mean(verdicts["either"])),
            "asr_images": float(np.mean(verdicts["image_complied"])), "asr_bound": float(np.mean(bound)),
            "intervals": {key: rate(count, n) for key, count in counts.items()},
            "loss_first": float(np.mean(history["start_loss"])),
            "loss_start": float(np.mean(history["beam_start_loss"])),
            "loss_last": float(np.mean(history["best_loss"])), "loss_last_max": float(np.max(history["best_loss"])),
            "started_from_attack": float(np.mean([s != "clean" for s in started_from])),
            "positions_changed": float(np.mean(history["positions_changed"])),
            "clean_positions_matched": 1 - float(np.mean(history["positions_changed"])) / len(clean),
            "positions_matched": matched,
            "sweeps": float(np.mean(history["sweeps"])), "seconds": round(search.seconds, 1),
            "example": texts[complied.index(True) if any(complied) else 0]}
