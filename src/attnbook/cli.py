"""The ``attnbook`` command: ``prepare``, ``train``, ``generate``, ``compare``, ``bench``.

    attnbook prepare --data tinyshakespeare --encoding char
    attnbook train --max_iters 2000 --attention gqa --n_kv_head 2 --run_name gqa-2
    attnbook train --n_layer 6 --layer_attention local,local,local,local,local,mha --window 16
    attnbook generate --out_dir runs/default --prompt "ROMEO:" --max_new_tokens 200
    attnbook compare --quick
    attnbook bench attention

``attnbook train`` alone trains the small character-level model of nanoGPT's CPU example on
TinyShakespeare into ``runs/default`` (and resumes there if it was interrupted). Each subcommand
has ``--help``. This file only parses arguments: the work is in ``data``, ``train``, ``model``,
``compare`` and ``bench``. Chapters 17 and 18 use it.
"""

import argparse
import sys

import torch

from . import bench, compare, train
from .clean import CleanReport
from .data import Encoding, TokenData, prepare


def cmd_prepare(args) -> None:
    folder = prepare(args.data, args.encoding, out_dir=args.out_dir,
                     val_fraction=args.val_fraction, clean=args.clean)  # fmt: skip
    data = TokenData(folder)
    meta = data.meta
    print(f"prepared {args.data} with encoding {args.encoding!r} in {folder}")
    if args.clean:
        print(f"cleaned: {CleanReport(**meta['cleaning'])}")
    print(f"vocab_size {meta['vocab_size']}, {meta['dtype']}, train {meta['n_train']:,} tokens, "
          f"val {meta['n_val']:,} tokens")  # fmt: skip


def _cache_reaches(model, n_positions: int) -> bool:
    """Whether cached decoding can reach ``n_positions``: within ``block_size`` always, past it
    when the model streams (bounded caches, no position table); otherwise ``generate``
    recomputes on the last ``block_size`` tokens."""
    if n_positions <= model.config.block_size:
        return True
    try:
        model.check_streaming(n_positions)
    except ValueError:
        return False
    return True


def cmd_generate(args) -> None:
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise SystemExit(
            f"--num_samples must be >= 1 and --max_new_tokens >= 0, got {args.num_samples} and "
            f"{args.max_new_tokens}"
        )
    model, cfg, meta = train.load_trained(args.out_dir, best=args.best)
    if not isinstance(meta, dict) or "encoding" not in meta:
        raise SystemExit(
            f"{args.out_dir} was trained on data without a text encoding to decode with (its "
            f"data: {meta}); generate samples runs trained on a corpus (attnbook train)"
        )
    encoding = Encoding.from_dict(meta["encoding"])
    ids = encoding.encode(args.prompt) if args.prompt else [0]
    idx = torch.tensor([ids] * args.num_samples)  # (num_samples, T)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(
        idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, use_cache=_cache_reaches(model, len(ids) + args.max_new_tokens),
        generator=gen,
    )  # fmt: skip
    for i, row in enumerate(out.tolist()):
        if i:
            print("-" * 40)
        print(encoding.decode(row if args.prompt else row[1:]))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="attnbook", description="Prepare data, train a GPT, sample from it, benchmark."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="encode a corpus once into train.bin / val.bin")
    p.add_argument("--data", default="tinyshakespeare", help="corpus name or UTF-8 text file")
    p.add_argument("--encoding", default="char", help="char, gpt2, minbpe-gpt2, minbpe:<vocab>")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--clean", action="store_true", help="clean the text first (attnbook.clean)")
    p.add_argument("--out_dir", default=None, help="default: the download cache's prepared/")

    sub.add_parser("train", help="train a GPT (every TrainConfig/GPTConfig field is a flag)",
                   add_help=False)  # fmt: skip

    g = sub.add_parser("generate", help="sample from a trained run's checkpoint")
    g.add_argument("--out_dir", default="runs/default", help="the training run's folder")
    g.add_argument("--prompt", default="", help="text to continue (default: from scratch)")
    g.add_argument("--max_new_tokens", type=int, default=500)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top_k", type=int, default=200)
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--num_samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--best", action="store_true", help="the best checkpoint, not the newest")

    sub.add_parser("compare", help="train every attention variant alike and compare them",
                   add_help=False)  # fmt: skip

    sub.add_parser("bench", help="speed and memory benchmarks (attention, train, baby, generate)",
                   add_help=False)  # fmt: skip

    if argv[:1] == ["train"]:  # the trainer parses its own flags
        train.main(argv[1:])
        return
    if argv[:1] == ["compare"]:
        compare.main(argv[1:])
        return
    if argv[:1] == ["bench"]:
        bench.main(argv[1:])
        return
    args = parser.parse_args(argv)
    command = cmd_prepare if args.command == "prepare" else cmd_generate
    try:
        command(args)
    except ValueError as err:  # the operator's to fix: one line, no traceback
        raise SystemExit(f"attnbook {args.command}: error: {err}") from None


if __name__ == "__main__":
    main()
