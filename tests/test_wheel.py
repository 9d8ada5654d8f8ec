"""`pip install .` (not editable) ships a package that works: build a wheel, install it into a
temporary folder, and generate with it from outside the source tree."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_generates_outside_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("infinite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "infinite").rglob("*.py")}
    assert source <= names, f"the wheel lacks {sorted(source - names)[:5]}"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    script = (
        "import infinite, sys\n"
        "from infinite import LLM, SamplingParams\n"
        "out = LLM(num_kv_blocks=64).generate(['Hello'], SamplingParams(max_tokens=4, temperature=0))\n"
        "print(infinite.__file__)\n"
        "print(len(out[0].outputs[0].token_ids))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    where, n = run.stdout.split()[-2:]
    assert Path(where).is_relative_to(site) and n == "4"
