from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.ingest import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.ingest_captions, "params:ingest", ["caption_corpus", "ingest_captions_report"],
             name="ingest_captions"),
        Node(nodes.ingest_dialogs, "params:ingest", ["dialogs", "ingest_dialogs_report"], name="ingest_dialogs"),
        Node(nodes.ingest_dmap, "params:ingest", ["dmap", "dmap_validation", "ingest_dmap_report"],
             name="ingest_dmap"),
        Node(nodes.ingest_evaluation_images, "params:ingest", ["eval_toxic", "eval_neutral", "ingest_eval_report"],
             name="ingest_evaluation_images"),
        Node(nodes.ingest_instructions, "params:ingest", "text_corpus", name="ingest_instructions"),
        Node(nodes.ingest_utility, "params:ingest", ["eval_utility", "ingest_utility_report"], name="ingest_utility"),
        Node(nodes.category_catalogue, "params:ingest", "emoji_catalogue", name="category_catalogue"),
        Node(nodes.no_items, None, "eval_items", name="no_items"),
        Node(nodes.no_hard_negatives, "eval_neutral", "eval_hard_negative", name="no_hard_negatives"),
        Node(nodes.merge_reports,
             ["ingest_captions_report", "ingest_dialogs_report", "ingest_dmap_report", "ingest_eval_report",
              "ingest_utility_report"],
             "ingest_report", name="merge_ingest_reports"),
    ])
