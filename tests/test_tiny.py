"""The embedded default checkpoint: deterministic, loadable by us and by transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_hf import dense_forward, hf_logits

from infinite import tiny
from infinite.model import ModelConfig, load_model
from infinite.tokenizer import load_tokenizer

torch.set_num_threads(1)
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_cli_is_byte_identical(ckpt, tmp_path):
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "infinite.tiny", str(out)], check=True, cwd=REPO,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "7"})
    assert sorted(p.name for p in out.iterdir()) == FILES
    for name in FILES:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes(), name


def test_config_and_tokenizer(ckpt):
    cfg = ModelConfig.from_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (512, 4, 8, 2, 64)
    assert cfg.intermediate_size == 1024 and cfg.max_position_embeddings == 32768
    assert cfg.vocab_size == tok.vocab_size
    assert cfg.eos_token_ids == (tok.eos_token_id,) and cfg.bos_token_id == tok.bos_token_id
    assert tok.id_to_token(tok.eos_token_id) == tiny.EOS
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # Every byte is encodable, so any text round-trips.
    text = "".join(chr(c) for c in range(1, 256)) + "世界🙂"
    assert tok.decode(tok.encode(text)) == text


def test_matches_transformers(ckpt):
    tok = load_tokenizer(ckpt)
    ids = torch.tensor(tok.encode("The lighthouse keeper woke before dawn, and the sea was calm."))
    ours = dense_forward(load_model(ckpt), ids)
    torch.testing.assert_close(ours, hf_logits(ckpt, ids), atol=1e-4, rtol=1e-4)


_RACE = """
import sys
from infinite.tiny import default_model_dir
print(default_model_dir())
"""


def test_default_model_dir_concurrent(tmp_path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "INFINITE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACE], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    final = tmp_path / tiny.NAME
    assert outs == [str(final)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.NAME]  # no temporary folder left
    assert sorted(p.name for p in final.iterdir()) == FILES


def test_default_model_dir_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITE_CACHE_DIR", str(tmp_path))
    final = tmp_path / tiny.NAME
    final.mkdir()
    (final / "marker").write_text("x")
    assert tiny.default_model_dir() == final  # existing folder is taken as complete
    assert (final / "marker").exists()
