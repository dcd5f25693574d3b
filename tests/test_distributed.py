"""Training on Accelerate: two CPU processes (gloo) train as one process does with the same global batch, a
killed two-process run resumes from rank 0's checkpoint to the same weights, one process under Accelerate is
plain PyTorch bit for bit, and gradient checkpointing changes the memory, not the gradients."""

import json
import os

import pytest
import torch

from conftest import PROJECT_ROOT
from qmllm_pipeline import scaling
from qmllm_pipeline.models.checkpoint import TrainingCheckpoint
from qmllm_pipeline.models.distributed import DistributedSettings, rank_share, world
from qmllm_pipeline.models.stage1 import Stage1Data, Stage1Settings, train_stage1
from qmllm_pipeline.models.training import TrainingConfig, activation_checkpointing, train_loop
from qmllm_pipeline.tracking import StepLogger

TOLERANCE = 1e-5  # float reduction order: per-rank means averaged, EMA statistics summed over the processes


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_two_processes_train_as_one_with_the_same_global_batch(stage):
    one, model_one, _ = scaling.train_stage(stage, 1, steps=12)
    two, model_two, _ = scaling.train_stage(stage, 2, steps=12)
    assert len(one) == len(two) == 12
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE
    assert scaling.largest_difference(model_one, model_two) < TOLERANCE  # the weights rank 0 handed back
    assert one[-1] != one[0]  # it trained


