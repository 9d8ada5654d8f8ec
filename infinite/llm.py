"""The offline API, as people know it from vLLM: LLM(...).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.sampling.params import SamplingParams

# text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]} (either with an optional "cache_salt")
Prompt = str | list[int] | dict


def _prompt_input(p: Prompt) -> tuple[str | list[int], str | None]:
    """vLLM's prompt forms (TextPrompt / TokensPrompt dicts) as the engine's text or ids, and the
    prompt's cache_salt (None: none given)."""
    if not isinstance(p, dict):
        return p, None
    keys = set(p) - {"cache_salt"}
    salt = p.get("cache_salt")
    if keys == {"prompt_token_ids"} or keys == {"prompt_token_ids", "prompt"}:
        return p["prompt_token_ids"], salt
    if keys == {"prompt"}:
        return p["prompt"], salt
    raise ValueError("a prompt dict holds 'prompt' (text) or 'prompt_token_ids' (ids), and optionally "
                     f"'cache_salt'; got keys {sorted(p)}")


class LLM:
    """``LLM(model=DIR or None, **engine_args)``; engine_args are EngineConfig fields."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        unknown = set(engine_args) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **engine_args)
        if self.config.num_processes > 1:  # several instances, or one of several tensor-parallel ranks
            from infinite.cluster.local import LocalCluster

            self.engine = LocalCluster(self.config)
        else:
            from infinite.runtime.engine import LLMEngine

            self.engine = LLMEngine(self.config)
            self.engine.detokenize_in_background()  # generate reads finished outputs only

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A bad prompt raises before any work starts."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # a single prompt
        inputs = [_prompt_input(p) for p in prompts]
        prompts = [p for p, _ in inputs]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        params = [sp if salt is None else sp.clone(cache_salt=salt) for sp, (_, salt) in zip(params, inputs)]
        eng = self.engine
        # n > 1: n engine requests per prompt (seed + i when seeded), merged into one output.
        jobs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            for j in range(sp.n):
                sub = sp if sp.n == 1 else sp.clone(n=1, seed=None if sp.seed is None else sp.seed + j)
                req = eng.make_request(p, sub)  # validate everything before any work
                req.output_kind = "final_only"  # only finished outputs are read: none is built while it runs
                jobs.append((i, j, req))
        where = {}
        for i, j, r in jobs:
            eng.submit(r)
            where[r.request_id] = (i, j)
        parts: list[list[RequestOutput | None]] = [[None] * sp.n for sp in params]
        bar = None
        if use_tqdm and len(prompts) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="Processed prompts", dynamic_ncols=True)
        try:
            while eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished and out.request_id in where:
                        i, j = where[out.request_id]
                        parts[i][j] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for _, _, r in jobs:
                eng.abort_request(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [_merge(outs) for outs in parts]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several, through the chat template."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("this checkpoint has no tokenizer, so it has no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # The template writes any BOS itself, so its text is encoded without adding special tokens.
        prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
                              add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stats(self) -> list[dict]:
        """One record per instance: rank, free/used/lent/borrowed blocks, running, waiting, step time."""
        return self.engine.stats()

    def shutdown(self) -> None:
        close = getattr(self.engine, "shutdown", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """The n samples of one prompt as one RequestOutput with outputs[0..n-1]."""
    first = outs[0]
    if len(outs) == 1:
        return first
    for j, o in enumerate(outs):
        o.outputs[0].index = j
    return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                         [o.outputs[0] for o in outs], True, first.metrics, extra=first.extra,
                         prompt_logprobs=first.prompt_logprobs)
