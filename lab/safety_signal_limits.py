"""What limits the safety map: the trained CLS path read as codes (Algorithm 1, the toxic-share rule) and as
k-nearest D_map images in the head's continuous output and in its input feature, each thresholded on
D_map's validation split at the same FPR budget, each measured on the held-out scenes
and, with a name head, Algorithm 1 over its name picks (experiments/safety_signal_limits.py says how to read
it).

Reads what `kedro run` wrote (the qmllm model, D_map, the evaluation splits, metrics/safety_map.json) and
changes none of it: the table is printed and saved to --out. About half a minute on 2 cores. Example:

    python lab/safety_signal_limits.py --k 1,5,15
"""

from __future__ import annotations

from common import PROJECT, comma_list, notebook_parser


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "safety_signal_limits.csv",
                             "CSV written (via a temporary file) with one row per detector")
    parser.add_argument("--k", type=comma_list(int), default=[1, 5, 15],
                        help="comma list of neighbour counts for the kNN detectors (default: 1,5,15)")
    args = parser.parse_args()

    # the project is imported only now: --help stays quick and quiet
    from common import project_context, write_table
    from experiments.safety_signal_limits import EVALUATION, signal_limits

    from qmllm_pipeline.models.qmllm import QMLLM

    with project_context(PROJECT, args.env) as context:
        load = context.catalog.load
        model = QMLLM.assemble(load("qmllm.qmllm_config"), load("qmllm.stage1_weights"), clip_model=load("clip_model"))
        splits = {name: load(name) for name in ("dmap", "dmap_validation", *EVALUATION)}
        table = signal_limits(model, load("clip_image_processor"), splits, load("safety_metrics"), args.k,
                              context.params["safety_map"]["max_validation_fpr"],
                              context.params["safety_map"]["tau_candidates"])
    write_table(table, args.out)


if __name__ == "__main__":
    main()
