"""bench/gpu_train.py only runs for real on a lent GPU: its --smoke mode keeps it working on CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu_train.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--smoke", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    losses = result["first_batch_loss"]
    assert abs(losses["padded_full_logits"] - losses["packed_supervised"]) < 1e-4
    assert result["fused_lora_layers"] > 0
    assert {r["side"] for r in result["runs"]} == {"baseline", "dstune"}
    assert all(r["tokens_per_second"] > 0 and 0 < r["mfu"] for r in result["runs"])
