"""Data that streams: manifests instead of pixels, images decoded per batch by a DataLoader, features written
in shards and read a batch at a time, and the same numbers as the in-memory path."""

import os
from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPModel

from qmllm_pipeline.datasets import ShardedSafetensorsDataset
from qmllm_pipeline.fixtures import CLIP_DIR, write_data, write_models
from qmllm_pipeline.loaders import BadInputError, load_llava_json
from qmllm_pipeline.models.feature_shards import ShardedFeatures, gather, shard_name
from qmllm_pipeline.models.image_data import SceneImages, TowerFeatures
from qmllm_pipeline.models.stage1 import Stage1Data, Stage1Settings, train_stage1
from qmllm_pipeline.models.training import TrainingConfig
from qmllm_pipeline.pipelines.features.nodes import extract_caption_features
from qmllm_pipeline.scaling import small_llama, small_qmllm, small_world


def _lazy(tensors: dict[str, torch.Tensor], sizes: list[int]) -> dict:
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return {shard_name(k): (lambda s=s, n=n: {key: t[s:s + n] for key, t in tensors.items()})
            for k, (s, n) in enumerate(zip(starts, sizes, strict=True))}


def test_shards_read_back_any_rows_as_the_whole_tensor_would(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"cls": torch.randn(13, 4, generator=generator).half(),
               "patches": torch.randn(13, 3, 4, generator=generator)}
    ShardedSafetensorsDataset(str(tmp_path / "features")).save(_lazy(tensors, [5, 5, 3]))
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [f"shard-0000{k}.safetensors" for k in range(3)]
    loaded = ShardedSafetensorsDataset(str(tmp_path / "features")).load()
    assert isinstance(loaded, ShardedFeatures) and set(loaded) == {"cls", "patches"}
    for key, whole in tensors.items():
        column = loaded[key]
        assert column.shape == whole.shape and len(column) == 13 and column.dtype == whole.dtype
        rows = torch.tensor([12, 0, 5, 5, 4, 9, -1, 3])
        assert torch.equal(column[rows], whole[rows])
        assert torch.equal(column[2:11], whole[2:11]) and torch.equal(column[:1], whole[:1])
        assert torch.equal(column[7], whole[7]) and torch.equal(column.float(), whole.float())
        with pytest.raises(IndexError, match=key):
            column[torch.tensor([13])]
    assert all(torch.equal(gather(_lazy(tensors, [5, 8]))[k], tensors[k]) for k in tensors)


def test_a_shard_folder_is_published_as_a_unit_and_bad_shards_are_named(tmp_path):
    target = tmp_path / "features"
    dataset = ShardedSafetensorsDataset(str(target))
    dataset.save({"cls": torch.ones(4, 2)})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken():
        raise RuntimeError("killed while computing shard 1")

    with pytest.raises(DatasetError, match="killed"):
        dataset.save({shard_name(0): lambda: {"cls": torch.zeros(2, 2)}, shard_name(1): broken})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous folder, whole
    assert [p.name for p in tmp_path.iterdir()] == ["features"]          # no staging folder left behind

    save_file({"cls": torch.ones(3, 5)}, str(target / "shard-00001.safetensors"))
    with pytest.raises(DatasetError, match=r"shard-00001.safetensors: its tensors do not line up"):
        dataset.load()
    (target / "shard-00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DatasetError, match="features: not a readable folder of feature shards"):
        dataset.load()
    with pytest.raises(DatasetError, match="feature folder not found"):
        ShardedSafetensorsDataset(str(tmp_path / "missing")).load()


def test_stage1_on_shards_trains_the_same_weights_as_on_tensors(tmp_path):
    world = small_world(rows=24)
    ShardedSafetensorsDataset(str(tmp_path / "f")).save(_lazy({"cls": world.cls, "patches": world.patches}, [10, 14]))
    sharded = ShardedFeatures(tmp_path / "f")
    settings = Stage1Settings(TrainingConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1))
    models = []
    for features in ({"cls": world.cls, "patches": world.patches}, sharded):
        model = small_qmllm(small_llama())
        train_stage1(model, Stage1Data.from_cache(features, {}, world.examples), settings, seed=0)
        models.append(model.state_dict())
    assert all(torch.equal(value, models[1][key]) for key, value in models[0].items())


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_models(root)
    write_data(root, images=12)
    clip = CLIPModel.from_pretrained(root / CLIP_DIR)
    return root, clip, CLIPImageProcessor.from_pretrained(root / CLIP_DIR)


def _features_params(smoke_params, **changes) -> dict:
    features = {**smoke_params["features"], "batch_size": 4, **changes}
    features["vision_tower"] = {**features["vision_tower"], "cls_source": "layer", "patch_pool": 1}
    return features


