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
