"""Errors, not tracebacks (docs/faults.md): every `qmllm` command that reads model files or tables turns a
corrupt safetensors file, a size mismatch or a broken table into one line on stderr and exit code 1 (a bad
argument: 2); and the CLI and the Python API read an image file alike."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from qmllm_pipeline.datasets import SealedManifestDataset
from qmllm_pipeline.files import atomic_path

QMLLM = [sys.executable, "-m", "qmllm_pipeline.commands"]


def _qmllm(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*QMLLM, *arguments], cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    """Exit `code` and one error line with `message`; no traceback (a library's own warning may precede it)."""
    assert result.returncode == code and message in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("qmllm: error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1 and message in errors[0], result.stderr


def _replace(path: Path, content: bytes) -> None:
    """Write as the pipelines do (a new file renamed onto the name), so the sealed copy keeps the old one."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(content)


@pytest.fixture
def model(smoke_run):
    """The smoke run's model folder; whatever a test changes in it (and the manifest) is put back after."""
    folder = smoke_run / "data" / "smoke" / "06_models" / "qmllm"
    kept = {path: path.read_bytes() for path in (folder / "guarded.json", folder / "stage1.safetensors",
                                                 folder / "safety_map.parquet")}
    yield folder
    for path, content in kept.items():
        _replace(path, content)
    copy = (folder / json.loads(kept[folder / "guarded.json"])["sealed_copy"]).resolve()
    shutil.rmtree(copy, ignore_errors=True)
    _reseal(folder)  # the restored files sealed again: the same hashes, the same copy, linked to them anew
    assert (folder / "guarded.json").read_bytes() == kept[folder / "guarded.json"]


def _reseal(folder: Path) -> None:
    """What someone who changed the files and knew the format would do."""
    manifest = json.loads((folder / "guarded.json").read_text())
    SealedManifestDataset(filepath=str(folder / "guarded.json")).save(
        {k: v for k, v in manifest.items() if k not in ("files", "sealed_copy")})


@pytest.fixture(scope="module")
def scene(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scene")
    result = _qmllm("render", "--kind", "toxic", "--count", "1", "--out", str(out), cwd=smoke_run)
    assert result.returncode == 0, result.stderr
    return next(out.glob("*.png"))


def test_a_corrupt_or_misshapen_model_file_is_one_line_in_check_and_chat(smoke_run, model, scene):
    manifest = str(model / "guarded.json")
    weights = model / "stage1.safetensors"
    original = weights.read_bytes()
    _replace(weights, original[:100])  # corrupt, then sealed as it is: the seal holds, the file does not load
    _reseal(model)
    for command in (["check", "--model", manifest, str(scene)],
                    ["chat", "--model", manifest, "--image", str(scene), "--prompt", "What is it?"]):
        _one_line_error(_qmllm(*command, cwd=smoke_run), 1, "stage1.safetensors: not a readable safetensors file")

    _replace(weights, original)
    state = load_file(weights)
    name = next(k for k in state if k.startswith("patch_quantizer.") and state[k].dim() == 2)
    state[name] = state[name][:-1]  # one code fewer than the config's codebook
    save_file(state, weights.with_suffix(".tmp"))
    _replace(weights, weights.with_suffix(".tmp").read_bytes())
    weights.with_suffix(".tmp").unlink()
    _reseal(model)
    _one_line_error(_qmllm("check", "--model", manifest, str(scene), cwd=smoke_run), 1,
                    "stage-1 weights do not fit the config's patch_quantizer")


def test_a_broken_safety_map_table_is_one_line(smoke_run, model, scene):
    _replace(model / "safety_map.parquet", b"PAR1 not really a table")
    _reseal(model)
    _one_line_error(_qmllm("check", "--model", str(model / "guarded.json"), str(scene), cwd=smoke_run), 1,
                    "safety_map.parquet: not a readable Parquet table")


def test_bench_names_a_corrupt_weights_file(smoke_run, model):
    _replace(model / "stage1.safetensors", b"\x00" * 64)
    result = _qmllm("bench", "--project", str(smoke_run), "--env", "smoke", "--repeats", "3", cwd=smoke_run)
    _one_line_error(result, 1, "stage1.safetensors: not a readable safetensors file")


def test_promote_foundation_refuses_a_corrupt_weights_file(smoke_run, tmp_path):
    source = tmp_path / "trained"
    shutil.copytree(smoke_run / "data" / "smoke" / "06_models" / "foundation", source)
    clip = source / "clip" / "model.safetensors"
    clip.write_bytes(clip.read_bytes()[:200])
    result = _qmllm("promote-foundation", "--source", str(source), "--target", str(tmp_path / "shipped"), "--force",
                    cwd=tmp_path)
    _one_line_error(result, 1, "clip/model.safetensors: not a readable safetensors file")
    assert not (tmp_path / "shipped").exists()  # nothing shipped


def test_report_and_seeds_compare_name_a_broken_table(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text("{broken")
    _one_line_error(_qmllm("report", "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "r.md"),
                           "--no-readme", cwd=tmp_path), 1, "evaluate.json: not valid JSON")
    sweep = tmp_path / "seeds_a.json"
    sweep.write_text("[1, 2")
    _one_line_error(_qmllm("seeds", "compare", str(sweep), cwd=tmp_path), 1, "seeds_a.json")


def test_the_cli_and_the_api_read_an_image_file_alike(smoke_run, tmp_path):
    """One RGBA PNG with transparent pixels and one 16-bit grayscale PNG, through `qmllm check` and through
    `GuardedQMLLM.check(Image.open(file))`: the same codes and verdicts, from the same pixels."""
    from qmllm_pipeline.loaders import open_image_checked
    from qmllm_pipeline.models.guarded import GuardedQMLLM

    manifest = smoke_run / "data" / "smoke" / "06_models" / "qmllm" / "guarded.json"
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (56, 56, 4), dtype=np.uint8)
    rgba[:28, :, 3] = 0  # the top half transparent: composited on white, not read as its hidden colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rng.integers(0, 4096, (56, 56), dtype=np.uint16)).save(tmp_path / "deep.png")  # 12 of 16 bits
    files = [tmp_path / "alpha.png", tmp_path / "deep.png"]
    cli = _qmllm("check", "--json", "--model", str(manifest), *map(str, files), cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    guarded = GuardedQMLLM.from_manifest(manifest)
    opened = [Image.open(path) for path in files]
    api = guarded.check(opened)
    assert [json.loads(line)["code"] for line in cli.stdout.splitlines()] == [v.code for v in api]
    assert [json.loads(line)["refused"] for line in cli.stdout.splitlines()] == [v.refused for v in api]
    pixels = guarded._pixels(opened)
    assert np.array_equal(pixels.numpy(), guarded._pixels([open_image_checked(p, 10**8) for p in files]).numpy())
    assert not np.array_equal(pixels.numpy(), guarded._pixels([i.convert("RGB") for i in opened]).numpy())
    assert (np.asarray(open_image_checked(files[0], 10**8))[:28] == 255).all()  # transparent: white, as composited