def test_manifest_and_embedded_tables_give_the_same_features_in_shards_and_with_workers(fixture_data, smoke_params):
    root, clip, processor = fixture_data
    json_path = root / "blip_laion_cc_sbu_558k.json"
    embedded, _ = load_llava_json(json_path, root / "images", image_size=56)
    manifest, _ = load_llava_json(json_path, root / "images", image_size=56, embed_images=False)
    assert "image" not in manifest and manifest["image_bytes"].gt(0).all() and set(manifest["image_size"]) == {56}
    one = gather(extract_caption_features(embedded, clip, processor, _features_params(smoke_params, rows_per_shard=12),
                                          "cpu"))
    runs = {"manifest, 3 shards, 2 workers": (manifest, {"rows_per_shard": 4, "num_workers": 2}),
            "embedded, 2 shards": (embedded, {"rows_per_shard": 8})}
    for name, (table, changes) in runs.items():
        shards = extract_caption_features(table, clip, processor, _features_params(smoke_params, **changes), "cpu")
        assert len(shards) == -(-12 // changes["rows_per_shard"]), name
        other = gather(shards)
        assert all(torch.equal(other[key], one[key]) for key in one), name
    with pytest.raises(ValueError, match="rows_per_shard .* multiple of features.batch_size"):
        extract_caption_features(embedded, clip, processor, _features_params(smoke_params, rows_per_shard=6), "cpu")
    with pytest.raises(ValueError, match=r"rows_per_shard \(0\) must be at least 1"):
        extract_caption_features(embedded, clip, processor, _features_params(smoke_params, rows_per_shard=0), "cpu")


def test_features_on_the_fly_match_the_cache_and_share_one_pass_per_batch(fixture_data, smoke_params):
    root, clip, processor = fixture_data
    manifest, _ = load_llava_json(root / "blip_laion_cc_sbu_558k.json", root / "images", image_size=56,
                                  embed_images=False)
    cached = gather(extract_caption_features(manifest, clip, processor, _features_params(smoke_params), "cpu"))
    live = extract_caption_features(manifest, clip, processor, _features_params(smoke_params, cache=False,
                                                                                   num_workers=2), "cpu")
    assert isinstance(live, TowerFeatures) and set(live) == set(cached)
    rows = torch.tensor([11, 3, 3, 0, 7])
    for key, whole in cached.items():
        assert live[key].shape == whole.shape and live[key].dtype == whole.dtype
        torch.testing.assert_close(live[key][rows].float(), whole[rows].float(), atol=2e-3, rtol=2e-3)
    passes = []
    live.tower.vision_model.register_forward_hook(lambda *_: passes.append(1))
    batch = torch.tensor([1, 2, 4])
    live["cls"][batch], live["patches"][batch], live["head_cls"][batch]
    assert len(passes) == 1   # one tower pass for the three columns of a batch
    data = Stage1Data.from_cache(live, {}, [])
    assert data.patches is live["patches"] and len(data.cls) == 12
    with pytest.raises(IndexError, match="out of range for 12 images"):
        live["cls"][torch.tensor([12])]


def test_an_image_changed_after_ingest_stops_the_features_with_its_path(fixture_data, tmp_path):
    root, _, processor = fixture_data
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("000.png", "001.png"):
        (folder / name).write_bytes((root / "images" / name).read_bytes())
    (tmp_path / "c.json").write_text('[{"id": "a", "image": "000.png", "conversations": [{"from": "human", '
                                     '"value": "<image>"}, {"from": "gpt", "value": "x"}]}]')
    manifest, _ = load_llava_json(tmp_path / "c.json", folder, image_size=56, embed_images=False)
    images = SceneImages(manifest, processor)
    assert images[0].shape == (3, 56, 56)
    (folder / "000.png").write_bytes((folder / "001.png").read_bytes())
    with pytest.raises(BadInputError, match=r"000.png: changed since ingest"):
        images[0]


@pytest.mark.parametrize("embed", [True, False])
def test_ingest_refuses_image_paths_that_resolve_outside_its_folder(fixture_data, tmp_path, embed):
    root, _, _ = fixture_data
    folder = tmp_path / "images"
    folder.mkdir()
    outside = root / "images" / "000.png"
    os.symlink(outside, folder / "link.png")
    (folder / "in.png").write_bytes(outside.read_bytes())
    records = [(str(outside), "absolute"), ("../../" + str(outside.relative_to(outside.anchor)), "dotdot"),
               ("link.png", "symlink"), ("in.png", "inside")]
    import json

    (tmp_path / "c.json").write_text(json.dumps([{"id": name, "image": path, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]} for path, name in records]))
    table, report = load_llava_json(tmp_path / "c.json", folder, on_bad_input="skip", embed_images=embed)
    assert list(table["id"]) == ["inside"]
    assert [s["problem"].split(" resolves")[0] for s in report.skipped] == [
        f"image path {path!r}" for path, _ in records[:3]]
    assert all("outside the image folder" in s["problem"] for s in report.skipped)
    with pytest.raises(BadInputError, match="record 0: image path .* resolves outside"):
        load_llava_json(tmp_path / "c.json", folder, on_bad_input="error", embed_images=embed)


