"""Measure the safety map's levers on the trained world: CLS design x CLS source x lambda_semantic x K x
D_map size.

Each (design, source, lambda, K) trains its own stage 1 (about 30 s on 2 cores with the default
configuration) and, on the decoupled path, its CLS head; each D_map size reuses it. Reads what `kedro run`
wrote (data, foundation, features) and changes none of it: the table is printed and saved to --out.
Examples:

    python lab/safety_map_levers.py --cls-source layer --lambda-semantic 1,0.3,0.1,0 \\
        --cls-codes 128 --dmap 50/500
    python lab/safety_map_levers.py --design decoupled,decoupled_cosine --seeds 0,1,2
"""

from __future__ import annotations

from common import PROJECT, comma_list, notebook_parser


def _dmap_size(text: str) -> tuple[int, int]:
    per_category, neutral = text.split("/")
    return int(per_category), int(neutral)


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "safety_map_levers.csv",
                             "CSV written (via a temporary file) with one row per setting")
    parser.add_argument("--cls-source", type=comma_list(str), default=None,
                        help="comma list of CLS features the safety map reads: layer, pooled, projected "
                             "(features.vision_tower.cls_source on the shared path, features.cls_head.cls_source "
                             "on the decoupled one; default: each design's configured one)")
    parser.add_argument("--design", type=comma_list(str), default=["configured"],
                        help="comma list of CLS designs (experiments/safety_map_levers.py: DESIGNS): configured, "
                             "shared, decoupled (a CLS head on features.cls_head beside the paper's stage 1), "
                             "decoupled_cosine, decoupled_patch_only (stage 1 without the CLS terms) "
                             "(default: configured)")
    parser.add_argument("--lambda-semantic", type=comma_list(float), default=[1.0],
                        help="comma list of L_semantic weights (pretrain.stage1.lambda_semantic on the shared path, "
                             "pretrain.cls_head.lambda_semantic on the decoupled one; default: 1)")
    parser.add_argument("--cls-codes", type=comma_list(int), default=[128],
                        help="comma list of K values (default: 128)")
    parser.add_argument("--dmap", type=comma_list(_dmap_size), default=[(50, 500)],
                        help="comma list of D_map sizes, images per toxic category/neutral images (default: 50/500)")
    parser.add_argument("--seeds", type=comma_list(int), default=None,
                        help="comma list of seeds, each a full sweep (default: the configured seed)")
    args = parser.parse_args()

    # the project is imported only now: --help stays quick and quiet
    import pandas as pd
    from common import project_context, write_table
    from experiments.safety_map_levers import INPUTS, lever_sweep

    from qmllm_pipeline.dotted import with_overrides

    with project_context(PROJECT, args.env) as context:
        inputs = {name: context.catalog.load(name) for name in INPUTS}
        seeds = args.seeds or [context.params["seed"]]
        table = pd.concat([lever_sweep(inputs, with_overrides(context.params, seed=seed), args.cls_source,
                                       args.lambda_semantic, args.cls_codes, args.dmap, args.design).assign(seed=seed)
                           for seed in seeds], ignore_index=True)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
