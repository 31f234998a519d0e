"""The `dstune` command line: one subcommand per stage, recipes as YAML with key.path=value overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ..errors import DstuneError
from ..scale import GPUS
from .resources import resource_message

EPILOG = """examples:
  dstune run recipes/icd10_lora.yaml
  dstune train recipes/icd10_lora.yaml train.learning_rate=1e-3 train.epochs=1
  dstune train recipes/icd10_lora.yaml name=icd10_more --from-adapter runs/icd10_lora/adapter   # continue it
  dstune run recipes/icd10_lora.yaml name=icd10_ia3 train.method=ia3   # lora|dora|ia3|prefix|bottleneck|a plugin's
  dstune run recipes/icd10_lora.yaml name=icd10_qlora model.load_in_4bit=true
  dstune run runs/icd10_lora/report.json name=icd10_lora_again   # the recipe a report recorded
  dstune eval recipes/icd10_lora.yaml --adapter runs/icd10_lora/adapter
  dstune eval recipes/icd10_lora.yaml --adapter runs/icd10_lora/adapter --test-file new_cases.jsonl
  dstune eval recipes/icd10_lora.yaml eval.few_shot.k=5 eval.few_shot.select=similar   # the base, 5-shot
  dstune curve recipes/icd10_lora.yaml --sizes 1,2,4,all --methods lora,prefix,ia3
  dstune export recipes/icd10_lora.yaml --format onnx --quant int8
  dstune chat recipes/icd10_lora.yaml --adapter runs/icd10_lora/adapter --prompt "Acute bronchitis due to RSV"
  dstune serve recipes/icd10_lora.yaml --adapter icd10=runs/icd10_lora/adapter   # OpenAI API on 127.0.0.1:8000
  dstune board   # the web UI on 127.0.0.1:7860: recipes, runs, reports, chat, exports
  dstune plan recipes/deepseek_r1_14b_qlora.yaml --gpu h100-80gb   # will it fit? (no weights needed)
