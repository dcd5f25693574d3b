"""A lever of the shipped stand-ins: every catalogue name as one token of the LLM's vocabulary.

The shipped tokenizer splits a third of the names into two to five pieces (' kitchen', ' knife'), so an
answer names an object over several tokens and a name slot is five tokens wide. Here the multi-piece names
are added as whole tokens (`add_tokens` below: each new embedding starts as the mean of its pieces'),
and stage 1 and stage 2 run on the grown tokenizer and LLM with the pipelines' own nodes, in memory; the
cached features and L_semantic targets are the trained project's (computed with the shipped tokenizer, and
CLIP's text tower keeps reading that one). The LLM side only: the shipped set itself is not changed.
Run on demand (`python lab/single_token_names.py --help`)."""

from __future__ import annotations

import copy
import logging
import tempfile
import time

import torch
from tokenizers import AddedToken

from qmllm_pipeline.dotted import with_overrides
from qmllm_pipeline.in_memory import run_in_memory
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
    chain = pretrain.create_pipeline(params) + finetune.create_pipeline(params)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="single-token-names-") as scratch:  # never the real run's checkpoints
        outputs = run_in_memory(chain, {**inputs, "tokenizer": tokenizer, "llm": llm},
                                with_overrides(params, checkpoint_dir=scratch))
    return {"tokens_added": added, "vocabulary": len(tokenizer), "seconds": round(time.perf_counter() - started, 1),
            "pretrain": outputs["pretrain_metrics"], "finetune": outputs["finetune_metrics"]}


def add_tokens(tokenizer, llm, tokens: list[str]) -> tuple[object, object]:
    """Copies of `tokenizer` and `llm` with `tokens` added as whole tokens (matched verbatim, leading space
    included: ' kitchen knife'), the LLM's embeddings resized to the new vocabulary; each new row starts as
    the mean of the embeddings of the pieces the old tokenizer split it into (tied output rows follow).
    Tokens the tokenizer already encodes as one token are left alone. Returns (tokenizer, llm)."""
    tokenizer, llm = copy.deepcopy(tokenizer), copy.deepcopy(llm)
    pieces = {token: tokenizer(token, add_special_tokens=False)["input_ids"] for token in tokens}
    new = [token for token, ids in pieces.items() if len(ids) != 1]
    tokenizer.add_tokens([AddedToken(token, normalized=False, single_word=False) for token in new])
    old = llm.get_input_embeddings().weight.detach().clone()
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = llm.get_input_embeddings().weight
        for token in new:
            weight[tokenizer.convert_tokens_to_ids(token)] = old[pieces[token]].mean(0)
    return tokenizer, llm
