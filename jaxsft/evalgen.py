"""Generation metrics during training (`train.eval_generate_every`): is the task itself improving?

Every `train.eval_generate_every` steps, at the last step, and before the first step of a fresh
run, the training loop decodes the first `train.eval_generate_prompts` held-out prompts (`data.eval`)
with its current parameters and logs the `eval.metrics` (and `eval.user_metric`) as `eval_<name>`
(fractions) into that step's metrics record: metrics.jsonl, TensorBoard, W&B and the plot.

The prompts, references, decoding (`eval.*`: greedy by default, `eval.max_new_tokens`,
`eval.batch_size`, stop tokens and strings) and scoring are `jaxsft eval`'s own (`jaxsft.evaluate`),
so the numbers of the last step are those `jaxsft eval` reports for the same checkpoint and prompts.
The prompts are rendered once; the decoder is compiled at the first evaluation and reused (the
shapes do not change). Every process runs the same decode (its batches are sharded over the mesh);
only process 0 writes the record.
"""

from __future__ import annotations

from typing import Callable

import jax

from jaxsft.config import Config
from jaxsft.evaluate import held_out, metric_functions, score
from jaxsft.generate import LoadedModel, stop_token_ids
from jaxsft.models import CausalLM
from jaxsft.monitor import info


def make(cfg: Config, tokenizer, mesh: jax.sharding.Mesh) -> Callable[[CausalLM], dict[str, float]] | None:
    """The evaluation `fn(model) -> {"eval_<metric>": value}` of `train.eval_generate_every`, or None
    when it is off (0) or there is no held-out data (`data.eval`) or no metric to compute."""
    if not cfg.train.eval_generate_every or not cfg.data.eval:
        return None
    fns = metric_functions(cfg.eval)
    if not fns:
        return None
    items = held_out(cfg, tokenizer, cfg.train.eval_generate_prompts)
    prompts = [it.prompt_ids for it in items]
    references = [it.reference for it in items]
    stop_ids = stop_token_ids(tokenizer, cfg.model.path)
    info(f"generation metrics ({', '.join(fns)}) every {cfg.train.eval_generate_every} steps on the first "
         f"{len(prompts)} held-out prompts")

    def evaluate(model: CausalLM) -> dict[str, float]:
        if not prompts:
            return {}
        loaded = LoadedModel(model, tokenizer, stop_ids, cfg.model.path, mesh=mesh)
        predictions = loaded.generate(prompts, cfg.eval)
        return {f"eval_{name}": value for name, value in score(predictions, references, fns).items()}

    return evaluate
