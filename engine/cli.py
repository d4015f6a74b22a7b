"""`pagedserve generate ...` (also `python -m pagedserve.engine`): offline generation from the shell.

Every `EngineConfig` field is a flag (`--max-batch-tokens`, `--enable-prefix-caching/--no-...`), so
`--help` lists them all with their defaults; the sampling flags include the structured-output constraints
(`--json-schema`, `--regex`, `--choice`, ...) and `--logit-bias`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.engine.core.request import StructuredOutputsParams
from pagedserve.engine.errors import InvalidRequestError, ModelLoadError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) of a config annotation such as `int | None` or a Literal."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else (str, None)
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    return (annotation if annotation in (int, float, str) else str), None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine configuration (EngineConfig)")
    for name, field in EngineConfig.model_fields.items():
        help_text = f"{field.description or ''} (default: {field.default})"
        annotation = field.annotation
        if annotation is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        arg_type, choices = _scalar_type(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and bool in typing.get_args(annotation):
            group.add_argument(_flag(name), choices=["true", "false"], default=None, help=help_text)
            continue
        group.add_argument(_flag(name), type=arg_type, choices=choices, default=None, help=help_text)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {}
    for name in EngineConfig.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if value in ("true", "false"):
            value = value == "true"
        kwargs[name] = value
    return kwargs


def _constraint(args: argparse.Namespace) -> StructuredOutputsParams | None:
    schema = args.json_schema
    if schema is not None and schema.startswith("@"):
        schema = Path(schema[1:]).read_text()
    if schema is None and not args.json_object and args.regex is None and args.choice is None and args.grammar is None:
        return None
    return StructuredOutputsParams(json=schema, json_object=args.json_object, regex=args.regex, choice=args.choice,
                                   grammar=args.grammar, param="--json-schema" if schema is not None else "constraint")


def _logit_bias(pairs: list[str] | None) -> dict[int, float] | None:
    if not pairs:
        return None
    try:
        return {int(token): float(bias) for token, _, bias in (pair.partition("=") for pair in pairs)}
    except ValueError:
        raise InvalidRequestError(f"--logit-bias takes TOKEN_ID=BIAS, got {pairs}", param="logit_bias") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: the engine options state EngineConfig's own (their parser default is None, meaning
    "not given")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default: " in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="Paged-KV-cache continuous-batching LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts", formatter_class=_HelpFormatter)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several); '-' reads lines from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None,
                     help="per-request sampling seed")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", default=None)
    constraint = gen.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None,
                            help="hold the output to a JSON schema: its text, or @PATH of a file holding it")
    constraint.add_argument("--json-object", action="store_true", help="hold the output to any JSON object")
    constraint.add_argument("--regex", default=None, help="hold the output to a regular expression")
    constraint.add_argument("--choice", action="append", default=None, help="one allowed output (repeat for several)")
    constraint.add_argument("--grammar", default=None, help="hold the output to an EBNF grammar (xgrammar's syntax)")
    gen.add_argument("--logit-bias", action="append", default=None, metavar="TOKEN_ID=BIAS",
                     help="add BIAS (-100..100) to a token's logit (repeat for several)")
    gen.add_argument("--lora", default=None, metavar="NAME",
                     help="run the prompts under this LoRA adapter (one of --lora-modules; docs/lora.md)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.add_argument("--log-level", default="WARNING")
    add_engine_arguments(gen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.core.request import SamplingParams

    prompts = [line.rstrip("\n") for line in sys.stdin] if args.prompt == ["-"] else args.prompt
    if not prompts:
        prompts = ["The meaning of a module is"]
    try:
        llm = LLM(**engine_kwargs(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:  # a path that is not there, a hub id unreachable: the user's to fix, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.chat:
        tokenizer = llm.get_tokenizer()
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.sampling_seed,
            max_tokens=args.max_tokens,
            stop=args.stop,
            logit_bias=_logit_bias(args.logit_bias),
            structured_outputs=_constraint(args),
        )
        outputs = llm.generate(prompts, params, use_tqdm=False, lora=args.lora)
    except InvalidRequestError as exc:
        print(f"error: {exc.param}: {exc.message}", file=sys.stderr)
        return 2
    for output in outputs:
        for completion in output.outputs:
            if args.json:
                print(json.dumps({"prompt": output.prompt, "index": completion.index, "text": completion.text,
                                  "finish_reason": completion.finish_reason}))
            else:
                print(f"--- {output.prompt!r} [{completion.index}] ({completion.finish_reason})")
                print(output.prompt + completion.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
