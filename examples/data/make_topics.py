"""Generate the `topics` task: 3-way classification of what someone *actually did*.

Each sentence names a person, one activity from the labelled topic (sports, cooking or
computing) and, in most sentences, a *distractor* activity from another topic that the person
did not do, or did only as a backdrop ("Instead of baking bread, Ana fixed a bug in the parser").
The label is the topic of the main activity. Bag-of-words cues therefore point at two topics
about equally often, and the clause that matters moves around between templates: a frozen
sentence encoder with a trained linear head stays well below a model whose attention has been
adapted (a LoRA) to read the clause structure.

Everything is deterministic (seeded ``random.Random``, no hashing of strings), so

    python examples/data/make_topics.py

rewrites ``topics_train.jsonl`` and ``topics_test.jsonl`` byte for byte. Train and test hold no
sentence in common (asserted), and no sentence repeats within a split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ("sports", "cooking", "computing")
SEED = 7
N_TRAIN = 3000
N_TEST = 600
# share of sentences with a distractor activity; the rest are plain one-topic sentences
DISTRACTOR_SHARE = 0.85

# (base form, past tense, gerund) of each activity, so templates stay grammatical
ACTIVITIES = {
    "sports": [
        ("run a half marathon", "ran a half marathon", "running a half marathon"),
        ("score a late goal", "scored a late goal", "scoring a late goal"),
        ("practice a tennis serve", "practiced a tennis serve", "practicing a tennis serve"),
        ("swim forty laps", "swam forty laps", "swimming forty laps"),
        ("coach the youth team", "coached the youth team", "coaching the youth team"),
        ("win the cycling race", "won the cycling race", "winning the cycling race"),
        ("lift heavy weights at the gym", "lifted heavy weights at the gym", "lifting heavy weights at the gym"),
        ("train for the boxing match", "trained for the boxing match", "training for the boxing match"),
        ("shoot free throws", "shot free throws", "shooting free throws"),
        ("referee the rugby final", "refereed the rugby final", "refereeing the rugby final"),
        ("climb the bouldering wall", "climbed the bouldering wall", "climbing the bouldering wall"),
        ("stretch before the sprint", "stretched before the sprint", "stretching before the sprint"),
        ("pitch nine innings", "pitched nine innings", "pitching nine innings"),
        ("row across the lake", "rowed across the lake", "rowing across the lake"),
    ],
    "cooking": [
        ("bake sourdough bread", "baked sourdough bread", "baking sourdough bread"),
        ("simmer a tomato sauce", "simmered a tomato sauce", "simmering a tomato sauce"),
        ("roast a whole chicken", "roasted a whole chicken", "roasting a whole chicken"),
        ("chop onions for the soup", "chopped onions for the soup", "chopping onions for the soup"),
        ("whisk eggs for an omelette", "whisked eggs for an omelette", "whisking eggs for an omelette"),
        ("knead dough for pizza", "kneaded dough for pizza", "kneading dough for pizza"),
        (
            "grill vegetables on the barbecue",
            "grilled vegetables on the barbecue",
            "grilling vegetables on the barbecue",
        ),
        ("season the stew with thyme", "seasoned the stew with thyme", "seasoning the stew with thyme"),
        ("fry dumplings in a wok", "fried dumplings in a wok", "frying dumplings in a wok"),
        ("decorate a chocolate cake", "decorated a chocolate cake", "decorating a chocolate cake"),
        ("marinate the tofu overnight", "marinated the tofu overnight", "marinating the tofu overnight"),
        ("peel potatoes for dinner", "peeled potatoes for dinner", "peeling potatoes for dinner"),
        ("caramelize sugar for a flan", "caramelized sugar for a flan", "caramelizing sugar for a flan"),
        ("prepare fresh pasta", "prepared fresh pasta", "preparing fresh pasta"),
    ],
    "computing": [
        ("fix a bug in the parser", "fixed a bug in the parser", "fixing a bug in the parser"),
        ("compile the kernel", "compiled the kernel", "compiling the kernel"),
        ("refactor the database layer", "refactored the database layer", "refactoring the database layer"),
        ("write unit tests for the API", "wrote unit tests for the API", "writing unit tests for the API"),
        ("debug a memory leak", "debugged a memory leak", "debugging a memory leak"),
        ("deploy the web server", "deployed the web server", "deploying the web server"),
        ("install a new operating system", "installed a new operating system", "installing a new operating system"),
        ("optimize a slow query", "optimized a slow query", "optimizing a slow query"),
        ("review a pull request", "reviewed a pull request", "reviewing a pull request"),
        ("configure the firewall", "configured the firewall", "configuring the firewall"),
        ("train a neural network", "trained a neural network", "training a neural network"),
        ("back up the laptop", "backed up the laptop", "backing up the laptop"),
        ("profile the rendering code", "profiled the rendering code", "profiling the rendering code"),
        ("port the script to Python", "ported the script to Python", "porting the script to Python"),
    ],
}

NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elif",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Mei",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
]
WHEN = [
    "this morning",
    "on Saturday",
    "last night",
    "after lunch",
    "yesterday",
    "on Monday",
    "today",
    "over the weekend",
    "before dinner",
    "late on Friday",
]

# Templates with a distractor: {main_*} is the labelled activity, {other_*} the one not done
# (or only a backdrop). The main clause comes first in some, last in others.
WITH_DISTRACTOR = [
    "Instead of {other_ger}, {name} {main_past} {when}.",
    "{name} {main_past} {when} instead of {other_ger}.",
    "{name} wanted to {other_base}, but ended up {main_ger} {when}.",
    "{name} skipped {other_ger} {when} and {main_past}.",
    "Although {name} usually loves {other_ger}, {when} {name} {main_past}.",
    "{when_cap}, {name} talked about {other_ger} while actually {main_ger}.",
    "{name} was too tired for {other_ger}, so {name} {main_past} {when}.",
    "Rather than {other_ger} {when}, {name} decided to {main_base}.",
    "{name} did not {other_base} {when}; {name} {main_past}.",
    "After reading an article about {other_ger}, {name} {main_past} {when}.",
]
PLAIN = [
    "{name} {main_past} {when}.",
    "{when_cap}, {name} spent hours {main_ger}.",
    "{name} plans to {main_base} {when}.",
    "{name} really enjoyed {main_ger} {when}.",
]


def make_sentence(rng: random.Random) -> dict:
    """One labelled sentence; the label is the topic (name) of the main activity."""
    label = rng.randrange(len(LABELS))
    main = rng.choice(ACTIVITIES[LABELS[label]])
    when = rng.choice(WHEN)
    fields = {
        "name": rng.choice(NAMES),
        "when": when,
        "when_cap": when[0].upper() + when[1:],
        "main_base": main[0],
        "main_past": main[1],
        "main_ger": main[2],
    }
    if rng.random() < DISTRACTOR_SHARE:
        other_topic = rng.choice([t for i, t in enumerate(LABELS) if i != label])
        other = rng.choice(ACTIVITIES[other_topic])
        fields.update(other_base=other[0], other_ger=other[2])
        template = rng.choice(WITH_DISTRACTOR)
    else:
        template = rng.choice(PLAIN)
    return {"text": template.format(**fields), "label": LABELS[label]}


def make_splits(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Draw unique sentences until both splits are full; the first n_test go to test."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        row = make_sentence(rng)
        if row["text"] not in seen:  # a sentence drawn twice is kept once: no train/test overlap
            seen.add(row["text"])
            rows.append(row)
    test, train = rows[:n_test], rows[n_test:]
    assert not {r["text"] for r in train} & {r["text"] for r in test}, "train and test overlap"
    return train, test


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=True) + "\n" for r in rows)


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text(to_jsonl(rows), encoding="utf-8")


def main() -> None:
    here = Path(__file__).resolve().parent
    train, test = make_splits()
    write_jsonl(train, here / "topics_train.jsonl")
    write_jsonl(test, here / "topics_test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} test sentences to {here}")


if __name__ == "__main__":
    main()
