"""Rebuild data/home_assistant/ from the home-assistant-intents package (run once, outside the project's venv).

    python -m venv /tmp/ha && /tmp/ha/bin/pip install hassil==3.13.0 home-assistant-intents==2026.11.25
    /tmp/ha/bin/python data/home_assistant/build.py

The package ships the English sentence *templates* of Home Assistant's voice assistant (home_assistant_intents/
data/en.json: 42 intents, alternatives ``(a|b)``, optionals ``[a]``, rules ``<rule>``, slot lists ``{area}``).
hassil (the package's own parser) parses each template; this script draws sentences from it by a seeded random
walk (one alternative, one slot value, one permutation order at a time), so every template of an intent is drawn
from, not only the first expansions. Slot values the package leaves to the user's home (areas, device names,
floors, wildcards such as shopping items) come from the small lists below. See SOURCE.md for the splits and the
out-of-scope construction.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import home_assistant_intents
from hassil.expression import Alternative, ListReference, Permutation, RuleReference, Sequence, TextChunk
from hassil.intents import Intents, RangeSlotList, TextSlotList, WildcardSlotList

OUT = Path(__file__).resolve().parent
SEED = 0
PER_INTENT = {"train": 40, "test": 12}
POOL_PER_INTENT = 6

AREAS = ["kitchen", "living room", "bedroom", "bathroom", "garage", "office", "hallway", "dining room", "basement",
         "kids room", "guest room", "laundry room"]
NAMES = ["ceiling light", "desk lamp", "tv", "front door", "porch light", "speaker", "garage door", "kitchen blinds",
         "coffee maker", "bedside lamp", "sound bar", "patio lights"]
FLOORS = ["first floor", "second floor", "upstairs", "downstairs", "ground floor", "attic"]
WILDCARDS = {
    "shopping_list_item": ["milk", "eggs", "bread", "coffee beans", "dish soap", "bananas", "paper towels"],
    "todo_list_item": ["call the plumber", "pay rent", "water the plants", "book a dentist appointment"],
    "search_query": ["jazz", "the beatles", "taylor swift", "relaxing piano", "the news", "abbey road"],
    "message": ["dinner is ready", "time to leave", "the movie starts in five minutes"],
    "timer_name": ["pizza", "tea", "laundry", "pasta"],
    "timer_command": ["turn off the lights", "open the blinds"],
    "zone": ["home", "work", "school"],
}
EXTRA_LISTS = {"area": AREAS, "name": NAMES, "floor": FLOORS}
#: device names for a template that requires a device domain (``requires_context.domain``)
NAMES_BY_DOMAIN = {
    "light": ["ceiling light", "desk lamp", "porch light", "bedside lamp", "patio lights"],
    "media_player": ["tv", "speaker", "sound bar", "kitchen radio"],
    "cover": ["garage door", "kitchen blinds", "bedroom curtains", "skylight"],
    "fan": ["ceiling fan", "desk fan"], "lock": ["front door", "back door"], "climate": ["thermostat"],
    "vacuum": ["robot vacuum", "roomba"], "lawn_mower": ["lawn mower", "mower"],
    "switch": ["coffee maker", "christmas lights"], "todo": ["shopping", "chores"],
}

# In scope: what the example deployment handles. Out of scope: intents of devices it does not have. Those in
# OOS_TRAIN appear in train as "out_of_scope"; those in OOS_TEST_ONLY appear only in test, so the test's
# out-of-scope slice holds requests of a kind the student never saw.
OOS_TRAIN = ["HassLawnMowerDock", "HassLawnMowerStartMowing", "HassVacuumStart", "HassVacuumReturnToBase",
             "HassVacuumCleanArea"]
OOS_TEST_ONLY = ["HassClimateGetTemperature", "HassClimateSetTemperature", "HassClimateSetFanMode",
                 "HassGetWeather"]
DROP = ["HassBroadcast"]  # a single wildcard-only template: nothing but the filler list would vary


def names_for(data: object) -> list[str]:
    context = getattr(data, "requires_context", None) or {}
    domains = context.get("domain") or []
    domains = [domains] if isinstance(domains, str) else list(domains)
    picked = [n for d in domains for n in NAMES_BY_DOMAIN.get(d, [])]
    return picked or NAMES


def walk(expr: object, rules: dict, lists: dict, rng: random.Random) -> str:
    if isinstance(expr, TextChunk):
        return expr.original_text
    if isinstance(expr, Alternative):
        return walk(rng.choice(expr.items), rules, lists, rng)
    if isinstance(expr, Permutation):
        items = list(expr.items)
        rng.shuffle(items)
        return " ".join(walk(i, rules, lists, rng) for i in items)
    if isinstance(expr, Sequence):
        return "".join(walk(i, rules, lists, rng) for i in expr.items)
    if isinstance(expr, RuleReference):
        return walk(rules[expr.rule_name].expression, rules, lists, rng)
    if isinstance(expr, ListReference):
        name = expr.list_name
        if name in EXTRA_LISTS:
            return rng.choice(EXTRA_LISTS[name])
        slot = lists[name]
        if isinstance(slot, TextSlotList):
            value = rng.choice(slot.values)
            text = value.text_in
            return text if isinstance(text, str) else walk(text, rules, lists, rng)
        if isinstance(slot, RangeSlotList):
            return str(rng.choice(list(slot.get_numbers())))
        if isinstance(slot, WildcardSlotList):
            return rng.choice(WILDCARDS[name])
        raise ValueError(f"unexpected slot list {name}: {slot!r}")
    raise ValueError(f"unexpected expression {expr!r}")


def tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def main() -> None:
    path = Path(home_assistant_intents.__file__).parent / "data" / "en.json"
    intents = Intents.from_dict(json.loads(path.read_text()))
    rng = random.Random(SEED)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    labels: list[str] = []
    for name in sorted(intents.intents):
        if name in DROP:
            continue
        intent = intents.intents[name]
        templates = [(data, s) for data in intent.data for s in data.sentences]
        drawn: list[str] = []
        seen: set[str] = set()
        want = PER_INTENT["train"] + PER_INTENT["test"]
        for _ in range(want * 30):
            data, sentence = rng.choice(templates)
            rules = {**intents.expansion_rules, **(data.expansion_rules or {})}
            lists = {**intents.slot_lists, **(data.slot_lists or {})}
            EXTRA_LISTS["name"] = names_for(data)
            text = tidy(walk(sentence.expression, rules, lists, rng))
            if text and text not in seen:
                seen.add(text)
                drawn.append(text)
            if len(drawn) == want:
                break
        label = "out_of_scope" if name in OOS_TRAIN + OOS_TEST_ONLY else name
        if label not in labels:
            labels.append(label)
        n_test = min(PER_INTENT["test"], len(drawn) // 4)
        test, train = drawn[:n_test], drawn[n_test:]
        if name in OOS_TEST_ONLY:
            test, train = drawn[: PER_INTENT["test"] // 2], []
        elif name in OOS_TRAIN:
            train, test = train[: PER_INTENT["train"] // 2], test[: PER_INTENT["test"] // 4]
        for split, texts in (("train", train), ("test", test)):
            rows[split] += [{"text": t, "label": label, "source_intent": name} for t in texts]
    for split, items in rows.items():
        random.Random(SEED).shuffle(items)
        with (OUT / f"{split}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label", "source_intent"])
            writer.writeheader()
            writer.writerows(items)
    # the example pool of a retrieval teacher: more sentences per intent, drawn afterwards with another seed (so
    # train/test stay as they are) and kept only when they are in neither split; no test-only out-of-scope intent
    # is in it, so the test's unseen out-of-scope requests stay unseen
    taken = {r["text"] for items in rows.values() for r in items}
    pool: list[dict[str, str]] = []
    pool_rng = random.Random(SEED + 1)
    for name in sorted(intents.intents):
        if name in DROP or name in OOS_TEST_ONLY:
            continue
        intent = intents.intents[name]
        templates = [(data, s) for data in intent.data for s in data.sentences]
        picked: list[str] = []
        for _ in range(POOL_PER_INTENT * 30):
            data, sentence = pool_rng.choice(templates)
            rules = {**intents.expansion_rules, **(data.expansion_rules or {})}
            lists = {**intents.slot_lists, **(data.slot_lists or {})}
            EXTRA_LISTS["name"] = names_for(data)
            text = tidy(walk(sentence.expression, rules, lists, pool_rng))
            if text and text not in taken:
                taken.add(text)
                picked.append(text)
            if len(picked) == POOL_PER_INTENT:
                break
        label = "out_of_scope" if name in OOS_TRAIN else name
        pool += [{"text": t, "label": label, "source_intent": name} for t in picked]
    rows["pool"] = pool
    with (OUT / "pool.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label", "source_intent"])
        writer.writeheader()
        writer.writerows(pool)
    (OUT / "intents.json").write_text(json.dumps(sorted(labels), indent=1) + "\n")
    for split, items in rows.items():
        print(split, len(items))
    print("labels", len(labels))


if __name__ == "__main__":
    main()
