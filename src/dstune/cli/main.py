"""The `dstune` command line: one subcommand per stage, recipes as YAML with key.path=value overrides."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import DstuneError

EPILOG = """examples:
  dstune run recipes/icd10_lora.yaml
  dstune train recipes/icd10_lora.yaml train.learning_rate=1e-3 train.epochs=1
  dstune run recipes/icd10_lora.yaml name=icd10_adapter train.method=adapter   # lora|dora|prefix|adapter|ia3
  dstune run recipes/icd10_lora.yaml name=icd10_qlora model.load_in_4bit=true
  dstune eval recipes/icd10_lora.yaml --adapter runs/icd10_lora/adapter
  dstune chat recipes/icd10_lora.yaml --adapter runs/icd10_lora/adapter --prompt "Acute bronchitis due to RSV"
"""


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps `dstune --debug train ...` working as well as `dstune train ... --debug`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override recipe values, e.g. train.learning_rate=1e-3 model.name_or_path=./my-model")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dstune", description="Fine-tune, evaluate and merge domain-specialised causal LMs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole job: data, base eval, train, tuned eval, merge, report",
                       description="Build the dataset, evaluate the base model, LoRA fine-tune, evaluate the tuned "
                                   "model, merge the adapter and write runs/<name>/report.{json,md}.")
    _add_recipe(p)
    p = sub.add_parser("data", help="build the dataset folder (train/dev/test JSONL, manifest, data report)",
                       description="Turn the recipe's data source into runs/<name>/data/{train,dev,test}.jsonl: "
                                   "quality checks (every drop counted by reason with its file:line), adversarial "
                                   "domain filter, stratified sampling, augmentation and general replay, as the "
                                   "recipe's data section says. The report is report.md / report.html.")
    _add_recipe(p)
    p = sub.add_parser("train", help="LoRA fine-tune on the dataset folder",
                       description="Fine-tune with LoRA; saves runs/<name>/adapter in peft format.")
    _add_recipe(p)
    p = sub.add_parser("eval", help="score a model on the test split",
                       description="Generate answers on the test split and score them with the recipe's metrics. "
                                   "Evaluates the base model unless --model or --adapter is given.")
    _add_recipe(p)
    p.add_argument("--model", help="a model directory or .gguf file instead of the recipe's base model")
    p.add_argument("--adapter", help="a peft adapter folder to load on top of the model")
    p.add_argument("--tag", help="name of the result file under runs/<name>/eval/")
    p = sub.add_parser("merge", help="merge an adapter into the base model",
                       description="Fold a LoRA adapter into the base weights and save a safetensors HF directory.")
    _add_recipe(p)
    p.add_argument("--adapter", help="adapter folder (default: runs/<name>/adapter)")
    p.add_argument("--out", help="output directory (default: runs/<name>/merged)")
    p = sub.add_parser("chat", help="talk to a model (one prompt, or a prompt loop on stdin)",
                       description="Greedy answers with the recipe's chat template and system prompt.")
    _add_recipe(p)
    p.add_argument("--model", help="a model directory or .gguf file instead of the recipe's base model")
    p.add_argument("--adapter", help="a peft adapter folder to load on top of the model")
    p.add_argument("--prompt", help="answer this prompt and exit (otherwise read prompts from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
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


def _chat_loop(args) -> None:
    from .. import api

    answer = api.chat_session(args.recipe, args.overrides, args.model, args.adapter, args.max_new_tokens)
    for prompt in _prompts(args.prompt):
        print(answer(prompt), flush=True)


def dispatch(args) -> int:
    """Run one parsed command."""
    from .. import api

    if args.command == "run":
        api.run(args.recipe, args.overrides)
    elif args.command == "data":
        out = api.data(args.recipe, args.overrides)
        print(f"dstune: dataset written to {out} (report: {out / 'report.html'})")
    elif args.command == "train":
        result = api.train(args.recipe, args.overrides)
        if result.trainer.is_world_process_zero():  # under torchrun only rank 0 saves
            print(f"dstune: adapter saved to {result.adapter_dir}")
    elif args.command == "eval":
        result = api.evaluate(args.recipe, args.overrides, model=args.model, adapter=args.adapter, tag=args.tag)
        for name, value in result["metrics"].items():
            print(f"{name}: {value:.4f}")
    elif args.command == "merge":
        out = api.merge(args.recipe, args.overrides, adapter=args.adapter, out_dir=args.out)
        print(f"dstune: merged model saved to {out}")
    elif args.command == "chat":
        _chat_loop(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors a user can act on become one line and an exit code (2 bad input, 1 runtime)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return dispatch(args)
    except DstuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dstune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dstune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
