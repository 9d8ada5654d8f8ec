"""The offline API, as people know it from vLLM: LLM(...).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.sampling.params import SamplingParams

Prompt = str | list[int]


class LLM:
    """``LLM(model=DIR or None, **engine_args)``; engine_args are EngineConfig fields."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        unknown = set(engine_args) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **engine_args)
        if self.config.num_instances > 1:
            from infinite.cluster.local import LocalCluster

            self.engine = LocalCluster(self.config)
        else:
            from infinite.runtime.engine import LLMEngine

            self.engine = LLMEngine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A bad prompt raises before any work starts."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        eng = self.engine
        reqs = [eng.make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        order = {}
        for i, r in enumerate(reqs):
            eng.submit(r)
            order[r.request_id] = i
        results: list[RequestOutput | None] = [None] * len(reqs)
        bar = None
        if use_tqdm and len(reqs) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="Processed prompts", dynamic_ncols=True)
        try:
            while eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for r in reqs:
                eng.abort_request(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

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
