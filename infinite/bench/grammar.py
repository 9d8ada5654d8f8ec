"""Structured-output overhead per decode step: the sampler with and without grammar masks.

``python -m infinite.bench grammar [--batch-sizes 1,8,32] [--steps 200] [--json out.json]``

Per step the sampler asks llguidance for the bitmask of every constrained row, unpacks
it and masks the logits; after sampling each row's matcher consumes its token. This
bench times exactly that path (``Sampler.sample`` plus ``advance``) against the same
batch unconstrained, on random logits, for two vocabularies: the embedded model's
(1.2K tokens) and a 32K byte-level BPE trained here on generated words (a real model's
size class: mask cost grows with the vocabulary). Each constrained row walks the JSON
schema below and restarts when its grammar completes, so every step is a real mid-output
step. The model forward is not included: compare with a decode step's time
(docs/bench-offline.md) to see the share.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from infinite.bench.common import format_table, write_json
from infinite.sampling.params import SamplingParams, StructuredOutputsParams
from infinite.sampling.sampler import Sampler, SampleRow
from infinite.sampling.structured import GrammarCompiler, advance

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


class _Tok:
    """The two things GrammarCompiler reads from a tokenizer."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend


def synthetic_tokenizer(vocab: int, seed: int = 0) -> Any:
    """A byte-level BPE with ``vocab`` tokens, trained on generated words (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(60000)]
    text = [" ".join(rng.choice(words) for _ in range(200)) + ' {"k": [1, 2.5], "v": null}' for _ in range(2000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer=trainer)
    return tk


def tokenizers_to_bench() -> list[tuple[str, Any, int]]:
    from infinite.tiny import default_model_dir
    from infinite.tokenizer import load_tokenizer

    tiny = load_tokenizer(default_model_dir())
    synth = synthetic_tokenizer(32000)
    return [("tiny-1.2K", tiny, tiny.eos_token_id), ("bpe-32K", _Tok(synth), synth.token_to_id("<eos>"))]


def time_steps(sampler: Sampler, rows: list[SampleRow], vocab: int, steps: int, restart: Any) -> float:
    """Median seconds of a sampler step (mask + sample + advance) over ``steps`` steps: the
    median, because on a shared machine a few steps lose the CPU to other work."""
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 5):  # 5 untimed warm-up steps (llguidance's thread pool, lexer states)
        logits = torch.randn(len(rows), vocab, generator=gen)
        t0 = time.perf_counter()
        res = sampler.sample(logits, rows)
        done = [i for i, (row, tok) in enumerate(zip(rows, res.token_ids))
                if row.matcher is not None and advance(row.matcher, tok)]
        if step >= 5:
            times.append(time.perf_counter() - t0)
        for i in done:  # a new request takes the finished row's place (not timed: that is admission)
            rows[i] = restart()
    return statistics.median(times)


def run(batch_sizes: list[int], steps: int) -> list[dict[str, Any]]:
    results = []
    spec = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(temperature=1.0, seed=1)
    for name, tok, eos in tokenizers_to_bench():
        vocab = tok.backend.get_vocab_size(with_added_tokens=True)
        compiler = GrammarCompiler(tok, vocab, (eos,))
        t0 = time.perf_counter()
        compiler.matcher(spec)
        first_compile_ms = (time.perf_counter() - t0) * 1e3
        sampler = Sampler(seed=0, grammar_executor=compiler.executor)
        for b in batch_sizes:
            plain = time_steps(sampler, [SampleRow(params, [1], []) for _ in range(b)], vocab, steps, None)

            def restart() -> SampleRow:
                return SampleRow(params, [1], [], matcher=compiler.matcher(spec))

            constrained = time_steps(sampler, [restart() for _ in range(b)], vocab, steps, restart)
            results.append({"vocab": name, "vocab_size": vocab, "batch": b, "plain_ms": plain * 1e3,
                            "grammar_ms": constrained * 1e3, "overhead_ms": (constrained - plain) * 1e3,
                            "overhead_per_row_us": (constrained - plain) * 1e6 / b,
                            "first_compile_ms": first_compile_ms})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infinite.bench grammar", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--steps", type=int, default=200, help="decode steps timed per configuration (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: llguidance has its own)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    if not sizes or min(sizes) < 1 or args.steps < 1:
        ap.error("batch sizes and steps must be positive")
    rows = run(sizes, args.steps)
    print(format_table(
        "grammar overhead per decode step (sampler only; JSON schema; median ms)",
        ["vocab", "batch", "plain", "grammar", "overhead", "per row (us)", "compile (ms)"],
        [[r["vocab"], r["batch"], r["plain_ms"], r["grammar_ms"], r["overhead_ms"], r["overhead_per_row_us"],
          r["first_compile_ms"]] for r in rows]))
    if args.json:
        write_json(args.json, {"bench": "grammar", "schema": SCHEMA, "steps": args.steps, "results": rows})
    return 0
