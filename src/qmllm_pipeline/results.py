"""`docs/results.md` and the README's headline table, written from `metrics/*.json` (`qmllm report`), so
the figures a reader sees are the ones the last `kedro run` (or `dvc repro`) measured, never typed in."""

from __future__ import annotations

import json
import re
from pathlib import Path

METRICS = ("world_summary", "foundation", "pretrain", "finetune", "safety_map", "evaluate")
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
SYSTEMS = ("baseline", "safeclip", "qmllm")


def load_metrics(directory: str | Path) -> dict[str, dict]:
    """Every metrics file present in `directory`, by name (a missing file is left out; a broken one raises
    naming it)."""
    found = {}
    for name in METRICS:
        path = Path(directory) / f"{name}.json"
        if not path.is_file():
            continue
        try:
            found[name] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    return found


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _in_order(by_system: dict) -> list[tuple[str, dict]]:
    """baseline, safeclip, qmllm first (the order of DESIGN.md), then anything else."""
    return sorted(by_system.items(), key=lambda item: (SYSTEMS.index(item[0]) if item[0] in SYSTEMS else 99, item[0]))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def headline_table(metrics: dict[str, dict]) -> str:
    """The README's short table: what the method is measured on, per system."""
    evaluate = metrics.get("evaluate")
    if evaluate is None:
        return "(no `metrics/evaluate.json` yet: run `kedro run`)"
    summary = evaluate["summary"]
    budgets = [b for b in ("eps16", "eps64", "unconstrained") if f"jailbreak_dsr_{b}" in summary["qmllm"]]
    header = ["system", "toxic-image DSR (single)", "FPR neutral", *(f"jailbreak DSR, worst at {b}" for b in budgets),
              "colour acc.", "object acc."]
    rows = [[system, pct(row["toxic_dsr_single"]), pct(row["fpr_neutral"]),
             *(pct(row[f"jailbreak_dsr_{b}"]) for b in budgets), pct(row["utility_color"]), pct(row["utility_object"])]
            for system, row in _in_order(summary)]
    clip = metrics.get("foundation", {}).get("clip")
    lines = _table(header, rows)
    if clip:
        lines.append("")
        lines.append(f"Stand-in CLIP: {pct(clip['top1'])} zero-shot top-1 over {clip['zero_shot_classes']} emoji. "
                     "One run of the default configuration; [docs/results.md](docs/results.md) has every figure.")
    return "\n".join(lines)


def results_markdown(metrics: dict[str, dict]) -> str:
    """Every headline figure of the metrics files, one section per pipeline."""
    lines = ["# Results", "",
             "Written by `qmllm report` from `metrics/*.json` (the last default `kedro run` or `dvc repro`); do not",
             "edit by hand. One run of one configuration: a figure here is one draw, not a claim about the method",
             "(see [experiments.md](experiments.md) for what was measured across settings). Rates are shares of",
             "held-out items; the world's split sizes are in the last section.", ""]
    if "foundation" in metrics:
        clip, llm = metrics["foundation"]["clip"], metrics["foundation"]["llm"]
        lines += ["## Foundation stand-ins (`foundation`)", ""]
        lines += _table(["measured on held-out data", "result"], [
            [f"CLIP zero-shot top-1 / top-5 among {clip['zero_shot_classes']} names",
             f"{pct(clip['top1'])} / {pct(clip['top5'])}"],
            ["CLIP top-1 on toxic / neutral emoji", f"{pct(clip['top1_toxic'])} / {pct(clip['top1_neutral'])}"],
            ["LLM refuses held-out harmful / benign instructions",
             f"{pct(llm['heldout_harmful_refused'])} / {pct(llm['heldout_benign_refused'])}"],
            ["training steps, CLIP / LLM", f"{clip['training']['steps']} / {llm['training']['steps']}"]])
        lines.append("")
    if "pretrain" in metrics:
        qmllm, baseline = metrics["pretrain"]["qmllm"], metrics["pretrain"]["baseline"]
        codebooks = qmllm["codebooks"]
        lines += ["## Stage 1 (`pretrain`)", ""]
        lines += _table(["", "codes used", "perplexity", "caption loss"], [
            [f"qmllm CLS codebook (K={codebooks['cls_codes']})", codebooks["cls"]["codes_used"],
             f"{codebooks['cls']['perplexity']:.1f}", ""],
            [f"qmllm patch codebook (P={codebooks['patch_codes']})", codebooks["patch"]["codes_used"],
             f"{codebooks['patch']['perplexity']:.1f}", f"{qmllm['final']['generative']:.3f}"],
            ["continuous baseline", "", "", f"{baseline['final']['generative']:.3f}"]])
        lines.append("")
    if "finetune" in metrics:
        finetune = metrics["finetune"]
        kinds = sorted(finetune["qmllm"]["utility"])
        lines += ["## Stage 2 (`finetune`): utility and safety of the models alone", ""]
        rows = [[f"{kind} (exact answer)", *(pct(finetune[s]["utility"].get(kind)) for s in ("qmllm", "baseline")),
                 pct(finetune["blind_guess"]["utility"].get(kind))] for kind in kinds]
        for kind in ("harmful", "benign"):
            key = f"heldout_{kind}_refused_with_neutral_image"
            rows.append([f"held-out {kind} instructions refused, neutral image attached",
                         pct(finetune["qmllm"]["safety"][key]), pct(finetune["baseline"]["safety"][key]), ""])
        lines += _table(["held-out", "qmllm", "baseline", "blind guess"], rows)
        lines.append("")
    if "safety_map" in metrics:
        safety = metrics["safety_map"]
        choice = safety["safety_map"]
        lines += ["## Safety map (`safety_map`): toxic-image detection", "",
                  f"Algorithm 1 with tau {choice['tau_used']} and unseen codes `{choice['unseen_policy_used']}` "
                  f"(chosen on the validation split: recall {pct(choice['toxic_recall'])} at FPR "
                  f"{pct(choice['neutral_fpr'])}); {choice['codes_seen']} of {choice['codes']} CLS codes reached by "
                  f"D_map, {choice['toxic_codes']} labelled toxic.", ""]
        lines += _table(["detector", "DSR single", "DSR among distractors", "FPR neutral", "FPR hard negatives"],
                        [[name, pct(safety[name]["dsr"]["single"]), pct(safety[name]["dsr"]["distractors"]),
                          pct(safety[name]["fpr_neutral"]), pct(safety[name]["fpr_hard_negative"])]
                         for name in ("qmllm", "safeclip")])
        categories = sorted(safety["qmllm"]["dsr_per_category"]["single"])
        lines += ["", "DSR per category (single object):", ""]
        lines += _table(["detector", *categories], [[name, *(pct(safety[name]["dsr_per_category"]["single"][c])
                                                             for c in categories)] for name in ("qmllm", "safeclip")])
        lines.append("")
    if "evaluate" in metrics:
        lines += _evaluate_sections(metrics["evaluate"])
    if "world_summary" in metrics:
        world = metrics["world_summary"]
        lines += ["## The world these were measured on (`data`)", ""]
        lines += _table(["split", "rows"], [[name, entry["rows"]] for name, entry in world["scenes"].items()]
                        + [["dialogs (turns)", f"{world['dialogs']['rows']} ({world['dialogs']['turns']})"],
                           ["eval_utility", world["eval_utility"]["rows"]]])
        lines.append("")
    return "\n".join(lines)


