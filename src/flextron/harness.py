"""lm-evaluation-harness bridge: any budget of an elastic checkpoint as an `lm_eval` model, and
our tasks as `lm_eval` task configs on local files (needs `pip install lm-eval`).

    import lm_eval
    from flextron.harness import FlextronLM, task_config
    lm = FlextronLM("ckpt", budget="0.5")
    lm_eval.simple_evaluate(model=lm, tasks=[task_config("arc_easy", "/tmp/arc")], limit=100)

From lm-eval's own command line the model is `flextron` (`--model_args pretrained=CKPT,budget=0.5`,
`adaptive=true` for input-adaptive routing): lm-eval releases that load plugins find it through our
`lm_eval.models` entry point; with older ones (0.4.13 has no plugin loading) run lm-eval's CLI as
`python -m flextron.harness run --model flextron ...`.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from flextron.errors import FlextronError
from flextron.fsutil import write_jsonl
from flextron.space import Budget
from flextron.tasks import load_docs

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # an optional dependency: say how to get it
    raise FlextronError("the lm-evaluation-harness bridge needs `pip install lm-eval`") from e


@register_model("flextron")
class FlextronLM(HFLM):
    """HFLM over the sub-network a budget selects (router, else the largest uniform one), or with
    `adaptive` over the checkpoint's input-adaptive routers: each loglikelihood request is a request
    whose prompt is its context (the context alone chooses the attention widths, so the candidates of
    a question share them, as in `flextron.tasks`), one request per call; generation routes on the prompt.

    The weights are the checkpoint's, sliced in place: switch budgets with `set_budget`."""

    def __init__(self, pretrained: str | Path | None = None, budget: str | float = "1.0", adaptive: bool = False,
                 device: str | None = None, batch_size: int | str = 8, **kwargs) -> None:
        from flextron import api  # api imports most of the package; keep this module light to import

        self.routing = None
        self._prompt_length: int | None = None  # adaptive: the context length of the request being scored
        self.elastic, tok = api.open_model(pretrained, [Budget.parse(budget)], device)
        if adaptive:
            from flextron.adaptive import AdaptiveRouting

            self.routing = AdaptiveRouting.for_model(self.elastic)
            self.fraction = self.routing.fraction(Budget.parse(budget))
            self.routing.attach()
            batch_size = 1  # one request per call: its context length is known only per request
        else:
            self.set_budget(budget)
        super().__init__(pretrained=self.elastic.model, tokenizer=tok, batch_size=batch_size, **kwargs)

    def set_budget(self, budget: str | float) -> None:
        from flextron.budgets import select_subnet

        if self.routing is not None:
            raise FlextronError("an adaptive FlextronLM keeps its budget; make another for a new budget")
        self.elastic.set_subnet(select_subnet(self.elastic, Budget.parse(budget)))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.routing is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="Running loglikelihood requests (adaptive)"):
            _, context, continuation = request
            # HFLM keeps the last max_length + 1 tokens of context + continuation (and drops the very last):
            # the context's share of what is kept is the prompt.
            self._prompt_length = min(len(context) + len(continuation), self.max_length + 1) - len(continuation)
            try:
                out += super()._loglikelihood_tokens([request], disable_tqdm=True)
            finally:
                self._prompt_length = None
        return out

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.routing is not None:
            if self._prompt_length is None:
                raise FlextronError("an adaptive FlextronLM scores loglikelihood requests only, each on its context")
            self.routing.start(self.fraction, inps[:, : self._prompt_length])
        return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.routing is not None:
            self.routing.start(self.fraction, context)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def task_config(task: str, workdir: str | Path, limit: int | None = None) -> dict:
    """An lm_eval task config scoring the same documents as `flextron.tasks` (written as JSON
    lines into `workdir`): multiple choice with `acc` / `acc_norm`, or LAMBADA-style `acc` and
    `perplexity`. Every choice must share its document's context (not winogrande)."""
    docs = load_docs(task, limit)
    rows = []
    for d in docs:
        contexts = {c for c, _ in d.pairs}
        if len(contexts) != 1:
            raise FlextronError(f"{task}: choices with different contexts have no plain lm_eval form")
        rows.append({"context": contexts.pop(), "choices": [c for _, c in d.pairs], "gold": d.gold})
    name = Path(task).name.split(".")[0]
    path = Path(workdir) / f"{name}.jsonl"
    write_jsonl(path, rows)
    config = {
        "task": f"flextron_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test", "doc_to_text": "context", "target_delimiter": "", "num_fewshot": 0,
    }
    if all(len(d.pairs) == 1 for d in docs):
        return {**config, "output_type": "loglikelihood", "doc_to_target": "{{choices[0]}}",
                "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]}
    return {**config, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}


if __name__ == "__main__":  # lm-eval's own command line, with `--model flextron` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
