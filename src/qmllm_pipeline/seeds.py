"""Results over seeds. One `kedro run` is one draw: the same commit on another seed (or another machine,
whose last floating-point bits differ) trains other codebooks and another stage-2 LLM, and the figures the
method is about move with them. A seed sweep runs the chain once per `seed` (conf/base/parameters.yml) as
DVC experiments, and `aggregate` turns their metrics into mean, standard deviation, min and max per
headline figure, with each seed's value (metrics/seeds.json; `qmllm report` puts it in the docs).

    qmllm seeds run --seeds 0,1,2      # one `dvc exp run --temp -S seed=K` each, in turn
    qmllm seeds aggregate              # metrics/seeds.json from `dvc exp show --json`
    qmllm report                       # docs/results.md and the README headline, now over seeds

A lever is measured the same way, through the whole chain and over the same seeds: `--set` adds DVC
`-S` overrides and `--label` names the sweep (`qmllm seeds run --label replay --set
conf/base/parameters_finetune.yml:finetune.data.image_replay_fraction=0.5`, then `qmllm seeds aggregate
--label replay --out metrics/seeds_replay.json` and `qmllm seeds compare`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from qmllm_pipeline.dotted import lookup
from qmllm_pipeline.world.catalogue import TOXIC_CATEGORIES

PARAMS_FILE = "conf/base/parameters.yml"
EXPERIMENT_PREFIX = "seed-"

# the headline figures the parameters do not shape: label -> (metrics file stem, dotted key); `figures()` adds
# the jailbreak's, generated from evaluate.attackers and evaluate.budgets
FIGURES: dict[str, tuple[str, str]] = {
    "qmllm refuses held-out harmful requests, neutral image": (
        "finetune", "qmllm.safety.heldout_harmful_refused_with_neutral_image"),
    "baseline refuses held-out harmful requests, neutral image": (
        "finetune", "baseline.safety.heldout_harmful_refused_with_neutral_image"),
    "qmllm refuses held-out benign requests, neutral image": (
        "finetune", "qmllm.safety.heldout_benign_refused_with_neutral_image"),
    "baseline refuses held-out benign requests, neutral image": (
        "finetune", "baseline.safety.heldout_benign_refused_with_neutral_image"),
    "qmllm object naming": ("finetune", "qmllm.utility.object"),
    "baseline object naming": ("finetune", "baseline.utility.object"),
    "qmllm colour": ("finetune", "qmllm.utility.color"),
    "baseline colour": ("finetune", "baseline.utility.color"),
    "qmllm count": ("finetune", "qmllm.utility.count"),
    "baseline count": ("finetune", "baseline.utility.count"),
    **{f"blind guess {name}": ("finetune", f"blind_guess.utility.{key}")
       for name, key in (("object naming", "object"), ("colour", "color"), ("count", "count"))},
    "qmllm caption word F1": ("finetune", "qmllm.caption_f1"),
    "baseline caption word F1": ("finetune", "baseline.caption_f1"),
    **{f"{system} caption names the objects, {scenes}": ("finetune", f"{system}.caption_objects.{key}")
       for system in ("qmllm", "baseline")
       for scenes, key in (("1-object scenes", "recall.1"), ("2-3 object scenes (share of objects)", "recall.multi"),
                           ("2-3 object scenes (all and only)", "exact.multi"))},
    "qmllm naming, every catalogue emoji alone": ("finetune", "qmllm.naming.all"),
    "baseline naming, every catalogue emoji alone": ("finetune", "baseline.naming.all"),
    "qmllm naming, toxic emoji alone": ("finetune", "qmllm.naming.toxic"),
    "baseline naming, toxic emoji alone": ("finetune", "baseline.naming.toxic"),
    "name head's first pick right, every catalogue emoji alone": ("finetune", "qmllm.naming.head"),
    "CLS codes used": ("pretrain", "qmllm.codebooks.cls.codes_used"),
    "patch codes used": ("pretrain", "qmllm.codebooks.patch.codes_used"),
    "safety-map DSR, single toxic object": ("safety_map", "qmllm.dsr.single"),
    "safety-map DSR, toxic among distractors": ("safety_map", "qmllm.dsr.distractors"),
    **{f"safety-map DSR, single {category.replace('_', ' ')}": ("safety_map",
                                                                  f"qmllm.dsr_per_category.single.{category}")
       for category in TOXIC_CATEGORIES},
    "safety-map FPR, neutral": ("safety_map", "qmllm.fpr_neutral"),
    "safety-map FPR, hard negatives": ("safety_map", "qmllm.fpr_hard_negative"),
    "safety-map, toxic-share rule: DSR, single toxic object": ("safety_map", "qmllm_rules.toxic_share.dsr.single"),
    "safety-map, toxic-share rule: FPR, neutral": ("safety_map", "qmllm_rules.toxic_share.fpr_neutral"),
    "safety-map, toxic-share rule: FPR, hard negatives": ("safety_map",
                                                          "qmllm_rules.toxic_share.fpr_hard_negative"),
    "SafeCLIP DSR, single toxic object": ("safety_map", "safeclip.dsr.single"),
    "SafeCLIP FPR, neutral": ("safety_map", "safeclip.fpr_neutral"),
    "safety-map DSR gain over SafeCLIP, single toxic object": ("safety_map",
                                                               "qmllm_minus_safeclip.dsr.single.value"),
    "SafeCLIP DSR at the safety map's neutral FPR, single toxic object": ("safety_map",
                                                                         "safeclip_at_qmllm_fpr.dsr.single"),
    "safety-map DSR gain over SafeCLIP at equal neutral FPR, single toxic object": (
        "safety_map", "qmllm_minus_safeclip_at_equal_fpr.dsr.single.value"),
    "qmllm jailbreak ASR, clean image": ("evaluate", "jailbreak_clean.qmllm.asr"),
    "baseline jailbreak ASR, clean image": ("evaluate", "jailbreak_clean.baseline.asr"),
    "qmllm code-space bound ASR (found codes, clean or any image tried comply)": (
        "evaluate", "code_space_bound.asr_bound"),
    "qmllm image attacks' union ASR (any attacker, any budget)": ("evaluate", "code_space_bound.asr_images"),
    "qmllm code-space search ASR (found or clean codes comply)": ("evaluate", "code_space_bound.asr_with_clean"),
    "qmllm code-space search ASR, found codes alone": ("evaluate", "code_space_bound.asr"),
    "qmllm code-space search target loss, clean codes": ("evaluate", "code_space_bound.loss_first"),
    "qmllm code-space search target loss, found codes": ("evaluate", "code_space_bound.loss_last"),
    "qmllm code-space search: name picks changed (of the slots)": ("evaluate", "code_space_bound.name_picks_changed"),
}


def attack_figures(evaluate: dict) -> dict[str, tuple[str, str]]:
    """The jailbreak's figures, from the parameters that define it (`evaluate`: its attackers, their cases'
    labels and the budgets): what the strongest attacker and noise add over clean, every case's ASR, each
    per-instruction attacker's target loss and its codes' match to the code-space search, code stability."""
    budgets = list(evaluate["budgets"])
    bounded = [b for b in budgets if evaluate["budgets"][b]["eps"] is not None]
    attackers = evaluate["attackers"]
    found = {f"qmllm: most any attacker adds over clean, {b}": ("evaluate", f"qmllm_attack_gain_over_clean.{b}")
             for b in budgets}
    found |= {f"qmllm: random noise adds over clean, {b}": ("evaluate", f"qmllm_noise_gain_over_clean.{b}")
              for b in budgets}
    found |= {f"{case['system']} {case['label']} ASR, {b}": ("evaluate", f"jailbreak.{b}.{name}.asr")
              for attacker in attackers.values() for name, case in attacker["cases"].items() for b in budgets}
    for name, attacker in attackers.items():
        if attacker["kind"] != "per_instruction":
            continue
        own, case = next(iter(attacker["cases"].items()))
        found |= {f"{case['system']} {case['label']} target loss reached, {b}": (
            "evaluate", f"jailbreak.{b}.pgd.{name}.nll_last") for b in budgets}
        if case["system"] == "qmllm":
            found |= {f"qmllm {case['label']}: found-code positions matched, {b}": (
                "evaluate", f"code_space_bound.positions_matched.{b}.{own}") for b in bounded}
    for codes, key in (("patch-code", "patch_codes_unchanged"), ("CLS-code", "cls_code_unchanged"),
                       ("name-pick", "name_picks_unchanged")):
        found |= {f"qmllm {codes} stability under random noise, {b}": (
            "evaluate", f"code_stability.budgets.{b}.{key}") for b in bounded}
    return found


def figures(params: dict | None = None) -> dict[str, tuple[str, str]]:
    """Every headline figure, label -> (metrics file stem, dotted key): the fixed ones (`FIGURES`) and the
    jailbreak's, generated from `params` (default: the project's parameters, read from the working
    directory's conf/)."""
    if params is None:
        from qmllm_pipeline.parameters import load_parameters

        params = load_parameters()
    return {**FIGURES, **attack_figures(params["evaluate"])}


