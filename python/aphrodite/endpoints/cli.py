"""The ``aphrodite`` command: ``aphrodite run MODEL [flags]`` starts the OpenAI-compatible server.

Heavy imports (torch, the model) wait until a command runs, so ``aphrodite --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


def _make_parser() -> argparse.ArgumentParser:
    from aphrodite import __version__
    from aphrodite.endpoints.openai.cli_args import add_server_args

    parser = argparse.ArgumentParser(
        prog="aphrodite",
        description="Aphrodite: an inference engine for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"aphrodite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a vision-language model over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /v1/tokenize, /v1/detokenize, "
        "/health, /version, /metrics). Example: aphrodite run llava-hf/llava-1.5-7b-hf "
        "--chat-template examples/llava.jinja",
    )
    add_server_args(run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _make_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        from aphrodite.endpoints.openai.api_server import run_server_from_args

        sys.exit(run_server_from_args(args, parser))


if __name__ == "__main__":
    main()
