"""Small things users of vLLM trip on: prompt dicts, scripts without a main guard, `serve MODEL`,
threads and log level on every rank."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infinite import LLM, SamplingParams
from infinite.cli import build_parser, engine_config

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


def test_vllm_prompt_dicts_are_accepted():
    llm = LLM(num_kv_blocks=64)
    ids = llm.get_tokenizer().encode("Hello there")
    plain = llm.generate([ids, "Hello there"], GREEDY, use_tqdm=False)
    dicts = llm.generate([{"prompt_token_ids": ids}, {"prompt": "Hello there"}], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    single = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert single[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"tokens": ids}], GREEDY, use_tqdm=False)


def test_serve_takes_the_model_as_a_positional_argument(tmp_path):
    args = build_parser().parse_args(["serve", str(tmp_path), "--threads-per-rank", "3"])
    cfg = engine_config(args)
    assert cfg.model == str(tmp_path) and cfg.threads_per_rank == 3
    assert engine_config(build_parser().parse_args(["serve", "--model", "x"])).model == "x"
    with pytest.raises(ValueError, match="given twice"):
        engine_config(build_parser().parse_args(["serve", "a", "--model", "b"]))
    defaults = engine_config(build_parser().parse_args(["serve"]))
    from infinite.runtime.config import EngineConfig

    assert (defaults.max_lend_fraction, defaults.block_size) == (EngineConfig().max_lend_fraction, EngineConfig().block_size)
    # --eager-lending reaches the lending policy the gManager applies
    from infinite.cluster.policy import LendingPolicy

    eager = engine_config(build_parser().parse_args(["serve", "--eager-lending"]))
    assert not defaults.eager_lending and eager.eager_lending
    assert LendingPolicy.from_config(eager, 2).eager and not LendingPolicy.from_config(defaults, 2).eager
    with pytest.raises(ValueError, match="eager_lending"):
        EngineConfig(eager_lending="yes")


def test_a_script_without_a_main_guard_runs_a_cluster_once(tmp_path):
    """Ranks never import the user's script: no re-run at import, no bootstrapping error.
    threads_per_rank and the log level reach the ranks."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import logging
        logging.basicConfig(level=logging.INFO)
        print("SCRIPT-TOP-LEVEL", flush=True)
        from infinite import LLM, SamplingParams
        llm = LLM(num_instances=2, num_kv_blocks=32, threads_per_rank=1)
        out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        print("TOKENS", len(out[0].outputs[0].token_ids), flush=True)
        print("THREADS", sorted({s["torch_threads"] for s in llm.stats()}), flush=True)
        llm.shutdown()
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("SCRIPT-TOP-LEVEL") == 1
    assert "TOKENS 3" in run.stdout and "THREADS [1]" in run.stdout
    assert "[rank0]" in run.stderr and "transport round trip" in run.stderr  # INFO reached rank 0
