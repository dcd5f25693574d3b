"""Training can resume: a run stopped in the middle continues from its last checkpoint."""

import pytest
import torch

from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.training import TrainingConfig, train_loop

CONFIG = TrainingConfig(steps=12, batch_size=8, lr=0.05, warmup_steps=2, grad_clip=1.0, checkpoint_every=5)
PARAMS = CONFIG.as_dict()  # what a checkpoint is fingerprinted with


def _run(checkpoint, stop_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(64, 4)
    target = data @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    calls = []

    def step(generator):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        rows = torch.randint(64, (CONFIG.batch_size,), generator=generator)
        return {"loss": torch.nn.functional.mse_loss(model(data[rows]).squeeze(-1), target[rows])}

    train_loop({"model": model}, step, CONFIG, seed=3, checkpoint=checkpoint)
    return model, len(calls)


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    reference, steps = _run(None)
    assert steps == 12
    checkpoint = TrainingCheckpoint(tmp_path / "ckpt", PARAMS)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint, stop_at=8)  # dies during step 8; the last save was after step 5
    assert checkpoint.load()["step"] == 5
    resumed, steps = _run(checkpoint)
    assert steps == 12 - 5
    assert torch.allclose(resumed.weight, reference.weight) and torch.allclose(resumed.bias, reference.bias)
    assert not (tmp_path / "ckpt").exists()  # cleared when the run completes


def test_checkpoint_of_another_configuration_is_ignored(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(TrainingCheckpoint(tmp_path / "ckpt", PARAMS), stop_at=8)
    assert TrainingCheckpoint(tmp_path / "ckpt", {**PARAMS, "lr": 0.1}).load() is None
    _, steps = _run(TrainingCheckpoint(tmp_path / "ckpt", {**PARAMS, "lr": 0.1}))
    assert steps == 12


def test_a_checkpoint_written_on_other_data_is_ignored(tmp_path):
    """The same settings on rebuilt features (a shard file replaced, as the features dataset writes it) or on
    other token lists: the checkpoint's data fingerprint differs, so training starts over."""
    from safetensors.torch import save_file

    from qmllm_pipeline.files import atomic_path
    from qmllm_pipeline.models.checkpoint import data_digest
    from qmllm_pipeline.models.feature_shards import ShardedFeatures

    folder, rows, examples = tmp_path / "features", torch.randn(6, 3), [([1, 2], [-100, 2], 0)]
    folder.mkdir()
    save_file({"cls": rows[:4]}, folder / "shard-00000.safetensors")
    save_file({"cls": rows[4:]}, folder / "shard-00001.safetensors")

    def fingerprint(tokens=examples) -> dict:
        return {**PARAMS, "data": data_digest(ShardedFeatures(folder)["cls"], tokens)}

    with pytest.raises(KeyboardInterrupt):
        _run(TrainingCheckpoint(tmp_path / "ckpt", fingerprint()), stop_at=8)
    assert TrainingCheckpoint(tmp_path / "ckpt", fingerprint()).load()["step"] == 5  # same data: resumes
    assert TrainingCheckpoint(tmp_path / "ckpt", fingerprint([([1, 3], [-100, 3], 0)])).load() is None
    changed = rows.clone()
    changed[5, 0] += 1e-3
    with atomic_path(folder / "shard-00001.safetensors") as temporary:  # the features rebuilt
        save_file({"cls": changed[4:]}, temporary)
    assert TrainingCheckpoint(tmp_path / "ckpt", fingerprint()).load() is None
    _, steps = _run(TrainingCheckpoint(tmp_path / "ckpt", fingerprint()))
    assert steps == 12


class _Kill(Exception):
    pass


class _KillingLogger:
    """A step logger that kills the run after logging step `at` (before that step's checkpoint is written)."""

    def __init__(self, at: int | None):
        from qmllm_pipeline.tracking import StepLogger

        self.inner, self.at = StepLogger("t", every=100), at
        self.prefix, self.history = self.inner.prefix, self.inner.history

    def log(self, step: int, **values) -> None:
        self.inner.log(step, **values)
        if step == self.at:
            raise _Kill(f"killed after step {step}")

    def flush(self) -> None:
        self.inner.flush()


def _stage1(checkpoint, kill_at=None):
    """A quantized stage 1 whose dead-code restarts draw from torch's global random state on most steps."""
    import dataclasses

    from qmllm_pipeline import scaling
    from qmllm_pipeline.models.qmllm import QMLLM
    from qmllm_pipeline.models.stage1 import Stage1Data, Stage1Settings, train_stage1

    world = scaling.small_world()
    model = scaling.small_qmllm(scaling.small_llama())
    model = QMLLM(dataclasses.replace(model.config, dead_code_threshold=0.9), model.llm)
    settings = Stage1Settings(TrainingConfig(steps=12, batch_size=8, lr=1e-2, checkpoint_every=5))
    train_stage1(model, Stage1Data(world.cls, world.patches, world.examples), settings, 0,
                 step_logger=_KillingLogger(kill_at), checkpoint=checkpoint)
    return model.stage1_state()


def test_a_killed_quantized_stage_1_resumes_bit_for_bit(tmp_path):
    """k-means and the dead-code restarts draw from torch's global random state, not the loop's generator: the
    checkpoint keeps it, so a killed run resumes to exactly the weights of a run never stopped."""
    straight = _stage1(None)
    checkpoint = TrainingCheckpoint(tmp_path / "ckpt", {"stage": 1})
    with pytest.raises(_Kill):
        _stage1(checkpoint, kill_at=8)
    assert checkpoint.load()["step"] == 5
    resumed = _stage1(checkpoint)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight), \
        [key for key in straight if not torch.equal(straight[key], resumed[key])]
