"""Benchmark minbpe on TinyShakespeare: ``python -m minbpe.bench``.

Prints one table: for each vocabulary size (default 256, 512, 1024, 4096) the seconds
``RegexTokenizer.train`` takes on the 1.1 MB text, the seconds to encode it and bytes per token;
then GPT-2's tokenizer (ours) on the same text, with an empty and a full chunk cache, next to
tiktoken's time in the same run (the ids must be identical). Every time is the best of
``--repeats``, in this one process on one thread. Files come through attnbook's download cache
(offline: ATTNBOOK_DATA_MIRROR and TIKTOKEN_CACHE_DIR). Wall-clock time: other work on the
machine makes the numbers worse, never better.
"""

import argparse
import platform
import time

from .gpt2 import GPT2Tokenizer
from .regex import RegexTokenizer

TRAIN_TARGET_S = 30.0  # for vocab_size=1024
ENCODE_TARGET_RATIO = 5.0  # ours / tiktoken


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minbpe.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[256, 512, 1024, 4096])
    parser.add_argument("--pattern", default="gpt4", help="split pattern for RegexTokenizer")
    parser.add_argument(
        "--repeats", type=int, default=3, help="GPT-2 and tiktoken encode timings: best of N"
    )
    args = parser.parse_args(argv)

    import tiktoken

    from attnbook.data import corpus_path

    text = corpus_path("tinyshakespeare").read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    print(
        f"minbpe benchmark: TinyShakespeare, {n_bytes:,} bytes; Python {platform.python_version()}, one thread"
    )
    print(f"RegexTokenizer pattern: {args.pattern}")
    print()
    print(f"{'tokenizer':<22} {'train s':>8} {'encode s':>9} {'tokens':>9} {'bytes/token':>12}")

    train_1024 = None
    for vocab_size in args.vocab_sizes:
        tok, train_s = timed(lambda v=vocab_size: RegexTokenizer(args.pattern).train(text, v))
        ids, encode_s = timed(lambda t=tok: t.encode(text))
        assert tok.decode(ids) == text, f"vocab {vocab_size}: round trip failed"
        if vocab_size == 1024:
            train_1024 = train_s
        print(
            f"{'vocab ' + str(vocab_size):<22} {train_s:>8.2f} {encode_s:>9.2f} {len(ids):>9,} {n_bytes / len(ids):>12.3f}"
        )

    gpt2, load_s = timed(GPT2Tokenizer)
    ours, cold_s = timed(lambda: gpt2.encode(text))
    for _ in range(args.repeats - 1):  # an empty cache each time
        gpt2.clear_cache()
        cold_s = min(cold_s, timed(lambda: gpt2.encode(text))[1])
    warm_s = min(timed(lambda: gpt2.encode(text))[1] for _ in range(args.repeats))
    enc = tiktoken.get_encoding("gpt2")
    theirs = enc.encode(text)  # the first call also builds tiktoken's regex: not timed
    tiktoken_s = min(timed(lambda: enc.encode(text))[1] for _ in range(args.repeats))
    same = ours == theirs
    label = f"GPT-2 (load {load_s:.2f} s)"
    print(f"{label:<22} {'-':>8} {cold_s:>9.2f} {len(ours):>9,} {n_bytes / len(ours):>12.3f}")
    print()
    print("encoding the whole text with GPT-2's tokenizer")
    print(f"  minbpe GPT2Tokenizer, empty cache   {cold_s:6.3f} s   (best of {args.repeats})")
    print(f"  minbpe GPT2Tokenizer, warm cache    {warm_s:6.3f} s   (best of {args.repeats})")
    print(f"  tiktoken gpt2                       {tiktoken_s:6.3f} s   (best of {args.repeats})")
    print(
        f"  ratio, empty cache / tiktoken       {cold_s / tiktoken_s:6.2f} x   (target <= {ENCODE_TARGET_RATIO:g} x)"
    )
    print(f"  ratio, warm cache / tiktoken        {warm_s / tiktoken_s:6.2f} x")
    print(f"  identical ids: {same}")
    print()
    if train_1024 is not None:
        verdict = "meets" if train_1024 <= TRAIN_TARGET_S else "MISSES"
        print(f"train vocab 1024: {train_1024:.2f} s, {verdict} the target of {TRAIN_TARGET_S:g} s")
    verdict = "meets" if cold_s / tiktoken_s <= ENCODE_TARGET_RATIO else "MISSES"
    print(
        f"encode with GPT-2: {cold_s / tiktoken_s:.2f} x tiktoken, {verdict} the target of {ENCODE_TARGET_RATIO:g} x"
    )
    if not same:
        raise SystemExit("GPT-2 ids differ from tiktoken's")


if __name__ == "__main__":
    main()
