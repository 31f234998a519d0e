"""`dstune.scale.launch`: torchrun with accelerate's environment for a config file, and FSDP2 + LoRA training through it
(2 CPU processes on gloo): the saved adapter is the gathered whole, it matches one process, and a SIGKILLed run
resumes bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dstune.errors import InputError
from dstune.scale.launch import launch, launch_command, without_launch_options

CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"


def changed(env: dict) -> dict:
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def test_fsdp2_config_gives_accelerates_environment_and_a_standalone_torchrun():
    command, env = launch_command(CONFIGS / "fsdp2.yaml", 2, argv=["train", "r.yaml", "--resume"])
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "dstune", "train", "r.yaml", "--resume"]
    new = changed(env)
    assert new["ACCELERATE_USE_FSDP"] == "true" and new["FSDP_VERSION"] == "2"
    assert new["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert new["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and new["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_every_shipped_config_maps_and_nodes_rendezvous_at_the_master():
    kinds = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(kinds)
    for name, kind in kinds.items():
        assert yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["distributed_type"] == kind
        command, env = launch_command(CONFIGS / f"{name}.yaml", None, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                      master_port=29600, argv=["train", "r.yaml"])
        assert command[3:13] == ["--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1",
                                 "--master_addr", "10.0.0.1", "--master_port", "29600"], name
        if kind == "DEEPSPEED":
            assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
            assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-1]
        assert ("ACCELERATE_USE_FSDP" in changed(env)) == (kind == "FSDP")


@pytest.mark.parametrize("text, message", [
    (None, "no such accelerate config file"),
    ("distributed_type: FSDP\nnum_procesess: 2\n", "unknown accelerate config key 'num_procesess'; did you mean "
                                                   "'num_processes'?"),
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_verison: 2\n", "unknown key 'fsdp_verison' in fsdp_config; "
                                                                  "did you mean 'fsdp_version'?"),
    ("distributed_type: XLA\n", "distributed_type 'XLA'"),
    ("distributed_type: [FSDP\n", "not valid YAML"),
])
def test_a_bad_config_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "accelerate.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as error:
        launch_command(path, 2, argv=["train", "r.yaml"])
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_launched_processes_get_the_command_line_without_the_launch_options():
    argv = ["train", "r.yaml", "--launch", "fsdp2.yaml", "train.lr=1e-4", "--nproc=2", "--nnodes", "2",
            "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port=29600", "--resume"]
    assert without_launch_options(argv) == ["train", "r.yaml", "train.lr=1e-4", "--resume"]


def test_multi_node_needs_the_master_address():
    with pytest.raises(InputError, match="--master-addr"):
        launch_command(CONFIGS / "ddp.yaml", 2, nnodes=2, node_rank=1)


@pytest.mark.slow
def test_fsdp2_lora_saves_the_whole_adapter_matches_one_process_and_resumes_exactly(tiny_recipe, tmp_path,
                                                                                     monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dstune import api

    # The shipped FSDP2 config, on this machine's CPUs: fp32, two processes.
    config = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())
    config.update(mixed_precision="no", num_processes=2)
    config_path = tmp_path / "fsdp2_cpu.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # Two ranks x batch 2 is one process's batch 2 x 2 accumulated: the same samples per step, in the same order.
    # Dev evaluation at each checkpoint: the best step's weights are loaded back into the shards at the end.
    train = {"max_steps": 4, "batch_size": 2, "save_steps": 2, "eval_steps": 2, "max_grad_norm": 1.0}

    def recipe(name: str, **extra) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(tiny_recipe(name=name, train={**train, **extra})))
        return str(path)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = tmp_path / "runs"
    # Two launches at once (the 2-core machine spends most of each one importing): an uninterrupted run, and one whose
    # every rank is SIGKILLed in step 3, after checkpoint-2.
    with ThreadPoolExecutor(1) as pool:
        uninterrupted = pool.submit(launch, config_path, 2, argv=["train", recipe("fsdp")])
        command, env = launch_command(config_path, 2, argv=["train", recipe("resumed")])
        killed = subprocess.run(command, env={**env, "DSTUNE_FAULT": "kill_at_step=3"}, capture_output=True,
                                text=True, timeout=300)
        assert uninterrupted.result() == 0
    assert killed.returncode != 0 and "SIGKILL in step 3" in killed.stdout, killed.stderr[-2000:]
    assert (runs / "resumed" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (runs / "resumed" / "adapter").exists()
    # The resumed run, and meanwhile one process on the same samples (one thread: the launch has the other core).
    with ThreadPoolExecutor(1) as pool:
        resumed_run = pool.submit(launch, config_path, 2, argv=["train", recipe("resumed"), "--resume"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = api.train(json.loads(Path(recipe("single", grad_accum=2)).read_text()))
        finally:
            torch.set_num_threads(threads)
        assert resumed_run.result() == 0

    fsdp = load_file(runs / "fsdp" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(runs / "resumed" / "adapter" / "adapter_model.safetensors")
    one = load_file(runs / "single" / "adapter" / "adapter_model.safetensors")
    summary = json.loads((runs / "fsdp" / "adapter" / "dstune_train.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer_steps"] == 4
    assert summary["best_checkpoint"] == single.summary["best_checkpoint"].replace("single", "fsdp")
    # The whole adapter, not rank 0's shard: every tensor has the unsharded shape.
    assert fsdp.keys() == one.keys() and all(fsdp[k].shape == one[k].shape for k in one)
    # Summation order differs; AdamW divides by sqrt(v), which blows that up on the odd element whose gradient is
    # ~0, so: all but a handful of elements within 1e-5, none off by more than a tenth of one step's size.
    diffs = torch.cat([(fsdp[k] - one[k]).abs().flatten() for k in one])
    off = int((diffs > 1e-5).sum())
    print(f"FSDP2 vs one process: max abs diff {diffs.max():.2e}; {off} of {diffs.numel()} elements beyond 1e-5")
    assert off <= 3 and diffs.max() < 1e-3
    assert max(one[k].abs().max() for k in one if "lora_B" in k) > 1e-3  # they trained
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)  # a SIGKILL and --resume change no bit
    for name in ("fsdp", "resumed"):
        for rank in (0, 1):
            log = (runs / name / f"sample_order.rank{rank}.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
    # peft loads it back as saved.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(summary["base_model"]),
                                       runs / "fsdp" / "adapter")
    params = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert params.keys() == fsdp.keys() and all(torch.equal(params[k], fsdp[k]) for k in fsdp)


def test_fsdp2_refuses_a_4bit_base_and_deepspeed_refuses_dstunes_accumulation():
    from dstune.config import load_recipe
    from dstune.scale.launch import check_launch

    qlora = load_recipe({"name": "q", "model": {"load_in_4bit": True}})
    with pytest.raises(InputError, match="loses their quantization state"):
        check_launch(CONFIGS / "fsdp2.yaml", qlora)
    check_launch(CONFIGS / "ddp.yaml", qlora)  # QLoRA under DDP: each GPU holds the 4-bit model
    accumulating = load_recipe({"name": "a", "train": {"grad_accum": 4}})
    with pytest.raises(InputError, match="train.grad_accum 4"):
        check_launch(CONFIGS / "deepspeed_zero3.yaml", accumulating)
    check_launch(CONFIGS / "fsdp2.yaml", accumulating)
