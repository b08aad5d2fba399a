"""Peak memory of analyze(path) on a sharded safetensors folder: tensors are read one at a
time, so the peak resident-set growth stays far below the checkpoint's size.

Measured in a fresh subprocess: the high-water mark (``VmHWM``) reset through
``/proc/self/clear_refs`` after imports and a warm-up, then ``VmHWM - VmRSS`` before the
scan. The same harness loading every tensor first must exceed the bound (so the bound can
fail)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                       reason="needs Linux /proc (VmHWM, clear_refs)"),
]

N_TENSORS, SHAPE = 16, (16384, 128)  # 8 MiB each in float32, 128 MiB in all
TENSOR_BYTES = SHAPE[0] * SHAPE[1] * 4
TOTAL_BYTES = N_TENSORS * TENSOR_BYTES
BOUND = 0.5 * TOTAL_BYTES + 4 * TENSOR_BYTES  # 96 MiB

SCRIPT = r"""
import json, re, sys, warnings
from pathlib import Path
import torch
import bayes_spectral as bs

def kib(key):
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())[1])

warnings.simplefilter("ignore")
torch.set_num_threads(1)
folder, mode = sys.argv[1], sys.argv[2]
bs.analyze({"warm.weight": torch.randn(256, 64)}, threads=1)  # libraries loaded
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
before = kib("VmRSS")
if mode == "load_all":
    from safetensors.torch import load_file
    model = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        model.update(load_file(f))
else:
    model = folder
ds = bs.analyze(model, threads=1)
print(json.dumps({"growth": (kib("VmHWM") - before) * 1024, "rows": int(ds.sizes["layer"])}))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two safetensors shards with an index, 16 heavy-tailed 16384 x 128 float32 tensors."""
    root = tmp_path_factory.mktemp("sharded")
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in range(2):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        part = {}
        for i in range(N_TENSORS // 2):
            key = f"layers.{shard * N_TENSORS // 2 + i}.weight"
            part[key] = torch.randn(*SHAPE, generator=g) / torch.rand(*SHAPE, generator=g).add(0.1)
            weight_map[key] = name
        save_file(part, str(root / name))
        del part
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": TOTAL_BYTES}, "weight_map": weight_map}))
    return root


def peak_growth(folder: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), mode],
                         capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_streaming_scan_peak_is_far_below_the_checkpoint(folder):
    got = peak_growth(folder, "stream")
    assert got["rows"] == N_TENSORS
    assert got["growth"] <= BOUND, (f"peak RSS grew {got['growth'] / 2**20:.1f} MiB, bound "
                                    f"{BOUND / 2**20:.0f} MiB (checkpoint "
                                    f"{TOTAL_BYTES / 2**20:.0f} MiB)")


def test_the_bound_catches_loading_every_tensor(folder):
    """The harness is sensitive: loading the whole checkpoint first breaks the bound."""
    got = peak_growth(folder, "load_all")
    assert got["rows"] == N_TENSORS
    assert got["growth"] > BOUND
