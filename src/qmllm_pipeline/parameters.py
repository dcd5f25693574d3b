"""The project's parameters as the pipelines are built from them. Kedro builds pipelines before it knows the
run's environment, so what shapes them (the trained `variants`, one namespace each; the jailbreak `budgets`,
one namespace each) is read from the default run environment (conf/base under conf/local): other
environments change their settings, not these lists. Everything else, the attackers among it, the nodes read
at run time from the run's own parameters."""

from __future__ import annotations

from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.pipeline import Node
from omegaconf.basecontainer import BaseContainer

from qmllm_pipeline.models.training import RunSettings

# Kedro's config loader settings (settings.py hands them to Kedro)
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments (smoke, real) override single keys of base, not whole parameter blocks.
    "merge_strategy": {"parameters": "soft", "catalog": "soft"},
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
    },
}


def load_parameters(env: str | None = None, conf_source: str | Path | None = None) -> dict:
    """The parameters of `conf_source` (default: `conf/` of the working directory, a Kedro project's root) in
    `env` (None: the default run environment, `local`, over conf/base, as `kedro run` reads them)."""
    source = Path(conf_source) if conf_source is not None else Path.cwd() / "conf"
    if not (source / "base").is_dir():
        raise FileNotFoundError(f"{source / 'base'}: no parameters to build the pipelines from (run from the "
                                "project root, or pass the parameters to create_pipeline)")
    # OmegaConf's resolvers are process-wide and a loader registers its own `globals`: keep the running
    # session's (which resolves its environment's globals) as they were
    saved = dict(BaseContainer._resolvers)
    try:
        return OmegaConfigLoader(conf_source=str(source), env=env, **CONFIG_LOADER_ARGS)["parameters"]
    finally:
        BaseContainer._resolvers.clear()
        BaseContainer._resolvers.update(saved)


def variants(params: dict) -> tuple[str, ...]:
    """The models trained through the same pipelines (`variants` in parameters_pretrain.yml), in order."""
    return tuple(params["variants"])


def budgets(params: dict) -> tuple[str, ...]:
    """The jailbreak budgets (`evaluate.budgets`), in order."""
    return tuple(params["evaluate"]["budgets"])



def run_settings_node() -> Node:
    """The run-wide settings every training node reads (`RunSettings`: seed, checkpoints, distributed, device), as a
    node each training pipeline holds (Kedro keeps one when pipelines are added)."""
    return Node(RunSettings.from_params, ["params:seed", "params:checkpoint_dir", "params:distributed",
                                          "params:device"], "run_settings", name="run_settings")
