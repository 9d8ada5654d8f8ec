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


def test_streams_survive_idling_past_their_deadlines():
    rpc_port, data_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(rpc_port), str(data_port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
        assert f"rank {r} probe" in out, out
        assert "pair closure" not in out and "ended:" not in out, out
