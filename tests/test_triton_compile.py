"""Every kernel launch compiles for Hopper (sm_90 cubin) without register spills.

The interpreter tests cannot see what only the compiler rejects; tests/aot_compile.py
captures the real launches of the host wrappers and compiles them with Triton's
own argument specialization. It runs in a subprocess: the interpreter mode of
this test process would swap Triton's helpers for interpreted ones.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"_decode_kernel", "_reduce_kernel", "_prefill_kernel", "_aggregate_kernel", "_write_kv_kernel",
           "_rms_norm_kernel", "_rope_qkv_kernel"}


def test_all_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "aot_compile.py"), "--quick", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^sm_90 (\w+) .* local-stores=(\d+)$", proc.stdout, re.M)
    assert {name for name, _ in rows} == KERNELS, proc.stdout
    assert all(spills == "0" for _, spills in rows), proc.stdout
