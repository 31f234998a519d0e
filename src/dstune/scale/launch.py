"""Multi-process launches: `dstune train RECIPE --launch CONFIG` starts torchrun itself, with the environment that
`accelerate launch` would set for that accelerate config file (DDP, FSDP2 or DeepSpeed).

accelerate's own functions read the config and map it to environment variables; dstune only builds the torchrun
command. It does not go through `accelerate launch`, which with `--cpu --num_processes 2` starts a single process:
dstune's launch starts the same number of processes with or without GPUs (gloo on CPUs, see train.loop).
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

from ..errors import InputError

# The distributed types a torchrun launch of dstune can run (TPUs and Megatron-LM have launchers of their own).
SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")
# Sections of an accelerate config whose keys are launcher arguments with a prefix (as accelerate merges them).
PREFIXED = {"fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}
# The CLI's launch options (each takes a value); the launched processes get the command line without them.
LAUNCH_OPTIONS = ("--launch", "--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def without_launch_options(argv: list[str]) -> list[str]:
    """The command line each launched process runs: this one without --launch, --nproc and the other launch options."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True  # its value follows
        elif arg.split("=", 1)[0] not in LAUNCH_OPTIONS:
            kept.append(arg)
    return kept


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_accelerate_config(config_file: str | Path):
    """The accelerate config file, read by accelerate itself; a missing file or unknown key is one InputError line."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = Path(config_file)
    if not path.is_file():
        raise InputError(f"{path}: no such accelerate config file (see configs/accelerate/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: an accelerate config is a mapping (compute_environment, distributed_type, ...)")
    fields = set(ClusterConfig.__dataclass_fields__) | {"fp16", "dynamo_backend"}  # accelerate converts the last two
    for key in raw:
        if key not in fields:
            raise InputError(f"{path}: unknown accelerate config key {key!r}{_suggest(key, fields)}")
    if raw.get("compute_environment", "LOCAL_MACHINE") != "LOCAL_MACHINE":
        raise InputError(f"{path}: compute_environment {raw['compute_environment']!r}; dstune launches on "
                         "LOCAL_MACHINE only")
    if raw.get("distributed_type") not in SUPPORTED:
        raise InputError(f"{path}: distributed_type {raw.get('distributed_type')!r}; dstune launches one of "
                         f"{', '.join(SUPPORTED)}")
    try:
        return load_config_from_file(str(path))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: {str(exc).splitlines()[0]}") from None


def _launch_args(config, path: Path, nproc: int, nnodes: int, node_rank: int, master_addr, master_port):
    """accelerate's launch arguments: its parser's defaults, then the config's values, as `accelerate launch` merges
    them (commands.launch._validate_launch_command, a private function: the few lines are repeated here)."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import get_int_from_env

    argv = ["--config_file", str(path), "--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes),
            "--machine_rank", str(node_rank), "--num_cpu_threads_per_process",
            str(get_int_from_env(["OMP_NUM_THREADS"], 1))]
    if master_addr is not None:
        argv += ["--main_process_ip", str(master_addr)]
    if master_port is not None:
        argv += ["--main_process_port", str(master_port)]
    args = launch_command_parser().parse_args([*argv, "-m", "dstune"])
    kind = config.distributed_type.value
    args.use_deepspeed, args.use_fsdp, args.multi_gpu = kind == "DEEPSPEED", kind == "FSDP", kind == "MULTI_GPU"
    for name, value in vars(config).items():
        if isinstance(value, dict):
            for key, item in value.items():
                prefix = PREFIXED.get(name, "")
                dest = key if key.startswith(prefix) else prefix + key
                if not hasattr(args, dest):
                    raise InputError(f"{path}: unknown key {key!r} in {name}{_suggest(dest, vars(args))}")
                if dest not in args.nondefault:
                    setattr(args, dest, item)
        elif name not in ("compute_environment", "mixed_precision", "distributed_type") and \
                getattr(args, name, None) is None:
            setattr(args, name, value)
    args.debug = bool(config.debug)
    args.mixed_precision = config.mixed_precision or "no"
    args.dynamo_backend = args.dynamo_backend or "no"
    args.gpu_ids = args.gpu_ids or "all"
    # What accelerate's DeepSpeed plugin takes from the config rather than from a DeepSpeed JSON file.
    args.deepspeed_fields_from_accelerate_config = ",".join(
        [*config.deepspeed_config, *(["mixed_precision"] if config.mixed_precision else [])])
    return args


def launch_command(config_file: str | Path, nproc: int | None = None, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str | None = None, master_port: int | None = None,
                   argv: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """torchrun's command that runs `dstune <argv>` on this node, and its environment for the accelerate config."""
    # nproc: processes on this node; None takes the config's num_processes over nnodes.
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = Path(config_file)
    config = load_accelerate_config(path)
    if nproc is None:
        if config.num_processes < 1:
            raise InputError(f"{path}: no num_processes; pass --nproc (processes per node)")
        nproc = max(config.num_processes // max(nnodes, 1), 1)
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise InputError(f"--nproc {nproc} --nnodes {nnodes} --node-rank {node_rank}: need nproc >= 1, nnodes >= 1 "
                         "and 0 <= node-rank < nnodes")
    if nnodes > 1 and master_addr is None:
        raise InputError(f"--nnodes {nnodes}: a multi-node launch needs --master-addr (the address of node 0)")
    args = _launch_args(config, path, nproc, nnodes, node_rank, master_addr, master_port)
    try:
        env = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    except ValueError as exc:
        raise InputError(f"{path}: {str(exc).splitlines()[0]}") from None
    if config.use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # `accelerate launch` passes use_cpu to its simple launcher only
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes > 1 or master_port is not None:
        command += ["--nnodes", str(nnodes), "--node_rank", str(node_rank),
                    "--master_addr", str(master_addr or "127.0.0.1"), "--master_port", str(master_port or 29500)]
    else:
        command += ["--standalone"]  # a free port of its own: two single-node runs can share a machine
    return command + ["-m", "dstune", *argv], env


def launch(config_file: str | Path, nproc: int | None = None, nnodes: int = 1, node_rank: int = 0,
           master_addr: str | None = None, master_port: int | None = None, argv: list[str] = ()) -> int:
    """Run `dstune <argv>` in `nproc` processes on this node under the accelerate config; the exit code."""
    command, env = launch_command(config_file, nproc, nnodes, node_rank, master_addr, master_port, argv)
    print(f"dstune: {' '.join(command[2:])}", flush=True)
    return subprocess.run(command, env=env).returncode


def check_launch(config_file: str | Path, recipe) -> None:
    """Refuse, in one line, what the accelerate config cannot do with this recipe."""
    kind = load_accelerate_config(config_file).distributed_type.value
    if kind == "FSDP" and recipe.model.load_in_4bit:
        # axolotl #2992; bench/gpu_scale.py shows it: after fully_shard no linear keeps its quant_state.
        raise InputError(f"{config_file}: FSDP2 shards bitsandbytes' 4-bit weights into plain tensors and loses "
                         "their quantization state; train QLoRA (model.load_in_4bit) under configs/accelerate/"
                         "ddp.yaml or deepspeed_zero2.yaml")
    if kind == "DEEPSPEED" and recipe.train.grad_accum > 1:
        # DeepSpeed's engine steps at each backward unless it owns the accumulation, which dstune's loop does.
        raise InputError(f"{config_file}: DeepSpeed with train.grad_accum {recipe.train.grad_accum}: set "
                         "train.grad_accum=1 and a larger train.batch_size, or use fsdp2.yaml")