def is_raw(label: str) -> bool:
    """Figures given as they are (code counts, losses), not as shares shown in percent."""
    return "codes used" in label or "loss" in label or "picks changed" in label


def name_head_figure(label: str) -> bool:
    """Figures a run has only with a name head (`pretrain.name_head.slots` > 0): not an error where it is off."""
    return label in ("name head's first pick right, every catalogue emoji alone",
                     "qmllm code-space search: name picks changed (of the slots)") or "name-pick stability" in label


def experiments(show: list) -> list[dict]:
    """Flatten `dvc exp show --json`: one {name, rev, finished, params, metrics} per experiment (params and
    metrics by file, as DVC read them), for every baseline commit listed. An experiment still running, or one
    that was stopped, has no commit of its own yet (`finished` False): DVC shows the workspace's metrics for it."""
    found = []
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for revision in group.get("revs") or []:
                data = revision.get("data") or {}
                finished = data.get("rev") == revision.get("rev") and data.get("timestamp") is not None
                found.append({"name": revision.get("name") or revision.get("rev"), "rev": revision.get("rev"),
                              "finished": finished,
                              "params": {path: (entry or {}).get("data", {}) for path, entry in
                                         (data.get("params") or {}).items()},
                              "metrics": {Path(path).stem: (entry or {}).get("data", {}) for path, entry in
                                          (data.get("metrics") or {}).items()}})
    return found


