"""Typed settings (`models/params.py`): every stage's and attacker's parameters parse into frozen dataclasses, and
a bad key or value is one line naming the parameters file and the dotted key."""

import dataclasses

import pytest

from conftest import PROJECT_ROOT
from qmllm_pipeline.dotted import with_overrides
from qmllm_pipeline.models.heads import ClsHeadSettings, NameHeadSettings
from qmllm_pipeline.models.params import SettingsError, parse
from qmllm_pipeline.models.stage1 import Stage1Settings
from qmllm_pipeline.models.stage2 import Stage2Settings
from qmllm_pipeline.models.training import TrainingConfig
from qmllm_pipeline.parameters import load_parameters
from qmllm_pipeline.pipelines.evaluate.settings import EvaluateSettings
from qmllm_pipeline.pipelines.features.nodes import FeatureSettings
from qmllm_pipeline.pipelines.pretrain.nodes import PretrainSettings

SECTIONS = [(PretrainSettings, "pretrain"), (Stage1Settings, "pretrain.stage1"), (ClsHeadSettings, "pretrain.cls_head"),
            (NameHeadSettings, "pretrain.name_head"), (Stage2Settings, "finetune.stage2"),
            (FeatureSettings, "features"), (EvaluateSettings, "evaluate")]


@pytest.mark.parametrize("env", ["base", "smoke", "full", "real"])
def test_every_environment_parses_into_frozen_settings(env):
    params = load_parameters(env, PROJECT_ROOT / "conf")
    for cls, key in SECTIONS:
        section = params
        for part in key.split("."):
            section = section[part]
        settings = parse(cls, section, key)
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.__setattr__(dataclasses.fields(settings)[0].name, None)
    evaluate = parse(EvaluateSettings, params["evaluate"], "evaluate")
    assert set(evaluate.system_cases("qmllm")) >= {"qmllm_plain", "qmllm_adaptive", "qmllm_noise"}


def test_a_bad_parameter_is_one_line_naming_its_file_and_key():
    params = load_parameters("base", PROJECT_ROOT / "conf")
    cases = [
        ({"stage1.training.stpes": 5}, "conf/*/parameters_pretrain.yml: pretrain.stage1.training.stpes: unknown key"),
        ({"stage1.lambda_vq": "high"}, "pretrain.stage1.lambda_vq: expected float, got 'high'"),
        ({"cls_head.stage1": "both"}, "pretrain.cls_head.stage1: expected one of 'paper', 'patch_only', got 'both'"),
        ({"name_head.slots": True}, "pretrain.name_head.slots: expected int, got True"),
    ]
    for override, message in cases:
        with pytest.raises(SettingsError) as error:
            parse(PretrainSettings, with_overrides(params["pretrain"], **override), "pretrain")
        assert str(error.value).startswith("conf/*/parameters_pretrain.yml: ") and message in str(error.value)
        assert "\n" not in str(error.value)
    broken = {k: v for k, v in params["pretrain"]["stage1"].items() if k != "training"}
    with pytest.raises(SettingsError, match=r"pretrain.stage1.training: missing"):
        parse(Stage1Settings, broken, "pretrain.stage1")
    with pytest.raises(SettingsError, match=r"parameters_evaluate.yml: evaluate.attackers.noise.cases: expected a map"):
        parse(EvaluateSettings, with_overrides(params["evaluate"], **{"attackers.noise.cases": [1]}), "evaluate")


def test_values_convert_to_their_types():
    training = parse(TrainingConfig, {"steps": 3, "batch_size": 2, "lr": 1}, "x.training")
    assert training.lr == 1.0 and isinstance(training.lr, float)
    stage2 = parse(Stage2Settings, {"training": {"steps": 3, "batch_size": 2, "lr": 1e-3},
                                    "search_augment": {"fraction": 0.5, "rounds": [1, 2], "candidates": None},
                                    "lora": {"enabled": True, "target_modules": ["q_proj"]}}, "finetune.stage2")
    assert stage2.search_augment.rounds == (1, 2) and stage2.search_augment.candidates is None
    assert stage2.lora.enabled and stage2.lora.target_modules == ["q_proj"] and stage2.lora.rank == 128
