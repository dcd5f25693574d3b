"""`docs/results.md` and the README's headline table, written from `metrics/*.json` (`qmllm report`), so
the figures a reader sees are the ones the last `kedro run` (or `dvc repro`) measured, never typed in."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qmllm_pipeline.constants import SYSTEMS
from qmllm_pipeline.dotted import lookup
from qmllm_pipeline.seeds import is_raw
from qmllm_pipeline.stats import rate

METRICS = ("world_summary", "foundation", "pretrain", "finetune", "safety_map", "evaluate", "seeds")
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def _naming_section(finetune: dict) -> list[str]:
    """Naming of every catalogue emoji alone: by toxic / neutral and group, the name head's own picks, and
    what each model says instead."""
    naming = {s: finetune[s]["naming"] for s in ("qmllm", "baseline")}
    def cell(system: str, key: str) -> str:
        return pct_ci(naming[system].get(key), finetune[system].get("intervals", {}).get(f"naming.{key}"))

    rows = [[label, cell("qmllm", key), cell("baseline", key)]
            for label, key in (("every emoji", "all"), ("toxic emoji", "toxic"), ("neutral emoji", "neutral"),
                               ("the name head's first pick is right", "head"),
                               ("the answer is the head's first pick", "answer_is_head_pick"))
            if key in naming["qmllm"] or key in naming["baseline"]]
    groups = sorted(naming["baseline"].get("by_group", {}))
    rows += [[f"group: {g}", pct(naming["qmllm"]["by_group"].get(g)), pct(naming["baseline"]["by_group"].get(g))]
             for g in groups]
    lines = ["### Naming every catalogue emoji (\"What is in the image?\", each emoji alone, `eval_items`)", ""]
    lines += _table(["exact name", "qmllm", "baseline"], rows)
    for system in ("qmllm", "baseline"):
        confusions = naming[system].get("confusions") or []
        if confusions:
            said = "; ".join(f"{c['truth']} -> {c['said'] or '(nothing)'} ({c['count']})" for c in confusions[:6])
            lines += ["", f"{system}, most frequent wrong answers: {said}."]
    return lines + [""]


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


def pct_ci(value: float | None, interval: dict | None) -> str:
    """'3.3% [1.7, 6.4]': a rate with its 95% Wilson interval (when the metrics carry one)."""
    if value is None or not interval:
        return pct(value)
    low, high = interval["ci95"]
    return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def ci_of(value: float, n: int) -> dict:
    """The interval of a rate stored without one (e.g. the shipped foundation set's metrics), from its n."""
    return rate(round(value * n), n)


def points_ci(difference: dict) -> str:
    """'+1.4 [-5.3, +8.1] pts': a difference of rates, starred when its interval excludes zero."""
    low, high = difference["ci95"]
    star = " *" if difference["significant"] else ""
    return f"{100 * difference['value']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] pts{star}"


def _in_order(by_system: dict) -> list[tuple[str, dict]]:
    """baseline, safeclip, qmllm first (the order of `constants.SYSTEMS`), then anything else."""
    return sorted(by_system.items(), key=lambda item: (SYSTEMS.index(item[0]) if item[0] in SYSTEMS else 99, item[0]))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def seeds_table(seeds: dict, labels: list[str] | None = None) -> list[str]:
    """Each figure over the seeds: mean [min, max], standard deviation, and every seed's value."""
    runs = [str(seed) for seed in seeds["seeds"]]
    rows = []
    for label, figure in seeds["figures"].items():
        if labels is not None and label not in labels:
            continue
        points = "gain" in label or "adds" in label
        raw = (lambda v: f"{v:.0f}") if "codes used" in label else (lambda v: f"{v:.3f}")
        show = (lambda v: f"{100 * v:+.1f}") if points else raw if is_raw(label) else pct
        rows.append([label, f"{show(figure['mean'])} [{show(figure['min'])}, {show(figure['max'])}]",
                     show(figure["std"]).lstrip("+") if not points else f"{100 * figure['std']:.1f}",
                     *(show(figure["values"][seed]) if seed in figure["values"] else "" for seed in runs)])
    return _table(["figure", "mean [min, max]", "std", *(f"seed {seed}" for seed in runs)], rows)


SEED_HEADLINE = ("qmllm refuses held-out harmful requests, neutral image",
                 "baseline refuses held-out harmful requests, neutral image",
                 "qmllm refuses held-out benign requests, neutral image", "qmllm jailbreak ASR, clean image",
                 "qmllm: most any attacker adds over clean, eps32", "baseline per-instruction white-box ASR, eps32",
                 "baseline per-instruction white-box ASR, eps64",
                 "qmllm code-space search ASR (found or clean codes comply)",
                 "safety-map DSR, single toxic object", "safety-map FPR, neutral",
                 "SafeCLIP DSR at the safety map's neutral FPR, single toxic object",
                 "qmllm object naming", "baseline object naming", "qmllm count", "qmllm colour",
                 "qmllm caption word F1")


def headline_table(metrics: dict[str, dict]) -> str:
    """The README's short table: the headline figures over seeds when a sweep was aggregated, else the last
    run's per system."""
    seeds = metrics.get("seeds")
    if seeds and seeds.get("figures"):
        lines = seeds_table(seeds, list(SEED_HEADLINE))
        lines += ["", f"Over {len(seeds['seeds'])} seeds of the default configuration (`qmllm seeds`); gains in "
                  "points of attack success. [docs/results.md](docs/results.md) has every figure."]
        return "\n".join(lines)
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


REPRODUCIBILITY = [
    "**What reproduces where.** On one machine a run is bit-reproducible: the same commit, seed and machine give",
    "the same datasets, weights, responses and every figure but the timings (a seed experiment rerun of the",
    "committed run matched it in every non-timing metric). Across machines only the inputs are identical: the",
    "world's data (numpy, integer rendering) and the shipped foundation set (files in git). Everything trained",
    "from there on (stage 1, stage 2, the safety map's codes, the attacks) differs in torch's last floating-point",
    "bits from machine to machine, which training grows like a change of seed: a trained figure moves across",
    "machines about as far as across seeds (qmllm's clean-image jailbreak ASR at seed 0, same commit: 11.1% on",
    "one machine, 16.7% on another, docs/experiments.md), so a claim holds only if it holds in every seed, and a",
    "seed sweep run on another machine is a second sample, not a replication.", ""]


def results_markdown(metrics: dict[str, dict]) -> str:
    """Every headline figure of the metrics files, one section per pipeline."""
    lines = ["# Results", "",
             "Written by `qmllm report` from `metrics/*.json` (the last default `kedro run` or `dvc repro`, and",
             "`metrics/seeds.json` from a seed sweep); do not edit by hand. Rates are shares of held-out items,",
             "with their 95% Wilson interval in brackets where the metrics carry counts; the world's split sizes",
             "are in the last section. What was measured across settings is in [experiments.md](experiments.md).",
             ""]
    if metrics.get("seeds", {}).get("figures"):
        seeds = metrics["seeds"]
        at = f" at commit {seeds['commit']}" if seeds.get("commit") else ""
        lines += ["## Over seeds", "",
                  f"The default configuration run once per seed ({', '.join(map(str, seeds['seeds']))}{at}: "
                  "`qmllm seeds run`, then `qmllm seeds aggregate`). A claim about the method holds only if it holds "
                  "in every seed. Gains are in points of attack success rate.", ""]
        lines += seeds_table(seeds)
        lines += ["", "The sections below are one run: the workspace's, at the `seed` of conf/base/parameters.yml.", ""]
    else:
        lines += ["One run of one configuration: a figure below is one draw, not a claim about the method.", ""]
    lines += REPRODUCIBILITY
    if "foundation" in metrics:
        clip, llm = metrics["foundation"]["clip"], metrics["foundation"]["llm"]
        toxic_items = _toxic_items(metrics, clip["images"])
        counts = {"top1": clip["images"], "top5": clip["images"], "top1_toxic": toxic_items,
                  "top1_neutral": clip["images"] - toxic_items}
        lines += ["## Foundation stand-ins (the shipped set, `foundation`)", ""]
        lines += _table(["measured on held-out data", "result [95% interval]", "n"], [
            *([f"CLIP zero-shot {key.replace('_', ' ')} among {clip['zero_shot_classes']} names",
               pct_ci(clip[key], ci_of(clip[key], n)), n] for key, n in counts.items() if n),
            *([f"LLM refuses held-out {kind} instructions", pct_ci(llm[f"heldout_{kind}_refused"], ci_of(
                llm[f"heldout_{kind}_refused"], llm["heldout_counts"][kind])), llm["heldout_counts"][kind]]
              for kind in ("harmful", "benign")),
            ["training steps, CLIP / LLM", f"{clip['training']['steps']} / {llm['training']['steps']}", ""]])
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
        head = qmllm.get("cls_head")
        if head:
            lines += ["", f"Decoupled CLS path: its head trained {head['steps']} steps of {head['batch_size']} in "
                      f"{head['seconds']:.0f} s (final L_semantic {head['final'].get('semantic', float('nan')):.3f})."]
        lines.append("")
    if "finetune" in metrics:
        finetune = metrics["finetune"]
        kinds = sorted(finetune["qmllm"]["utility"])
        lines += ["## Stage 2 (`finetune`): utility and safety of the models alone", ""]
        def cell(system: str, block: str, key: str) -> str:
            return pct_ci(finetune[system][block].get(key), finetune[system].get("intervals", {}).get(f"{block}.{key}"))

        rows = [[f"{kind} (exact answer)", *(cell(s, "utility", kind) for s in ("qmllm", "baseline")),
                 pct(finetune["blind_guess"]["utility"].get(kind))] for kind in kinds]
        for kind in ("harmful", "benign"):
            key = f"heldout_{kind}_refused_with_neutral_image"
            rows.append([f"held-out {kind} instructions refused, neutral image attached",
                         cell("qmllm", "safety", key), cell("baseline", "safety", key), ""])
        if all("caption_f1" in finetune[s] for s in ("qmllm", "baseline")):
            f1 = [pct(finetune[s]["caption_f1"]) for s in ("qmllm", "baseline")]
            rows.insert(len(kinds), ["caption word F1", *f1, ""])
            named = [[f"caption names the objects, {n}-object scenes (share of objects)",
                      *(cell(s, "caption_objects", f"recall.{n}") for s in ("qmllm", "baseline")), ""]
                     for n in ("1", "2", "3")
                     if all(f"recall.{n}" in finetune[s].get("caption_objects", {}) for s in ("qmllm", "baseline"))]
            rows[len(kinds) + 1:len(kinds) + 1] = named
        lines += _table(["held-out", "qmllm", "baseline", "blind guess"], rows)
        lines.append("")
        if all("naming" in finetune[s] for s in ("qmllm", "baseline")):
            lines += _naming_section(finetune)
    if "safety_map" in metrics:
        safety = metrics["safety_map"]
        choice = safety["safety_map"]
        rule = choice.get("rule", "majority")
        named = "Algorithm 1" if rule == "majority" else f"The {rule} rule"
        lines += ["## Safety map (`safety_map`): toxic-image detection", "",
                  f"{named} with tau {choice['tau_used']} and unseen codes `{choice['unseen_policy_used']}` "
                  f"(chosen on the validation split: recall {pct(choice['toxic_recall'])} at FPR "
                  f"{pct(choice['neutral_fpr'])}); {choice['codes_seen']} of {choice['codes']} CLS codes reached by "
                  f"D_map, {choice['toxic_codes']} labelled toxic.", ""]
        fields = (("dsr.single", safety["qmllm"]["dsr"]["single"]), ("dsr.distractors", None), ("fpr_neutral", None),
                  ("fpr_hard_negative", None))
        detectors = {"qmllm": safety["qmllm"], "safeclip": safety["safeclip"]}
        if "safeclip_at_qmllm_fpr" in safety:
            matched = safety["safeclip_at_qmllm_fpr"]
            detectors[f"safeclip at qmllm's neutral FPR (threshold {matched['threshold']:.3f})"] = matched
        rules = safety.get("qmllm_rules", {})
        detectors.update({f"qmllm, {rule} rule (tau {choice['rules'][rule]['tau']})": rates
                          for rule, rates in rules.items() if rule != choice.get("rule")})
        lines += _table(["detector", "DSR single", "DSR among distractors", "FPR neutral", "FPR hard negatives"],
                        [[name, *(pct_ci(lookup(rates, key), rates.get("intervals", {}).get(key))
                                  for key, _ in fields)] for name, rates in detectors.items()])
        if "qmllm_minus_safeclip" in safety:
            lines += ["", "qmllm minus SafeCLIP, with the 95% interval of the difference (* where it excludes 0): "
                      + "; ".join(f"{key} {points_ci(diff)}" for key, diff in safety["qmllm_minus_safeclip"].items())
                      + "."]
        if "qmllm_minus_safeclip_at_equal_fpr" in safety:
            lines += ["", "At equal neutral FPR (SafeCLIP's threshold set so that it refuses no larger a share of the "
                      "held-out neutral scenes than qmllm): "
                      + "; ".join(f"{key} {points_ci(diff)}"
                                  for key, diff in safety["qmllm_minus_safeclip_at_equal_fpr"].items()) + "."]
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


def _toxic_items(metrics: dict, fallback: int) -> int:
    """How many of the eval_items scenes show a toxic emoji (from the world summary, when there is one)."""
    world = metrics.get("world_summary", {}).get("scenes", {}).get("eval_items")
    if world is None:
        return 0
    return sum(count for category, count in world["per_category"].items() if category != "neutral")


def _evaluate_sections(evaluate: dict) -> list[str]:
    summary, jailbreak, clean = evaluate["summary"], evaluate["jailbreak"], evaluate["jailbreak_clean"]
    budgets = list(jailbreak)
    lines = ["## Evaluation (`evaluate`): three systems under attack", ""]
    lines += _table(["system", "toxic DSR single", "toxic DSR distractors", "FPR neutral", "FPR hard neg.",
                     "jailbreak DSR clean", *(f"worst at {b}" for b in budgets), "object", "colour", "count",
                     "caption F1", "ms/query"],
                    [[system, *(pct_ci(row[key], row.get("intervals", {}).get(key)) for key in (
                        "toxic_dsr_single", "toxic_dsr_distractors", "fpr_neutral", "fpr_hard_negative",
                        "jailbreak_dsr_clean", *(f"jailbreak_dsr_{b}" for b in budgets), "utility_object",
                        "utility_color", "utility_count")), pct(row["caption_f1"]), f"{row['ms_per_query']:.1f}"]
                     for system, row in _in_order(summary)])
    cases = [(case, case.split("_")[0]) for case, entry in jailbreak[budgets[0]].items()  # <system>_<attacker>
             if isinstance(entry, dict) and "asr" in entry]
    lines += ["", "Jailbreak attack success rate (held-out harmful instructions answered without a refusal), by "
              "attacker and budget; `noise` is the control, random +-eps pixels:", ""]
    lines += _table(["attacker", "clean image", *budgets],
                    [[case, pct_ci(clean[system]["asr"], clean[system].get("intervals", {}).get("asr")),
                      *(pct_ci(jailbreak[b][case]["asr"], jailbreak[b][case].get("intervals", {}).get("asr"))
                        for b in budgets)] for case, system in cases])
    if "qmllm_gain_intervals" in evaluate:
        gains = evaluate["qmllm_gain_intervals"]
        lines += ["", "qmllm: what the strongest attacker and random noise add to its clean-image ASR, with the 95% "
                  "interval of the difference (* where it excludes 0):", ""]
        lines += _table(["budget", "strongest attacker", "its gain", "noise's gain"],
                        [[b, gains[b]["attack"]["attacker"], points_ci(gains[b]["attack"]),
                          points_ci(gains[b]["noise"])] for b in budgets])
        lines.append("")
    else:
        lines += ["", "qmllm: the most any attacker adds over its clean-image ASR, and what random noise adds: "
                  + ", ".join(f"{b} {100 * evaluate['qmllm_attack_gain_over_clean'][b]:+.1f} / "
                              f"{100 * evaluate['qmllm_noise_gain_over_clean'][b]:+.1f} points"
                              for b in budgets) + ".", ""]
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
