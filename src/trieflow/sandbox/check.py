"""Built-in answer checks, for use as a task's test command (exit 0: pass, 1: fail).

    python -m trieflow.sandbox.check count --text e --min 7 answer.txt
    python -m trieflow.sandbox.check count --digits --min 2 answer.txt
    python -m trieflow.sandbox.check length --max 60 answer.txt
    python -m trieflow.sandbox.check equals --text 42 answer.txt

They score properties a policy can make more likely by shifting token probabilities (a
character that many tokens contain, stopping early), so even a randomly initialised model
passes some of the time and can learn to pass more often. Kept free of heavy imports: the
runner starts one per episode. A missing answer file fails (the agent wrote nothing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PASS, FAIL = 0, 1


def count(answer: str, *, text: str | None, digits: bool, ignore_case: bool) -> int:
    """Occurrences of ``text`` (non-overlapping) or of decimal digits in ``answer``."""
    if digits:
        return sum(ch.isdecimal() for ch in answer)
    assert text is not None
    if ignore_case:
        answer, text = answer.casefold(), text.casefold()
    return answer.count(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trieflow.sandbox.check", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="check", required=True)
    c = sub.add_parser("count", help="the answer contains TEXT (or digits) at least MIN times")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="substring to count")
    what.add_argument("--digits", action="store_true", help="count decimal digits")
    c.add_argument("--min", type=int, default=1, dest="minimum")
    c.add_argument("--ignore-case", action="store_true")
    n = sub.add_parser("length", help="the answer's length in characters is within bounds")
    n.add_argument("--min", type=int, default=1, dest="minimum", help="default 1: not empty")
    n.add_argument("--max", type=int, required=True, dest="maximum")
    e = sub.add_parser("equals", help="the answer, stripped, equals TEXT")
    e.add_argument("--text", required=True)
    for sp in (c, n, e):
        sp.add_argument("file", type=Path, help="the agent's answer file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        answer = args.file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        print(f"FAIL: cannot read the answer: {exc}")
        return FAIL
    if args.check == "count":
        found = count(answer, text=args.text, digits=args.digits, ignore_case=args.ignore_case)
        what = "digits" if args.digits else repr(args.text)
        ok = found >= args.minimum
        print(f"{'PASS' if ok else 'FAIL'}: {found} x {what}, need at least {args.minimum}")
    elif args.check == "length":
        ok = args.minimum <= len(answer) <= args.maximum
        print(
            f"{'PASS' if ok else 'FAIL'}: {len(answer)} characters, "
            f"need {args.minimum} to {args.maximum}"
        )
    else:
        ok = answer.strip() == args.text
        print(f"{'PASS' if ok else 'FAIL'}: answer {answer.strip()[:80]!r}, want {args.text!r}")
    return PASS if ok else FAIL


if __name__ == "__main__":
    sys.exit(main())
