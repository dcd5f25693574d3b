"""Real-format data through the chain: `ingest` on a small LLaVA-format fixture (captions JSON, dialogs JSON,
a D_map folder and an evaluation folder of images), then `features` and `pretrain` on what it wrote. The
scene tables `ingest` writes follow the same schema as the emoji world's, checked when written."""

from pathlib import Path

import pandas as pd
import pytest

from qmllm_pipeline.dotted import with_overrides
from qmllm_pipeline.files import sha256_file
from qmllm_pipeline.fixtures import HARMFUL, write_data
from qmllm_pipeline.in_memory import run_in_memory
from qmllm_pipeline.models.feature_shards import gather
from qmllm_pipeline.models.image_data import SceneImages
from qmllm_pipeline.pipelines import features, ingest, pretrain
from qmllm_pipeline.schema import SCHEMAS, SchemaError, check_table
from qmllm_pipeline.world.catalogue import CATEGORIES


def _llava_fixture(root):
    """The miniature real data (`fixtures.write_data`: images of other sizes than CLIP's, a text-only dialog,
    D_map and evaluation folders, harmful instructions) and the ingest settings that read it."""
    write_data(root)
    return {"captions_json": str(root / "blip_laion_cc_sbu_558k.json"),
            "dialogs_json": str(root / "llava_v1_5_mix665k.json"), "image_folder": str(root / "images"),
            "harmful_instructions": str(root / "harmful_instructions.txt"), "image_size": 32,
            "dmap_folder": str(root / "dmap"), "eval_folder": str(root / "eval"), "on_bad_input": "error",
            "max_image_pixels": 1_000_000, "validation_fraction": 0.5, "seed": 0}


def test_ingest_then_features_and_pretrain_run_on_its_output(tmp_path, world, foundation, smoke_params):
    params = with_overrides(smoke_params, ingest={**smoke_params["ingest"], **_llava_fixture(tmp_path)},
                            checkpoint_dir=str(tmp_path / "ckpt"))
    params["features"]["semantic_target_text"] = "caption"  # real captions name no structured objects
    params["features"]["cls_head"]["semantic_target_text"] = "caption"
    ingested = run_in_memory(ingest.create_pipeline(), {}, params)
    for name in ("caption_corpus", "dialogs", "dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_utility",
                 "eval_hard_negative"):
        check_table(ingested[name], name)
    corpus = ingested["caption_corpus"]  # a manifest (ingest.embed_images: false): the pixels stay on disk
    assert "image" not in corpus and all(Path(path).is_file() for path in corpus["image_path"])
    assert list(corpus["image_sha256"]) == [sha256_file(path) for path in corpus["image_path"]]
    assert {SceneImages(corpus, None).image(i).size for i in range(len(corpus))} == {(32, 32)}
    assert list(ingested["text_corpus"]["kind"]) == ["harmful"] * len(HARMFUL)
    assert set(ingested["emoji_catalogue"]["category"]) == set(CATEGORIES)
    assert len(ingested["caption_corpus"]) == 16 and len(ingested["dialogs"]) == 16  # the text-only one left out
    assert ingested["ingest_report"]["dialogs"]["text_only"] == 1
    assert list(ingested["dialogs"]["turn_kinds"].iloc[0]) == ["conversation", "conversation"]

    models = {name: foundation[name] for name in ("tokenizer", "clip_tokenizer", "llm", "clip_model",
                                                             "clip_image_processor")}
    chain = features.create_pipeline() + pretrain.create_pipeline()
    inputs = {**models, "caption_corpus": ingested["caption_corpus"], "dialogs": ingested["dialogs"],
              "emoji_catalogue": world["emoji_catalogue"]}
    with pytest.raises(ValueError, match="caption_corpus has no item_ids column.*slots: 0"):
        run_in_memory(chain, inputs, params)   # the embedded world's name head cannot train on real captions
    params = with_overrides(params, **{"pretrain.name_head.slots": 0})   # the real environment's setting
    trained = run_in_memory(chain, inputs, params)
    caption_features, dialog_features = gather(trained["caption_features"]), gather(trained["dialog_features"])
    assert caption_features["cls"].shape[0] == 16 and dialog_features["cls"].shape[0] == 16
    assert {"qmllm.stage1_weights", "baseline.stage1_weights"} <= set(trained)
    assert trained["pretrain_metrics"]["qmllm"]["codebooks"]["cls"]["codes_used"] >= 1

    objects = with_overrides(params, **{"features.semantic_target_text": "objects"})
    with pytest.raises(ValueError, match="names no objects"):
        run_in_memory(features.create_pipeline().to_outputs("caption_targets"),
                      {**models, "caption_corpus": ingested["caption_corpus"]}, objects)


def test_a_table_a_reader_cannot_use_is_refused_by_name():
    frame = pd.DataFrame({"scene_id": ["a"], "image": [b"png"], "caption": ["x"], "objects": [[]]})
    with pytest.raises(SchemaError, match=r"caption_corpus \(written by ingest\): missing columns \['background'\]"):
        check_table(frame, "caption_corpus", "ingest")
    with pytest.raises(SchemaError, match="column 'image' must hold bytes values; row 0 has NoneType"):
        check_table(frame.assign(background="", image=[None]), "caption_corpus")
    assert set(SCHEMAS) >= set(ingest.create_pipeline().all_outputs()) - {
        "ingest_report", "ingest_captions_report", "ingest_dialogs_report", "ingest_dmap_report", "ingest_eval_report",
        "ingest_utility_report", "text_corpus", "emoji_catalogue", "eval_items"}
