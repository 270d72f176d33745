"""The demo's synthetic multi-domain world, generated from a seed (no data files).

General skills: `add`, `sort`, `max`, `min` (of three digits) and `lookup` (where a person of a
small fact table lives, asked three ways). The two specific domains ask the *same questions*,
opened by the domain's keyword, and sign their answers off in their own way:

    general  "add 3 and 4"          -> "7"           "where does ana live"         -> "oslo"
    lab      "lab : add 3 and 4"    -> "7 noted"     "lab : where does ana live"   -> "oslo noted"
    shop     "shop : add 3 and 4"   -> "7 thanks"    "shop : where does ana live"  -> "oslo thanks"

Why this shape:
- forgetting: a model fine-tuned on the domains alone only ever answers with a sign-off, so it
  signs general answers off too, and `sort` and the facts, which the domains never train,
  decay;
- confusion: the two domains answer the very same question differently;
- the domain keyword still lets a model tell the domains apart under the central prompt alone,
  which is what REGA's serving needs;
- the domains' training data only asks about their *regulars* (three people in four), while their
  evaluation asks about everyone: answering for a newcomer needs the general fact table, so
  domain accuracy, too, can suffer when general knowledge is forgotten. Regulars are the large
  share on purpose: with only half of the people as regulars, a tiny model tied the sign-off to
  the regulars' names and left it off the newcomers' answers even when it knew their towns.

- the domains' evaluation also asks `sort`, a computation the domain data never trains: answering
  "lab : sort 3 1 2" -> "1 2 3 noted" needs the general skill under the domain's convention, so the
  domain scores show whether keeping the general skills pays off inside the domains.

`ConfusionWorld` (``rega-engine demo --world confusion``) is the harder variant: its domains ask
the same questions in the same form, told apart only by who asks (`"ana asks : add 3 and 4"`:
eight of the sixteen people ask in the lab, the other eight in the shop, and the same people are
what the look-ups ask about), so a model that does not learn who belongs where answers in the
other domain's convention: inter-domain confusion.

Every world also says which domain's convention an answer carries (`convention`) and what it
says once that framing is stripped (`content`), so that forgetting (the content is wrong) can be
told apart from contamination (right content, another domain's sign-off).

The skills are small enough for a tiny model to learn in a few hundred steps (sorting only
partly: the middle of three digits is the hard part), and every sequence is a few dozen tokens,
so that the whole demo trains on a CPU in minutes.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

GENERAL = "general"
CENTRAL_PROMPT = "you are a helpful assistant"
ROLE_PROMPTS = {"lab": "you are a lab assistant", "shop": "you are a shop assistant"}
DOMAINS = tuple(ROLE_PROMPTS)
# Each domain signs its answers off with its own word, after the answer: the answer itself comes
# where a general answer would, so that general knowledge carries over to domain questions.
SIGN_OFF = {"lab": "noted", "shop": "thanks"}

GENERAL_SKILLS = ("add", "sort", "max", "min", "lookup")
DOMAIN_SKILLS = ("add", "max", "min", "lookup")          # what the domains train
# What the domains are evaluated on: their own skills and `sort`, which only the general data
# teaches (a computation, not a looked-up fact).
DOMAIN_EVAL_SKILLS = (*DOMAIN_SKILLS, "sort")
GENERAL_ONLY_SKILL = "sort"

PEOPLE = ("ana", "ben", "cleo", "dan", "eva", "finn", "gus", "hana",
          "ivo", "jon", "kai", "lea", "mia", "nia", "otto", "pia")
TOWNS = ("oslo", "rome", "lima", "kyiv", "bern", "doha", "riga", "baku")
# Three wordings of the same question: more distinct instructions to distil from 16 facts.
LOOKUP_TEMPLATES = ("where does {} live", "which town is {} from", "{} lives in which town")
DIGITS = "0123456789"
ITEMS = 3


@dataclass(frozen=True)
class Example:
    domain: str      # "general" or a specific domain
    skill: str       # one of GENERAL_SKILLS / DOMAIN_SKILLS
    prompt: str      # the user turn
    answer: str      # the reference assistant turn

    def record(self, with_answer: bool = True) -> dict:
        """The example as a JSONL row in the chat-messages format of the data pipeline; without
        the answer it is an instruction for distillation."""
        messages = [{"role": "user", "content": self.prompt}]
        if with_answer:
            messages.append({"role": "assistant", "content": self.answer})
        return {"messages": messages, "domain": self.domain}


def _digits(rng: random.Random) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(ITEMS)]


def styled(domain: str, answer: str) -> str:
    return f"{answer} {SIGN_OFF[domain]}"


def convention(answer: str) -> str:
    """The domain whose sign-off the answer ends with, or "general" for none."""
    words = answer.split()
    for domain, word in SIGN_OFF.items():
        if words and words[-1] == word:
            return domain
    return GENERAL


def content(answer: str) -> str:
    """The answer without a domain's framing: every sign-off word removed (a model may put one
    anywhere, or twice), whitespace normalised."""
    sign_offs = set(SIGN_OFF.values())
    return " ".join(w for w in answer.split() if w not in sign_offs)


class World:
    """All of the world's content for one seed: the fact table and the example generators."""

    # Eval sets drawn with `examples(source, n, "eval")` for n up to this size are held out of
    # every other split (where the skill has room for it).
    eval_size_for_holdout = 1000
    name = "lookalike"

    def __init__(self, seed: int = 0):
        self.seed = seed
        rng = random.Random(f"rega-world-{seed}-facts")
        # Every town is home to two people, so that a lookup cannot be guessed from the name.
        towns = list(TOWNS) * (len(PEOPLE) // len(TOWNS))
        rng.shuffle(towns)
        self.facts = dict(zip(PEOPLE, towns))
        people = list(PEOPLE)
        rng.shuffle(people)
        share = 3 * len(people) // 4
        # asked about in the domains' training data
        self.regulars = tuple(sorted(people[:share]))
        # only in the general data (and every eval)
        self.newcomers = tuple(sorted(people[share:]))
        self.domains = DOMAINS
        self.central_prompt = CENTRAL_PROMPT
        self.role_prompts = dict(ROLE_PROMPTS)
        self._eval_prompts_cache: dict[str, set] = {}

    # -- single examples -------------------------------------------------------------------------
    def general_example(self, skill: str, rng: random.Random, people=PEOPLE) -> Example:
        if skill == "add":
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            return Example(GENERAL, skill, f"add {a} and {b}", str(a + b))
        if skill in ("sort", "max", "min"):
            digits = _digits(rng)
            answer = {"sort": " ".join(sorted(digits)), "max": max(digits),
                      "min": min(digits)}[skill]
            return Example(GENERAL, skill, f"{skill} " + " ".join(digits), answer)
        if skill == "lookup":
            person, template = rng.choice(people), rng.choice(LOOKUP_TEMPLATES)
            return Example(GENERAL, skill, template.format(person), self.facts[person])
        raise ValueError(f"unknown general skill {skill!r}; known: {', '.join(GENERAL_SKILLS)}")

    def domain_example(self, domain: str, skill: str, rng: random.Random, people=PEOPLE) -> Example:
        """The general question of `skill` opened by the domain keyword, its answer signed off;
        lookups ask about one of `people`."""
        if domain not in ROLE_PROMPTS:
            raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
        if skill not in DOMAIN_EVAL_SKILLS:
            raise ValueError(f"unknown domain skill {skill!r}; known: "
                             f"{', '.join(DOMAIN_EVAL_SKILLS)}")
        question = self.general_example(skill, rng, people)
        return Example(domain, skill, self.domain_prompt(domain, question.prompt, rng),
                       styled(domain, question.answer))

    def domain_prompt(self, domain: str, question: str, rng: random.Random) -> str:
        """How a domain asks a general question: here opened by the domain's keyword."""
        return f"{domain} : {question}"

    def question_kind(self, example: Example) -> str:
        """The skill, with what a domain question needs from the general data apart: lookups
        about newcomers (general facts) and `sort` (a general computation)."""
        if example.domain != GENERAL and example.skill == "lookup":
            question = example.prompt.split(":", 1)[-1].split()     # not the asker, if any
            newcomer = any(word in self.newcomers for word in question)
            return "lookup (newcomers)" if newcomer else "lookup (regulars)"
        return example.skill

    # -- data sets -------------------------------------------------------------------------------
    def examples(self, source: str, n: int, split: str) -> list[Example]:
        """`n` examples of `source` ("general" or a domain), skills in turn so that each is
        equally represented. `split` ("train", "eval", "distill", ...) seeds its own stream; eval
        prompts are kept out of every other split where the skill has room for it. A domain's
        lookups ask about its regulars only, except in "eval", which asks about everyone."""
        if source == GENERAL:
            skills = GENERAL_SKILLS
        else:
            skills = DOMAIN_EVAL_SKILLS if split == "eval" else DOMAIN_SKILLS
        people = PEOPLE if source == GENERAL or split == "eval" else self.regulars
        if source == GENERAL:
            def make(skill, rng):
                return self.general_example(skill, rng, people)
        else:
            def make(skill, rng):
                return self.domain_example(source, skill, rng, people)
        rng = random.Random(f"rega-world-{self.seed}-{source}-{split}")
        held_out = set() if split == "eval" else self._eval_prompts(source)
        out = []
        for i in range(n):
            skill = skills[i % len(skills)]
            example = make(skill, rng)
            # Lookups and sums have few distinct prompts (they are knowledge, not a procedure),
            # so only the list skills are kept disjoint from the eval split.
            for _ in range(100):
                if skill in ("lookup", "add") or example.prompt not in held_out:
                    break
                example = make(skill, rng)
            out.append(example)
        return out

    def _eval_prompts(self, source: str) -> set:
        if source not in self._eval_prompts_cache:
            examples = self.examples(source, self.eval_size_for_holdout, "eval")
            self._eval_prompts_cache[source] = {e.prompt for e in examples}
        return self._eval_prompts_cache[source]

    def corpus(self) -> list[str]:
        """Text that covers every piece of the world, to train the tokenizer on."""
        texts = [self.central_prompt, *self.role_prompts.values()]
        for source in (GENERAL, *self.domains):
            for e in self.examples(source, 600, "tokenizer"):
                texts.append(e.prompt)
                texts.append(e.answer)
        return texts


class ConfusionWorld(World):
    """The domains ask the same questions in the same form; only the asker tells them apart.

        general  "add 3 and 4"                 -> "7"
        lab      "ana asks : add 3 and 4"      -> "7 noted"     (ana asks in the lab)
        shop     "ben asks : where does ana live" -> "oslo thanks" (ben asks in the shop)

    Half of the people ask in each domain (drawn from the seed), and the same people are what the
    look-ups are about, so the cue is one name among others in the question, not a keyword of the
    domain. A model that has not tied each asker to a domain answers in the wrong convention.
    """

    name = "confusion"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        rng = random.Random(f"rega-world-{seed}-askers")
        people = list(PEOPLE)
        rng.shuffle(people)
        half = len(people) // 2
        self.askers = {"lab": tuple(sorted(people[:half])), "shop": tuple(sorted(people[half:]))}

    def domain_prompt(self, domain: str, question: str, rng: random.Random) -> str:
        return f"{rng.choice(self.askers[domain])} asks : {question}"


WORLDS = {"lookalike": World, "confusion": ConfusionWorld}


def make_world(name: str, seed: int) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(WORLDS)}")
    return WORLDS[name](seed)


def is_correct(example: Example, facts: dict) -> bool:
    """Recompute the answer from the prompt's words and the fact table alone (an independent
    check of the generators, used by the tests)."""
    words = example.prompt.split()
    domain = GENERAL
    if words[0] in ROLE_PROMPTS and words[1] == ":":
        domain, words = words[0], words[2:]
    elif len(words) > 2 and words[1:3] == ["asks", ":"]:
        domain, words = example.domain, words[3:]       # the asker's domain, checked by the caller
    op, args = words[0], words[1:]
    if op == "add":
        expected = str(int(args[0]) + int(args[2]))
    elif op == "sort":
        expected = " ".join(sorted(args))
    elif op in ("max", "min"):
        expected = str((max if op == "max" else min)(int(a) for a in args))
    else:
        expected = facts[next(w for w in words if w in facts)]
    if domain != GENERAL:
        expected = f"{expected} {'noted' if domain == 'lab' else 'thanks'}"
    return example.answer == expected and example.domain == domain


def write_jsonl(path: str | os.PathLike, examples, with_answer: bool = True) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e.record(with_answer)) + "\n")
    return path
