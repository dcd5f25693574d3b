"""Measure the name head's levers on the trained world: what it reads x its width x its training steps.

Each setting trains the head with the pretrain pipeline's own node on the cached caption features (about a
minute on 2 cores at the default) and scores its picks on held-out scenes: every catalogue emoji alone
(`eval_items`) and the held-out neutral scenes (`eval_utility`). Reads what `kedro run` wrote and changes
none of it: the table is printed and saved to --out. Example:

    python lab/name_head_levers.py --inputs cls,cls_mean_patch,cls_patches --steps 1500
"""

from __future__ import annotations

from common import PROJECT, comma_list, notebook_parser


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "name_head_levers.csv",
                             "CSV written (via a temporary file) with one row per setting")
    parser.add_argument("--inputs", type=comma_list(str), default=["cls", "cls_mean_patch", "cls_patches"],
                        help="comma list of what the head reads: cls, cls_mean_patch, cls_patches (default: all)")
    parser.add_argument("--hidden", type=comma_list(int), default=None,
                        help="comma list of hidden widths (default: pretrain.name_head.hidden)")
    parser.add_argument("--steps", type=comma_list(int), default=None,
                        help="comma list of training steps (default: pretrain.name_head.training.steps)")
    parser.add_argument("--seeds", type=comma_list(int), default=None,
                        help="comma list of seeds, each a full sweep (default: the configured seed)")
    args = parser.parse_args()

    # the project is imported only now: --help stays quick and quiet
    import pandas as pd
    from common import project_context, write_table
    from experiments.name_head_levers import INPUTS, name_head_sweep

    from qmllm_pipeline.dotted import with_overrides

    with project_context(PROJECT, args.env) as context:
        params = context.params
        inputs = {name: context.catalog.load(name) for name in INPUTS}
        head = params["pretrain"]["name_head"]
        seeds = args.seeds or [params["seed"]]
        table = pd.concat([name_head_sweep(inputs, with_overrides(params, seed=seed), args.inputs,
                                           args.hidden or [head["hidden"]], args.steps or [head["training"]["steps"]])
                           .assign(seed=seed) for seed in seeds], ignore_index=True)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
