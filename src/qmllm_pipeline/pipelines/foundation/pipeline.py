from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.foundation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Train a new set of stand-ins (`trained_*`, under data/06_models/foundation). The chain reads the shipped
    set (`tokenizer`, `clip_model`, ...); `qmllm promote-foundation` turns a trained set into the shipped one."""
    return Pipeline([
        Node(nodes.fit_tokenizer, ["text_corpus", "dialogs", "params:foundation.tokenizer"], "trained_tokenizer",
             name="fit_tokenizer"),
        Node(nodes.fit_clip, ["caption_corpus", "trained_tokenizer", "params:foundation.clip",
                              "params:data.layout.image_size", "params:foundation.seed", "params:foundation.log_every"],
             ["trained_clip_model", "trained_clip_image_processor", "clip_loss_curve", "clip_training"],
             name="fit_clip"),
        Node(nodes.fit_llm, ["text_corpus", "trained_tokenizer", "params:foundation.llm", "params:foundation.seed",
                             "params:foundation.log_every"],
             ["trained_llm", "llm_loss_curve", "llm_training"], name="fit_llm"),
        Node(nodes.zero_shot_classes, ["emoji_catalogue", "params:data.layout.backgrounds", "params:foundation.clip"],
             "zero_shot_classes", name="zero_shot_classes"),
        Node(nodes.evaluate_clip, ["trained_clip_model", "trained_clip_image_processor", "trained_tokenizer",
                                   "zero_shot_classes", "eval_items"], "clip_metrics", name="evaluate_clip"),
        Node(nodes.evaluate_llm, ["trained_llm", "trained_tokenizer", "text_corpus", "params:foundation.evaluation"],
             "llm_metrics", name="evaluate_llm"),
        Node(nodes.foundation_report, ["clip_metrics", "llm_metrics", "clip_training", "llm_training"],
             "foundation_metrics", name="foundation_report"),
        Node(nodes.foundation_provenance, ["foundation_metrics", "params:foundation", "params:data.layout.image_size"],
             "foundation_provenance", name="foundation_provenance"),
    ])