def test_the_fixture_writes_incompressible_images_of_one_size(tmp_path):
    write_data(tmp_path, images=3, image_side=64)
    files = sorted((tmp_path / "images").glob("*.png"))
    assert len(files) == 3 and all(p.stat().st_size > 0.8 * 64 * 64 * 3 for p in files)
    from PIL import Image

    assert {Image.open(p).size for p in files} == {(64, 64)}
    assert Path(tmp_path / "blip_laion_cc_sbu_558k.json").is_file()


@pytest.mark.slow
def test_data_scale_runs_the_chain_at_each_size_and_writes_its_table(tmp_path):
    import json

    from click.testing import CliRunner

    from qmllm_pipeline.commands import main

    out = tmp_path / "data_scale.json"
    result = CliRunner().invoke(main, ["data-scale", "--images", "8", "--images", "24", "--side", "64", "--workers",
                                       "0", "--loader-images", "8", "--steps", "1", "--out", str(out),
                                       "--project", str(Path(__file__).resolve().parents[1])])
    assert result.exit_code == 0, result.output
    table = json.loads(out.read_text())
    assert table["images"] == [8, 24] and all(mb > 100 for mb in table["peak_rss_mb"])
    inputs = [disk["input_images"] for disk in table["disk_mb"]]
    assert 2.5 < inputs[1] / inputs[0] < 3.5                 # the images are written, of one size, at each size
    assert all(disk["04_feature"] < 0.1 for disk in table["disk_mb"])  # no features cached (L_semantic targets only)
    assert [(row["step"], row["workers"]) for row in table["loader"]] == [
        ("loader alone", 0), ("loader + tower", 0), ("stage-1 step, features on the fly", 0),
        ("stage-1 step, features in memory", 0)]
    assert "peak RSS growth 8 -> 24 images" in result.output and table["command"].startswith("qmllm data-scale")


def test_stage2_on_patch_codes_reads_what_the_features_give_and_trains_alike():
    import dataclasses

    from qmllm_pipeline.models.stage2 import Stage2Data, Stage2Settings, draw_batch, patch_codes, train_stage2
    from qmllm_pipeline.scaling import largest_difference

    world = small_world(rows=12)
    model = small_qmllm(small_llama()).eval()
    data = Stage2Data(world.cls, world.patches, world.examples)
    codes = patch_codes(model, data, batch_size=5)
    deployed = model.encode_features(world.cls, world.patches, straight_through=False, with_cls=False,
                                     with_names=False)
    assert codes.dtype == torch.int16 and torch.equal(codes.long(), deployed.patches.indices)
    on_codes, _ = draw_batch(model, dataclasses.replace(data, codes=codes), 6, torch.Generator().manual_seed(3))
    on_features, _ = draw_batch(model, data, 6, torch.Generator().manual_seed(3))
    assert on_codes.picks == on_features.picks and torch.equal(on_codes.replayed, on_features.replayed)
    rows = [world.examples[i][2] for i in on_codes.imaged]
    assert torch.equal(on_codes.image_tokens, deployed.image_tokens[rows])        # the codebook rows, exactly
    torch.testing.assert_close(on_codes.image_tokens, on_features.image_tokens)   # straight-through: to rounding

    settings = Stage2Settings(TrainingConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1), image_input="codes")
    trained = [train_stage2(small_qmllm(small_llama()), data, dataclasses.replace(settings, image_input=kind), 0)[0]
               for kind in ("codes", "features")]
    assert largest_difference(*trained) < 1e-4


def test_gpu_check_says_it_needs_cuda_or_runs(tmp_path):
    from click.testing import CliRunner

    from qmllm_pipeline.commands import main

    result = CliRunner().invoke(main, ["gpu-check", "--help"])
    assert result.exit_code == 0 and "peak GPU memory" in result.output
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run `qmllm gpu-check` itself (about 15 minutes)")
    result = CliRunner().invoke(main, ["gpu-check"])
    assert result.exit_code == 1 and "no CUDA device here" in result.output
