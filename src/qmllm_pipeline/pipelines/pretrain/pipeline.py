from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.pipelines.pretrain import nodes

VARIANTS = ("qmllm", "baseline")
SHARED = ["caption_features", "caption_targets", "caption_corpus", "tokenizer", "llm"]


def create_pipeline(**kwargs) -> Pipeline:
    """One stage-1 node, instantiated per variant by namespace (outputs `qmllm.*`, `baseline.*`)."""
    template = Pipeline([
        Node(nodes.pretrain_variant, [*SHARED, "params:pretrain", "params:variant"],
             ["stage1_weights", "pretrain_summary", "pretrain_loss_curve"], name="pretrain_variant"),
    ])
    variants = [
        pipeline(template, namespace=name, inputs=set(SHARED),
                 parameters={"params:pretrain": "params:pretrain", "params:variant": f"params:variants.{name}"})
        for name in VARIANTS
    ]
    report = Pipeline([Node(nodes.pretrain_report, ["qmllm.pretrain_summary", "baseline.pretrain_summary"],
                            "pretrain_metrics", name="pretrain_report")])
    return sum(variants, Pipeline([])) + report
