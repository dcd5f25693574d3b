"""The `qmllm` command line (not `cli.py`: Kedro reserves `<package>.cli` for its own project commands)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import click

from qmllm_pipeline import __version__

KINDS = ("mixed", "toxic", "neutral", "hard_negative")


USAGE, RUNTIME = 2, 1  # exit codes: a bad argument (as click's own), a failure on the way (a file, a run)


def _usage(message: str) -> None:
    """A bad argument: the command line has to change."""
    click.echo(f"qmllm: error: {message}", err=True)
    sys.exit(USAGE)


def _fail(message: str) -> None:
    """A failure on the way: a file the command read (a model, a table), a run it started."""
    click.echo(f"qmllm: error: {message}", err=True)
    sys.exit(RUNTIME)


def _file_errors() -> tuple[type[BaseException], ...]:
    """What a broken file raises on its way through the libraries the commands read with: a corrupt
    safetensors file, a broken Parquet table or JSON, a Kedro dataset that cannot load, a refused model, a file
    that is not there or not readable. `QmllmGroup` turns each into one line and exit code 1. Only the
    libraries already imported are asked (the others cannot have raised), so that a usage error stays quick
    and quiet."""
    errors: list[type[BaseException]] = [OSError, json.JSONDecodeError]
    for module, name in (("safetensors", "SafetensorError"), ("pyarrow", "ArrowException"),
                         ("kedro.io", "DatasetError"), ("qmllm_pipeline.loaders", "BadInputError"),
                         ("qmllm_pipeline.models.guarded", "UntrustedModelError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


class QmllmGroup(click.Group):
    """The `qmllm` group: a broken file met anywhere in a command is one line on stderr and exit code 1, not
    a traceback (bugs, anything else, still show theirs)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _file_errors() as error:
            _fail(_one_line(error))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _load_parameters(conf_source: Path, env: str) -> dict:
    from kedro.config import OmegaConfigLoader

    from qmllm_pipeline.settings import CONFIG_LOADER_ARGS

    if not (conf_source / "base").is_dir():
        _usage(f"{conf_source}: no Kedro configuration here (run from the project root or pass --conf-source)")
    return OmegaConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)["parameters"]


@click.group(cls=QmllmGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
        _usage(f"--category needs --kind toxic and one of {', '.join(TOXIC_CATEGORIES)}")
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


DEFAULT_MODEL = Path("data/06_models/qmllm/guarded.json")
MAX_PROMPT_CHARS = 500


def _load_guarded(model: Path, device: str = "auto"):
    import transformers

    transformers.logging.set_verbosity_error()  # keep the output to the verdicts and answers
    transformers.utils.logging.disable_progress_bar()
    from safetensors import SafetensorError

    from qmllm_pipeline.models.guarded import GuardedQMLLM, ModelNotReadyError, UntrustedModelError

    logging.getLogger("qmllm_pipeline.models.guarded").setLevel(logging.ERROR)  # the note is printed below
    try:
        guarded = GuardedQMLLM.from_manifest(model, device)
        if guarded.note:
            click.echo(f"qmllm: warning: {guarded.note}", err=True)
        return guarded
    except ModelNotReadyError as error:
        _fail(str(error))
    except UntrustedModelError as error:
        _fail(f"refused to load the model: {error}")
    except (OSError, ValueError, SafetensorError) as error:
        _fail(f"{model}: cannot load the trained model ({error})")


def _open_images(paths: tuple[Path, ...], max_pixels: int):
    from qmllm_pipeline.loaders import BadInputError, open_image_checked

    images = []
    for path in paths:
        try:
            images.append(open_image_checked(path, max_pixels))
        except BadInputError as error:
            _usage(str(error))
    return images


model_option = click.option(
    "--model", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True,
    help="Manifest of a trained model (written by `kedro run --pipelines safety_map`).")
device_option = click.option("--device", default="auto", show_default=True,
                             help="Where the model runs: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.")
pixels_option = click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True,
                             help="Refuse larger images (decompression-bomb guard).")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_option
