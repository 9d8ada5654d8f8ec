"""The point-to-point data plane on its own: two processes, a stub endpoint, real gloo streams."""

import subprocess
import sys
import textwrap

from infinite.cluster.rpc_transport import free_port

# Each rank: start a P2PTransport whose deadlines (start-up and data) are 2 s, stay idle for
# longer than that, then run a probe to the other rank in both directions. Before streams had
# groups of their own, the idle creditor's wait for a header timed out, gloo closed the pair,
# and the next send either way failed ("Application timeout caused pair closure").
RANK = textwrap.dedent("""
    import sys, time, torch
    from infinite.cluster.p2p import P2PTransport

    class Stub:
        def handle(self, src, msg, tensors):
            raise AssertionError("no control message is sent here")
        def attention_shape(self):
            return 2, 4, 8, 2, torch.float32
        def attend(self, layer, meta, t):
            raise AssertionError("a probe attends to nothing")

    rank, rpc_port, data_port = map(int, sys.argv[1:])
    torch.set_num_threads(1)
    tr = P2PTransport(rank, 2, f"tcp://127.0.0.1:{rpc_port}", f"tcp://127.0.0.1:{data_port}",
                      timeout_s=2.0, data_timeout_s=2.0)
    tr.start(Stub())
    time.sleep(4.0)  # idle past every deadline
    rtt = tr.probe(1 - rank)
    print(f"rank {rank} probe {rtt * 1e6:.0f} us", flush=True)
    tr.close()
""")


def run_pair(script: str, timeout: float) -> list[str]:
    """Run ``script`` as ranks 0 and 1 on free ports; both must exit 0 -> their outputs."""
    rpc_port, data_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(rpc_port), str(data_port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return outs


def test_streams_survive_idling_past_their_deadlines():
    for r, out in enumerate(run_pair(RANK, 60)):
        assert f"rank {r} probe" in out, out
        assert "pair closure" not in out and "ended:" not in out, out


# Rank 1 lends rows that rank 0 describes by diffs; its stub answers each query with LSE = the number of
# blocks its row holds, so rank 0 reads back what the creditor built. Rank 0 sends a first step (whole
# row), an append, a diff that does not continue what rank 1 holds (refused: every layer answers
# "stale"), then the whole row again.
DIFFS = textwrap.dedent("""
    import sys, threading, torch
    from infinite.cluster import messages as M
    from infinite.cluster.lent_rows import LentRows
    from infinite.cluster.p2p import P2PTransport
    from infinite.cluster.transport import PeerError, is_stale

    LAYERS, NH, D = 2, 4, 8

    class Lender:
        def __init__(self):
            self.rows = LentRows(64)
            self.done = threading.Event()
        def handle(self, src, msg, tensors):
            assert isinstance(msg, M.Stop)
            self.done.set()
            return M.Ack(), None
        def attention_shape(self):
            return LAYERS, NH, D, 2, torch.float32
        def step_metadata(self, debtor, step, meta, num_queries):
            return self.rows.apply(debtor, step, meta)
        def attend(self, layer, meta, t):
            lse = meta.num_blocks.float().repeat_interleave(meta.cu_q.diff()).unsqueeze(1).expand(-1, NH)
            return M.AttentionResultTensors(torch.zeros(t.q.shape[0], NH, D), lse.contiguous())

    rank, rpc_port, data_port = map(int, sys.argv[1:])
    torch.set_num_threads(1)
    tr = P2PTransport(rank, 2, f"tcp://127.0.0.1:{rpc_port}", f"tcp://127.0.0.1:{data_port}",
                      timeout_s=20.0, data_timeout_s=20.0)
    lender = Lender()
    tr.start(lender)
    if rank == 1:
        lender.done.wait(60)  # rank 1 serves until rank 0 is done
    else:
        def step(i, meta):
            futs = [tr.attention(1, M.AttentionCall(M.StepKey(0, i, 0), layer, meta if layer == 0 else None),
                                 M.AttentionTensors(torch.zeros(1, NH, D))) for layer in range(LAYERS)]
            out = []
            for f in futs:
                try:
                    out.append(int(f.wait().lse[0, 0]))
                except PeerError as e:
                    out.append("stale" if is_stale(e) else "failed")
            return out
        row = lambda e, base, blocks: M.AttentionMeta([7], [e], [base], [1], [99], [len(blocks)], blocks,
                                                      [base + j for j in range(len(blocks))])
        print("whole", step(1, row(1, 0, [3, 4, 5])), flush=True)
        print("append", step(2, row(1, 3, [6])), flush=True)
        print("gap", step(3, row(1, 9, [8])), flush=True)
        print("again", step(4, row(2, 0, [3, 4])), flush=True)
        tr.stop(1).wait()
    tr.close()
""")


def test_creditor_builds_rows_from_diffs_and_refuses_a_diff_that_does_not_continue():
    outs = run_pair(DIFFS, 90)
    lines = [ln for ln in outs[0].splitlines() if ln.split(" ")[0] in ("whole", "append", "gap", "again")]
    assert lines == ["whole [3, 3]", "append [4, 4]", "gap ['stale', 'stale']", "again [2, 2]"], outs[0]
