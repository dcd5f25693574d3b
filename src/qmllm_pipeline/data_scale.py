"""How the real path's memory and disk grow with the data (`qmllm data-scale`).

For each corpus size, a fresh copy of the project gets the miniature real inputs (`fixtures`: the real
architectures in miniature) with `size` caption and dialog images of `side` x `side` noisy pixels that a PNG
cannot compress, and `kedro run --env real --pipelines ingest,features,pretrain` runs on them with the
fixture's small settings in a child process whose peak resident memory is read back. The pixels stay on disk
(`ingest.embed_images: false`), so the peak should not grow with the number of images. Then the data loader's
throughput is timed alone and under the feature step, over the largest corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = "ingest,features,pretrain"
_MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def project_copy(project: Path, root: Path) -> Path:
    """The project's configuration and metadata in `root` (the package itself is installed)."""
    shutil.copytree(project / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (project / name).exists():
            shutil.copy(project / name, root / name)
    (root / "src").mkdir()
    return root


def fixture_params(side: int, workers: int) -> str:
    """`--params` of the fixture's settings with the images read at `side` and `workers` decoding processes."""
    from qmllm_pipeline.dotted import with_overrides
    from qmllm_pipeline.fixtures import FIXTURE_PARAMETERS, params_line

    return params_line(with_overrides(FIXTURE_PARAMETERS, **{"ingest.image_size": side,
                                                             "features.num_workers": workers}))


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def measure_size(project: Path, images: int, side: int, workers: int, keep: Path | None = None) -> dict:
    """One corpus size: peak RSS of the chain's process (MB), its wall time (s), and the disk use of the
    inputs and of each output folder (MB)."""
    from qmllm_pipeline.fixtures import write_real_fixture

    with tempfile.TemporaryDirectory(prefix=f"data-scale-{images}-", dir=keep) as folder:
        root = project_copy(project, Path(folder))
        raw = write_real_fixture(root / "data/01_raw/real", images=images, image_side=side)
        command = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "kedro", "run", "--env", "real",
                   "--pipelines", PIPELINES, "--params", fixture_params(side, workers)]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=root, capture_output=True, text=True,
                                env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
        seconds = time.perf_counter() - started
        if result.returncode:
            raise RuntimeError(f"{images} images: the chain failed:\n{result.stderr[-3000:]}")
        peak_kb = int(result.stdout.rsplit("peak_rss_kb", 1)[1].split()[0])
        out = root / "data/real"
        disk = {"input_images": folder_mb(raw / "images"),
                **{name: folder_mb(out / name) for name in ("03_primary", "04_feature", "06_models")}}
        return {"images": images, "peak_rss_mb": peak_kb / 1024, "seconds": seconds,
                "disk_mb": {name: round(mb, 2) for name, mb in disk.items()}}


def loader_rates(images: int, side: int, workers: tuple[int, ...], batch_size: int = 16, steps: int = 10) -> list[dict]:
    """Images per second over `images` fresh fixture images of `side` x `side`, read through a manifest:

    - `loader alone`: the DataLoader (`workers` processes) decoding, hash-checking, resizing, normalising;
    - `loader + tower`: what `features.cache: true` runs, the DataLoader feeding the fixture's CLIP tower;
    - `stage-1 step, features on the fly`: what `features.cache: false` runs, a training step (forward and
      backward of the fixture's Q-MLLM on random rows) whose features `TowerFeatures` computes from the
      images (`workers` decoding threads);
    - `stage-1 step, features in memory`: the same step on features already computed, what the step costs
      without any image work."""
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, LlamaForCausalLM

    from qmllm_pipeline.constants import IMAGE_TOKEN
    from qmllm_pipeline.fixtures import CLIP_DIR, LLM_DIR, write_real_fixture
    from qmllm_pipeline.loaders import load_llava_json
    from qmllm_pipeline.models.conversation import prepare_for_images
    from qmllm_pipeline.models.image_data import SceneImages, TowerFeatures, image_loader
    from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
    from qmllm_pipeline.models.stage1 import Stage1Data, caption_examples, stage1_losses
    from qmllm_pipeline.models.vision import VisionTower

    rows = []

    def rate(step: str, count: int, seconds: float, done: int) -> None:
        rows.append({"step": step, "workers": count, "images_per_s": round(done / seconds, 1)})

    with tempfile.TemporaryDirectory(prefix="data-scale-loader-") as folder:
        raw = write_real_fixture(Path(folder), images=images, image_side=side)
        table, _ = load_llava_json(raw / "blip_laion_cc_sbu_558k.json", raw / "images", image_size=side,
                                   embed_images=False)
        processor = CLIPImageProcessor.from_pretrained(raw / CLIP_DIR)
        clip = CLIPModel.from_pretrained(raw / CLIP_DIR)
        tower = VisionTower.from_clip(clip).eval()
        dataset = SceneImages(table, processor)
        tokenizer = AutoTokenizer.from_pretrained(raw / LLM_DIR)
        llm = LlamaForCausalLM.from_pretrained(raw / LLM_DIR)
        prepare_for_images(tokenizer, llm, "vicuna_v1")
        examples = caption_examples(list(table["caption"]), tokenizer, "Describe the image.", 512)
        for count in workers:
            for step in ("loader alone", "loader + tower"):
                started = time.perf_counter()
                with torch.no_grad():
                    for pixels in image_loader(dataset, range(len(dataset)), batch_size, count):
                        if step == "loader + tower":
                            tower.features(pixels, ("layer",))
                rate(step, count, time.perf_counter() - started, len(dataset))
        live = TowerFeatures(dataset, tower, "layer", "layer", batch_size=batch_size)
        config = QMLLMConfig(vision_width=tower.hidden_size, llm_width=llm.config.hidden_size,
                             image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cls_codes=8, patch_codes=16)
        model = QMLLM(config, llm)
        model.llm.requires_grad_(False)
        draws = [torch.randint(len(dataset), (batch_size,), generator=torch.Generator().manual_seed(k))
                 for k in range(steps)]
        cached = {key: value[:] for key, value in live.items()}
        sources = [("stage-1 step, features on the fly", count, live) for count in workers]
        sources.append(("stage-1 step, features in memory", 0, cached))
        for step, count, features in sources:
            if isinstance(features, TowerFeatures):
                features.threads = count
            data = Stage1Data(features["cls"], features["patches"], examples)
            warm = torch.randint(len(dataset), (batch_size,), generator=torch.Generator().manual_seed(-1 % 2**31))
            stage1_losses(model, data, [examples[i] for i in warm.tolist()])["loss"].backward()  # not timed
            started = time.perf_counter()
            for draw in draws:
                stage1_losses(model, data, [examples[i] for i in draw.tolist()])["loss"].backward()
            rate(step, count, time.perf_counter() - started, steps * batch_size)
    return rows


def write(results: list[dict], loader: list[dict], out: Path, command: str) -> dict:
    table = {"images": [r["images"] for r in results], "peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in results],
             "seconds": [round(r["seconds"], 1) for r in results], "disk_mb": [r["disk_mb"] for r in results],
             "loader": loader, "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    return table
