from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.pipelines.finetune import nodes
from qmllm_pipeline.pipelines.pretrain.pipeline import VARIANTS

SHARED = ["dialog_features", "dialogs", "text_corpus", "tokenizer", "llm", "clip_model", "clip_image_processor",
          "eval_utility", "eval_neutral"]


def create_pipeline(**kwargs) -> Pipeline:
    """Stage 2 and its measurements, instantiated per variant by namespace."""
    template = Pipeline([
        Node(nodes.finetune_variant, ["dialog_features", "dialogs", "text_corpus", "tokenizer", "llm",
                                      "stage1_weights", "params:pretrain", "params:finetune", "params:variant"],
             ["finetuned_llm", "finetune_summary", "finetune_loss_curve"], name="finetune_variant"),
        Node(nodes.evaluate_variant, ["finetuned_llm", "stage1_weights", "tokenizer", "clip_model",
                                      "clip_image_processor", "eval_utility", "eval_neutral", "text_corpus",
                                      "params:pretrain", "params:features", "params:finetune", "params:variant"],
             "finetune_metrics", name="evaluate_variant"),
    ])
    variants = [
        pipeline(template, namespace=name, inputs=set(SHARED),
                 parameters={"params:pretrain": "params:pretrain", "params:features": "params:features",
                             "params:finetune": "params:finetune", "params:variant": f"params:variants.{name}"})
        for name in VARIANTS
    ]
    report = Pipeline([
        Node(nodes.blind_guess, ["dialogs", "eval_utility"], "blind_guess", name="blind_guess"),
        Node(nodes.finetune_report, ["qmllm.finetune_metrics", "baseline.finetune_metrics", "blind_guess",
                                     "qmllm.finetune_summary", "baseline.finetune_summary"],
             "finetune_metrics", name="finetune_report"),
    ])
    return sum(variants, Pipeline([])) + report
