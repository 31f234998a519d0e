"""Every benchmark's --smoke mode runs and writes its results (BENCHMARKS.md rule 9: benchmarks that cannot rot).

Each smoke runs the benchmark's own code on a tiny random Llama (the session's, from conftest) in seconds, in a
process of its own that imports this tree's src/. A process spends most of its ~10 s importing torch, transformers
and peft on one core, so the selected smokes run two at a time (one thread each), started when the first of them is
needed: the file takes ~30 s on 2 cores instead of ~55 s. bench/gpu_train.py's smoke is tested in
tests/train/test_gpu_bench_script.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
IN_GIT = (ROOT / ".git").exists()

# Per script, the slowest first (they start in this order): extra arguments, whether it takes the tiny model
# (--model), and the keys its results must have.
SMOKES = {
    # --baseline-rev HEAD: a detached worktree of HEAD as the third side, in its own process.
    "train_speed": (["--baseline-rev", "HEAD"] if IN_GIT else [], True,
                    {"benchmark", "mode", "machine", "gemm_peak_flops", "settings", "runs", "medians"}),
    "methods": ([], True, {"benchmark", "mode", "machine", "gemm_peak_flops", "settings", "runs"}),
    "qat": ([], True, {"benchmark", "mode", "machine", "exports", "variants", "qat_vs_ptq"}),
    "decode": ([], True, {"benchmark", "mode", "machine", "memory_read_bandwidth_gb_s", "settings", "variants"}),
    "data_checks": ([], False, {"benchmark", "mode", "machine", "settings", "checks", "dedup_repetitions",
                                "dedup_medians"}),
    "dropout_mask": ([], False, {"benchmark", "mode", "machine", "median_ms", "speedup", "floor_ms"}),
    "few_shot": ([], True, {"benchmark", "mode", "machine", "settings", "curve", "goals"}),
    "board": ([], True, {"benchmark", "mode", "machine", "settings", "page_load_ms", "tensorboard_page_load_ms",
                         "curve_delay_ms", "ratios"}),
    "continual": ([], True, {"benchmark", "mode", "machine", "settings", "base", "runs"}),
    "plan_memory": ([], True, {"benchmark", "mode", "machine", "cpu_heap_overhead", "rows", "goal_met"}),
    "gpu_scale": ([], False, {"benchmark", "mode", "device", "libraries", "qlora_14b", "fsdp2_qlora",
                              "deepspeed_zero3"}),
    "serve": (["--concurrency", "1,4"], True, {"benchmark", "mode", "machine", "settings", "quality", "medians",
                                              "ratios", "goals", "runs"}),
}
TESTED_ELSEWHERE = {"gpu_train": ROOT / "tests" / "train" / "test_gpu_bench_script.py"}


def test_every_bench_script_has_a_smoke_test():
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    assert scripts == set(SMOKES) | set(TESTED_ELSEWHERE), "a bench script without a smoke test (or a stale entry)"
    assert all(path.is_file() for path in TESTED_ELSEWHERE.values())


def run_smoke(script: str, out: Path, model: Path | None, extra: list[str]) -> dict:
    command = [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out), *extra]
    if model is not None:
        command += ["--model", str(model)]
    # TMPDIR: a smoke's work folder (models, runs, a REV's worktree) lands in pytest's tmp folder, not /tmp.
    tmp = out.parent / f"{script}-tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, f"bench/{script}.py --smoke failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert out.is_file(), f"bench/{script}.py --smoke wrote no {out}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smokes(request, tiny_model_dirs, tmp_path_factory):
    """The smokes this session selected, started two at a time; script -> future of its results."""
    selected = {item.callspec.params["script"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bench_smoke"}
    folder = tmp_path_factory.mktemp("bench-smoke")
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {script: pool.submit(run_smoke, script, folder / f"{script}.json",
                                   tiny_model_dirs["llama"] if takes_model else None, extra)
               for script, (extra, takes_model, _) in SMOKES.items() if script in selected}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SMOKES))
def test_bench_smoke(script, smokes):
    result = smokes[script].result()
    keys = SMOKES[script][2]
    assert keys <= set(result), f"missing keys: {sorted(keys - set(result))}"
    assert result["mode"] == "smoke"
    check = CHECKS.get(script)
    if check:
        check(result)


def check_train_speed(result: dict) -> None:
    sides = result["medians"]["icd10"]
    expected = {"baseline", "dstune"} | ({result["settings"]["baseline_rev"]["side"]} if IN_GIT else set())
    assert set(sides) == expected
    for m in sides.values():
        assert m["supervised_tokens_per_second"] > 0 and m["peak_rss_mb"] > 0 and m["dev_loss"] > 0
        assert set(m["spread"]["supervised_tokens_per_second"]) == {"min", "q1", "q3", "max"}
    # The sides trained on the same tokens (the bench checks it, and it is what makes the ratios fair).
    assert len({(r["tokens"], r["supervised_tokens"]) for r in result["runs"]}) == 1
    assert all(r["useful_flops"] for r in result["runs"])
    if IN_GIT:
        rev_src = [r["dstune_source"] for r in result["runs"] if r["side"] != "dstune" and r["side"] != "baseline"]
        assert rev_src and all(src != str(ROOT / "src") for src in rev_src)
        ratios = result["comparison"]["icd10"]
        assert set(ratios) == {"new_over_old", "new_over_hf"}
        assert set(ratios["new_over_old"]) == {"supervised_tokens_per_second", "peak_rss_mb", "dev_loss"}


def check_continual(result: dict) -> None:
    runs = {r["control"]: r for r in result["runs"]}
    assert set(runs) == {"naive", "replay", "kl", "olora", "ewc", "kl+replay", "rehearsal", "kl+rehearsal"}
    for run in runs.values():  # every chapter scored after every stage
        assert [len(row) for row in run["matrix"]] == [3, 3, 3] and len(run["stages"]) == 3
    # O-LoRA's adapter grows by the recipe's rank each stage; the KL anchor and EWC ran
    sizes = [s["trainable_parameters"] for s in runs["olora"]["stages"]]
    assert sizes == [sizes[0], 2 * sizes[0], 3 * sizes[0]]
    ranks = [s["objective_summary"].get("orthogonal", {}).get("rank") for s in runs["olora"]["stages"]]
    assert ranks[0] is None and ranks[2] == 2 * ranks[1]
    assert runs["kl"]["stages"][0]["objective_summary"]["kl_anchor"]["sequences"] > 0
    assert [s["objective_summary"]["ewc"]["from_parent"] for s in runs["ewc"]["stages"]] == [False, True, True]


def check_few_shot(result: dict) -> None:
    curve = result["curve"]
    tuned = [r for r in curve["rows"] if r["kind"] == "fine-tuned"]
    # one row per method and size, each trained on exactly `size` source records (the books balance)
    assert sorted((r["system"], r["size"]) for r in tuned) == sorted((m, s) for m in ("lora", "prefix", "ia3")
                                                                      for s in (2, 4))
    assert all(r["books"]["source_records"] == r["size"] == r["books"]["expected"] for r in tuned)
    assert all(r["optimizer_steps"] >= 2 for r in tuned)
    shots = [r for r in curve["rows"] if r["kind"] == "in-context"]
    assert sorted((r["system"], r["size"]) for r in shots) == [("2-shot random", 2), ("2-shot random", 4),
                                                               ("2-shot similar", 2), ("2-shot similar", 4)]
    assert all(r["pool"]["kept"] == r["size"] for r in shots)  # demonstrations come from that size's records
    assert {"crossover_found", "lora_at_most_4_per_category_beats_in_context_and_1nn"} <= set(result["goals"])


def check_serve(result: dict) -> None:
    assert set(result["medians"]) == {"generate, one at a time"} | {
        f"{system} @{c}" for c in (1, 4) for system in ("serve base", "serve LoRA r16", "serve onnx", "transformers serve")}
    for system, same in result["quality"]["served_answers_identical_to_generate"].items():
        served, total = map(int, same.split("/"))
        assert served == total == result["settings"]["prompts"], system  # greedy answers equal model.generate's
    runs = [r for name, rs in result["runs"].items() if name.startswith("serve") for r in rs]
    assert all(r["failed"] == 0 and r["tokens"] > 0 for r in runs)
    for system in ("serve base", "serve onnx"):  # concurrent requests decoded together
        assert result["medians"][f"{system} @4"]["mean_decode_batch"] > 1


def check_methods(result: dict) -> None:
    rows = {r["method"]: r for r in result["runs"]}
    assert set(rows) == {"lora", "dora", "prefix", "bottleneck", "ia3"}
    assert all(r["tokens_per_second"] > 0 and r["optimizer_steps"] == 2 for r in rows.values())


def check_qat(result: dict) -> None:
    assert set(result["variants"]) == {"ptq", "qat-int8"}
    assert all(set(v["exports"]) == {"int8"} for v in result["variants"].values())
    assert "p_value" in result["qat_vs_ptq"]["int8"]


def check_decode(result: dict) -> None:
    assert set(result["variants"]) == {"hf:fp32", "torchao:int8"}
    assert all(v["decode_tokens_per_second"] > 0 and 0 <= v["retention"] for v in result["variants"].values())


def check_data_checks(result: dict) -> None:
    assert result["checks"]["records"] > 0
    assert result["dedup_medians"]["dstune"]["records_per_s"] > 0


def check_plan_memory(result: dict) -> None:
    assert [r["role"] for r in result["rows"]] == ["calibration", "check", "check"]
    assert all(r["measured"]["rise_mb"] > 0 and r["predicted"]["rise_mb"] > 0 for r in result["rows"])
    assert {"activations", "loss_head", "optimizer"} <= set(result["rows"][0]["predicted"]["parts_mb"])


def check_gpu_scale(result: dict) -> None:
    qlora = result["qlora_14b"]
    if "skipped" not in qlora:  # bitsandbytes' CPU backend: the 4-bit model trains, and the planner ran
        assert qlora["losses_finite"] and qlora["predicted_peak_allocated_gb"] > 0 and qlora["mfu"] > 0
        assert qlora["trainable"] > 0
    # FSDP2's fully_shard drops bitsandbytes' quant_state (axolotl #2992): dstune refuses FSDP2 with a 4-bit base.
    assert "skipped" in result["fsdp2_qlora"] or result["fsdp2_qlora"]["ok"] is False


def check_board(result: dict) -> None:
    steps = result["settings"]["logged_steps"]
    # Every logged step was seen on the board's page and at TensorBoard's API, each after it was logged.
    for side in ("board_page", "tensorboard_api"):
        delay = result["curve_delay_ms"][side]
        assert delay["n"] == steps and delay["median"] > 0, (side, delay)
    assert all(stats["n"] == result["settings"]["repetitions"] for stats in result["page_load_ms"].values())


CHECKS = {"plan_memory": check_plan_memory, "gpu_scale": check_gpu_scale, "board": check_board, "train_speed": check_train_speed, "serve": check_serve, "methods": check_methods, "qat": check_qat, "decode": check_decode,
          "data_checks": check_data_checks, "few_shot": check_few_shot, "continual": check_continual}
