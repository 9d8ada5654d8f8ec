"""The decode graph runner's CPU seam: buckets, padding and static buffers, with capture replaced by
the eager call of the same padded forward; and the torch attention path off CPU (the GPU reference)."""

from __future__ import annotations

import pytest
import torch

from infinite.attention import MAMetadata, torch_ops
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine
from infinite.runtime.graph_runner import GraphRunner, capture_sizes
from infinite.sampling.params import SamplingParams

torch.set_num_threads(1)


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError):
        capture_sizes(0)
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=256, max_num_seqs=20))
    g = GraphRunner(eng.model, eng.kv, eng.input_batch, eng.decode_buffers, eng.scale, 20, 255)
    assert [g.bucket(n) for n in (1, 3, 4, 5, 16, 17, 20)] == [1, 4, 4, 8, 16, 20, 20]
    assert g.bucket(21) is None
    with pytest.raises(ValueError, match="over the largest"):
        g.run(21)


def _generate(graphs: bool, max_num_seqs: int, num_kv_blocks: int = 256) -> tuple[dict, LLMEngine]:
    eng = LLMEngine(EngineConfig(num_kv_blocks=num_kv_blocks, max_model_len=512, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=64))
    if graphs:
        eng.graphs = GraphRunner(eng.model, eng.kv, eng.input_batch, eng.decode_buffers, eng.scale,
                                 max_num_seqs, eng.max_model_len - 1)
        seen = []
        run = eng.graphs.run
        eng.graphs.run = lambda n: (seen.append((n, eng.graphs.bucket(n))), run(n))[1]
        eng.bucket_log = seen
    gen = torch.Generator().manual_seed(0)
    for i in range(11):  # lengths cross block boundaries; finishing at different steps shrinks the batch
        eng.add_request(torch.randint(10, 1000, (3 + 9 * i,), generator=gen).tolist(),
                        SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True), request_id=f"r{i}")
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    return outs, eng


def test_padded_decode_equals_eager_engine():
    """Greedy tokens with every decode step run padded through the graph runner's static buffers equal
    those of the plain eager engine; steps ran at several bucket sizes, padded and not."""
    want, _ = _generate(False, 12)
    got, eng = _generate(True, 12)
    assert got == want
    sizes = {b for _, b in eng.bucket_log}
    assert len(sizes) >= 3 and any(n < b for n, b in eng.bucket_log), eng.bucket_log
    eng.input_batch.sync([])  # rows leave at the next step's sync
    assert eng.input_batch.num_rows == 0 and not eng.input_batch.nb_np.any()


def test_padded_decode_with_preemption():
    """A pool too small for everyone: preemptions free rows in the middle of the batch (rows move)."""
    want, _ = _generate(False, 12, num_kv_blocks=40)
    got, eng = _generate(True, 12, num_kv_blocks=40)
    assert got == want
    assert eng.scheduler.num_preemptions > 0


def test_padding_rows_write_no_kv_and_see_nothing():
    """A padded run leaves the KV cache outside the live rows' slots untouched."""
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=256, max_num_seqs=8))
    eng.graphs = GraphRunner(eng.model, eng.kv, eng.input_batch, eng.decode_buffers, eng.scale, 8, 255)
    eng.add_request([5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    eng.step()  # prefill
    before_k = eng.kv.k.clone()
    eng.graphs.sizes = [8]  # the one decode row runs padded to 8
    eng.step()
    eng.step()
    written = (eng.kv.k != before_k).any(dim=(0, 3, 4)).nonzero().tolist()  # [block, offset] pairs
    table = eng.rm.table("req-0")
    assert written and {(b, o) for b, o in written} == {(table[p // 16].block, p % 16) for p in (5, 6)}


@pytest.mark.parametrize("q_lens,starts", [([1, 1, 1], [40, 7, 0]), ([6, 1, 3], [0, 19, 12])])
def test_torch_attention_math_path_equals_flash(monkeypatch, q_lens, starts):
    """The torch path off CPU (the GPU reference) spells out the softmax: the same out and lse as
    ATen's CPU flash kernel, rows that see no key included."""
    gen = torch.Generator().manual_seed(3)
    bsz, nh, nkv, d = 8, 4, 2, 16
    kc = torch.randn(16, bsz, nkv, d, generator=gen)
    vc = torch.randn(16, bsz, nkv, d, generator=gen)
    blocks = [[3, 9, 1, 12, 5, 6], [2, 4, 8], [0, 10, 11, 13, 14]]
    logical = [[0, 1, 2, 3, 4, 5], [0, 1, 2], [2, 3, 4, 5, 6]]  # row 2 holds only later blocks
    meta = MAMetadata.build(q_lens, starts, blocks, logical)
    q = torch.randn(sum(q_lens), nh, d, generator=gen)
    want = torch_ops.micro_attention(q, kc, vc, meta, 0.3)
    monkeypatch.setattr(torch_ops, "_FLASH_DEVICES", ())
    got = torch_ops.micro_attention(q, kc, vc, MAMetadata.build(q_lens, starts, blocks, logical), 0.3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert torch.isinf(got[1]).any()  # some query saw nothing in this part
