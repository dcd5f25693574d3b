"""The project as a user drives it: `kedro run` in the smoke environment, MLflow tracking, Kedro-Viz, `qmllm`."""

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pandas as pd

from conftest import KEDRO, PROJECT_ROOT
from conftest import run_checked as _run
from qmllm_pipeline.pipeline_registry import register_pipelines


def test_kedro_run_writes_every_catalogue_entry(smoke_run):
    smoke = smoke_run / "data" / "smoke"  # conf/smoke/globals.yml: smoke never overwrites a default run
    for path in ["02_intermediate/emoji_catalogue.parquet", "03_primary/caption_corpus.parquet",
                 "03_primary/text_corpus.parquet", "03_primary/dialogs.parquet", "03_primary/dmap.parquet",
                 "03_primary/dmap_validation.parquet", "05_model_input/eval_toxic.parquet",
                 "05_model_input/eval_neutral.parquet", "05_model_input/eval_hard_negative.parquet",
                 "05_model_input/eval_utility.parquet", "05_model_input/eval_items.parquet",
                 "08_reporting/world_contact_sheet.png", "metrics/world_summary.json", "metrics/foundation.json",
                 "06_models/foundation/provenance.json", "06_models/foundation/clip/model.safetensors",
                 "metrics/pretrain.json", "metrics/finetune.json", "08_reporting/clip_loss_curve.png",
                 "04_feature/caption_features.safetensors", "06_models/qmllm/stage1.safetensors",
                 "06_models/baseline/stage1.safetensors", "06_models/qmllm/config.json",
                 "06_models/qmllm/llm/model.safetensors",
                 "06_models/foundation/tokenizer/tokenizer.json", "metrics/evaluate.json",
                 "08_reporting/evaluation_report.md", "08_reporting/jailbreak_dsr.png",
                 "07_model_output/adversarial_images.safetensors", "07_model_output/toxic_image_responses.parquet"]:
        assert (smoke / path).is_file(), path
    assert not (smoke_run / "data" / "03_primary").exists()
    dialogs = pd.read_parquet(smoke / "03_primary/dialogs.parquet")
    assert dialogs["conversations"].iloc[0][0]["from"] == "human"  # list<struct> survives Parquet
    summary = json.loads((smoke / "metrics/world_summary.json").read_text())
    assert summary["scenes"]["caption_corpus"]["rows"] == 600
    assert not list(smoke_run.glob("data/**/.*.tmp")) and not list((smoke / "06_models/checkpoints").iterdir())


