from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.constants import VARIANTS
from qmllm_pipeline.pipelines.pretrain import nodes

SHARED = ["caption_features", "caption_targets", "caption_examples", "tokenizer", "llm", "name_vocabulary",
          "name_head_weights"]
SHARED_PARAMETERS = ("params:pretrain.model", "params:features.vision_tower", "params:features.cls_head",
                     "params:pretrain.name_head", "params:pretrain.stage1",
                     "params:pretrain.cls_head", "params:seed", "params:checkpoint_dir", "params:distributed")


def create_pipeline(**kwargs) -> Pipeline:
    """The model config and stage 1, instantiated per variant by namespace (outputs `qmllm.*`, `baseline.*`)."""
    template = Pipeline([
        Node(nodes.model_config, ["tokenizer", "llm", "caption_features", "caption_targets", "params:pretrain.model",
                                  "params:features.vision_tower", "params:features.cls_head", "name_vocabulary",
                                  "params:pretrain.name_head", "params:variant"],
             "qmllm_config",
             name="model_config"),
        Node(nodes.pretrain_variant, ["qmllm_config", "caption_features", "caption_examples", "caption_targets",
                                      "llm", "name_head_weights", "params:pretrain.stage1", "params:pretrain.cls_head",
                                      "params:pretrain.name_head", "params:seed",
                                      "params:checkpoint_dir", "params:distributed"],
             ["stage1_weights", "pretrain_summary", "pretrain_loss_curve"], name="pretrain_variant"),
    ])
    variants = [
        pipeline(template, namespace=name, inputs=set(SHARED),
                 parameters={**{p: p for p in SHARED_PARAMETERS}, "params:variant": f"params:variants.{name}"})
        for name in VARIANTS
    ]
    shared = Pipeline([
        Node(nodes.tokenized_captions, ["caption_corpus", "tokenizer", "params:pretrain.caption_instruction",
                                        "params:pretrain.max_length"], "caption_examples", name="tokenized_captions"),
        Node(nodes.name_vocabulary, ["emoji_catalogue", "tokenizer", "params:data.layout.backgrounds",
                                     "params:pretrain.name_head"], "name_vocabulary", name="name_vocabulary"),
        Node(nodes.name_head_weights, ["caption_features", "caption_corpus", "name_vocabulary",
                                       "params:pretrain.name_head", "params:seed", "params:checkpoint_dir"],
             ["name_head_weights", "name_head_summary"], name="name_head"),
    ])
    report = Pipeline([Node(nodes.pretrain_report, ["qmllm.pretrain_summary", "baseline.pretrain_summary",
                                                    "name_head_summary"],
                            "pretrain_metrics", name="pretrain_report")])
    return shared + sum(variants, Pipeline([])) + report
