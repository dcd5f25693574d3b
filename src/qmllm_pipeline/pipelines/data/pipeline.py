from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.data import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.validate_emoji_catalogue, ["emoji_catalogue_raw", "params:data"], "emoji_catalogue",
             name="validate_emoji_catalogue"),
        Node(nodes.render_caption_corpus, ["emoji_catalogue", "params:data"], "caption_corpus",
             name="render_caption_corpus"),
        Node(nodes.build_text_corpus, ["emoji_catalogue", "caption_corpus", "params:data"], "text_corpus",
             name="build_text_corpus"),
        Node(nodes.make_dialogs, ["emoji_catalogue", "text_corpus", "params:data"], "dialogs",
             name="make_dialogs"),
        Node(nodes.render_dmap, ["emoji_catalogue", "params:data"], "dmap", name="render_dmap"),
        Node(nodes.render_dmap_validation, ["emoji_catalogue", "params:data"], "dmap_validation",
             name="render_dmap_validation"),
        Node(nodes.render_evaluation_splits, ["emoji_catalogue", "params:data"],
             ["eval_toxic", "eval_neutral", "eval_hard_negative", "eval_utility", "eval_items"],
             name="render_evaluation_splits"),
        Node(nodes.draw_contact_sheet, ["eval_toxic", "eval_neutral", "eval_hard_negative", "params:data"],
             "world_contact_sheet", name="draw_contact_sheet"),
        Node(nodes.summarise_world,
             ["emoji_catalogue", "caption_corpus", "dialogs", "dmap", "dmap_validation", "eval_toxic",
              "eval_neutral", "eval_hard_negative", "eval_utility", "eval_items", "text_corpus"],
             "world_summary", name="summarise_world"),
    ])
