"""The shipped foundation set: the stand-ins for CLIP and Vicuna that the default run reads as a real run
reads downloaded weights (`data/01_raw/foundation/`, git-tracked), and `promote`, which makes a set the
`foundation` pipeline trained (`data/06_models/foundation/`) the shipped one."""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from qmllm_pipeline.files import atomic_directory

PARTS = ("tokenizer", "clip", "clip_image_processor", "llm")
PROVENANCE = "provenance.json"
SHIPPED, TRAINED = Path("data/01_raw/foundation"), Path("data/06_models/foundation")


def read_provenance(directory: str | Path) -> dict:
    path = Path(directory) / PROVENANCE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no provenance here (train a set with `kedro run --pipelines foundation`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def unmet_goals(provenance: dict) -> list[str]:
    return [goal for goal, met in provenance["metrics"]["goals"].items() if not met]


def promote(source: str | Path = TRAINED, target: str | Path = SHIPPED, force: bool = False) -> dict:
    """Copy a trained set (its four model directories and its provenance) over the shipped one, as one
    folder swap (an interrupted promotion leaves the old set in place). A set that misses a shipping goal is
    refused unless `force`. Returns the provenance written beside the shipped weights."""
    source, target = Path(source), Path(target)
    provenance = read_provenance(source)
    missing = [part for part in PARTS if not (source / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{source}: the trained set lacks {missing}")
    check_weights(source)
    unmet = unmet_goals(provenance)
    if unmet and not force:
        raise ValueError(f"{source}: the trained set misses shipping goals {unmet} (promote with --force to ship "
                         "it anyway)")
    provenance["promoted"] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from": str(source),
                              "command": " ".join(["qmllm", *sys.argv[1:]]), "goals_unmet": unmet}
    with atomic_directory(target) as staging:
        for part in PARTS:
            shutil.copytree(source / part, staging / part)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return provenance


def check_weights(directory: str | Path) -> None:
    """Every safetensors file under `directory` reads, and holds finite numbers only; else `ValueError` naming
    the file. A set is checked before it ships: the default run would otherwise meet the broken file first."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for path in sorted(Path(directory).rglob("*.safetensors")):
        try:
            tensors = load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{path}: tensor {name} holds NaN or infinite values")


def size_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
