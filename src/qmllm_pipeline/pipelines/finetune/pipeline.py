from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.constants import VARIANTS
from qmllm_pipeline.pipelines.finetune import nodes

SHARED = ["dialog_features", "dialog_examples", "stage2_validation", "text_corpus", "tokenizer", "llm", "clip_model",
          "clip_image_processor", "eval_utility", "eval_neutral", "eval_items", "emoji_catalogue"]
SHARED_PARAMETERS = ("params:finetune.stage2", "params:finetune.evaluation", "params:seed", "params:checkpoint_dir",
                     "params:distributed")


def create_pipeline(**kwargs) -> Pipeline:
    """Stage 2 and its measurements, instantiated per variant by namespace."""
    template = Pipeline([
        Node(nodes.finetune_variant, ["qmllm_config", "stage1_weights", "llm", "tokenizer", "dialog_features",
                                      "dialog_examples", "text_corpus", "stage2_validation",
                                      "params:finetune.stage2", "params:seed",
                                      "params:checkpoint_dir", "params:distributed"],
             ["finetuned_llm", "lora_adapter", "finetune_summary", "finetune_loss_curve"], name="finetune_variant"),
        Node(nodes.finetuned_model, ["qmllm_config", "stage1_weights", "finetuned_llm", "clip_model", "tokenizer",
                                     "clip_image_processor"], "finetuned_model", name="finetuned_model"),
        Node(nodes.evaluate_variant, ["finetuned_model", "eval_utility", "eval_neutral", "eval_items",
                                      "emoji_catalogue", "text_corpus", "stage2_validation",
                                      "params:finetune.evaluation"],
             "finetune_metrics", name="evaluate_variant"),
    ])
    variants = [pipeline(template, namespace=name, inputs=set(SHARED),
                         parameters={p: p for p in SHARED_PARAMETERS}) for name in VARIANTS]
    shared = Pipeline([
        Node(nodes.stage2_validation, ["text_corpus", "params:finetune.data"], "stage2_validation",
             name="stage2_validation"),
        Node(nodes.synthetic_replay, ["text_corpus", "stage2_validation", "llm", "tokenizer", "params:finetune.data",
                                      "params:seed"], "synthetic_replay", name="synthetic_replay"),
        Node(nodes.dialog_examples, ["dialogs", "text_corpus", "stage2_validation", "synthetic_replay", "tokenizer",
                                     "params:finetune.data", "params:seed"],
             "dialog_examples", name="dialog_examples"),
    ])
    report = Pipeline([
        Node(nodes.blind_guess, ["dialogs", "eval_utility"], "blind_guess", name="blind_guess"),
        Node(nodes.finetune_report, ["qmllm.finetune_metrics", "baseline.finetune_metrics", "blind_guess",
                                     "qmllm.finetune_summary", "baseline.finetune_summary"],
             "finetune_metrics", name="finetune_report"),
    ])
    return shared + sum(variants, Pipeline([])) + report