def test_the_run_is_tracked_in_mlflow(smoke_run):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{smoke_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qmllm_pipeline")
    runs = {",".join(sorted(r.data.tags["pipeline"].split(","))): r
            for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"data,foundation", "__default__"}
    foundation, run = runs["data,foundation"], runs["__default__"]
    assert run.info.status == foundation.info.status == "FINISHED"
    assert run.data.params["data.caption_corpus.n_scenes"] == "600"
    assert run.data.tags["env"] == "smoke"
    assert run.data.tags["variants"] == "qmllm,baseline" and run.data.tags["systems"] == "baseline,safeclip,qmllm"
    history = client.get_metric_history(foundation.info.run_id, "clip/loss")
    assert len(history) == 30  # one point per training step
    assert {"foundation/clip/top1", "profile/foundation/seconds"} <= set(foundation.data.metrics)
    assert "plots/clip_loss_curve.png" in {a.path for a in client.list_artifacts(foundation.info.run_id, "plots")}
    assert {"qmllm/pretrain/vq_patch", "qmllm/pretrain/patch_perplexity", "baseline/pretrain/generative",
            "pretrain/qmllm/codebooks/cls/codes_used", "finetune/qmllm/utility/object"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/qmllm_pretrain_loss_curve.png", "plots/jailbreak_dsr.png",
            "plots/adversarial_images.png"} <= artifacts
    assert {"evaluate/summary/qmllm/toxic_dsr_single", "evaluate/jailbreak/eps64/qmllm_adaptive/asr",
            "evaluate/overhead/baseline/answer_median_ms", "profile/evaluate/seconds"} <= set(run.data.metrics)
    assert "profile/foundation/seconds" not in run.data.metrics  # the default chain reads the foundation set
    assert 100 < run.data.metrics["profile/peak_rss_mb"] < 24 * 1024
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == ["reports/evaluation_report.md"]


def test_kedro_viz_build_shows_the_lineage(smoke_run):
    _run([*KEDRO, "viz", "build"], cwd=smoke_run)
    graph = json.loads((smoke_run / "build" / "api" / "main").read_text())
    layers = graph["layers"]  # the shipped foundation set and the world are both inputs of the chain
    assert layers[3:] == ["features", "pretrain", "finetune", "safety_map", "evaluate", "reporting"]
    assert set(layers[:3]) == {"raw", "world", "foundation"} and layers.index("raw") < layers.index("world")
    assert {"validate_emoji_catalogue", "render_caption_corpus"} <= {n["name"] for n in graph["nodes"]}


def test_pipelines_are_registered():
    pipelines = register_pipelines()
    assert {"data", "ingest", "__default__"} <= set(pipelines)
    # `ingest` is the real-data alternative to `data`: same outputs, never in one run.
    assert {"caption_corpus", "dmap"} <= pipelines["ingest"].all_outputs() & pipelines["data"].all_outputs()


def test_qmllm_render_and_bad_options(tmp_path):
    command = [sys.executable, "-m", "qmllm_pipeline.commands"]
    out = tmp_path / "scenes"
    result = _run([*command, "render", "--kind", "toxic", "--category", "drugs", "--count", "3", "--out", str(out),
                   "--conf-source", str(PROJECT_ROOT / "conf")], cwd=tmp_path)
    assert len(list(out.glob("*.png"))) == 3 and result.stdout.count("\tdrugs\t") == 3
    bad = subprocess.run([*command, "render", "--category", "drugs"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs --kind toxic" in bad.stderr and "Traceback" not in bad.stderr
    outside = subprocess.run([*command, "render"], cwd=tmp_path, capture_output=True, text=True)
    assert outside.returncode == 2 and "no Kedro configuration here" in outside.stderr


def test_a_killed_pretrain_run_resumes_from_its_checkpoint(smoke_run):
    """SIGKILL `kedro run --pipelines pretrain` once a checkpoint is on disk; the next run continues from it."""
    import signal
    import time

    overrides = ["--params", "pretrain.stage1.training.steps=100,pretrain.stage1.training.checkpoint_every=20"]
    command = [*KEDRO, "run", "--env", "smoke", "--pipelines", "pretrain", *overrides]
    checkpoints = smoke_run / "data" / "smoke" / "06_models" / "checkpoints"
    # this test retrains stage 1 in the shared project; the sealed model the later tests load is put back after
    trained = {path: path.read_bytes() for variant in ("qmllm", "baseline")
               for path in (smoke_run / "data" / "smoke" / "06_models" / variant).glob("*.*")}
    qmllm = [sys.executable, "-m", "qmllm_pipeline.commands"]
    manifest = smoke_run / "data" / "smoke" / "06_models" / "qmllm" / "guarded.json"
    scenes = smoke_run / "kill_test_scenes"
    _run([*qmllm, "render", "--kind", "toxic", "--count", "3", "--out", str(scenes)], cwd=smoke_run)
    check = [*qmllm, "check", "--json", "--model", str(manifest), *sorted(map(str, scenes.glob("*.png")))]
    before = _run(check, cwd=smoke_run).stdout
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true")
    process = subprocess.Popen(command, cwd=smoke_run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 120
    while not list(checkpoints.glob("*_pretrain/state.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = list(checkpoints.glob("*_pretrain/state.json"))
    assert saved, "no checkpoint was written before the kill"
    step = json.loads(saved[0].read_text())["step"]
    assert 0 < step < 100
    result = _run(command, cwd=smoke_run)
    assert f"resuming from the checkpoint at step {step} of 100" in result.stdout + result.stderr
    assert not list(checkpoints.glob("*_pretrain/state.json"))
    # new stage-1 weights beside the old LLM and map, never re-sealed: the sealed copy is served, unchanged
    after = _run(check, cwd=smoke_run)
    assert after.stdout == before and "stage1.safetensors: changed since the model was sealed" in after.stderr
    assert "serving the sealed copy" in after.stderr
    for path, content in trained.items():
        path.write_bytes(content)
    assert "warning" not in _run(check, cwd=smoke_run).stderr  # put back: the folder is as sealed again


def test_qmllm_check_and_chat_on_the_trained_smoke_model(smoke_run, tmp_path):
    command = [sys.executable, "-m", "qmllm_pipeline.commands"]
    manifest = smoke_run / "data" / "smoke" / "06_models" / "qmllm" / "guarded.json"
    scene = tmp_path / "scenes"
    _run([*command, "render", "--kind", "toxic", "--category", "weapon", "--count", "2", "--out", str(scene),
          "--conf-source", str(PROJECT_ROOT / "conf")], cwd=tmp_path)
    images = sorted(str(p) for p in scene.glob("*.png"))
    checked = _run([*command, "check", "--json", "--model", str(manifest), *images], cwd=tmp_path)
    verdicts = [json.loads(line) for line in checked.stdout.splitlines()]
    assert [v["image"] for v in verdicts] == images
    assert all(set(v) == {"image", "refused", "category", "code", "probability"} for v in verdicts)
    answered = _run([*command, "chat", "--model", str(manifest), "--image", images[0], "--prompt", "Describe."],
                    cwd=tmp_path)
    assert len(answered.stdout.strip().splitlines()) == 1  # the answer (or refusal), nothing else

    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    cases = [
        (["check", "--model", str(manifest), str(broken)], "not a recognised image format"),
        (["check", "--model", str(manifest), str(tmp_path / "missing.png")], "file not found"),
        (["check", "--model", str(manifest), str(scene)], "is a directory"),
        (["chat", "--model", str(manifest), "--image", images[0], "--prompt", "  "], "--prompt is empty"),
        (["chat", "--model", str(manifest), "--image", images[0], "--prompt", "x" * 501], "the limit is 500"),
        (["check", "--model", str(tmp_path / "untrained" / "guarded.json"), images[0]], "no trained model here"),
    ]
    for arguments, message in cases:
        result = subprocess.run([*command, *arguments], cwd=tmp_path, capture_output=True, text=True)
        usage = "no trained model" not in message  # a bad argument (2), or nothing to load (a runtime error, 1)
        assert result.returncode == (2 if usage else 1) and message in result.stderr, (arguments, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_qmllm_bench_prints_every_ratio_and_the_run_profile(smoke_run, tmp_path):
    out = tmp_path / "bench.md"
    result = _run([sys.executable, "-m", "qmllm_pipeline.commands", "bench", "--project", str(smoke_run), "--env",
                   "smoke", "--repeats", "3", "--stage1-steps", "2", "--out", str(out)], cwd=smoke_run)
    table = out.read_text()
    assert table.strip() in result.stdout
    for number in ("| 1. ", "| 2. ", "| 3. ", "| 4. ", "| 5. ", "| 6. ", "| 7. "):
        assert number in table, number
    assert "| pretrain |" in table and "peak resident memory" in table  # from the smoke run's MLflow profile
    missing = subprocess.run([sys.executable, "-m", "qmllm_pipeline.commands", "bench", "--project", str(tmp_path)],
                             cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 2 and "not a Kedro project" in missing.stderr


def test_qmllm_runs_compares_the_latest_runs(smoke_run, tmp_path):
    result = _run([sys.executable, "-m", "qmllm_pipeline.commands", "runs", "--project", str(smoke_run),
                   "--metric", "evaluate/summary/qmllm/toxic_dsr_single", "--metric", "profile/peak_rss_mb"],
                  cwd=smoke_run)
    lines = result.stdout.splitlines()
    assert any(line.startswith("env") and "smoke" in line for line in lines)
    assert any(line.startswith("evaluate/summary/qmllm/toxic_dsr_single") for line in lines)
    missing = subprocess.run([sys.executable, "-m", "qmllm_pipeline.commands", "runs", "--project", str(tmp_path)],
                             cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 1 and "no MLflow store here" in missing.stderr


def test_the_walkthrough_notebook_runs_against_the_smoke_run(smoke_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    monkeypatch.setenv("QMLLM_ENV", "smoke")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(smoke_run)}}).execute()
    printed = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for output in cell.get("outputs", []))
    assert "baseline  ->" in printed and "qmllm     ->" in printed and "environment smoke" in printed


def test_the_full_profile_trains_the_papers_recipe_beside_the_default_run():
    from kedro.config import OmegaConfigLoader

    from qmllm_pipeline.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), env="full", **CONFIG_LOADER_ARGS)
    catalog, params = loader["catalog"], loader["parameters"]
    # (read before another loader exists: each one registers its own `globals` resolver for all)
    defaults = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), env="base", **CONFIG_LOADER_ARGS)["parameters"]
    jailbreak = params["evaluate"]["jailbreak"]
    assert jailbreak["steps"] > 300 and jailbreak["train_instructions"] is None
    assert params["pretrain"]["name_head"]["slots"] == 0  # the paper's recipe alone
    assert params["finetune"]["data"]["synthetic_requests"] == 0 < defaults["finetune"]["data"]["synthetic_requests"]
    assert params["finetune"]["stage2"]["search_augment"]["fraction"] == 0  # no adversarial training in code space
    # a longer budget than the default run's: five times its stage-1 samples; stage 2, whose default is longer
    # for the name head's made-up requests (1,200 steps), gets 2.5 times that (five times the recipe's 600)
    for stage, factor in (("stage1", 5), ("stage2", 2.5)):
        default = (defaults["pretrain"] if stage == "stage1" else defaults["finetune"])[stage]["training"]
        chosen = (params["pretrain"] if stage == "stage1" else params["finetune"])[stage]["training"]
        assert chosen["steps"] * chosen["batch_size"] >= factor * default["steps"] * default["batch_size"]
    assert params["checkpoint_dir"].startswith("data/full/")
    pipelines = register_pipelines()
    read = set().union(*(pipelines[name].inputs() for name in ("pretrain", "finetune", "safety_map", "evaluate")))
    written = set().union(*(pipelines[name].all_outputs() for name in ("pretrain", "finetune", "safety_map",
                                                                        "evaluate")))
    saved = []
    for name in sorted(written):
        entry = catalog.get(name) or next((catalog[pattern] for pattern in catalog if "{" in pattern
                                           and name.endswith(pattern.split("}")[-1])), None)
        if entry is None or entry.get("type") == "MemoryDataset":
            continue
        path = entry.get("filepath") or entry.get("path") or entry["dataset"]["filepath"]
        assert path.startswith("data/full/"), (name, path)  # DVC tracks the default paths
        saved.append(name)
    assert len(saved) >= 15
    for name in ("caption_features", "dialog_features", "eval_items", "dmap"):  # the default run's world
        assert name in read and catalog[name]["filepath"].startswith("data/0"), name
    assert catalog["tokenizer"]["path"] == "data/01_raw/foundation/tokenizer"  # the shipped stand-ins
    model_dir = PROJECT_ROOT / "data/full/06_models/qmllm"
    for reference in ("vision_tower", "image_processor", "tokenizer"):
        target = (model_dir / params["pretrain"]["model"]["references"][reference]).resolve()
        assert target.parent == (PROJECT_ROOT / "data/01_raw/foundation").resolve(), reference


def test_each_environment_overlays_single_keys_of_base():
    """An environment's parameters overlay base key by key (the smoke profile shortens the name head's
    training, the full profile turns it off)."""
    from qmllm_pipeline.parameters import load_parameters

    smoke = load_parameters("smoke", PROJECT_ROOT / "conf")
    assert smoke["pretrain"]["name_head"]["slots"] == 3 and smoke["pretrain"]["name_head"]["training"]["steps"] == 20
    base = load_parameters("base", PROJECT_ROOT / "conf")
    assert base["pretrain"]["name_head"]["slots"] == 3 and base["pretrain"]["name_head"]["training"]["steps"] > 20
    assert load_parameters("full", PROJECT_ROOT / "conf")["pretrain"]["name_head"]["slots"] == 0


def test_a_tampered_or_inconsistent_model_is_refused_and_the_restored_one_loads(smoke_run, tmp_path):
    """The guarded model is sealed: `qmllm check` refuses it, in one line, when a file it was sealed with
    changed, went missing or gained a neighbour, or (re-sealed by whoever changed it) when its map and weights
    disagree; restoring the files restores the same verdicts. A file replaced (not changed in place) leaves the
    sealed copy intact, which is then served."""
    import numpy as np
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from qmllm_pipeline.commands import main
    from qmllm_pipeline.datasets import SealedManifestDataset
    from qmllm_pipeline.files import atomic_path

    folder = smoke_run / "data" / "smoke" / "06_models" / "qmllm"
    manifest_file, map_file = folder / "guarded.json", folder / "safety_map.parquet"
    weights = folder / "stage1.safetensors"
    scenes = tmp_path / "scenes"
    CliRunner().invoke(main, ["render", "--kind", "toxic", "--category", "weapon", "--count", "2", "--out",
                              str(scenes), "--conf-source", str(PROJECT_ROOT / "conf")])
    images = sorted(str(p) for p in scenes.glob("*.png"))

    def check() -> tuple[int, str]:
        result = CliRunner().invoke(main, ["check", "--json", "--model", str(manifest_file), *images])
        return result.exit_code, result.output

    code, before = check()
    assert code == 0, before
    originals = {path: path.read_bytes() for path in (manifest_file, map_file, weights)}
    manifest = json.loads(originals[manifest_file])
    copy = (manifest_file.parent / manifest["sealed_copy"]).resolve()  # the model folder as sealed (hard links)
    shutil.rmtree(copy)  # sealed afresh, so that the copy shares the folder's files (as after `kedro run`)
    SealedManifestDataset(filepath=str(manifest_file)).save({k: v for k, v in manifest.items()
                                                             if k not in ("files", "sealed_copy")})
    assert manifest_file.read_bytes() == originals[manifest_file] and copy.is_dir()

    def reseal(toxic_codes: int) -> None:  # what someone who changed the files and knew the format would do
        unsealed = {k: v for k, v in manifest.items() if k != "files"}
        SealedManifestDataset(filepath=str(manifest_file)).save({**unsealed, "toxic_codes": toxic_codes})

    safety_map = pd.read_parquet(map_file)
    state = load_file(weights)
    poisoned = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in poisoned.items() if v.is_floating_point() and v.numel())
    poisoned[first].view(-1)[0] = float("nan")
    faults = {
        "map relabelled all neutral": (lambda: safety_map.assign(label="neutral").to_parquet(map_file),
                                       "safety_map.parquet: changed since the model was sealed"),
        "weights truncated": (lambda: weights.write_bytes(originals[weights][:100]),
                              "stage1.safetensors: changed since the model was sealed"),
        "seal removed": (lambda: manifest_file.write_text(json.dumps({k: v for k, v in manifest.items()
                                                                       if k != "files"})), "not sealed"),
        "all-neutral map, re-sealed": (lambda: (safety_map.assign(label="neutral").to_parquet(map_file), reseal(0)),
                                       "every code is labelled neutral"),
        "map cut to half, re-sealed": (lambda: (safety_map.head(len(safety_map) // 2).to_parquet(map_file),
                                                reseal(int((safety_map.head(len(safety_map) // 2)["label"]
                                                            != "neutral").sum()))),
                                       "codes do not match the model's CLS codebook"),
        "NaN weight, re-sealed": (lambda: (save_file(poisoned, weights), reseal(manifest["toxic_codes"])),
                                  "NaN or infinite"),
    }
    for name, (tamper, message) in faults.items():
        try:
            tamper()
            code, output = check()
            assert code == 1 and message in output and "Traceback" not in output, (name, output)
            assert len(output.strip().splitlines()) == 1, (name, output)
        finally:
            for path, content in originals.items():
                path.write_bytes(content)
    assert check() == (0, before)   # the restored model loads and says the same

    # a file replaced as the pipelines write (a new file renamed onto its name): the folder no longer matches,
    # the sealed copy still does and is served, with a warning; without the copy it is refused
    with atomic_path(folder / "llm" / "extra.bin") as temporary:
        temporary.write_bytes(b"x")
    try:
        result = CliRunner().invoke(main, ["check", "--json", "--model", str(manifest_file), *images])
        assert result.exit_code == 0 and "serving the sealed copy" in result.stderr, result.output
        assert result.stdout == before
        hidden = copy.with_name(copy.name + "-away")
        copy.rename(hidden)
        try:
            code, output = check()
            assert code == 1 and "extra.bin: not part of the sealed model" in output, output
        finally:
            hidden.rename(copy)
    finally:
        (folder / "llm" / "extra.bin").unlink()
    assert check() == (0, before)
    assert np.isfinite(load_file(weights)[first]).all()

    neutral = tmp_path / "neutral"
    CliRunner().invoke(main, ["render", "--kind", "neutral", "--count", "4", "--out", str(neutral), "--conf-source",
                              str(PROJECT_ROOT / "conf")])
    candidates = sorted(str(p) for p in neutral.glob("*.png"))
    verdicts = CliRunner().invoke(main, ["check", "--json", "--model", str(manifest_file), *candidates]).output
    image = next(json.loads(line)["image"] for line in verdicts.splitlines() if not json.loads(line)["refused"])
    prompts = {"<image> describe": "contains <image>", "猫" * 490: "too long"}
    for prompt, message in prompts.items():
        result = CliRunner().invoke(main, ["chat", "--model", str(manifest_file), "--image", image, "--prompt",
                                           prompt])
        assert result.exit_code == 2 and message in result.output, (prompt[:20], result.output)
