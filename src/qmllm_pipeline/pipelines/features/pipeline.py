from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.features import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.extract_caption_features, ["caption_corpus", "clip_model", "clip_image_processor",
                                              "params:features"], "caption_features", name="extract_caption_features"),
        Node(nodes.extract_dialog_features, ["dialogs", "clip_model", "clip_image_processor", "params:features"],
             "dialog_features", name="extract_dialog_features"),
        Node(nodes.caption_semantic_targets, ["caption_corpus", "tokenizer", "llm", "clip_model", "clip_tokenizer",
                                              "params:features"],
             "caption_targets", name="caption_semantic_targets"),
    ])
