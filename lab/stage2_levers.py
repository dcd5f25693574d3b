"""Screen stage-2 levers on a trained stage 1: the finetune pipeline's own nodes for one variant, once per
setting, scored as `kedro run --pipelines finetune` scores it (held-out harmful and benign requests refused
with a neutral image, naming, colour, count, caption word F1). Reads what `kedro run` wrote in the chosen
environment and changes none of it: the table is printed and saved to --out. Each setting is a JSON object
of dotted `finetune.*` keys; {} is the configured stage 2. Example (the configured stage 2, then LoRA):

    python lab/stage2_levers.py --seeds 1,2 \
        --settings '[{}, {"finetune.stage2.lora.enabled": true, "finetune.stage2.lora.rank": 16}]'

A screen is one draw per seed on one stage 1; a lever that looks right goes through the whole chain over
seeds (`qmllm seeds run --label L --set ...`) before it counts.
"""

from __future__ import annotations

from common import PROJECT, json_settings, notebook_parser


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "stage2_levers.csv",
                             "CSV written (via a temporary file) with one row per setting and seed",
                             env_help="Kedro environment whose trained stage 1 is read (default: base)")
    parser.add_argument("--variant", default="qmllm", help="qmllm or baseline (default: qmllm)")
    parser.add_argument("--settings", type=json_settings, default="[{}]",
                        help="JSON list of settings (default: [{}], the configured one)")
    parser.add_argument("--seeds", default=None,
                        help="comma list of stage-2 seeds (default: the configured seed); stage 1 stays the run's")
    args = parser.parse_args()

    # the project is imported only now: --help stays quick and quiet
    import pandas as pd
    from common import project_context, write_table
    from experiments.stage2_levers import stage2_levers, stage2_pipeline

    from qmllm_pipeline.dotted import with_overrides

    with project_context(PROJECT, args.env) as context:
        params = context.params
        pipeline = stage2_pipeline(args.variant)
        inputs = {name: context.catalog.load(name) for name in pipeline.inputs() if not name.startswith("params:")}
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [params["seed"]]
        table = pd.concat([stage2_levers(inputs, with_overrides(params, seed=seed), args.settings, args.variant)
                           for seed in seeds], ignore_index=True)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
