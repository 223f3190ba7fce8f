#!/usr/bin/env python3
"""Write an input file for kv739-driver (format: client/ffi/driver/kv739-driver.c).

The file starts with an init line, then --ops get/put lines, then a shutdown line.
Keys are drawn either uniformly or from a hot set (by default 10 % of the keys receive
90 % of the operations). Output is a pure function of the arguments, so a seed names a
workload exactly.

Examples:
  scripts/gen_input.py --base-port 5000 --count 3 --ops 10000 -o in.txt
  scripts/gen_input.py --servers 127.0.0.1:5000,127.0.0.1:5001 --dist hot --get-ratio 0.9
"""

import argparse
import random
import string
import sys

MAX_KEY_SIZE = 128
MAX_VALUE_SIZE = 2048
# Printable ASCII a kv739 value may hold, minus ',' so the driver's output stays
# unambiguous. '[' and ']' are not allowed by kv739 at all.
VALUE_ALPHABET = "".join(
    c for c in string.printable if c.isprintable() and c not in "[],"
)


def fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--servers", help="explicit init list: host:port,host:port,..."
    )
    target.add_argument(
        "--base-port", type=positive, default=5000,
        help="init servers localhost:BASE_PORT .. BASE_PORT+COUNT-1",
    )
    p.add_argument("--count", type=positive, default=3, help="servers with --base-port")
    p.add_argument("--no-init", action="store_true", help="omit the init line")
    p.add_argument("--no-shutdown", action="store_true", help="omit the shutdown line")
    p.add_argument("--ops", type=non_negative, default=1000, help="get/put lines")
    p.add_argument("--keys", type=positive, default=100, help="distinct keys")
    p.add_argument("--get-ratio", type=fraction, default=0.5, help="fraction of gets")
    p.add_argument("--dist", choices=["uniform", "hot"], default="uniform")
    p.add_argument(
        "--hot-keys", type=fraction, default=0.1,
        help="with --dist hot: fraction of the keys that are hot",
    )
    p.add_argument(
        "--hot-ops", type=fraction, default=0.9,
        help="with --dist hot: fraction of the operations that go to hot keys",
    )
    p.add_argument("--key-len", type=positive, default=16, help="bytes per key")
    p.add_argument(
        "--value-len", type=non_negative, default=64, help="bytes per value"
    )
    p.add_argument("--key-prefix", default="k", help="keys start with this")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    args = p.parse_args(argv)

    if args.key_len > MAX_KEY_SIZE:
        p.error(f"--key-len is at most {MAX_KEY_SIZE}")
    if args.value_len > MAX_VALUE_SIZE:
        p.error(f"--value-len is at most {MAX_VALUE_SIZE}")
    if any(c not in VALUE_ALPHABET for c in args.key_prefix):
        p.error("--key-prefix must be printable ASCII without '[', ']' or ','")
    longest = len(key_name(args.key_prefix, args.keys - 1, 0))
    if args.key_len < longest:
        p.error(f"--key-len must be at least {longest} for {args.keys} keys")
    if args.base_port + args.count - 1 > 65535:
        p.error("--base-port + --count - 1 exceeds 65535")
    return args


def key_name(prefix, index, length):
    """prefix + index, padded with '_' to length: '_' is not a digit, so names of one
    length are distinct for distinct indexes."""
    name = f"{prefix}{index}"
    return name + "_" * max(0, length - len(name))


def choose_key(rng, args):
    if args.dist == "uniform":
        return rng.randrange(args.keys)
    hot = max(1, round(args.keys * args.hot_keys))
    if hot >= args.keys or rng.random() < args.hot_ops:
        return rng.randrange(hot)
    return rng.randrange(hot, args.keys)


def lines(args):
    rng = random.Random(args.seed)
    if not args.no_init:
        if args.servers:
            yield f"init,{args.servers}"
        else:
            yield f"init,{args.base_port},{args.count}"
    for _ in range(args.ops):
        key = key_name(args.key_prefix, choose_key(rng, args), args.key_len)
        if rng.random() < args.get_ratio:
            yield f"get,{key}"
        else:
            value = "".join(rng.choice(VALUE_ALPHABET) for _ in range(args.value_len))
            yield f"put,{key},{value}"
    if not args.no_shutdown:
        yield "shutdown"


def main(argv):
    args = parse_args(argv)
    out = open(args.output, "w", encoding="ascii") if args.output else sys.stdout
    try:
        for line in lines(args):
            out.write(line + "\n")
    finally:
        if args.output:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
