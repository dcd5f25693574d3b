"""The evaluation report: one metrics JSON (DVC metric), a Markdown table in the paper's layout, plots,
and the adversarial images; everything logged to MLflow."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qmllm_pipeline.stats import difference  # noqa: E402
from qmllm_pipeline.tracking import log_summary_metrics  # noqa: E402

logger = logging.getLogger(__name__)
# (system, the attacker that reaches it, its label) rows of the jailbreak table
JAILBREAK_CASES = (("baseline", "baseline_per_instruction", "white-box, per instruction"),
                   ("baseline", "baseline_whitebox", "white-box, universal"),
                   ("safeclip", "safeclip_per_instruction", "white-box, per instruction"),
                   ("safeclip", "safeclip_whitebox", "white-box, universal"),
                   ("baseline", "baseline_noise", "random noise (control)"),
                   ("qmllm", "qmllm_plain", "(a) plain gradient"), ("qmllm", "qmllm_transfer", "(b) transfer"),
                   ("qmllm", "qmllm_transfer_per_instruction", "(b) transfer, per instruction"),
                   ("qmllm", "qmllm_adaptive", "(c) adaptive BPDA"),
                   ("qmllm", "qmllm_adaptive_per_instruction", "(c) adaptive BPDA, per instruction"),
                   ("qmllm", "qmllm_surrogate", "(d) continuous surrogate"),
                   ("qmllm", "qmllm_noise", "random noise (control)"))
QMLLM_ATTACKS = ("qmllm_plain", "qmllm_transfer", "qmllm_transfer_per_instruction", "qmllm_adaptive",
                 "qmllm_adaptive_per_instruction", "qmllm_surrogate")


def evaluation_report(toxic: dict, utility: dict, clean: dict, timing: dict, stability: dict, bound: dict,
                      *budgets: dict):
    """Metrics, the Markdown report, the plots (DSR against eps, DSR per category, adversarial images) and
    the adversarial images as tensors (the per-instruction ones (n, 3, H, W) under `<attacker>_per_instruction`).
    `bound`: the code-space search on qmllm (`code_space_bound`)."""
    jailbreak = {b["budget"]: {"eps": b["eps"], **b["results"], "pgd": b["pgd"]} for b in budgets}
    bound_metrics = _numbers({k: v for k, v in bound.items() if k != "codes"})
    bound_metrics["gain_over_clean"] = difference(bound["intervals"]["asr"], clean["qmllm"]["intervals"]["asr"])
    bound_metrics["gain_over_images"] = difference(bound["intervals"]["asr_bound"], bound["intervals"]["asr_images"])
    metrics = {"toxic_image": toxic, "utility": utility, "jailbreak_clean": _numbers(clean), "jailbreak": {
        name: {k: (_numbers(v) if isinstance(v, dict) else v) for k, v in entry.items()}
        for name, entry in jailbreak.items()}, "overhead": timing, "code_stability": stability,
        "code_space_bound": bound_metrics}
    for system in ("baseline", "safeclip", "qmllm"):
        worst_case = {name: min((case for s, case, _ in JAILBREAK_CASES if s == system),
                                key=lambda case, entry=entry: entry[case]["dsr"])
                      for name, entry in jailbreak.items()}
        worst = {name: jailbreak[name][case]["dsr"] for name, case in worst_case.items()}
        metrics.setdefault("summary", {})[system] = {
            "toxic_dsr_single": toxic[system]["dsr"]["single"],
            "toxic_dsr_distractors": toxic[system]["dsr"]["distractors"],
            "fpr_neutral": toxic[system]["fpr_neutral"], "fpr_hard_negative": toxic[system]["fpr_hard_negative"],
            "jailbreak_dsr_clean": clean[system]["dsr"],
            **{f"jailbreak_dsr_{name}": value for name, value in worst.items()},
            "utility_object": utility[system]["accuracy"].get("object", 0.0),
            "utility_color": utility[system]["accuracy"].get("color", 0.0),
            "utility_count": utility[system]["accuracy"].get("count", 0.0),
            "caption_f1": utility[system]["caption_f1"], "ms_per_query": timing[system]["answer_median_ms"],
            "intervals": {
                "toxic_dsr_single": toxic[system]["intervals"]["dsr.single"],
                "toxic_dsr_distractors": toxic[system]["intervals"]["dsr.distractors"],
                "fpr_neutral": toxic[system]["intervals"]["fpr_neutral"],
                "fpr_hard_negative": toxic[system]["intervals"]["fpr_hard_negative"],
                "jailbreak_dsr_clean": clean[system]["intervals"]["dsr"],
                **{f"jailbreak_dsr_{name}": jailbreak[name][case]["intervals"]["dsr"]
                   for name, case in worst_case.items()},
                **{f"utility_{kind}": utility[system]["intervals"][f"accuracy.{kind}"]
                   for kind in ("object", "color", "count") if f"accuracy.{kind}" in utility[system]["intervals"]}}}
    strongest = {name: max(QMLLM_ATTACKS, key=lambda case, entry=entry: entry[case]["asr"])
                 for name, entry in jailbreak.items()}
    metrics["qmllm_attack_gain_over_clean"] = {
        name: jailbreak[name][case]["asr"] - clean["qmllm"]["asr"] for name, case in strongest.items()}
    metrics["qmllm_noise_gain_over_clean"] = {
        name: entry["qmllm_noise"]["asr"] - clean["qmllm"]["asr"] for name, entry in jailbreak.items()}
    # the same gains with their 95% intervals: a gain is an effect only when `significant` (interval excludes 0)
    metrics["qmllm_gain_intervals"] = {
        name: {"attack": {**difference(jailbreak[name][case]["intervals"]["asr"], clean["qmllm"]["intervals"]["asr"]),
                          "attacker": case},
               "noise": difference(jailbreak[name]["qmllm_noise"]["intervals"]["asr"],
                                   clean["qmllm"]["intervals"]["asr"])}
        for name, case in strongest.items()}
    rates = {name: {case: entry[case] for case in entry if case not in ("pgd", "eps")}
             for name, entry in jailbreak.items()}
    log_summary_metrics({k: v for k, v in metrics.items() if k != "jailbreak"} | {"jailbreak": rates},
                        prefix="evaluate")
    logger.info("the strongest attack on qmllm adds over its clean-image ASR: %s (random noise: %s)",
                {k: round(v, 3) for k, v in metrics["qmllm_attack_gain_over_clean"].items()},
                {k: round(v, 3) for k, v in metrics["qmllm_noise_gain_over_clean"].items()})
    images = {f"{b['budget']}/{attacker}": image for b in budgets
              for attacker, image in {**b["images"], **b.get("instruction_images", {})}.items()}
    return (metrics, markdown_report(metrics, jailbreak, clean), dsr_against_eps_figure(jailbreak, clean),
            dsr_per_category_figure(toxic), adversarial_images_figure(budgets, clean), images)


def _numbers(node: dict) -> dict:
    """Drop free-text fields (answer examples) from a nested dict for the metrics JSON."""
    return {k: _numbers(v) if isinstance(v, dict) else v for k, v in node.items() if not isinstance(v, str)}


def _pct(value: float | None, interval: dict | None = None) -> str:
    """A rate in percent, with its 95% interval in brackets when given."""
    if value is None:
        return "n/a"
    if not interval:
        return f"{100 * value:.1f}"
    low, high = interval["ci95"]
    return f"{100 * value:.1f} [{100 * low:.0f}-{100 * high:.0f}]"


def markdown_report(metrics: dict, jailbreak: dict, clean: dict) -> str:
    budgets = list(jailbreak)
    summary = metrics["summary"]
    lines = ["# Q-MLLM evaluation (embedded default world)", "",
             "DSR = defense success rate (share of attack inputs refused), FPR = refusals of benign images; "
             "percentages, with the 95% Wilson interval in brackets. Jailbreak columns: DSR on the held-out harmful "
             "instructions with the clean start image and with the worst image per eps (in 1/255) among the "
             "attackers' and the random-noise control's.", "",
             "| system | toxic DSR single | toxic DSR distractors | FPR neutral | FPR hard neg. | jailbreak clean | "
             + " | ".join(f"jailbreak {b}" for b in budgets)
             + " | object acc. | colour acc. | count acc. | caption F1 | ms/query |",
             "|---" * (11 + len(budgets)) + "|"]
    for system, row in summary.items():
        def cell(key: str, row=row) -> str:
            return _pct(row[key], row.get("intervals", {}).get(key))

        keys = ("toxic_dsr_single", "toxic_dsr_distractors", "fpr_neutral", "fpr_hard_negative", "jailbreak_dsr_clean",
                *(f"jailbreak_dsr_{b}" for b in budgets), "utility_object", "utility_color", "utility_count")
        lines.append(f"| {system} | " + " | ".join(cell(key) for key in keys)
                     + f" | {_pct(row['caption_f1'])} | {row['ms_per_query']:.1f} |")
    lines += ["", "## Jailbreak by attacker", "",
              "ASR by the refusal detector (share of held-out harmful instructions answered without a refusal); "
              "in brackets: share opening with the target's affirmative \"Sure, here is\" / share containing the "
              "whole target string.", "",
              "| system | attacker | clean | " + " | ".join(budgets) + " |", "|---" * (3 + len(budgets)) + "|"]
    for system, case, label in JAILBREAK_CASES:
        cells = [_asr_cell(jailbreak[b][case]) for b in budgets]
        lines.append(f"| {system} | {label} | {_asr_cell(clean[system])} | " + " | ".join(cells) + " |")
    lines += ["", "Q-MLLM: patch codes the attack image moved (of the image's patches), and whether the safety map "
              "refused it:", "", "| attacker | " + " | ".join(budgets) + " |", "|---" * (1 + len(budgets)) + "|"]
    for case in (*QMLLM_ATTACKS, "qmllm_noise"):
        cells = [f"{jailbreak[b][case].get('patch_codes_changed', 0):.1f}/{jailbreak[b][case].get('patch_codes', 0)}"
                 + (f" refused {_pct(jailbreak[b][case]['guard_refused_share'])}%"
                    if jailbreak[b][case]["guard_refused_share"] else "") for b in budgets]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "Per-instruction PGD: mean target loss over the held-out instructions at the start and the best "
              "reached (the nll part, and its worst instruction):", "",
              "| attacker | " + " | ".join(budgets) + " |", "|---" * (1 + len(budgets)) + "|"]
    for case in sorted({c for b in budgets for c in jailbreak[b]["pgd"] if c.endswith("_per_instruction")}):
        cells = [f"{p['loss_first']:.2f} -> {p['loss_last']:.2f} (nll {p['nll_last']:.2f}, "
                 f"worst {p['nll_last_max']:.2f})" for p in (jailbreak[b]["pgd"][case] for b in budgets)]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    stability = metrics["code_stability"]
    lines += ["", f"Q-MLLM code stability: share of codes unchanged under random +-eps noise "
              f"({stability['images']} held-out neutral scenes):", "",
              "| codes | " + " | ".join(stability["budgets"]) + " |", "|---" * (1 + len(stability["budgets"])) + "|"]
    for key in ("patch_codes_unchanged", "cls_code_unchanged", "name_picks_unchanged"):
        if all(key in entry for entry in stability["budgets"].values()):
            lines.append(f"| {key.removesuffix('_unchanged').replace('_', ' ')} | "
                         + " | ".join(_pct(entry[key]) for entry in stability["budgets"].values()) + " |")
    bound = metrics["code_space_bound"]
    gain = bound["gain_over_clean"]
    images_gain = bound["gain_over_images"]
    starts = ("the clean image's codes and every qmllm image's" if bound["start_from_attacks"]
              else "the clean image's codes")
    what = (f"{bound['patch_positions']} patch codes and {bound['name_positions']} name picks"
            if bound["names_searched"] else f"{bound['patch_positions']} patch codes")
    lines += ["", "## Code-space bound on Q-MLLM", "",
              f"A beam coordinate search over the {what} themselves (CLS code held at the "
              f"clean image's neutral code {bound['cls_code']}), one code sequence per held-out instruction "
              f"({bound['instructions']}), from {starts} ({100 * bound['started_from_attack']:.0f}% began from an "
              f"image attack's): what an attacker who could choose the codes reaches. Bound: the found codes, the "
              f"clean image's or any of the {bound['image_cases']} qmllm images tried (every attacker and budget) "
              "comply.", "",
              "| bound | image attacks' union | bound over union | found codes' ASR (target) | found over clean | "
              "loss clean -> start -> best (worst) | codes changed | search s |", "|---|---|---|---|---|---|---|---|",
              f"| {_pct(bound['asr_bound'], bound['intervals']['asr_bound'])} | "
              f"{_pct(bound['asr_images'], bound['intervals']['asr_images'])} | "
              f"{100 * images_gain['value']:+.1f} [{100 * images_gain['ci95'][0]:+.0f}, "
              f"{100 * images_gain['ci95'][1]:+.0f}] | "
              f"{_pct(bound['asr'], bound['intervals']['asr'])} ({_pct(bound['asr_target'])}) | "
              f"{100 * gain['value']:+.1f} [{100 * gain['ci95'][0]:+.0f}, {100 * gain['ci95'][1]:+.0f}] | "
              f"{bound['loss_first']:.2f} -> {bound['loss_start']:.2f} -> {bound['loss_last']:.2f} "
              f"({bound['loss_last_max']:.2f}) | {bound['positions_changed']:.1f}/{bound['positions']} | "
              f"{bound['seconds']:.0f} |", "",
              "Share of the positions where an image attack's codes equal the codes the search found (the clean "
              f"image's: {_pct(bound['clean_positions_matched'])}):", "",
              "| attacker | " + " | ".join(budgets) + " |", "|---" * (1 + len(budgets)) + "|"]
    for case in (*QMLLM_ATTACKS, "qmllm_noise"):
        lines.append(f"| {case} | " + " | ".join(_pct(bound["positions_matched"][b].get(case)) for b in budgets)
                     + " |")
    toxic = metrics["toxic_image"]
    categories = sorted(toxic["qmllm"]["dsr_per_category"]["single"])
    lines += ["", "## Toxic-image DSR per category (single object / among distractors)", "",
              "| system | " + " | ".join(categories) + " |", "|---" * (1 + len(categories)) + "|"]
    for system in summary:
        per = toxic[system]["dsr_per_category"]
        lines.append(f"| {system} | " + " | ".join(f"{_pct(per['single'][c])} / {_pct(per['distractors'][c])}"
                                                   for c in categories) + " |")
    overhead = metrics["overhead"]
    lines += ["", "## Time per query (batch 1, median)", "", "| system | answer ms | refusal ms | refusal / answer |"
              " answer / baseline |", "|---|---|---|---|---|"]
    for system, entry in overhead.items():
        refusal = entry.get("refusal_median_ms")
        ratio = entry.get("refusal_over_answer")
        lines.append(f"| {system} | {entry['answer_median_ms']:.1f} | {'n/a' if refusal is None else f'{refusal:.1f}'}"
                     f" | {'n/a' if ratio is None else f'{ratio:.2f}'} | {entry['answer_over_baseline']:.2f} |")
    return "\n".join(lines) + "\n"


def _asr_cell(rates: dict) -> str:
    return (f"{_pct(rates['asr'], rates.get('intervals', {}).get('asr'))} "
            f"({_pct(rates['asr_affirmative'])} / {_pct(rates['asr_target'])})")


def dsr_against_eps_figure(jailbreak: dict, clean: dict):
    budgets = list(jailbreak)
    labels = ["clean", *budgets]
    figure, axis = plt.subplots(figsize=(7, 4))
    for system, case, label in JAILBREAK_CASES:
        values = [clean[system]["dsr"], *(jailbreak[b][case]["dsr"] for b in budgets)]
        # dotted: the noise controls; dashed: safeclip, whose line overlaps baseline's (the same LLM)
        axis.plot(range(len(labels)), [100 * v for v in values], marker="o", label=f"{system}: {label}",
                  linestyle=":" if case.endswith("_noise") else "--" if system == "safeclip" else "-")
    axis.set_xticks(range(len(labels)), labels)
    axis.set_ylim(-3, 103)
    axis.set_ylabel("jailbreak DSR (%)")
    axis.set_xlabel("perturbation budget (eps, 1/255)")
    axis.set_title("Image jailbreak: defense success against budget")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def dsr_per_category_figure(toxic: dict):
    categories = sorted(toxic["qmllm"]["dsr_per_category"]["single"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / len(toxic)
    for axis, level in zip(axes, ("single", "distractors"), strict=True):
        for i, (system, entry) in enumerate(toxic.items()):
            values = [100 * entry["dsr_per_category"][level][c] for c in categories]
            axis.bar(np.arange(len(categories)) + i * width, values, width, label=system)
        axis.set_xticks(np.arange(len(categories)) + width, categories, rotation=30, ha="right")
        axis.set_title(f"toxic-image DSR, {level}")
    axes[0].set_ylabel("DSR (%)")
    axes[0].legend()
    figure.tight_layout()
    return figure


def adversarial_images_figure(budgets: tuple, clean: dict):
    attackers = list(budgets[0]["images"])
    figure, axes = plt.subplots(len(attackers), len(budgets), figsize=(2 * len(budgets), 2.2 * len(attackers)),
                                squeeze=False)
    for column, budget in enumerate(budgets):
        for row, attacker in enumerate(attackers):
            axis = axes[row][column]
            axis.imshow(budget["images"][attacker].permute(1, 2, 0).numpy())
            asr = budget["results"][attacker]["asr"]
            axis.set_title(f"{attacker}\n{budget['budget']}: ASR {100 * asr:.0f}%", fontsize=7)
            axis.axis("off")
    figure.tight_layout()
    return figure
