#!/usr/bin/env python3
"""What a model answered on the synthetic tasks, beyond right or wrong: for each task and length of
`moeforge eval --task FILE --predictions PRED`, how many answers were correct, how many copied
another needle's value (by the needle's place in the text) and how many copied none, each with
", then a list" when the output went on with more items (the format of niah_multivalue); for
niah_multivalue and vt, how many of the answer's items the output held. It shows whether a model
that fails niah_multikey retrieves at all (and always the last needle, say) or only guesses digits.

Usage: scripts/needle_outcomes.py TASKS.jsonl PREDICTIONS.jsonl
Prints one JSON object: {task: {length: {outcome: count}}}. The files must hold the same examples
in the same order (eval writes them so); a mismatch is an error naming the line."""
import json
import re
import sys

NEEDLE = re.compile(r"The special magic number for [a-z]+-[a-z]+ is (\d+)\.")


def first_line(text):
    return text.split("\n", 1)[0].strip()


def items(text):
    return {item for item in re.split(r"[, ]+", first_line(text)) if item}


def outcome(task, prompt, answer, output):
    """The outcome of one example: a label counted per task and length."""
    if task in ("niah_multivalue", "vt"):
        wanted, given = answer.split(", "), items(output)
        found = sum(1 for item in wanted if item in given)
        return f"{found} of {len(wanted)} items"
    line = first_line(output)
    if line == answer:
        return "correct"
    # A line of several items ("2382569, 23": a list, as niah_multivalue answers) is labelled by
    # its first item, so that an answer in the wrong format shows apart from a wrong value.
    first, *rest = re.split(r"[, ]+", line) if line else [""]
    then = ", then a list" if rest else ""
    if first == answer:
        return f"right value{then}"
    values = NEEDLE.findall(prompt)
    if first in values:
        return f"needle {values.index(first)} of {len(values)}{then}"
    return f"no needle{then}"


def read_jsonl(path):
    with open(path) as f:
        return [(number, json.loads(line)) for number, line in enumerate(f, 1) if line.strip()]


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: needle_outcomes.py TASKS.jsonl PREDICTIONS.jsonl")
    tasks, predictions = read_jsonl(argv[1]), read_jsonl(argv[2])
    if len(tasks) != len(predictions):
        sys.exit(f"needle_outcomes: {argv[1]} holds {len(tasks)} examples but {argv[2]} "
                 f"holds {len(predictions)}")
    counts = {}
    for (number, example), (_, prediction) in zip(tasks, predictions):
        for field in ("task", "length", "answer"):
            if example.get(field) != prediction.get(field):
                sys.exit(f"needle_outcomes: line {number}: the {field} differs between "
                         f"{argv[1]} ({example.get(field)!r}) and {argv[2]} "
                         f"({prediction.get(field)!r})")
        label = outcome(example["task"], example["prompt"], example["answer"], prediction["output"])
        per_length = counts.setdefault(example["task"], {}).setdefault(str(example["length"]), {})
        per_length[label] = per_length.get(label, 0) + 1
    print(json.dumps(counts, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv)