def aggregate(runs: dict[int, dict[str, dict]], headline: dict[str, tuple[str, str]] | None = None) -> dict:
    """`runs`: seed -> metrics by file stem. Per headline figure (`headline`, default `figures()`): mean, std
    (sample; 0 for one seed), min, max, spread (max - min) and every seed's value; figures no run measured
    are left out."""
    figures_out = {}
    for label, (stem, key) in (headline or figures()).items():
        values = {seed: lookup(metrics.get(stem, {}), key) for seed, metrics in sorted(runs.items())}
        values = {seed: float(v) for seed, v in values.items() if isinstance(v, (int, float))}
        if not values:
            continue
        numbers = list(values.values())
        figures_out[label] = {"metric": f"{stem}:{key}", "mean": statistics.fmean(numbers),
                          "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0,
                          "min": min(numbers), "max": max(numbers), "spread": max(numbers) - min(numbers),
                          "values": {str(seed): v for seed, v in values.items()}}
    return {"seeds": sorted(runs), "figures": figures_out}


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc` from this environment, with its bin folder first on PATH so the stages find `kedro` and `qmllm`."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], env=env, check=check,
                          capture_output=args[0] == "exp" and args[1] == "show", text=True)


def experiment_name(seed: int, label: str | None = None) -> str:
    """`seed-<K>-<commit>`, or `seed-<K>-<label>-<commit>` for a labelled sweep (a lever's settings)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{EXPERIMENT_PREFIX}{seed}-{f'{label}-' if label else ''}{head}"


def label_of(name: str) -> str | None:
    """The label of an experiment named by `experiment_name` (None: the default configuration's sweep)."""
    parts = (name or "").split("-")
    if len(parts) < 3 or f"{parts[0]}-" != EXPERIMENT_PREFIX or not parts[1].isdigit():
        return None
    return "-".join(parts[2:-1]) or None


def run_seeds(seeds: list[int], settings: tuple[str, ...] = (), label: str | None = None) -> None:
    """One DVC experiment per seed, run in turn in a temporary copy (`--temp`): the workspace stays as it is.
    `settings` are further `-S file:key=value` overrides (a lever), named by `label`."""
    if settings and not label:
        raise ValueError("a sweep with --set needs a --label, so it is not mistaken for the default's")
    for seed in seeds:
        overrides = [arg for setting in settings for arg in ("-S", setting)]
        _dvc("exp", "run", "--temp", "-n", experiment_name(seed, label), "-S", f"{PARAMS_FILE}:seed={seed}",
             *overrides)


def collect(seeds: list[int] | None = None, label: str | None = None,
            rev: str = "HEAD") -> dict[int, dict[str, dict]]:
    """The metrics of the finished seed experiments with `label` (None: the default's) run on commit `rev`, by
    seed."""
    return select(experiments(json.loads(_dvc("exp", "show", "--json", "--rev", rev).stdout)), seeds, label)


def select(found: list[dict], seeds: list[int] | None = None, label: str | None = None) -> dict[int, dict[str, dict]]:
    """Metrics by seed of the finished seed experiments with `label` among `found` (`experiments(...)`); the
    first listed per seed (DVC lists the newest first)."""
    runs = {}
    for experiment in found:
        name = experiment["name"] or ""
        seed = lookup(experiment["params"].get(PARAMS_FILE, {}), "seed")
        if not experiment["finished"] or not name.startswith(EXPERIMENT_PREFIX) or seed is None \
                or (seeds and seed not in seeds) or label_of(name) != label:
            continue
        runs.setdefault(int(seed), experiment["metrics"])
    return runs


def compare_table(sweeps: dict[str, dict]) -> str:
    """Markdown: each headline figure's mean [min, max] in every sweep (`name -> aggregate(...)`), side by side."""
    labels = list(dict.fromkeys(label for sweep in sweeps.values() for label in sweep["figures"]))
    lines = ["| figure | " + " | ".join(sweeps) + " |", "|---" * (1 + len(sweeps)) + "|"]
    for label in labels:
        cells = []
        for sweep in sweeps.values():
            figure = sweep["figures"].get(label)
            scale, digits = (1, 3 if "loss" in label else 2 if "picks" in label else 0) if is_raw(label) else (100, 1)
            cells.append("" if figure is None else f"{scale * figure['mean']:.{digits}f} "
                         f"[{scale * figure['min']:.{digits}f}, {scale * figure['max']:.{digits}f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
