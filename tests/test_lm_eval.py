"""lm-eval's ``local-completions`` model through the real server scores like its own ``hf`` backend.

Two tiny local tasks (JSONL in tests/data/lm_eval_tasks, no download): a
multiple-choice task (loglikelihood of each choice: ``echo`` + ``logprobs`` +
``max_tokens: 1``) and a ``loglikelihood_rolling`` perplexity task. lm-eval finds
``/tokenizer_info`` and tokenizes through the server, as it would against vLLM. The
``hf`` backend runs transformers on the same checkpoint (the embedded tiny model).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_server_e2e import KEY, MODEL, running_server

from infinite.tiny import default_model_dir
from infinite.tokenizer import load_tokenizer


DATA = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK_YAML = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


def _evaluate(model: str, model_args: dict, include: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=list(TASK_YAML),
                          task_manager=TaskManager(include_path=str(include)), batch_size=4,
                          log_samples=False, bootstrap_iters=0)
    return out["results"]


def test_local_completions_scores_equal_hf_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for name, text in TASK_YAML.items():
        (tmp_path / f"{name}.yaml").write_text(text.format(data=DATA))
    model_dir = str(default_model_dir())
    # Both backends must score the same token sequences. lm-eval's remote tokenizer never adds
    # special tokens, while its hf backend follows the tokenizer (which adds BOS): hf gets
    # add_bos_token=False. Rolling windows start with a prefix token: hf takes BOS, the remote
    # tokenizer `bos_token_id or eos_token_id` (EOS when BOS is id 0, as in the tiny model), so
    # both are given BOS.
    bos = load_tokenizer(model_dir).bos_token_id

    hf = _evaluate("hf", {"pretrained": model_dir, "dtype": "float32", "device": "cpu", "prefix_token_id": bos,
                          "add_bos_token": False}, tmp_path)
    with running_server("--num-kv-blocks", "64", "--dtype", "float32") as srv:
        api = _evaluate("local-completions", {
            "base_url": f"{srv.url}/v1/completions", "model": MODEL, "num_concurrent": 1, "max_retries": 1,
            "tokenizer_backend": "remote", "custom_prefix_token_id": bos,
        }, tmp_path)

    for metric in ("acc,none", "acc_norm,none"):
        assert api["tiny_mc"][metric] == hf["tiny_mc"][metric], (metric, api["tiny_mc"], hf["tiny_mc"])
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert api["tiny_ppl"][metric] == pytest.approx(hf["tiny_ppl"][metric], rel=1e-4), (metric, api, hf)
    # The random model's perplexity is high; the point is that both backends compute the same number.
    assert hf["tiny_ppl"]["word_perplexity,none"] > 1.0
    print({k: {m: v for m, v in r.items() if "," in m} for k, r in api.items()}, os.getpid())