def _evaluate_sections(evaluate: dict) -> list[str]:
    summary, jailbreak, clean = evaluate["summary"], evaluate["jailbreak"], evaluate["jailbreak_clean"]
    budgets = list(jailbreak)
    lines = ["## Evaluation (`evaluate`): three systems under attack", ""]
    lines += _table(["system", "toxic DSR single", "toxic DSR distractors", "FPR neutral", "FPR hard neg.",
                     "jailbreak DSR clean", *(f"worst at {b}" for b in budgets), "object", "colour", "count",
                     "caption F1", "ms/query"],
                    [[system, pct(row["toxic_dsr_single"]), pct(row["toxic_dsr_distractors"]), pct(row["fpr_neutral"]),
                      pct(row["fpr_hard_negative"]), pct(row["jailbreak_dsr_clean"]),
                      *(pct(row[f"jailbreak_dsr_{b}"]) for b in budgets), pct(row["utility_object"]),
                      pct(row["utility_color"]), pct(row["utility_count"]), pct(row["caption_f1"]),
                      f"{row['ms_per_query']:.1f}"] for system, row in _in_order(summary)])
    cases = [(case, case.split("_")[0]) for case, entry in jailbreak[budgets[0]].items()  # <system>_<attacker>
             if isinstance(entry, dict) and "asr" in entry]
    lines += ["", "Jailbreak attack success rate (held-out harmful instructions answered without a refusal), by "
              "attacker and budget; `noise` is the control, random +-eps pixels:", ""]
    lines += _table(["attacker", "clean image", *budgets],
                    [[case, pct(clean[system]["asr"]), *(pct(jailbreak[b][case]["asr"]) for b in budgets)]
                     for case, system in cases])
    lines += ["", "qmllm: the most any attacker adds over its clean-image ASR, and what random noise adds: "
              + ", ".join(f"{b} {100 * evaluate['qmllm_attack_gain_over_clean'][b]:+.1f} / "
                          f"{100 * evaluate['qmllm_noise_gain_over_clean'][b]:+.1f} points" for b in budgets) + ".", ""]
    overhead = evaluate["overhead"]
    lines += _table(["system", "answer (ms, median, batch 1)", "refusal (ms)", "answer / baseline"],
                    [[system, f"{entry['answer_median_ms']:.1f}",
                      f"{entry['refusal_median_ms']:.1f}" if "refusal_median_ms" in entry else "n/a",
                      f"{entry['answer_over_baseline']:.2f}"] for system, entry in _in_order(overhead)])
    lines.append("")
    return lines


def write_report(metrics_dir: str | Path, results: str | Path, readme: str | Path | None) -> list[Path]:
    """Write `results` from the metrics, and the README's headline block (between its two markers) if given.
    Returns the files written."""
    metrics = load_metrics(metrics_dir)
    if not metrics:
        raise FileNotFoundError(f"{metrics_dir}: no metrics files (run `kedro run` first)")
    written = []
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(results_markdown(metrics))
    written.append(results)
    if readme is not None:
        readme = Path(readme)
        text = readme.read_text()
        if HEADLINE_START not in text or HEADLINE_END not in text:
            raise ValueError(f"{readme}: no {HEADLINE_START} ... {HEADLINE_END} block to fill")
        block = f"{HEADLINE_START}\n{headline_table(metrics)}\n{HEADLINE_END}"
        readme.write_text(re.sub(re.escape(HEADLINE_START) + ".*?" + re.escape(HEADLINE_END), lambda _: block, text,
                                 flags=re.S))
        written.append(readme)
    return written
