from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.foundation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.fit_tokenizer, ["text_corpus", "dialogs", "params:foundation.tokenizer"], "tokenizer",
             name="fit_tokenizer"),
        Node(nodes.fit_clip, ["caption_corpus", "tokenizer", "params:foundation.clip", "params:data.layout.image_size",
                              "params:foundation.seed", "params:foundation.log_every"],
             ["clip_model", "clip_image_processor", "clip_loss_curve", "clip_training"], name="fit_clip"),
        Node(nodes.fit_llm, ["text_corpus", "tokenizer", "params:foundation.llm", "params:foundation.seed",
                             "params:foundation.log_every"],
             ["llm", "llm_loss_curve", "llm_training"], name="fit_llm"),
        Node(nodes.evaluate_clip,
             ["clip_model", "clip_image_processor", "tokenizer", "emoji_catalogue", "eval_items",
              "params:foundation.clip", "params:data.layout.backgrounds"], "clip_metrics", name="evaluate_clip"),
        Node(nodes.evaluate_llm, ["llm", "tokenizer", "text_corpus", "params:foundation.evaluation"], "llm_metrics",
             name="evaluate_llm"),
        Node(nodes.foundation_report, ["clip_metrics", "llm_metrics", "clip_training", "llm_training"],
             "foundation_metrics", name="foundation_report"),
    ])
