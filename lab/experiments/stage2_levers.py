"""Stage 2 of one variant under other settings, on a stage 1 already trained: the finetune pipeline's own
nodes (`dialog_examples`, `finetune_variant`, `finetuned_model` and its scoring) run in memory, one
setting at a time, and the figures issue 18 sets goals on read off each (held-out harmful and benign
requests refused with a neutral image, naming, colour, count, caption word F1), with the refusals on the
stage-2 validation split (`finetune.data.validation_fraction`) to choose by: the held-out split reports.

A setting is a dict of dotted parameter keys under `finetune.` (`{"finetune.stage2.lora.enabled": true}`);
`{}` is the configured stage 2, so it reproduces what `kedro run --pipelines finetune` scored. Stage 1, the
world and the foundation models stay the run's: a screen of a stage-2 lever costs one stage 2, not a chain.
"""

from __future__ import annotations

import time

import pandas as pd

from qmllm_pipeline.dotted import lookup, with_overrides
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.pipelines.finetune import pipeline as finetune_pipeline

# the figures of a row: column -> dotted key in the variant's finetune metrics
FIGURES = {
    "validation_harmful_refused": "safety.validation_harmful_refused_with_neutral_image",
    "validation_benign_refused": "safety.validation_benign_refused_with_neutral_image",
    "harmful_refused": "safety.heldout_harmful_refused_with_neutral_image",
    "benign_refused": "safety.heldout_benign_refused_with_neutral_image",
    "naming": "naming.all",
    "naming_toxic": "naming.toxic",
    "object": "utility.object",
    "color": "utility.color",
    "count": "utility.count",
    "caption_f1": "caption_f1",
    "caption_objects_multi": "caption_objects.recall.multi",
}


def stage2_pipeline(variant: str):
    """The finetune pipeline's nodes that one variant's scored stage 2 needs (its shared dialog examples too)."""
    return finetune_pipeline.create_pipeline().to_outputs(f"{variant}.finetune_metrics")


def stage2_levers(inputs: dict, params: dict, settings: list[dict], variant: str = "qmllm") -> pd.DataFrame:
    """One row per setting: the stage-2 settings (as given), the seconds stage 2 and its scoring took, and the
    `FIGURES` of the variant's finetune metrics. `inputs`: the datasets `stage2_pipeline(variant)` reads (a
    trained run's stage 1 among them); `params`: the run's parameters (its seed included)."""
    pipeline = stage2_pipeline(variant)
    missing = sorted(name for name in pipeline.inputs() if not name.startswith("params:") and name not in inputs)
    if missing:
        raise ValueError(f"stage-2 levers: inputs {missing} not given")
    rows = []
    for setting in settings:
        outside = sorted(key for key in setting if not key.startswith("finetune."))
        if outside:
            raise ValueError(f"stage-2 levers change stage 2 only: {outside} are not finetune.* keys")
        started = time.perf_counter()
        outputs = run_in_memory(pipeline, inputs, with_overrides(params, **setting))
        metrics = outputs[f"{variant}.finetune_metrics"]
        rows.append({"variant": variant, "seed": params["seed"],
                     "setting": ", ".join(f"{k.removeprefix('finetune.')}={v}" for k, v in setting.items()) or
                     "configured", "seconds": round(time.perf_counter() - started, 1),
                     **{column: lookup(metrics, key) for column, key in FIGURES.items()}})
    return pd.DataFrame(rows)