"""


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps `dstune --debug train ...` working as well as `dstune train ... --debug`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors, and the libraries' warnings (else in runs/<name>/dstune.log)")
    parser.add_argument("recipe", help="recipe YAML file (see recipes/), or a report.json or other dstune manifest "
                                       "to re-run the recipe it records")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override recipe values, e.g. train.learning_rate=1e-3 model.name_or_path=./my-model")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load .bin adapter/model weights (pickle) instead of refusing them, still through "
                             "torch's weights_only unpickler (tensors only)")


def _add_resume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue training exactly from the newest complete checkpoint of the run (or the "
                             "checkpoint folder given)")
    parser.add_argument("--from-adapter", metavar="ADAPTER",
                        help="start from this trained adapter instead of a fresh one (train.init_adapter): same "
                             "method, rank and targets; the new adapter records it as its parent")


def _add_launch(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process training (see docs/scale.md)")
    group.add_argument("--launch", metavar="CONFIG",
                       help="an accelerate config (configs/accelerate/{ddp,fsdp2,deepspeed_zero2,deepspeed_zero3}"
                            ".yaml): start the training processes with torchrun, with the environment `accelerate "
                            "launch` would set")
    group.add_argument("--nproc", type=int, help="processes on this node (default: the config's num_processes / "
                                                 "--nnodes)")
    group.add_argument("--nnodes", type=int, default=1, help="nodes (run the same command on each; default 1)")
    group.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 to nnodes-1 (default 0)")
    group.add_argument("--master-addr", help="address of node 0 (needed with --nnodes > 1)")
    group.add_argument("--master-port", type=int, help="port on node 0 (default 29500 with --nnodes > 1)")


def _add_tp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor parallelism: N torchrun processes on this machine, the model sharded across "
                             "them (transformers' tp_plan=auto; gloo on CPUs, NCCL on GPUs); default 1")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dstune", description="Fine-tune, evaluate, merge and export domain-specialised causal LMs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole job: data, base eval, train, tuned eval, merge, exports, report",
                       description="Build the dataset, evaluate the base model, fine-tune with the recipe's method "
                                   "(train.method), evaluate the tuned model, merge the adapter where the method "
                                   "allows, export and score export.formats, and write "
                                   "runs/<name>/report.{json,md,html}.")
    _add_recipe(p)
    _add_resume(p)
    p = sub.add_parser("data", help="build the dataset folder (train/dev/test JSONL, manifest, data report)",
                       description="Turn the recipe's data source into runs/<name>/data/{train,dev,test}.jsonl: "
                                   "quality checks (every drop counted by reason with its file:line), adversarial "
                                   "domain filter, stratified sampling, augmentation and general replay, as the "
                                   "recipe's data section says. The report is report.md / report.html.")
    _add_recipe(p)
    p = sub.add_parser("train", help="fine-tune an adapter on the dataset folder",
                       description="Fine-tune with the recipe's PEFT method (train.method: lora, dora, ia3, prefix, "
                                   "bottleneck or a plugin's) and objective (train.objective); saves "
                                   "runs/<name>/adapter in peft format. Crash-safe "
                                   "checkpoints go to runs/<name>/checkpoints every train.save_steps steps; on "
                                   "SIGTERM the run checkpoints and exits 0.")
    _add_recipe(p)
    _add_resume(p)
    _add_launch(p)
    p = sub.add_parser("eval", help="score a model on the test split, or on one file",
                       description="Generate answers on the test split and score them with the recipe's metrics. "
                                   "Evaluates the base model unless --model or --adapter is given. With "
                                   "--test-file, score that file alone: no dataset is built; the file gets the "
                                   "data stage's checks, and a report goes to runs/<name>/eval/<tag>/.")
    _add_recipe(p)
    p.add_argument("--test-file", help="a file or folder of records to score instead of the recipe's test split")
    p.add_argument("--model", help="a model directory or .gguf file instead of the recipe's base model")
    p.add_argument("--adapter", help="a peft adapter folder to load on top of the model")
    p.add_argument("--tag", help="name of the result file under runs/<name>/eval/")
    _add_tp(p)
    p = sub.add_parser("merge", help="merge an adapter into the base model",
                       description="Fold an adapter (lora, dora, ia3) into the base weights and save a safetensors "
                                   "HF directory.")
    _add_recipe(p)
    p.add_argument("--adapter", help="adapter folder (default: runs/<name>/adapter)")
    p.add_argument("--out", help="output directory (default: runs/<name>/merged)")
    p = sub.add_parser("prune", help="structured pruning of the merged model: heads, MLP channels, layers",
                       description="Remove the recipe's shares of attention heads (GQA-aware: query heads in equal "
                                   "numbers per KV group, or whole groups), MLP channels and whole layers, chosen by "
                                   "importance measured on train-split records, and save a plain HF directory "
                                   "(runs/<name>/pruned) whose config states the new shapes. Set prune.heads, "
                                   "prune.mlp, prune.layers (e.g. `dstune prune r.yaml prune.mlp=0.25 "
                                   "prune.layers=0.25`). See docs/compress.md.")
    _add_recipe(p)
    p.add_argument("--model", help="the model directory to prune (default: runs/<name>/merged)")
    p.add_argument("--out", help="output directory (default: runs/<name>/pruned)")
    p = sub.add_parser("export", help="export the merged model (ONNX, GGUF, torchao), score it and gate it",
                       description="Write a deployable artifact of the merged model under runs/<name>/exports/, score "
                                   "it on the test split against the fp32 merged model (domain metrics, business "
                                   "checks), and exit with code 3 if it keeps less than export.min_retention of the "
                                   "fp32 domain score. Formats: onnx (fp32, int8, int4, int4-rtn, and int4-gptq, "
                                   "int4-awq, int4-awq-gptq, int4-mixed, int4-gptq-mixed calibrated on "
                                   "export.calibration_samples train records; int4 writes every int4 scheme and keeps "
                                   "the best on the dev split), gguf (f32, f16, q8_0, q4_0), torchao (int8, int8wo, "
                                   "...). See docs/deploy.md.")
    _add_recipe(p)
    p.add_argument("--format", default="onnx", help="onnx | gguf | torchao | a plugin's (default onnx)")
    p.add_argument("--quant", default="int8", help="the format's quantization, e.g. int8, int4, q8_0 (default int8)")
    p.add_argument("--model", help="the merged model directory (default runs/<name>/merged)")
    p = sub.add_parser("chat", help="talk to a model (one prompt, or a prompt loop on stdin)",
                       description="Greedy answers with the recipe's chat template and system prompt.")
    _add_recipe(p)
    p.add_argument("--model", help="a model directory or .gguf file instead of the recipe's base model")
    p.add_argument("--adapter", help="a peft adapter folder to load on top of the model")
    p.add_argument("--prompt", help="answer this prompt and exit (otherwise read prompts from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    _add_tp(p)
    p = sub.add_parser("serve", help="an OpenAI-compatible server: the base model once, adapters chosen per request",
                       description="Serve the recipe's model over OpenAI's API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics) with continuous batching. A request's `model` picks "
                                   "the base (by its name) or an adapter (by NAME). The recipe gives the chat template "
                                   "and the default system prompt. See docs/serve.md.",
                       epilog="examples:\n"
                              "  dstune serve recipes/icd10_lora.yaml --adapter icd10=runs/icd10_lora/adapter\n"
                              "  DSTUNE_API_KEY=sk-... dstune serve recipes/icd10_lora.yaml --adapter a=A --adapter b=B\n"
                              "  dstune serve recipes/icd10_lora.yaml --engine vllm --adapter icd10=runs/icd10_lora/adapter "
                              "--dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe(p)
    p.add_argument("--adapter", dest="serve_adapters", action="append", default=[], metavar="NAME=PATH",
                   help="serve this peft adapter folder under NAME (repeatable)")
    p.add_argument("--model", help="a model folder or .gguf file instead of the recipe's base model (--engine onnx: "
                                   "the ONNX export folder)")
    p.add_argument("--engine", choices=["torch", "onnx", "vllm"], default="torch",
                   help="torch: the model with peft adapters (default); onnx: --model and each --adapter are ONNX "
                        "exports (merged models) run by onnxruntime; both with dstune's continuous batching. vllm: "
                        "check the adapters against vLLM's LoRA loader and launch `vllm serve` (GPU machines)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="the key every route but /health requires (default: $DSTUNE_API_KEY, else one "
                                     "made at start and printed)")
    p.add_argument("--admin-key", help="the key of /admin/adapters, to load and unload adapters at run time (default: "
                                       "$DSTUNE_ADMIN_KEY; none: admin routes are off)")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: the model path)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together at most (default 32)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot at most; more get 429 with Retry-After (default 64)")
    p.add_argument("--max-tokens-cap", type=int, default=1024,
                   help="the largest max_tokens a request may ask, and the default (default 1024)")
    p.add_argument("--max-model-len", type=int, help="context length cap (default: the model's)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size cap (default 1 MiB)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take before it is cancelled with a 408 (default 300)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="--engine vllm: vLLM's --max-lora-rank (default 16)")
    p.add_argument("--dry-run", action="store_true", help="--engine vllm: check and print the command, do not launch")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="--engine vllm: shard the model over N GPUs (vLLM's --tensor-parallel-size; default 1)")
    p = sub.add_parser("curve", help="data efficiency: train at several sizes, against k-shot prompting",
                       description="Train the recipe with each method at each training-set size (source records, "
                                   "per stratum where data.stratify names strata), score each on the same test "
                                   "split, beside the base model prompted with k demonstrations from the same "
                                   "records (random and similar) and a TF-IDF 1-nearest-neighbour classifier. "
                                   "Reports where fine-tuning overtakes prompting: runs/<name>/curve/curve.{json,md,"
                                   "html}. See docs/few_shot.md.")
    _add_recipe(p)
    p.add_argument("--sizes", help="comma-separated sizes, `all` for every record (default: 1,2,4,all per stratum, "
                                   "8,32,128,all in total)")
    p.add_argument("--methods", default="lora,prefix,ia3",
                   help="comma-separated PEFT methods to train at each size (default lora,prefix,ia3)")
    p.add_argument("--per", choices=["auto", "stratum", "total"], default="auto",
                   help="count sizes per stratum (data.stratify) or in total; auto: per stratum when the recipe "
                        "has strata")
    p.add_argument("--shots", default="random,similar",
                   help="in-context baselines: random, similar, both (default), or none")
    p.add_argument("--k", type=int, help="demonstrations per prompt (default eval.few_shot.k, else 5)")
    p.add_argument("--min-steps", type=int, default=30,
                   help="train at least this many optimizer steps at every size (default 30)")
    p = sub.add_parser("board", help="a web UI: build recipes, launch and watch runs, reports, chat, export",
                       description="A local web app over the runs folder: a recipe form with every key `dstune run` "
                                   "accepts, runs launched as processes of their own (they outlive the browser and "
                                   "the board) with live curves, reports side by side, a chat with base and adapter, "
                                   "and exports with their gates. It prints its URL with a token, as Jupyter does. "
                                   "See docs/board.md.",
                       epilog="examples:\n  dstune board\n  dstune board --port 7861 --runs-dir runs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs-dir", default="runs", help="the runs folder, relative to the current one (default runs)")
    p.add_argument("--recipes-dir", default="recipes", help="where the form finds base recipes (default recipes)")
    p.add_argument("--token", help="the token every route requires (default: $DSTUNE_BOARD_TOKEN, else one made at "
                                   "start and printed in the URL)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept this Host name (behind a reverse proxy); repeatable")
    p = sub.add_parser("plan", help="peak memory per GPU and step time of a recipe's training, from the config alone",
                       description="Build the recipe's model on the meta device (no weights), add its method, trace "
                                   "one training step at its batch size and sequence length, and decompose the peak "
                                   "memory per device: weights, adapter, gradients, optimizer states, activations "
                                   "(with or without checkpointing), the loss head's logits chunk, and the KV cache "
                                   "for evaluation, under DDP, ZeRO-2, FSDP2 or ZeRO-3, with expert parallelism for "
                                   "MoE. Says whether it fits and which knob to turn if not. See docs/scale.md.",
                       epilog="examples:\n"
                              "  dstune plan recipes/deepseek_r1_14b_qlora.yaml --gpu h100-80gb\n"
                              "  dstune plan recipes/deepseek_v3_lora.yaml --gpu h100-80gb --gpus 8 --nodes 8 "
                              "--strategy fsdp2 --expert-parallel 64\n"
                              "  dstune plan recipes/icd10_lora.yaml --cpu train.batch_size=4 data.max_length=1024",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe(p)
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu", help="a GPU model, which sets its memory and bf16 peak: " + ", ".join(GPUS))
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB (overrides --gpu's)")
    p.add_argument("--strategy", default="auto", help="ddp | zero2 | fsdp2 | zero3 (default auto: DDP if it fits, "
                                                      "else FSDP2)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="E",
                   help="MoE: split the routed experts over E GPUs (default 1)")
    p.add_argument("--config", help="a config.json or model folder to plan instead of the recipe's model, or a "
                                    "shipped config name (deepseek-r1-distill-qwen-14b, -32b, deepseek-v2-lite, "
                                    "deepseek-v3)")
    p.add_argument("--cpu", action="store_true", help="plan a CPU process's resident set instead of a GPU")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="assumed share of the GPU's bf16 peak a step reaches, for the time estimate (default 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p = sub.add_parser("convert-weights", help="rewrite pickle weights (.bin) as safetensors",
                       description="Load adapter_model.bin / pytorch_model*.bin (in a folder) or one weight file "
                                   "with torch's weights_only unpickler and write .safetensors next to it.")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    p.add_argument("path", help="an adapter or model folder, or one .bin/.pt file")
    return parser


def _prompts(text: str | None):
    """The one prompt given, or prompts read line by line from stdin."""
    if text:
        yield text
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _chat_loop(args, recipe) -> None:
    from .. import api

    answer = api.chat_session(recipe, None, args.model, args.adapter, args.max_new_tokens)
    for prompt in _prompts(args.prompt):
        print(answer(prompt), flush=True)


class _RunLog(logging.FileHandler):
    """A log file opened at its first record (its folder made then): no file for a run that logged nothing."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