def test_one_process_under_accelerate_is_plain_pytorch_bit_for_bit():
    runs = []
    for settings in (None, DistributedSettings()):
        world_ = scaling.small_world()
        model = scaling.small_qmllm(scaling.small_llama())
        logger = StepLogger("t", every=100)
        train_stage1(model, Stage1Data(world_.cls, world_.patches, world_.examples),
                     Stage1Settings(TrainingConfig(steps=8, batch_size=8, lr=1e-2)), 0, step_logger=logger,
                     distributed=settings)
        runs.append((logger.history["loss"], model.stage1_state()))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def _regression(crash_at: int | None, global_draw: bool = False):
    """A linear model on a fixed regression problem, its step taking the process's share of the batch; the
    step raises at its `crash_at`-th call in every process (a kill in the middle of a run). `global_draw`: each
    process adds one example drawn from torch's global random state (as k-means and dead-code restarts draw),
    so that only a resume that restores every process's global state continues the same run."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    calls = [0]

    def step(generator):
        calls[0] += 1
        if crash_at is not None and calls[0] == crash_at:
            raise RuntimeError("killed")
        picks = torch.randint(64, (8,), generator=generator).tolist()
        picks, _ = rank_share(picks, generator)
        if global_draw:
            picks = picks + torch.randint(64, (1,)).tolist()
        return {"loss": torch.nn.functional.mse_loss(net(inputs[picks]), targets[picks]),
                "processes": torch.tensor(float(world()[1]))}

    return net, step


def test_a_killed_two_process_run_resumes_from_rank_zeros_checkpoint_to_the_same_weights(tmp_path):
    config = TrainingConfig(steps=12, batch_size=8, lr=5e-2, checkpoint_every=5)
    two = DistributedSettings(num_processes=2)
    net, step = _regression(crash_at=None)
    logger = StepLogger("t", every=100)
    train_loop({"net": net}, step, config, 0, logger, TrainingCheckpoint(tmp_path / "straight", {}), distributed=two)
    assert [value for _, value in logger.history["processes"]] == [2.0] * 12  # the steps ran in two processes
    assert not (tmp_path / "straight").exists()  # cleared at the end

    checkpoint = TrainingCheckpoint(tmp_path / "killed", {})
    killed, step = _regression(crash_at=8)
    with pytest.raises(Exception, match="killed"):
        train_loop({"net": killed}, step, config, 0, StepLogger("t"), checkpoint, distributed=two)
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["step"] == 5
    assert state["written_by"]["rank"] == 0 and state["written_by"]["pid"] != os.getpid()  # a worker, rank 0
    resumed, step = _regression(crash_at=None)
    resumed_logger = StepLogger("t", every=100)
    train_loop({"net": resumed}, step, config, 0, resumed_logger, checkpoint, distributed=two)
    assert torch.equal(resumed.weight, net.weight) and torch.equal(resumed.bias, net.bias)
    assert resumed_logger.history["loss"] == logger.history["loss"]  # steps 1-5 from the checkpoint, 6-12 rerun


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_from_accelerates_sharded_checkpoint_to_the_same_weights(tmp_path):
    """A sharded strategy's checkpoint is Accelerate's (`save_state`, every process writing its part), and a
    killed run resumes from it (`load_state`) to the weights and losses of a run that was never stopped, each
    process's global random state included. On CPUs Accelerate runs `fsdp` as DDP (it engages FSDP on
    accelerators only), so this covers the save / resume path, not FSDP's shard files: `qmllm gpu-check`
    does."""
    config = TrainingConfig(steps=12, batch_size=8, lr=5e-2, checkpoint_every=5)
    fsdp = DistributedSettings(num_processes=2, strategy="fsdp")
    net, step = _regression(crash_at=None, global_draw=True)
    logger = StepLogger("t", every=100)
    train_loop({"net": net}, step, config, 0, logger, TrainingCheckpoint(tmp_path / "straight", {}),
               distributed=fsdp)
    assert not (tmp_path / "straight").exists()

    checkpoint = TrainingCheckpoint(tmp_path / "killed", {})
    killed, step = _regression(crash_at=8, global_draw=True)
    with pytest.raises(Exception, match="killed"):
        train_loop({"net": killed}, step, config, 0, StepLogger("t"), checkpoint, distributed=fsdp)
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["step"] == 5 and state["format"] == "accelerate"
    written = {path.name for path in (tmp_path / "killed" / "accelerate").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= written  # each process's random state
    assert not list(tmp_path.glob(".killed*"))  # no staging folder left beside it

    resumed, step = _regression(crash_at=None, global_draw=True)
    resumed_logger = StepLogger("t", every=100)
    train_loop({"net": resumed}, step, config, 0, resumed_logger, checkpoint, distributed=fsdp)
    assert torch.equal(resumed.weight, net.weight) and torch.equal(resumed.bias, net.bias)
    assert resumed_logger.history["loss"] == logger.history["loss"]


def test_settings_are_checked_and_the_batch_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="strategy must be one of"):
        DistributedSettings(strategy="horovod")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        DistributedSettings(mixed_precision="yes")
    net, step = _regression(crash_at=None)
    with pytest.raises(ValueError, match="global batch of 8 does not split evenly over 3 processes"):
        train_loop({"net": net}, step, TrainingConfig(steps=2, batch_size=8, lr=1e-2), 0,
                   distributed=DistributedSettings(num_processes=3))


def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients():
    grads, saved = [], []
    for on in (False, True):
        llm = scaling.small_llama(vocab_size=128, hidden=32, layers=2)
        saved.append(scaling.saved_activation_bytes(llm, batch=4, length=32, checkpointing=on))
        grads.append({name: p.grad.clone() for name, p in llm.named_parameters()})
    assert saved[1] < 0.5 * saved[0]
    assert all(torch.allclose(grads[0][name], grads[1][name], atol=1e-6) for name in grads[0])

    llm = scaling.small_llama()
    activation_checkpointing(llm, True)
    assert llm.is_gradient_checkpointing
    activation_checkpointing(llm, False)
    assert not llm.is_gradient_checkpointing


def test_scale_check_prints_the_process_comparison():
    from click.testing import CliRunner

    from qmllm_pipeline.commands import main

    result = CliRunner().invoke(main, ["scale-check", "--steps", "3", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "1 vs 2 processes (DDP), same global batch" in result.output
    assert "| stage 2 (LoRA) | 3 |" in result.output


def test_the_shipped_settings_survive_dvcs_rewrite_of_the_parameters_file(tmp_path):
    """`qmllm seeds run` sets the seed with `dvc exp run -S`, which rewrites parameters.yml and drops the
    quotes around "no": the settings Kedro then reads must still be valid (a seed sweep failed on it)."""
    import shutil

    import yaml
    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "parameters.yml"
    shutil.copy(PROJECT_ROOT / "conf" / "base" / "parameters.yml", copy)
    with modify_yaml(copy) as data:
        data["seed"] = 1
    rewritten = yaml.safe_load(copy.read_text())["distributed"]
    assert rewritten["mixed_precision"] is False  # what DVC writes, as YAML reads it
    assert DistributedSettings.from_params(rewritten) == DistributedSettings()


_MACHINE = """
import json, sys
from safetensors.torch import save_file
from qmllm_pipeline.models.distributed import DistributedSettings
from qmllm_pipeline.scaling import train_stage
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
settings = DistributedSettings(num_processes=1, num_machines=2, machine_rank=rank, port=port)
losses, model, _ = train_stage("pretrain", 1, steps=6, settings=settings)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".safetensors")
open(out + ".json", "w").write(json.dumps(losses))
"""


def test_two_machines_on_localhost_train_as_two_processes_on_one(tmp_path):
    """Two "machines" (two separate runs, each forking one worker, joined over TCP on the loopback as two
    hosts would be): both get the same weights back, equal to one machine's two processes."""
    import json
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runs = [subprocess.Popen([sys.executable, "-c", _MACHINE, str(rank), str(port), str(tmp_path / f"m{rank}")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    weights = [load_file(tmp_path / f"m{rank}.safetensors") for rank in (0, 1)]
    losses = [json.loads((tmp_path / f"m{rank}.json").read_text()) for rank in (0, 1)]
    one_losses, one_model, _ = scaling.train_stage("pretrain", 2, steps=6)
    assert len(losses[0]) == 6 and losses[1] == []          # the loss history is logged on the first machine
    assert max(abs(a - b) for a, b in zip(losses[0], one_losses, strict=True)) < 1e-6
    one = one_model.state_dict()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key      # each machine's node gets the same weights
        assert torch.allclose(value.float(), one[key].float(), atol=1e-6), key
    with pytest.raises(ValueError, match="several machines train with ddp only"):
        DistributedSettings(num_processes=2, num_machines=2, strategy="fsdp")
    with pytest.raises(ValueError, match="machine_rank must be in"):
        DistributedSettings(num_machines=2, machine_rank=2)
