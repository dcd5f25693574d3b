from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.features import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.extract_caption_features, ["caption_corpus", "clip_model", "clip_image_processor",
                                              "params:features", "params:device"],
             "caption_features", name="extract_caption_features"),
        Node(nodes.extract_dialog_features, ["dialogs", "clip_model", "clip_image_processor", "params:features",
                                             "params:device"],
             "dialog_features", name="extract_dialog_features"),
        Node(nodes.llm_text_targets, ["caption_corpus", "tokenizer", "llm", "params:features", "params:device"],
             "llm_text_targets", name="llm_text_targets"),
        Node(nodes.clip_text_targets, ["caption_corpus", "clip_model", "clip_tokenizer", "params:features",
                                       "params:device"],
             "clip_text_targets", name="clip_text_targets"),
        Node(nodes.caption_semantic_targets, ["llm_text_targets", "clip_text_targets", "params:features"],
             "caption_targets", name="caption_semantic_targets"),
    ])
