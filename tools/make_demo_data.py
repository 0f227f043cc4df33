"""Generate the bundled demo dataset: free-text order records -> strict JSON.

This is the kind of narrow format task supervised fine-tuning is good at: the
model has to pull six facts out of a sentence whose wording, fact order and
surface formats vary, normalize them (plural -> singular item, "three" -> 3,
"12 March 2024" -> "2024-03-12", "$1,234.50" -> 1234.5) and emit them as JSON
with a fixed key order.  Each line of the output files is::

    {"prompt": "Extract the order as JSON ...\\n<record>", "completion": "{...}"}

The generator uses only the standard library and a single
``random.Random(seed)``, and never iterates over sets or dicts whose order
depends on hashing, so rerunning it with the same arguments reproduces the
files byte for byte.

Usage::

    python tools/make_demo_data.py --out-dir configs/demo_data \\
        --n-train 2000 --n-eval 200 --seed 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random

INSTRUCTION = "Extract the order as JSON with keys name, item, color, quantity, date, total."

# Completion keys, in the order they are always emitted.
KEYS = ("name", "item", "color", "quantity", "date", "total")

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Chen", "Olivia", "Mateo", "Priya", "Liam",
    "Fatima", "Noah", "Sofia", "Kenji", "Emma", "Diego", "Hannah", "Omar",
    "Grace", "Lucas", "Ingrid", "Tariq", "Chloe", "Ravi", "Elena", "Samuel",
    "Yuki", "Daniel", "Amara", "Felix", "Nora", "Pablo", "Leila", "Victor",
    "Zoe", "Andre", "Mei", "Oscar",
]

LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Wang", "Brown", "Garcia", "Patel", "Murphy",
    "Hassan", "Johnson", "Rossi", "Tanaka", "Muller", "Silva", "Cohen",
    "Nguyen", "Okafor", "Novak", "Larsen", "Kowalski", "Dubois", "Singh",
    "Ivanova", "Walker", "Sato", "Fischer", "Mensah", "Costa", "Berg",
    "Romero", "Ahmed", "Keller", "Reyes", "Lindqvist", "Moreau", "Park",
]

# (singular, plural): explicit plurals because several are irregular and the
# model must learn to map the plural surface form back to the singular key.
ITEMS = [
    ("mug", "mugs"), ("notebook", "notebooks"), ("lamp", "lamps"),
    ("backpack", "backpacks"), ("scarf", "scarves"), ("knife", "knives"),
    ("box", "boxes"), ("glass", "glasses"), ("candle", "candles"),
    ("umbrella", "umbrellas"), ("pillow", "pillows"), ("towel", "towels"),
    ("chair", "chairs"), ("bottle", "bottles"), ("headphone case", "headphone cases"),
    ("water bottle", "water bottles"), ("jacket", "jackets"), ("hat", "hats"),
    ("sock", "socks"), ("brush", "brushes"), ("watch", "watches"),
    ("pencil", "pencils"), ("plate", "plates"), ("bowl", "bowls"),
    ("teapot", "teapots"), ("blanket", "blankets"), ("wallet", "wallets"),
    ("keyboard", "keyboards"), ("phone case", "phone cases"), ("vase", "vases"),
    ("shelf", "shelves"), ("dress", "dresses"), ("rug", "rugs"),
    ("clock", "clocks"), ("tote bag", "tote bags"), ("sweater", "sweaters"),
]

COLORS = [
    "blue", "red", "green", "black", "white", "yellow", "orange", "purple",
    "pink", "gray", "brown", "teal", "navy", "beige", "maroon", "olive",
    "silver", "gold", "ivory", "coral", "turquoise", "lavender", "crimson",
    "mint", "charcoal", "amber", "indigo", "magenta", "cream", "khaki",
]

MONTHS = [
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
]

# Spelled out here rather than via strftime("%A"), which follows the locale.
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve",
]

# Sentence templates.  Placeholders:
#   {name}   customer name            {date}  date in a random surface format
#   {total}  total in a random format {goods} e.g. "3 blue mugs" / "a red lamp"
#   {goods_in}  e.g. "3 mugs in blue" {item}/{color}/{n}  bare fields for the
#   "form-like" templates, where n is always a digit.
# The facts appear in many different orders so position is no shortcut.
TEMPLATES = [
    "{name} ordered {goods} on {date}, paying {total} in total.",
    "On {date}, {name} bought {goods} for {total}.",
    "Order from {name}: {n} x {item} ({color}), placed {date}, total {total}.",
    "{date} - {name} purchased {goods}. Amount charged: {total}.",
    "Customer: {name}. Item: {color} {item}. Qty: {n}. Date: {date}. Total: {total}.",
    "{total} was paid by {name} on {date} for {goods}.",
    "We shipped {goods} to {name}; the order was placed on {date} and came to {total}.",
    "{name} placed an order on {date}: {goods_in}, {total} total.",
    "Invoice for {name} ({date}): {goods}, grand total {total}.",
    "Got an order for {goods} from {name} on {date}. They paid {total}.",
    "{name} | {goods} | {total} | {date}",
    "Received {total} from {name} for {goods}, ordered {date}.",
    "For {total}, {goods_in} went to {name} (order date {date}).",
    "Date: {date}\nBuyer: {name}\nProduct: {item}, {color}\nQuantity: {n}\nPaid: {total}",
]


def _ordinal(day: int) -> str:
    """Return "1st", "2nd", "3rd", "4th", ..., "11th", "12th", "13th", "21st"."""
    if 11 <= day % 100 <= 13:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def format_date(rng: random.Random, d: datetime.date) -> str:
    """Render ``d`` in one of several human formats, always including the year.

    The year is always present so the ISO date in the completion is fully
    determined by the prompt (no guessing for the model to learn).
    """
    month = MONTHS[d.month - 1]
    weekday = WEEKDAYS[d.weekday()]
    fmt = rng.randrange(8)
    if fmt == 0:
        return f"{month} {d.day}, {d.year}"
    if fmt == 1:
        return f"{d.day} {month} {d.year}"
    if fmt == 2:
        return d.isoformat()
    if fmt == 3:
        return f"{month} {_ordinal(d.day)}, {d.year}"
    if fmt == 4:
        return f"{month[:3]} {d.day}, {d.year}"
    if fmt == 5:
        return f"the {_ordinal(d.day)} of {month}, {d.year}"
    if fmt == 6:
        return f"{weekday}, {month} {d.day}, {d.year}"
    return f"{d.day} {month[:3]} {d.year}"


def format_total(rng: random.Random, cents: int) -> str:
    """Render an amount in cents as "$27.50", "27.50 USD", "$1,234.56", ..."""
    dollars, rest = divmod(cents, 100)
    grouped = f"{dollars:,}" if rng.random() < 0.5 else str(dollars)
    if rest == 0 and rng.random() < 0.5:
        amount = grouped  # "$30" as well as "$30.00"
    else:
        amount = f"{grouped}.{rest:02d}"
    fmt = rng.randrange(4)
    if fmt == 0:
        return f"${amount}"
    if fmt == 1:
        return f"{amount} USD"
    if fmt == 2:
        return f"{amount} dollars"
    return f"USD {amount}"


def _count_word(rng: random.Random, n: int, next_word: str) -> str:
    """Spell quantity ``n`` as a digit, a number word, or an article for 1."""
    if n == 1 and rng.random() < 0.5:
        return "an" if next_word[0] in "aeiou" else "a"
    if n < len(NUMBER_WORDS) and rng.random() < 0.4:
        return NUMBER_WORDS[n]
    return str(n)


def make_record(rng: random.Random) -> tuple[str, str]:
    """Draw one random order and return ``(prompt, completion)``."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    item, plural = rng.choice(ITEMS)
    color = rng.choice(COLORS)
    # Mostly small quantities (like real orders), occasionally larger ones.
    n = rng.randint(1, 12) if rng.random() < 0.85 else rng.randint(13, 60)
    d = datetime.date(2022, 1, 1) + datetime.timedelta(days=rng.randrange(4 * 365))
    unit_cents = rng.randint(150, 9000)
    if rng.random() < 0.3:
        unit_cents -= unit_cents % 100  # whole-dollar prices exercise "$30" / 30.0
    cents = n * unit_cents

    noun = item if n == 1 else plural
    goods = f"{_count_word(rng, n, color)} {color} {noun}"
    goods_in = f"{_count_word(rng, n, noun)} {noun} in {color}"
    text = rng.choice(TEMPLATES).format(
        name=name,
        date=format_date(rng, d),
        total=format_total(rng, cents),
        goods=goods,
        goods_in=goods_in,
        item=item,
        color=color,
        n=n,
    )
    # A sentence-initial lowercase word ("the 3rd of May", "a red lamp") reads
    # oddly; capitalize the first character only (keeps "$" / digits as-is).
    text = text[0].upper() + text[1:]

    # cents / 100 is correctly rounded, so repr/json gives e.g. 27.5, 1234.56.
    values = (name, item, color, n, d.isoformat(), cents / 100)
    completion = json.dumps(dict(zip(KEYS, values)))
    return f"{INSTRUCTION}\n{text}", completion


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return ``(train, eval)`` lists of ``{"prompt", "completion"}`` dicts.

    Prompts are unique across both splits: train is filled first, then eval
    draws from the same stream, skipping any prompt already used, so eval never
    shares a prompt with train.
    """
    rng = random.Random(seed)
    seen: set[str] = set()  # membership only; never iterated (hash order varies)
    splits: list[list[dict]] = []
    for size in (n_train, n_eval):
        rows: list[dict] = []
        while len(rows) < size:
            prompt, completion = make_record(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
        splits.append(rows)
    return splits[0], splits[1]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write rows as JSON lines with "\\n" endings regardless of platform."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: write ``train.jsonl`` and ``eval.jsonl`` to ``--out-dir``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="configs/demo_data")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train, eval_ = generate(args.n_train, args.n_eval, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "eval.jsonl"), eval_)
    print(f"wrote {len(train)} train / {len(eval_)} eval records to {args.out_dir}")


if __name__ == "__main__":
    main()