LIBRARY_LOGGERS = ("py.warnings", "transformers", "peft", "accelerate", "torch", "onnxruntime", "huggingface_hub")


def library_output_to(path: Path) -> None:
    """Python warnings and the libraries' log records go to `path` instead of the terminal (--debug keeps them).

    peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` on every adapter load: a
    FutureWarning on each `chat`, `eval` and `run` that the user can do nothing about.
    """
    from transformers.utils import logging as hf_logging

    handler = _RunLog(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.captureWarnings(True)
    hf_logging.disable_default_handler()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def dispatch(args) -> int:
    """Run one parsed command."""
    if args.command == "board":
        from ..board import BoardOptions, board, check_options
        from ..serve import env_key

        options = BoardOptions(host=args.host, port=args.port, runs_dir=args.runs_dir, recipes_dir=args.recipes_dir,
                               allowed_hosts=tuple(args.allow_host))
        token = env_key(args.token, "DSTUNE_BOARD_TOKEN")
        if token:
            options.token = token
        check_options(options)
        board(options)
        return 0
    if args.command == "convert-weights":
        from ..models.safety import allow_pickle, convert_to_safetensors

        allow_pickle(True)  # asking to convert is the opt-in; the load is still weights_only
        for out in convert_to_safetensors(args.path):
            print(f"dstune: wrote {out}")
        return 0
    if getattr(args, "from_adapter", None):
        args.overrides.append(f"train.init_adapter={args.from_adapter}")
    if isinstance(getattr(args, "resume", None), str) and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.append(args.resume)  # `--resume key=value`: an override, not a checkpoint path
        args.resume = True
    from ..provenance import load_recipe_or_manifest

    # A bad recipe or override fails here, in a second, before the slow imports of torch, transformers and peft.
    recipe = load_recipe_or_manifest(args.recipe, args.overrides)
    if args.command == "serve":  # every error knowable from the command line, before the model loads
        from ..serve import ServeOptions, check_options, env_key, parse_adapters

        options = ServeOptions(
            adapters=parse_adapters(args.serve_adapters), model=args.model, host=args.host, port=args.port,
            api_key=env_key(args.api_key, "DSTUNE_API_KEY"), admin_key=env_key(args.admin_key, "DSTUNE_ADMIN_KEY"),
            served_model_name=args.served_model_name, max_batch=args.max_batch, max_queue=args.max_queue,
            max_tokens_cap=args.max_tokens_cap, max_model_len=args.max_model_len, max_body_bytes=args.max_body_bytes,
            request_timeout=args.request_timeout, engine="torch" if args.engine == "vllm" else args.engine)
        check_options(options)
    if getattr(args, "launch", None):
        from ..scale.launch import check_launch, launch, without_launch_options

        check_launch(args.launch, recipe)  # what the config cannot do with this recipe, before any process starts
        return launch(args.launch, args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                      without_launch_options(args.argv))
    if args.command in ("chat", "eval") and args.tp != 1:
        from ..scale import tp
        from ..scale.plan import load_model_config

        config = load_model_config(args.model or recipe.model.name_or_path,
                                   trust_remote_code=recipe.model.trust_remote_code)
        tp.check(args.tp, args.command, recipe.model.load_in_4bit, getattr(args, "prompt", None), config)
        if not tp.active():  # start the ranks, each of which runs this same command
            return tp.relaunch(args.tp, args.argv)
        recipe = tp.quiet_other_ranks(recipe)
    if getattr(args, "adapter", None):  # a bad adapter folder fails before the model loads
        from ..tuners.methods import check_adapters

        check_adapters(args.adapter)
    if args.command == "plan":  # reads a config, writes nothing
        import json

        from ..scale.plan import PlanRequest, plan_recipe

        result = plan_recipe(recipe, PlanRequest(
            gpus=args.gpus, nodes=args.nodes, gpu_memory=args.gpu_memory, gpu=args.gpu, strategy=args.strategy,
            expert_parallel=args.expert_parallel, config=args.config, cpu=args.cpu, mfu=args.mfu))
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2) if args.json else result["table"])
        return 0
    if not args.debug:
        library_output_to(recipe.run_dir / "dstune.log")
    from .. import api

    command = " ".join(["dstune", args.command, args.recipe, *args.overrides])
    if args.command == "run":
        report = api.run(recipe, resume=args.resume)
        if "preempted" in report:
            print(api.preemption_message(report["preempted"], command), flush=True)
    elif args.command == "data":
        out = api.data(recipe)
        print(f"dstune: dataset written to {out} (report: {out / 'report.html'})")
    elif args.command == "train":
        result = api.train(recipe, resume=args.resume)
        if not result.main_process:  # under torchrun only rank 0 saves and reports
            pass
        elif "preempted_at_step" in result.summary:
            print(api.preemption_message(result, command), flush=True)
        else:
            print(f"dstune: adapter saved to {result.adapter_dir}")
    elif args.command == "eval":
        result = api.evaluate(recipe, model=args.model, adapter=args.adapter, tag=args.tag, test_file=args.test_file)
        for name, value in result["metrics"].items():
            print(f"{name}: {value:.4f}")
        if "report" in result:
            books = result["data"]["quality"]["splits"]["test"]
            print(f"dstune: {books['kept']} of {books['input']} records scored (dropped: {books['dropped'] or 'none'});"
                  f" report: {result['report']}")
    elif args.command == "curve":
        report = api.curve(recipe, sizes=args.sizes, methods=args.methods, per=args.per, shots=args.shots, k=args.k,
                           min_steps=args.min_steps)
        print("\n" + report["table"] + "\n")
        print(f"dstune: curve written to {report['path']}")
    elif args.command == "merge":
        out = api.merge(recipe, adapter=args.adapter, out_dir=args.out)
        print(f"dstune: merged model saved to {out}")
    elif args.command == "prune":
        done = api.prune(recipe, model=args.model, out_dir=args.out)
        print(f"dstune: pruned model saved to {done['out']}: {done['parameters'] / 1e6:.1f}M parameters, "
              f"{100 * done['parameter_ratio']:.1f}% of {done['source_parameters'] / 1e6:.1f}M")
    elif args.command == "export":
        record = api.export(recipe, spec=f"{args.format}:{args.quant}", model=args.model)
        if record.get("selection"):
            picked = record["selection"]
            print(f"dstune: {record['format']}:{record['requested']} picked {record['quant']}, the best of "
                  + ", ".join(f"{c['quant']} {c['dev_retention']:.3f}" for c in picked["candidates"])
                  + f" (retention on the dev split; {'passing the gate' if picked['any_passed'] else 'none passed'})")
        print(f"dstune: {record['format']}:{record['quant']} written to {record['artifact']}: "
              f"{record['bytes'] / 1e6:.1f} MB ({100 * record['size_ratio']:.1f}% of fp32), {record['metric']} "
              f"{record['score']:.4f} vs fp32 {record['fp32_score']:.4f} (retention {record['retention']:.3f}, "
              f"gate {record['min_retention']}: passed)")
    elif args.command == "chat":
        _chat_loop(args, recipe)
    elif args.command == "serve":
        api.serve(recipe, options, engine=args.engine, max_lora_rank=args.max_lora_rank, dry_run=args.dry_run,
                  tensor_parallel=args.tp)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors a user can act on become one line and an exit code (2 bad input, 1 runtime)."""
    # transformers imports torchao when it is installed, and torchao logs the CUDA kernels a CPU build cannot load
    # and torch deprecations on every start: noise in front of dstune's own output.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--tp` runs again on each rank
    # Overrides may also come after the options (`dstune export r.yaml --quant int4 export.min_retention=0.9`).
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "allow_pickle", False):
        from ..models.safety import allow_pickle

        allow_pickle(True)
    try:
        return dispatch(args)
    except DstuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dstune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        message = resource_message(exc, args.command)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"dstune: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dstune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
