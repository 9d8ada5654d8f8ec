"""LLMEngine: one instance's model, KV pool, scheduler and sampler, stepped synchronously.

The offline `LLM` and the async server engine both drive this class; the
distributed runtime reuses its request handling and swaps the attention.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from infinite.kv.cache import KVCache
from infinite.kv.rmanager import RManager, blocks_for
from infinite.outputs import CompletionOutput, RequestOutput
from infinite.runtime.allocator import BlockAllocator, LocalAllocator
from infinite.runtime.config import EngineConfig
from infinite.runtime.detokenize import BACKGROUND_MIN_ROWS, BackgroundDetokenizer
from infinite.runtime.detokenize import advance as feed_detokenizer  # (grammar.advance is the matcher's)
from infinite.runtime.graph_runner import CaptureReport, GraphRunner
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.memory import MemoryPlan, size_pool
from infinite.runtime.model_runner import (DecodeBuffers, LocalAttention, StepInputs, forward, prepare_decode,
                                           prepare_inputs)
from infinite.runtime.request import Request
from infinite.runtime.scheduler import ScheduledBatch, Scheduler
from infinite.runtime.stop import check_stop, visible_len, visible_text
from infinite.runtime.tp import TPLeader
from infinite.sampling.params import SamplingParams
from infinite.sampling.logprobs import prompt_logprobs
from infinite.sampling.sampler import Sampler, SampleRow, make_generator
from infinite.sampling.structured import GrammarCompiler, advance

log = logging.getLogger(__name__)


DEFAULT_MODEL_NAME = "infinite-tiny-llama"


def resolve_model_dir(model: str | None) -> str:
    if model is not None:
        return model
    from infinite.tiny import default_model_dir

    return str(default_model_dir())


def model_name_for(config: EngineConfig, model_dir: str) -> str:
    """What clients call the model: --served-model-name, the folder given, or the default's name."""
    if config.served_model_name:
        return config.served_model_name
    from infinite.tiny import cache_root

    if config.model is None or Path(model_dir).parent == cache_root():
        return DEFAULT_MODEL_NAME
    return config.model


