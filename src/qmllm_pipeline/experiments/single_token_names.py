"""A lever of the shipped stand-ins: every catalogue name as one token of the LLM's vocabulary.

The shipped tokenizer splits a third of the names into two to five pieces (' kitchen', ' knife'), so an
answer names an object over several tokens and a name slot is five tokens wide. Here the multi-piece names
are added as whole tokens (`models/names.add_tokens`: each new embedding starts as the mean of its pieces'),
and stage 1 and stage 2 run on the grown tokenizer and LLM with the pipelines' own nodes, in memory; the
cached features and L_semantic targets are the trained project's (computed with the shipped tokenizer, and
CLIP's text tower keeps reading that one). The LLM side only: the shipped set itself is not changed.
Run on demand (`python notebooks/single_token_names.py --help`)."""

from __future__ import annotations

import logging
import tempfile
import time

from qmllm_pipeline.experiments.runs import run_in_memory, with_overrides
from qmllm_pipeline.models.names import add_tokens
from qmllm_pipeline.pipelines import finetune, pretrain

logger = logging.getLogger(__name__)

# what the experiment reads from a trained project (catalogue entries)
INPUTS = ("emoji_catalogue", "caption_corpus", "caption_features", "caption_targets", "dialogs", "dialog_features",
          "text_corpus", "eval_utility", "eval_neutral", "eval_items", "tokenizer", "llm", "clip_model",
          "clip_image_processor")


def single_token_names(inputs: dict, params: dict) -> dict:
    """Stage 1 and stage 2 of both variants with every catalogue name one token; returns the stage-2 metrics
    (`finetune.json`'s layout), how many tokens were added, and the time of both stages."""
    tokenizer, llm = add_tokens(inputs["tokenizer"], inputs["llm"],
                                [f" {name}" for name in inputs["emoji_catalogue"]["name"]])
    added = len(tokenizer) - len(inputs["tokenizer"])
    logger.info("single-token names: %d names added to the vocabulary (%d tokens)", added, len(tokenizer))
    chain = pretrain.create_pipeline() + finetune.create_pipeline()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="single-token-names-") as scratch:  # never the real run's checkpoints
        outputs = run_in_memory(chain, {**inputs, "tokenizer": tokenizer, "llm": llm},
                                with_overrides(params, checkpoint_dir=scratch))
    return {"tokens_added": added, "vocabulary": len(tokenizer), "seconds": round(time.perf_counter() - started, 1),
            "pretrain": outputs["pretrain_metrics"], "finetune": outputs["finetune_metrics"]}
