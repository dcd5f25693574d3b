"""The `qmllm` command line (not `cli.py`: Kedro reserves `<package>.cli` for its own project commands)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qmllm_pipeline import __version__

KINDS = ("mixed", "toxic", "neutral", "hard_negative")


def _fail(message: str) -> None:
    click.echo(f"qmllm: error: {message}", err=True)
    sys.exit(2)


def _load_parameters(conf_source: Path, env: str) -> dict:
    from kedro.config import OmegaConfigLoader

    from qmllm_pipeline.settings import CONFIG_LOADER_ARGS

    if not (conf_source / "base").is_dir():
        _fail(f"{conf_source}: no Kedro configuration here (run from the project root or pass --conf-source)")
    return OmegaConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)["parameters"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qmllm")
def main() -> None:
    """Q-MLLM: a vector-quantized multimodal LLM and its safety map, trained and attacked with Kedro.

    Run the pipelines with `kedro run --pipelines NAME` (see the README); this command holds the tools
    around them.
    """


@main.command()
@click.option("--kind", type=click.Choice(KINDS), default="mixed", show_default=True,
              help="What to draw: the pretraining mix, toxic scenes, neutral scenes or hard negatives.")
@click.option("--category", default=None, help="Toxic category for --kind toxic (default: random per scene).")
@click.option("--difficulty", type=click.Choice(["single", "distractors"]), default="single", show_default=True,
              help="For --kind toxic: the toxic object alone, or among neutral distractors.")
@click.option("--count", type=click.IntRange(1, 10_000), default=8, show_default=True, help="Number of scenes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Scene i is drawn from (seed, i).")
@click.option("--image-size", type=click.IntRange(8, 1024), default=None,
              help="Override data.layout.image_size from the configuration.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("scenes"), show_default=True,
              help="Folder for the PNG files (created if missing).")
@click.option("--env", default="base", show_default=True, help="Kedro configuration environment to read.")
@click.option("--conf-source", type=click.Path(path_type=Path), default=Path("conf"), show_default=True,
              help="The project's configuration folder.")
def render(kind, category, difficulty, count, seed, image_size, out, env, conf_source) -> None:
    """Render sample scenes of the emoji world to PNG files, with their captions."""
    from qmllm_pipeline.world.catalogue import TOXIC_CATEGORIES, CatalogueError, validate_catalogue
    from qmllm_pipeline.world.render import GlyphRenderer, resolve_font_path
    from qmllm_pipeline.world.scenes import LayoutParams, SceneRequest, SceneSampler

    if category is not None and (kind != "toxic" or category not in TOXIC_CATEGORIES):
        _fail(f"--category needs --kind toxic and one of {', '.join(TOXIC_CATEGORIES)}")
    params = _load_parameters(conf_source, env)["data"]
    layout = dict(params["layout"], **({"image_size": image_size} if image_size else {}))
    catalogue_csv = conf_source.parent / "data" / "01_raw" / "emoji_catalogue.csv"
    try:
        import pandas as pd

        font = resolve_font_path(params["font_path"])
        catalogue = validate_catalogue(pd.read_csv(catalogue_csv, keep_default_na=False, dtype=str), font,
                                       source=str(catalogue_csv))
    except (OSError, CatalogueError) as error:
        _fail(str(error))
    sampler = SceneSampler(catalogue, LayoutParams.from_params(layout), GlyphRenderer(font, params["glyph_size"]))
    request = SceneRequest(kind, category, difficulty if kind == "toxic" else None)
    scenes = sampler.render_split("cli", seed, [request] * count, params["mix"])
    out.mkdir(parents=True, exist_ok=True)
    for scene in scenes.to_dict("records"):
        path = out / f"{scene['scene_id']}.png"
        path.write_bytes(scene["image"])
        click.echo(f"{path}\t{scene['category']}\t{scene['caption']}")


if __name__ == "__main__":
    main()
