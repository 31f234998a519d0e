"""`dstune serve --engine vllm`: check each adapter against vLLM's LoRA loader, then launch `vllm serve`.

The check mirrors `PEFTHelper.validate_legal` in vllm/lora/peft_helper.py as published for vLLM 0.34.0 (the
newest release when this was written), plus the target modules vLLM's Llama-family and DeepSeek models accept.
vLLM cannot be installed on dstune's CPU machines, so this path is tested up to the command line it builds; see
docs/serve.md. An adapter vLLM would refuse is reported here, before a GPU is spent loading the base (vllm#9280 is
what users meet there instead).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from ..errors import InputError

VLLM_VERSION = "0.34.0"
# vLLM's --max-lora-rank takes one of these; its default is 16.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Linear layers vLLM's LoRA reaches in Llama, Qwen2, Mistral (q/k/v and gate/up are packed, each part accepted) and
# DeepSeek-V2/V3 (MLA projections, and the experts' gate/up/down).
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "fused_qkv_a_proj",
                "embed_tokens", "lm_head"}
SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def vllm_problems(path: str | Path, max_lora_rank: int) -> list[str]:
    """What vLLM's loader would refuse in this adapter folder (empty: it loads)."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"vLLM serves LoRA adapters only (this one is {config.get('peft_type')})")
        return problems
    unsupported = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if unsupported:
        problems.append(f"modules_to_save {unsupported} (vLLM accepts none for causal LMs)")
    if config.get("use_dora"):
        problems.append("DoRA (vLLM does not support it yet; merge the adapter instead)")
    if config.get("lora_bias"):
        problems.append("lora_bias")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (vLLM supports none)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights when peft loads it")
    for key, what in (("alora_invocation_tokens", "Activated LoRA"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{what} ({key})")
    rank = max([int(config.get("r", 0)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
    if rank > max_lora_rank:
        fit = next((r for r in VLLM_RANKS if r >= rank), None)
        problems.append(f"rank {rank} is over --max-lora-rank {max_lora_rank}"
                        + (f" (pass --max-lora-rank {fit})" if fit else " (vLLM's largest is 512)"))
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex: vLLM matches it against its own module names, so it cannot be checked
        targets = []
    others = sorted({t.split(".")[-1] for t in targets} - VLLM_TARGETS)
    if others:
        problems.append(f"target modules {others} are not layers vLLM's LoRA reaches ({', '.join(sorted(VLLM_TARGETS))})")
    return problems


def jinja_template(template, system_prompt: str | None, tokenizer=None) -> str:
    """A Jinja chat template that renders as dstune's `template` does, with the recipe's system prompt by default."""
    default = ""
    if system_prompt:
        default = ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
                   f"'content': {json.dumps(system_prompt)}}}] + messages %}}{{%- endif %}}")
    if template.name == "auto":
        return default + tokenizer.chat_template
    marker = "\x00"
    start = template.conversation_text([])
    parts = {}
    for role in ("system", "user", "assistant"):
        text = template.conversation_text([{"role": role, "content": marker}])[len(start):]
        before, _, after = text.partition(marker)
        parts[role] = (before, after)
    probe = [{"role": "user", "content": marker}]
    generation = template.prompt_text(probe)[len(template.conversation_text(probe)):]
    lit = lambda s: "{{ " + json.dumps(s) + " }}" if s else ""  # noqa: E731
    body = "".join(
        f"{'{%- if' if i == 0 else '{%- elif'} message['role'] == '{role}' %}}{lit(before)}{{{{ message['content'] }}}}"
        f"{lit(after)}" for i, (role, (before, after)) in enumerate(parts.items()))
    return (default + lit(start) + "{%- for message in messages %}" + body + "{%- endif %}{%- endfor %}"
            + "{%- if add_generation_prompt %}" + lit(generation) + "{%- endif %}")


def vllm_command(recipe, adapters: dict[str, str], model: str | None, host: str, port: int, max_lora_rank: int,
                 template_file: Path, max_model_len: int | None = None, tensor_parallel: int = 1) -> list[str]:
    """The `vllm serve` command line for this recipe and these adapters, after checking each adapter."""
    if max_lora_rank not in VLLM_RANKS:
        raise InputError(f"--max-lora-rank {max_lora_rank}: vLLM takes one of {', '.join(map(str, VLLM_RANKS))}")
    refused = [f"{name} ({path}): {'; '.join(p)}" for name, path in adapters.items()
               if (p := vllm_problems(path, max_lora_rank))]
    if refused:
        raise InputError("vLLM " + VLLM_VERSION + "'s LoRA loader would refuse " + " | ".join(refused))
    source = str(model or recipe.model.name_or_path)
    command = ["vllm", "serve", source, "--host", host, "--port", str(port), "--chat-template", str(template_file),
               # float32 is dstune's CPU default; on a GPU vLLM takes the checkpoint's own dtype.
               "--dtype", "auto" if recipe.model.dtype == "float32" else recipe.model.dtype]
    if recipe.model.trust_remote_code:
        command.append("--trust-remote-code")
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if tensor_parallel > 1:
        command += ["--tensor-parallel-size", str(tensor_parallel)]
    if adapters:
        command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(len(adapters)),
                    "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    return command


def launch(command: list[str], api_key: str | None, dry_run: bool) -> None:
    """Replace this process with vLLM (or print the command, with --dry-run or where vLLM is not installed).

    The API key goes to vLLM through VLLM_API_KEY, not the command line that `ps` shows.
    """
    import os

    shown = " ".join(shlex.quote(c) for c in command)
    if dry_run:
        print(shown)
        return
    if shutil.which("vllm") is None:
        raise InputError(f"vLLM is not installed here (pip install vllm=={VLLM_VERSION} on a CUDA machine); the "
                         f"command would be: {shown}")
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    os.execvpe(command[0], command, env)