@dataclass
class StepTiming:
    """Host-side time of the steps, by phase: what is not the forward is host work that a GPU waits on.

    ``postprocess`` includes sampling (on a GPU, its first device read waits for the forward)."""

    steps: int = 0
    decode_steps: int = 0
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    postprocess_s: float = 0.0
    decode_host_s: float = 0.0  # prepare + postprocess of pure-decode steps (schedule_s apart)

    def add(self, decode: bool, prepare: float, forward: float, post: float) -> None:
        """One executed step (its schedule time was added to schedule_s by the caller)."""
        self.steps += 1
        self.prepare_s += prepare
        self.forward_s += forward
        self.postprocess_s += post
        if decode:
            self.decode_steps += 1
            self.decode_host_s += prepare + post

    def reset(self) -> None:
        self.__init__()


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        rank: int = 0,
        make_allocator: Callable[[RManager], BlockAllocator] = LocalAllocator,
        tp: TPLeader | None = None,
    ) -> None:
        """``make_allocator`` builds where the scheduler's blocks come from, given this
        instance's rManager (its own pool by default; a cluster instance also borrows).
        ``tp``: this engine is the first rank of a tensor-parallel group (runtime/tp.py): it
        holds its shard of the model and broadcasts every step to the group's other ranks."""
        from infinite.model.loader import load_model
        from infinite.tokenizer import load_tokenizer

        self.config = config
        self.rank = rank
        self.device = config.torch_device()
        self.model_dir = resolve_model_dir(config.model)
        from infinite.model.config import ModelConfig

        mcfg = ModelConfig.from_pretrained(self.model_dir)
        self.dtype = config.torch_dtype(mcfg.torch_dtype, self.device)
        self.model = load_model(self.model_dir, dtype=self.dtype, device=self.device,
                                tp=None if tp is None else tp.group)
        self.model_config = self.model.config
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model_name = model_name_for(config, self.model_dir)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings) \
            if mcfg.max_position_embeddings else (config.max_model_len or 4096)
        if config.max_model_len and config.max_model_len > self.max_model_len:
            log.warning("max_model_len %d is over the model's %d; using the latter", config.max_model_len, self.max_model_len)
        self.eos_token_ids = tuple(mcfg.eos_token_ids)
        c = self.model_config
        self.block_size = config.block_size
        self.memory_plan: MemoryPlan | None
        num_blocks, self.memory_plan = size_pool(self.model, config, self.dtype, self.device)
        self.tp = tp
        if tp is not None:  # every rank's pool holds its heads of the same block ids: the group takes the least
            num_blocks = tp.group.all_min(num_blocks)
        kv_args = (c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)
        self.kv = KVCache(*kv_args) if tp is None else tp.kv_cache(*kv_args)
        self.rm = RManager(rank, num_blocks, self.block_size, enable_caching=config.enable_prefix_caching)
        self.model.rope.reserve(self.max_model_len)
        self.input_batch = InputBatch(self.rm, config.max_num_seqs,
                                      min(num_blocks, blocks_for(self.max_model_len, self.block_size)), self.device)
        self.decode_buffers = DecodeBuffers(config.max_num_seqs, self.device)
        if tp is not None:
            tp.attach(self.input_batch, self.max_model_len)
        self.timing = StepTiming()
        # The step timers' clock: wall time; bench offline's host cases may read per-thread CPU time
        # instead, which other processes on a shared CPU do not inflate.
        self.clock: Callable[[], float] = time.perf_counter
        self.graphs: GraphRunner | None = None
        self.graph_report: CaptureReport | None = None
        if self.device.type == "cuda" and not config.enforce_eager and self._graphs_safe():
            self.graphs = GraphRunner(self.model, self.kv, self.input_batch, self.decode_buffers, self.scale,
                                      config.max_num_seqs, self.max_model_len - 1)
            self.graph_report = self.graphs.capture()
        self.allocator = make_allocator(self.rm)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens)
        self.grammars = GrammarCompiler(self.tokenizer, c.vocab_size, self.eos_token_ids)
        self.sampler = Sampler(seed=config.seed, grammar_executor=self.grammars.executor)
        self.scale = c.head_dim**-0.5
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # Final-only requests' text made beside the step (runtime/detokenize.py): on where the engine's
        # caller reads finished outputs only (LLM.generate), via detokenize_in_background().
        self.background_detokenizer: BackgroundDetokenizer | None = None
        self.last_step_time = 0.0

    def detokenize_in_background(self, min_rows: int = BACKGROUND_MIN_ROWS) -> None:
        """Make final-only requests' text on a worker thread while the next step runs, in steps with
        at least ``min_rows`` of them (fewer are fed on the engine's thread)."""
        if self.background_detokenizer is None:
            self.background_detokenizer = BackgroundDetokenizer(min_rows).bind(self)

    def shutdown(self) -> None:
        """Stop the engine's own threads (the background detokenizer); the engine is not used after."""
        if self.background_detokenizer is not None:
            self.background_detokenizer.close()
            self.background_detokenizer = None

    def _graphs_safe(self) -> bool:
        """A captured step must not depend on host values: dynamic NTK RoPE past the model's positions
        depends on the longest position of the step."""
        c = self.model_config
        if self.tp is not None:
            return False  # a tensor-parallel group's decode runs eager (its collectives are not captured yet)
        return not (c.rope_type == "dynamic" and self.max_model_len > c.max_position_embeddings)

    # ---- capacity --------------------------------------------------------------
    @property
    def capacity_blocks(self) -> int:
        """The most blocks one request can ever hold: this pool, or what the cluster can lend it."""
        return self.allocator.capacity_blocks()

    @property
    def capacity_tokens(self) -> int:
        return min(self.max_model_len, self.capacity_blocks * self.block_size)

    # ---- requests --------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: give prompts as lists of token ids")
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise TypeError("a prompt is a string or a list of token ids (ints)")
        return None, list(prompt)

    def make_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate a prompt against the model and the pool; raises ValueError with the numbers."""
        text, ids = self.tokenize(prompt)
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty (0 tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of the vocabulary (size {vocab})")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but the model's context length is {self.max_model_len} "
                f"(prompt plus at least one generated token must fit)"
            )
        cap = self.capacity_tokens
        if n + 1 > cap:
            raise ValueError(
                f"the prompt has {n} tokens, but at most {self.capacity_blocks} blocks ({cap} tokens, "
                f"{self.block_size} per block) of KV cache can hold one request: {self.allocator.capacity_reason()}"
            )
        limit = min(self.max_model_len, cap) - n
        if params.max_tokens is None:
            max_tokens = limit
        elif n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} is over "
                f"the model's context length {self.max_model_len}"
            )
        elif n + params.max_tokens > cap:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs "
                f"{blocks_for(n + params.max_tokens, self.block_size)} KV blocks, but at most "
                f"{self.capacity_blocks} blocks ({cap} tokens) can hold one request: {self.allocator.capacity_reason()}"
            )
        else:
            max_tokens = params.max_tokens
        self.check_params(params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        return self.build_request(rid, ids, params, max_tokens, text)

    def check_params(self, params: SamplingParams) -> None:
        """What only the model can tell: token ids against the vocabulary, grammars against the
        tokenizer (compiled now, cached for the request's matcher). ValueError with the reason."""
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is out of the vocabulary (size {vocab})")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # GrammarError is a ValueError

    def build_request(
        self, rid: str, ids: list[int], params: SamplingParams, max_tokens: int, text: str | None
    ) -> Request:
        """A request already validated (here or on the cluster's front door)."""
        req = Request(rid, ids, params, max_tokens=max_tokens, prompt=text, output_kind=params.output_kind)
        if params.seed is not None:
            req.generator = make_generator(params.seed, self.device)
        if self.tokenizer is not None:
            from infinite.tokenizer import IncrementalDetokenizer

            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
            )
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = []
        if params.structured_outputs is not None:
            req.matcher = self.grammars.matcher(params.structured_outputs)
        return req

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        return self.submit(self.make_request(prompt, params or SamplingParams(), request_id))

    def submit(self, req: Request) -> str:
        """Queue a request made (and validated) by make_request."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req)
        req.finish_reason = "abort"
        return self.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = self.clock()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        self.timing.schedule_s += self.clock() - t0
        return self.execute(batch)

    def execute(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """A scheduled batch whose KV is all local: prepare, forward, sample, outputs."""
        t1 = self.clock()
        inputs = self.prepare(batch)
        t2 = self.clock()
        if inputs.padded is not None:
            logits = self.graphs.run(len(inputs.sample_requests))
        else:
            if self.tp is not None:
                self.tp.step(inputs)  # the group's other ranks run the same forward on their heads
            logits = forward(self.model, inputs, LocalAttention(self.kv, inputs, self.scale))
        t3 = self.clock()
        outs = self.postprocess(batch, inputs, logits)
        t4 = self.clock()
        self.timing.add(inputs.is_decode, t2 - t1, t3 - t2, t4 - t3)
        self.last_step_time = t4 - t1
        return outs

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The persistent batch brought up to date (O(changed rows)), then the step's inputs."""
        ib = self.input_batch
        ib.sync(batch.requests)
        if len(batch.requests) == ib.num_rows and batch.num_tokens == ib.num_rows:  # one token per row
            pad = self.graphs.bucket(ib.num_rows) if self.graphs is not None else None
            inputs = prepare_decode(ib, self.decode_buffers, pad)
            if inputs is not None:
                inputs.padded = pad
                return inputs
        num_new = {r.request_id: n for r, n in zip(batch.requests, batch.num_new_tokens)}
        return prepare_inputs(ib, num_new, self.device)

    def postprocess(self, batch: ScheduledBatch, inputs: StepInputs, logits: torch.Tensor) -> list[RequestOutput]:
        """``logits``: the sampling rows, then the prompt-logprob rows (``inputs.prompt_spans``)."""
        cache = self.allocator.cache_computed if self.rm.caching else None
        bs = self.block_size
        for req, n in zip(batch.requests, batch.num_new_tokens):
            done = req.num_computed_tokens
            req.num_computed_tokens = done + n
            if cache is not None and (done + n) // bs != done // bs:  # a block filled: offer it to the cache
                cache(req)
        reqs = inputs.sample_requests
        extra = logits[len(reqs):]
        for span in inputs.prompt_spans:
            req = span.request
            req.prompt_logprobs.extend(prompt_logprobs(
                extra[span.row : span.row + span.count], req.prompt_token_ids, span.first, req.params.prompt_logprobs
            ))
        if not reqs:
            return []
        res = self.sampler.sample(logits[: len(reqs)], [self._sample_row(r) for r in reqs])
        now = time.time()
        outs = []
        lps = res.logprobs
        background = self.background_detokenizer
        deferred: list[tuple[Request, int]] = []
        # This loop runs for every request of every step: its common path is a few attribute reads.
        for i, (req, tok) in enumerate(zip(reqs, res.token_ids)):
            out = req.output_token_ids
            out.append(tok)
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if lps is not None and lps[i] is not None and req.logprobs is not None:
                req.logprobs.append(lps[i])
                req.cumulative_logprob += lps[i][tok]
            quick = req.quick_stop
            if quick is None:
                quick = req.quick_stop = self._quick_stop(req)
            going_on = quick and tok not in quick[0] and len(out) < quick[1]  # nothing else can stop it
            det = req.detokenizer
            if det is None:
                delta = ""
            elif going_on and background is not None and req.output_kind == "final_only":
                deferred.append((req, len(out)))  # its text is read when it finishes
                continue
            elif background is not None:
                delta = background.advance(req, len(out))
            else:
                delta = feed_detokenizer(req, len(out))
            if going_on:
                pass
            elif check_stop(req, len(delta), self.eos_token_ids, self.max_model_len,
                            req.matcher is not None and advance(req.matcher, tok)):
                outs.append(self._finish(req, delta, now))
                continue
            if req.output_kind != "final_only":
                outs.append(self.make_output(req))
        if len(deferred) >= (background.min_rows if background is not None else 1):
            background.submit(deferred)
        else:  # a few rows (or none): their detokenizer steps cost less than waking the worker
            for req, n in deferred:
                background.advance(req, n)
        return outs

    def _quick_stop(self, req: Request) -> tuple[frozenset[int], int] | tuple[()]:
        """(token ids that may stop the request, output length at which it stops) when nothing else can
        stop it (no stop strings, min_tokens or grammar), so that most steps skip check_stop; () else."""
        p = req.params
        if p.stop or p.min_tokens or req.matcher is not None:
            return ()
        ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.eos_token_ids))
        return ids, min(req.max_tokens, self.max_model_len - len(req.prompt_token_ids))

    def _finish(self, req: Request, delta: str, now: float) -> RequestOutput:
        if isinstance(req.stop_reason, int) and not req.params.include_stop_str_in_output:
            req.text = req.text[: req.text_len - len(delta)]  # a stop token's text is not output (vLLM)
        if req.detokenizer is not None and not isinstance(req.stop_reason, str):
            req.append_text(req.detokenizer.finish())  # flush a held-back partial character
        req.metrics.finished_time = now
        placement = self.kv_placement(req.request_id)
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        out = self.make_output(req)
        out.extra["kv_blocks"] = placement
        return out

    def _sample_row(self, req: Request) -> SampleRow:
        """The request's SampleRow, made once (it holds references to the request's own lists)."""
        row = req.sample_row
        if row is None or row.output_ids is not req.output_token_ids:  # made, or the request was restored
            eos = self.eos_token_ids[0] if self.eos_token_ids else None
            row = req.sample_row = SampleRow(req.params, req.prompt_token_ids, req.output_token_ids,
                                             req.generator, eos, req.matcher)
        return row

    def kv_placement(self, request_id: str) -> dict[int, int]:
        """How many of the request's KV blocks sit on each instance (rank -> blocks)."""
        return self.rm.held_counts(request_id)

    def make_output(self, req: Request) -> RequestOutput:
        """The request's output as its kind asks: cumulative (everything so far), or a delta (what is
        new since its previous output: O(new), the form outputs travel in between ranks)."""
        if self.background_detokenizer is not None and req.detok_pos < len(req.output_token_ids):
            self.background_detokenizer.advance(req, len(req.output_token_ids))  # the text is read now
        if req.output_kind == "delta":
            return self._delta_output(req)
        comp = CompletionOutput(
            index=0,
            text=visible_text(req),
            token_ids=list(req.output_token_ids),
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
        )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[comp],
            finished=req.finish_reason is not None,
            metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens,
            prompt_logprobs=None if req.prompt_logprobs is None else [None, *req.prompt_logprobs],
        )

    def _delta_output(self, req: Request) -> RequestOutput:
        out = req.output_token_ids
        first = req.emitted_tokens
        visible = visible_len(req)
        text = req.text_tail(req.text_len - req.emitted_chars)[: visible - req.emitted_chars] \
            if visible > req.emitted_chars else ""
        lps = None
        if req.logprobs is not None:
            lps = req.logprobs[req.emitted_logprobs:]
            req.emitted_logprobs = len(req.logprobs)
        prompt_lp = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent \
                and len(req.prompt_logprobs) >= req.num_prompt_tokens - 1:
            prompt_lp = [None, *req.prompt_logprobs]  # once, when complete
            req.prompt_logprobs_sent = True
        req.emitted_tokens = len(out)
        req.emitted_chars = max(req.emitted_chars, visible)
        comp = CompletionOutput(0, text, out[first:], req.cumulative_logprob if req.logprobs is not None else None,
                                lps, req.finish_reason, req.stop_reason)
        first_out = not req.prompt_sent
        req.prompt_sent = True
        return RequestOutput(req.request_id, req.prompt if first_out else None,
                             req.prompt_token_ids if first_out else [], [comp],
                             req.finish_reason is not None, req.metrics, req.num_cached_tokens,
                             prompt_logprobs=prompt_lp, delta_offset=first)

    # ---- observability -------------------------------------------------------------
    def stats(self) -> list[dict]:
        s = self.rm.stats()
        s.update(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            step_time_ms=self.last_step_time * 1e3,
            num_preemptions=self.scheduler.num_preemptions,
            tokens_held=sum(r.num_computed_tokens for r in self.scheduler.running),
            **self.prefix_stats(),
        )
        return [s]

    def prefix_stats(self) -> dict[str, int | float]:
        """The prefix cache's counters (tokens, over admissions) and hit rate, as stats() reports them."""
        sch = self.scheduler
        return {"prefix_cache_queries": sch.prefix_queries, "prefix_cache_hits": sch.prefix_hits,
                "prefix_cache_hit_rate": sch.prefix_hits / sch.prefix_queries if sch.prefix_queries else 0.0}
