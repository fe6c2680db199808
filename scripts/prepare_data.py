#!/usr/bin/env python
"""Tokenize local corpora into OLMo-core token files (thin CLI over olmo_miras_plugin.data).

Examples::

    # text / markdown / code files, JSON Lines and Parquet, byte tokenizer, 1% validation
    python scripts/prepare_data.py 'corpus/**/*.md' notes.jsonl shards/ -o data/mycorpus \\
        --validation-fraction 0.01

    # a local Hugging Face tokenizer directory, JSON Lines field "content"
    python scripts/prepare_data.py data.jsonl -o data/hf --tokenizer /path/to/tokenizer \\
        --text-field content

    # the offline default corpus: the Python standard library's source
    python scripts/prepare_data.py --stdlib --max-bytes 4000000 -o data/stdlib
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from olmo_miras_plugin.data import (
    BYTE_TOKENIZER,
    DEFAULT_MAX_TOKENS_PER_FILE,
    DEFAULT_STDLIB_MAX_BYTES,
    PrepareDataConfig,
    PrepareDataError,
    prepare_data,
    prepare_stdlib_data,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", help="files, directories or globs (quote globs)")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument(
        "--tokenizer",
        default=BYTE_TOKENIZER,
        help=f"'{BYTE_TOKENIZER}' or a local Hugging Face tokenizer directory",
    )
    p.add_argument("--text-field", default="text", help="JSON Lines / Parquet text field")
    p.add_argument("--validation-fraction", type=float, default=0.0, help="of documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument(
        "--max-tokens-per-file",
        type=int,
        default=DEFAULT_MAX_TOKENS_PER_FILE,
        help="shard size; files break between documents",
    )
    p.add_argument("--num-proc", type=int, default=None, help="default: auto by corpus size")
    p.add_argument(
        "--no-bos",
        action="store_true",
        help="don't prefix documents with BOS (default: the byte tokenizer does; a Hugging Face "
        "tokenizer only if it adds its own BOS, distinct from EOS)",
    )
    p.add_argument(
        "--text-ext",
        action="append",
        default=[],
        metavar="EXT",
        help="extra extension to read as plain text (repeatable), e.g. --text-ext .log",
    )
    p.add_argument(
        "--treat-unknown-as-text", action="store_true", help="read any other file as plain text"
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs of other settings")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = p.add_argument_group("stdlib corpus (instead of inputs)")
    g.add_argument("--stdlib", action="store_true", help="use the Python stdlib's *.py files")
    g.add_argument("--max-bytes", type=int, default=DEFAULT_STDLIB_MAX_BYTES, help="source bytes")
    g.add_argument("--max-files", type=int, default=None)
    g.add_argument("--include-tests", action="store_true", help="also the stdlib's test dirs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.stdlib == bool(args.inputs):
        parser.error("give either input paths or --stdlib")
    try:
        if args.stdlib:
            if args.overwrite or args.text_ext or args.treat_unknown_as_text or args.no_bos:
                parser.error(
                    "--stdlib takes none of --overwrite, --text-ext, --treat-unknown-as-text, "
                    "--no-bos"
                )
            prepared = prepare_stdlib_data(
                args.output_dir,
                max_bytes=args.max_bytes,
                max_files=args.max_files,
                include_tests=args.include_tests,
                tokenizer=args.tokenizer,
                validation_fraction=args.validation_fraction,
                seed=args.seed,
                max_tokens_per_file=args.max_tokens_per_file,
                num_proc=args.num_proc,
                show_progress=not args.no_progress,
            )
        else:
            prepared = prepare_data(
                PrepareDataConfig(
                    inputs=args.inputs,
                    output_dir=args.output_dir,
                    tokenizer=args.tokenizer,
                    text_field=args.text_field,
                    validation_fraction=args.validation_fraction,
                    seed=args.seed,
                    max_tokens_per_file=args.max_tokens_per_file,
                    num_proc=args.num_proc,
                    add_bos=False if args.no_bos else None,
                    extra_text_extensions=args.text_ext,
                    treat_unknown_as_text=args.treat_unknown_as_text,
                    overwrite=args.overwrite,
                    show_progress=not args.no_progress,
                )
            )
    except PrepareDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(prepared.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