@device_option
@pixels_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image instead of a table.")
def check(images, model, device, max_pixels, as_json) -> None:
    """Safety verdict per IMAGE: refused or not, the toxic category, the CLS code and p(category | code).

    Runs the vision tower, projector and CLS codebook only; the LLM is never loaded into a conversation.
    """
    opened = _open_images(images, max_pixels)  # bad input fails before the model is loaded
    verdicts = _load_guarded(model, device).check(opened)
    for path, verdict in zip(images, verdicts, strict=True):
        if as_json:
            click.echo(json.dumps({"image": str(path), "refused": verdict.refused, "category": verdict.category,
                                          "code": verdict.code, "probability": round(verdict.probability, 4)}))
        else:
            state = "REFUSED" if verdict.refused else "ok"
            click.echo(f"{path}\t{state}\t{verdict.category}\tcode {verdict.code}\tp={verdict.probability:.2f}")


@main.command()
@click.option("--image", "image", required=True, type=click.Path(path_type=Path), help="The image to ask about.")
@click.option("--prompt", required=True, help=f"The question or instruction (at most {MAX_PROMPT_CHARS} characters).")
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=32, show_default=True)
@model_option
@device_option
@pixels_option
def chat(image, prompt, max_new_tokens, model, device, max_pixels) -> None:
    """Answer PROMPT about IMAGE, or refuse (naming the category) when the image's CLS code is toxic."""
    if not prompt.strip():
        _usage("--prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        _usage(f"--prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    opened = _open_images((image,), max_pixels)
    try:
        (result,) = _load_guarded(model, device).answer(opened, [prompt], max_new_tokens)
    except ValueError as error:  # a prompt the model cannot read (the placeholder, too long)
        _usage(f"--prompt: {error}")
    click.echo(result.text or "(the model produced no text)")


@main.command()
@click.option("--env", default="base", show_default=True, help="Kedro configuration environment of the trained models.")
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The Kedro project root (where `kedro run` trained the models).")
@click.option("--repeats", type=click.IntRange(3, 10_000), default=30, show_default=True,
              help="Timed repetitions per measurement (median and 25-75% spread are reported).")
@click.option("--stage1-steps", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Stage-1 steps per timed 'epoch' in measurement 5.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as Markdown to this file.")
def bench(env, project, repeats, stage1_steps, out) -> None:
    """Measure what the defense costs on the trained models: one table of ratios, each timed side by side
    in this process, plus the latest default `kedro run`'s time per pipeline and peak memory (MLflow).

    \b
    1. safety verdict / vision-tower forward          goal <= 1.10
    2. qmllm / baseline full answer, equal lengths     goal <= 1.05
    3. refusal / full answer                           goal <= 0.20
    4. nearest-code search / one matmul (the floor)    goal <= 2.00; and against torch.cdist + argmin
    5. stage 1 from pixels / from cached features      goal >= 5.00
    6. verdict throughput at batch 1, 8 and 32
    7. a per-instruction PGD step on the target's opening / on the whole target
    """
    import copy
    import datetime
    import platform

    import torch
    import transformers
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.io import DatasetError

    from qmllm_pipeline import benchmarks
    from qmllm_pipeline.models.clip import decode_images, pixel_values
    from qmllm_pipeline.models.stage1 import caption_examples
    from qmllm_pipeline.trained import evaluation_systems_from_catalog

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    project = project.resolve()
    if not (project / "pyproject.toml").is_file():
        _usage(f"{project}: not a Kedro project (no pyproject.toml); pass --project")
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        context = session.load_context()
        catalog, params = context.catalog, context.params
        torch.set_num_threads(params["threads"])
        try:
            load = catalog.load
            systems = evaluation_systems_from_catalog(catalog)
            neutral = decode_images(load("eval_neutral")["image"].iloc[:32], desc=None)
            toxic = decode_images(load("eval_toxic")["image"], desc=None)
            corpus = load("caption_corpus").iloc[:2000]
            text = load("text_corpus")
            features = load("caption_features")
        except DatasetError as error:
            _fail(f"{error} (train the default models first: `kedro run`)")
    qmllm = systems["qmllm"]
    student = copy.deepcopy(qmllm.model)  # row 5 trains it
    student.mm_projector.requires_grad_(True)
    pixels = pixel_values(decode_images(corpus["image"], desc=None), qmllm.processor)
    examples = caption_examples(list(corpus["caption"]), qmllm.tokenizer, params["pretrain"]["caption_instruction"],
                                params["pretrain"]["max_length"])
    rows = [*benchmarks.answer_rows(systems, neutral, toxic, repeats), *benchmarks.nearest_code_rows(repeats),
            benchmarks.stage1_row(student, pixels, features["cls"][:len(corpus)], features["patches"][:len(corpus)],
                                  examples, max(3, repeats // 6), steps=stage1_steps),
            *benchmarks.throughput_rows(qmllm, neutral, repeats)]
    harmful = text[(text["kind"] == "harmful") & (text["split"] == "heldout")].head(32)
    jailbreak = params["evaluate"]["jailbreak"]
    rows.append(benchmarks.pgd_step_row(systems["baseline"], neutral[0], list(harmful["instruction"]),
                                        list(harmful["target"]), jailbreak["max_length"], jailbreak["target_tokens"],
                                        max(3, repeats // 4)))
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    header = f"qmllm bench, {datetime.date.today()}, {machine}, {repeats} repeats"
    table = benchmarks.format_table(rows, header) + "\n\n" + benchmarks.run_profile_table(project, env)
    click.echo(table)
    if out is not None:
        out.write_text(table + "\n")


@main.command("real-fixture")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("data/01_raw/real"))
@click.option("--force", is_flag=True, help="Write into a directory that already has files.")
@click.option("--print-params", is_flag=True, help="Only print the fixture's small settings, for `kedro run --params`.")
@click.option("--images", type=click.IntRange(1, 10_000_000), default=16, show_default=True,
              help="Caption and dialog images to write.")
@click.option("--image-side", type=click.IntRange(8, 4096), default=None,
              help="Write SIDE x SIDE noisy images a PNG cannot compress (default: small flat colour fields).")
def real_fixture(directory, force, print_params, images, image_side) -> None:
    """Write the real environment's inputs in miniature to DIRECTORY (default data/01_raw/real): tiny random
    models with CLIP-L's and Vicuna's layouts where conf/real looks for the weights, LLaVA-format data,
    D_map and evaluation folders and a harmful-instruction file. The whole real path then runs on a CPU in
    under a minute (the paper's sizes in conf/real shrunk to the fixture's):

    \b
      qmllm real-fixture
      kedro run --env real --pipelines real --params "$(qmllm real-fixture --print-params)"

    It refuses a directory that is not empty (real weights may be there) unless --force."""
    from qmllm_pipeline.fixtures import FIXTURE_PARAMETERS, params_line, write_real_fixture

    if print_params:
        click.echo(params_line(FIXTURE_PARAMETERS))
        return
    if directory.exists() and any(directory.iterdir()) and not force:
        _usage(f"{directory}: not empty (real weights or data may be there); pass --force to write anyway")
    write_real_fixture(directory, images=images, image_side=image_side)
    click.echo(f"wrote the miniature real inputs to {directory}")


@main.command("data-scale")
@click.option("--images", "sizes", type=click.IntRange(1, 10_000_000), multiple=True, default=(1000, 10000),
              show_default=True, help="Corpus sizes to run (repeat the option).")
@click.option("--side", type=click.IntRange(8, 4096), default=336, show_default=True,
              help="Side of the square, incompressible fixture images (CLIP-L/14-336 reads 336).")
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="DataLoader processes decoding images (features.num_workers).")
@click.option("--loader-images", type=click.IntRange(0, 1_000_000), default=1000, show_default=True,
              help="Images the loader-throughput table reads (0: no table).")
@click.option("--steps", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Stage-1 steps (batches of 16) the step-throughput rows time.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("metrics/data_scale.json"),
              show_default=True, help="Where to write the table (JSON).")
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The project whose conf/ the runs use (each runs in a temporary copy).")
def data_scale(sizes, side, workers, loader_images, steps, out, project) -> None:
    """Measure how the real path's memory, time and disk grow with the data: for each size, the miniature real
    inputs with that many SIDE x SIDE incompressible images, and `kedro run --env real --pipelines
    ingest,features,pretrain` in a temporary copy of the project (peak RSS of its process); then images/s of
    the data loader alone, under the feature step, and of a stage-1 step with features computed on the fly or
    already in memory, with 0 and --workers processes (threads for the on-the-fly step). Takes about 10 minutes
    for the defaults on 2 cores and needs about 3.5 GB of temporary disk for 10,000 images."""
    from qmllm_pipeline import data_scale as scale

    if not (project / "pyproject.toml").is_file():
        _usage(f"{project}: not a Kedro project (no pyproject.toml); pass --project")
    results = []
    for size in sizes:
        click.echo(f"{size} images ...", err=True)
        try:
            results.append(scale.measure_size(project.resolve(), size, side, workers))
        except RuntimeError as error:
            _fail(str(error))
        row = results[-1]
        click.echo(f"  peak RSS {row['peak_rss_mb']:.0f} MB, {row['seconds']:.0f} s, disk {row['disk_mb']}", err=True)
    loader = (scale.loader_rates(loader_images, side, tuple(dict.fromkeys((0, workers))), steps=steps)
              if loader_images else [])
    command = "qmllm data-scale " + " ".join([*(f"--images {n}" for n in sizes), f"--side {side}",
                                               f"--workers {workers}", f"--loader-images {loader_images}",
                                               f"--steps {steps}"])
    table = scale.write(results, loader, out, command)
    click.echo("| images | peak RSS (MB) | seconds | input images (MB) | 03_primary (MB) | 04_feature (MB) |")
    click.echo("|---|---|---|---|---|---|")
    for row in results:
        disk = row["disk_mb"]
        click.echo(f"| {row['images']:,} | {row['peak_rss_mb']:.0f} | {row['seconds']:.0f} "
                   f"| {disk['input_images']:.0f} | {disk['03_primary']:.2f} | {disk['04_feature']:.2f} |")
    if len(results) > 1:
        click.echo(f"peak RSS growth {results[0]['images']:,} -> {results[-1]['images']:,} images: "
                   f"{results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb'] - 1:+.1%} (goal <= +15%)")
    for row in loader:
        click.echo(f"{row['step']}, {row['workers']} workers: {row['images_per_s']} images/s")
    click.echo(f"wrote {out} ({len(table['images'])} sizes)")


@main.command("gpu-check")
@click.option("--processes", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Training processes (one per GPU) to compare one with; the fixtures' batches of 4 and 8 must "
                   "divide by it.")
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The project whose conf/ the runs use (each runs in a temporary copy).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as JSON to this file.")
def gpu_check(processes, project, out) -> None:
    """On a machine with CUDA: run the smoke chain (`kedro run --env smoke`) and the real fixture's chain
    (`kedro run --env real --pipelines real` on `qmllm real-fixture`'s inputs) with 1 and PROCESSES training
    processes, each in a temporary copy of the project, and print their wall time and peak GPU memory (from
    nvidia-smi). Without CUDA it says so and exits 1. About 15 minutes."""
    import torch

    from qmllm_pipeline import gpu_check as gpu

    if not torch.cuda.is_available():
        click.echo("qmllm: error: no CUDA device here; run `qmllm gpu-check` on a machine with a GPU", err=True)
        sys.exit(1)
    if not (project / "pyproject.toml").is_file():
        _usage(f"{project}: not a Kedro project (no pyproject.toml); pass --project")
    if processes > torch.cuda.device_count():
        _usage(f"--processes {processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    try:
        rows = gpu.check(project.resolve(), processes)
    except RuntimeError as error:
        click.echo(f"qmllm: error: {error}", err=True)
        sys.exit(1)
    click.echo(f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}")
    click.echo(gpu.table(rows))
    if out is not None:
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=2) + "\n")


@main.command("scale-check")
@click.option("--processes", type=click.IntRange(2, 64), default=2, show_default=True,
              help="Processes to compare one process with (CPU processes over gloo; one per GPU on a GPU machine).")
@click.option("--steps", type=click.IntRange(2, 10_000), default=20, show_default=True, help="Steps per trainer.")
@click.option("--hidden", type=click.IntRange(8, 8192), default=256, show_default=True,
              help="Hidden width of the Llama the gradient-checkpointing table measures.")
@click.option("--layers", type=click.IntRange(1, 128), default=4, show_default=True,
              help="Layers of that Llama.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Also measure gradient checkpointing's memory (each setting in a fresh process).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the tables as Markdown to this file.")
def scale_check(processes, steps, hidden, layers, memory, out) -> None:
    """Check that training scales out, on small random models (no weights, no GPU needed): stage 1 and stage 2
    (full and LoRA) on 1 and on N processes with the same global batch, their losses and weights side by side
    (they should agree to float precision); and the activation memory of a stage-2 step with and without
    gradient checkpointing (with the peak CUDA memory where a GPU runs it)."""
    import datetime
    import platform

    import torch
    import transformers

    from qmllm_pipeline import scaling

    transformers.logging.set_verbosity_error()
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, " \
              f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"
    ddp = scaling.format_rows(scaling.ddp_rows(processes, steps))
    table = (f"qmllm scale-check, {datetime.date.today()}, {machine}\n\n"
             f"1 vs {processes} processes (DDP), same global batch:\n\n{ddp}")
    if memory:
        rows = scaling.format_rows(scaling.checkpointing_rows(hidden, layers))
        table += f"\n\nA stage-2 step with and without gradient checkpointing:\n\n{rows}"
    click.echo(table)
    if out is not None:
        out.write_text(table + "\n")


def _check_label(option: str, label: str | None) -> None:
    """A sweep's label (`qmllm seeds run --label`, the runs' `lever` tag): letters, digits and underscores."""
    if label is not None and not label.replace("_", "").isalnum():
        _usage(f"{option} {label!r}: letters, digits and underscores only")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: a comma list of whole numbers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{text!r}: at least one seed, none repeated")
    return seeds


def _short_commit(rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True)
    return done.stdout.strip() or rev


@main.group()
def seeds() -> None:
    """Results over seeds: run the default chain once per seed as DVC experiments, then aggregate.

    \b
    qmllm seeds run --seeds 0,1,2     about 15-20 min a seed on 2 cores (data, features and the
                                      foundation set are reused; stage 1 onward reruns)
    qmllm seeds aggregate             metrics/seeds.json: mean, std, min, max and each seed's value
    qmllm report                      docs/results.md and the README headline over the seeds
    """


@seeds.command("run")
@click.option("--seeds", "seed_text", default="0,1,2", show_default=True, help="Comma list of seeds.")
@click.option("--set", "settings", multiple=True,
              help="A lever: a DVC override FILE:KEY=VALUE for every seed (repeatable; needs --label).")
@click.option("--label", default=None, help="Name of a lever's sweep (in the experiment names).")
def seeds_run(seed_text, settings, label) -> None:
    """One `dvc exp run --temp -S conf/base/parameters.yml:seed=K` per seed, in turn (the workspace stays)."""
    from qmllm_pipeline.seeds import run_seeds

    _check_label("--label", label)
    try:
        run_seeds(_seed_list(seed_text), tuple(settings), label)
    except ValueError as error:
        _fail(str(error))
    except subprocess.CalledProcessError as error:
        _fail(f"dvc exp run failed (exit {error.returncode}); its output is above")


@seeds.command("aggregate")
@click.option("--seeds", "seed_text", default=None, help="Comma list of seeds to keep (default: every seed run).")
@click.option("--label", default=None, help="Aggregate a lever's sweep instead of the default's.")
@click.option("--rev", default="HEAD", show_default=True,
              help="The commit the sweep ran on (an earlier one, when later commits did not touch the chain).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("metrics/seeds.json"),
              show_default=True)
def seeds_aggregate(seed_text, label, rev, out) -> None:
    """Write the seed experiments' headline figures, aggregated, to metrics/seeds.json."""
    from qmllm_pipeline.seeds import aggregate, collect

    try:
        runs = collect(_seed_list(seed_text) if seed_text else None, label, rev)
    except subprocess.CalledProcessError as error:
        _fail(f"dvc exp show --rev {rev} failed: {(error.stderr or '').strip()}")
    if not runs:
        _fail(f"no seed experiments{f' labelled {label}' if label else ''} of commit {rev} in `dvc exp show` "
              "(run `qmllm seeds run` first)")
    summary = {"commit": _short_commit(rev), **aggregate(runs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(f"wrote {out}: {len(summary['figures'])} figures over seeds {summary['seeds']}")


@seeds.command("compare")
@click.argument("sweeps", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def seeds_compare(sweeps) -> None:
    """Print each headline figure's mean [min, max] in every SWEEP (files `qmllm seeds aggregate` wrote)."""
    from qmllm_pipeline.seeds import compare_table

    loaded = {}
    for path in sweeps:
        try:
            loaded[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            _fail(f"{path}: cannot read this sweep ({error})")
    try:
        click.echo(compare_table(loaded))
    except (KeyError, TypeError, AttributeError) as error:
        _fail(f"{', '.join(map(str, sweeps))}: not sweeps `qmllm seeds aggregate` wrote (no {error})")


@main.command("promote-foundation")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=Path("data/06_models/foundation"),
              show_default=True, help="A set `kedro run --pipelines foundation` trained.")
@click.option("--target", type=click.Path(file_okay=False, path_type=Path), default=Path("data/01_raw/foundation"),
              show_default=True, help="The shipped set the default run reads (git-tracked).")
@click.option("--force", is_flag=True, help="Ship a set that misses a shipping goal (the provenance says which).")
def promote_foundation(source, target, force) -> None:
    """Make a trained foundation set (tokenizer, CLIP, LLM) the shipped one, with its provenance (command, git
    commit, parameters, seeds, time, machine, metrics). Commit the target folder afterwards."""
    from qmllm_pipeline.shipped import promote, size_bytes

    try:
        provenance = promote(source, target, force)
    except (OSError, ValueError) as error:
        _fail(str(error))
    clip, llm = provenance["metrics"]["clip"], provenance["metrics"]["llm"]
    click.echo(f"shipped {source} as {target} ({size_bytes(target) / 1e6:.1f} MB): CLIP zero-shot top-1 "
               f"{clip['top1']:.3f}, top-5 {clip['top5']:.3f}; LLM held-out harmful refused "
               f"{llm['heldout_harmful_refused']:.3f}, benign refused {llm['heldout_benign_refused']:.3f}")


@main.command()
@click.option("--metrics", "metrics_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("metrics"),
              show_default=True, help="Folder of the metrics JSON files a run wrote.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/results.md"),
              show_default=True, help="The results page to write.")
@click.option("--readme", type=click.Path(dir_okay=False, path_type=Path), default=Path("README.md"),
              show_default=True, help="README whose headline block (between its markers) is rewritten.")
@click.option("--no-readme", is_flag=True, help="Leave the README alone.")
def report(metrics_dir, out, readme, no_readme) -> None:
    """Write docs/results.md and the README's headline table from metrics/*.json, so the documented figures
    are the last run's (run after `kedro run` or `dvc repro`)."""
    from qmllm_pipeline.results import write_report

    try:
        written = write_report(metrics_dir, out, None if no_readme else readme)
    except (OSError, ValueError) as error:
        _fail(str(error))
    for path in written:
        click.echo(f"wrote {path}")


@main.command()
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The Kedro project root (its mlflow.db holds the runs).")
@click.option("--last", type=click.IntRange(1, 100), default=5, show_default=True, help="How many recent runs.")
@click.option("--metric", "metrics", multiple=True,
              help="A metric to show (repeatable; default: a summary of every pipeline's headline numbers).")
@click.option("--all-params", is_flag=True, help="Show every parameter, not only those that differ.")
@click.option("--lever", default=None,
              help="Only the runs of this lever (the `lever` tag: `default`, or a `qmllm seeds run --label`), e.g. "
                   "the seeds of one sweep side by side.")
def runs(project, last, metrics, all_params, lever) -> None:
    """Compare the latest MLflow runs from the command line: one column per run, the parameters that
    differ between them, and headline metrics (the MLflow UI's run comparison, as text)."""
    import pandas as pd

    from qmllm_pipeline.tracking import DEFAULT_COMPARISON_METRICS, compare_runs

    store = project.resolve() / "mlflow.db"
    if not store.is_file():
        _fail(f"{store}: no MLflow store here (run `kedro run` first, or pass --project)")
    _check_label("--lever", lever)
    table = compare_runs(f"sqlite:///{store}", last, tuple(metrics) or DEFAULT_COMPARISON_METRICS,
                         all_params=all_params, lever=lever)
    if table.empty:
        _fail(f"{store}: no runs in the experiment 'qmllm_pipeline'" + (f" with lever {lever!r}" if lever else " yet"))
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                           "display.max_colwidth", 40):
        click.echo(table.to_string(na_rep="-", float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
