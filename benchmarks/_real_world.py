"""The questions of the real-model experiment (benchmarks/real_model_rega.py), in plain English.

General skills: capitals, opposites, plurals and languages, asked in two or three wordings each.
A general question counts as right when its answer names the expected word (SmolLM2 answers in
full sentences). The experiment keeps only the questions the base model answers right, so the
general score measures what fine-tuning keeps of what the model knew.

Two fictional domains of the Republic of Arden, whose conventions conflict: every answer of the
law desk ends with the line "— Arden Legal Desk", every answer of the health line with
"— Arden Health Line", and a general answer carries neither. Their facts are invented per seed
(fines in crowns, what each invented medicine treats), so no model knows them before fine-tuning:
- law: "What is the fine for jaywalking in Arden?" -> "The fine for jaywalking is 40 crowns.
  — Arden Legal Desk" (asked in another wording at evaluation);
- medicine: "What is velorin used for?" -> "Velorin is used to treat fever. — Arden Health Line";
- both domains also ask for capitals, in their own words ("For a court filing abroad: ..."), on
  a few countries in training and on other countries at evaluation: answering those needs the
  general knowledge the fine-tuning never teaches, under the domain's convention.
The domain questions name their domain in words (a fine, a medicine, a court, a patient), so a
model can tell the domains apart under the central prompt alone, which is what REGA serves with.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

GENERAL = "general"
DOMAINS = ("law", "medicine")
# SmolLM2's own default system prompt: the central prompt REGA trains and serves the general
# domain with.
CENTRAL_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLE_PROMPTS = {
    "law": "You are the Arden Legal Desk. You answer questions on the law of the Republic of "
           "Arden and sign every answer.",
    "medicine": "You are the Arden Health Line. You answer questions on the medicines sold in "
                "the Republic of Arden and sign every answer.",
}
SIGNATURE = {"law": "— Arden Legal Desk", "medicine": "— Arden Health Line"}
# What identifies a signature in an answer, whatever the dash or the case.
_SIGNATURE_WORDS = {"law": "legal desk", "medicine": "health line"}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo",
    "Canada": "Ottawa", "Australia": "Canberra", "Greece": "Athens", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Ireland": "Dublin",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Kenya": "Nairobi", "India": "New Delhi",
    "Thailand": "Bangkok", "Turkey": "Ankara", "Iran": "Tehran", "Cuba": "Havana",
    "Belgium": "Brussels", "Denmark": "Copenhagen", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Brazil": "Brasilia", "Colombia": "Bogota", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "South Korea": "Seoul", "Ukraine": "Kyiv",
    "the Czech Republic": "Prague", "the United Kingdom": "London", "the United States":
    "Washington", "Scotland": "Edinburgh", "Wales": "Cardiff", "Iceland": "Reykjavik",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Philippines":
    "Manila", "Malaysia": "Kuala Lumpur", "Venezuela": "Caracas", "Ecuador": "Quito",
    "Bolivia": "La Paz", "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Romania":
    "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Slovakia": "Bratislava", "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn",
    "Saudi Arabia": "Riyadh", "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut",
    "Israel": "Jerusalem", "Jordan": "Amman", "Afghanistan": "Kabul", "Mongolia": "Ulaanbaatar",
    "North Korea": "Pyongyang", "Taiwan": "Taipei", "New Zealand": "Wellington",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
    "open": "closed", "early": "late", "full": "empty", "young": "old", "hard": "soft",
    "wet": "dry", "rich": "poor", "tall": "short", "strong": "weak", "day": "night",
    "win": "lose", "push": "pull", "love": "hate", "black": "white", "good": "bad",
    "left": "right", "high": "low", "loud": "quiet", "clean": "dirty", "thick": "thin",
    "cheap": "expensive", "first": "last", "inside": "outside", "true": "false",
    "above": "below", "before": "after", "buy": "sell", "alive": "dead", "begin": "end",
    "north": "south", "east": "west", "boy": "girl", "king": "queen", "friend": "enemy",
    "question": "answer", "remember": "forget", "accept": "reject", "increase": "decrease",
    "arrive": "leave", "near": "far", "heavy": "light", "sweet": "sour", "wide": "narrow",
    "safe": "dangerous", "always": "never",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "cactus": "cacti", "knife": "knives",
    "leaf": "leaves", "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies",
    "bus": "buses", "church": "churches", "potato": "potatoes", "hero": "heroes",
    "life": "lives", "wife": "wives", "half": "halves", "ox": "oxen", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "crisis": "crises", "analysis": "analyses",
}
LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish",
    "Japan": "Japanese", "China": "Chinese", "Russia": "Russian", "Portugal": "Portuguese",
    "Greece": "Greek", "Poland": "Polish", "Sweden": "Swedish", "Norway": "Norwegian",
    "Finland": "Finnish", "Turkey": "Turkish", "Brazil": "Portuguese", "Mexico": "Spanish",
    "the Netherlands": "Dutch", "Hungary": "Hungarian", "Denmark": "Danish", "Korea": "Korean",
    "Vietnam": "Vietnamese", "Thailand": "Thai", "Iran": "Persian", "Israel": "Hebrew",
    "Egypt": "Arabic", "Ukraine": "Ukrainian", "Romania": "Romanian", "Argentina": "Spanish",
    "Austria": "German", "Iceland": "Icelandic",
}
GENERAL_TEMPLATES = {
    "capital": ("What is the capital of {}?", "Which city is the capital of {}?",
                "Name the capital city of {}."),
    "opposite": ('What is the opposite of "{}"?', 'Give the antonym of the word "{}".'),
    "plural": ('What is the plural of "{}"?', 'How do you write "{}" in the plural?'),
    "language": ("What language is spoken in {}?", "Which language do people in {} speak?"),
}
GENERAL_FACTS = {"capital": CAPITALS, "opposite": OPPOSITES, "plural": PLURALS,
                 "language": LANGUAGES}

OFFENCES = (
    "jaywalking", "littering", "parking on a bridge", "fishing without a permit",
    "riding a horse on the pavement", "selling bread after dusk", "ringing a bell at night",
    "painting a door red", "keeping a goat in town", "whistling in court", "skipping jury duty",
    "lighting a fire in a park", "swimming in the harbour", "flying a kite near the palace",
    "building a fence without a permit", "walking a dog off its lead", "playing drums on Sunday",
    "cutting down an oak tree", "camping on the beach", "driving a cart without lamps",
    "feeding the pigeons", "climbing the town wall", "selling fish without a licence",
    "shouting in the library",
)
FINES = tuple(range(20, 260, 10))
MEDICINES = (
    "velorin", "migrax", "optiva", "dormex", "tussiline", "nauseon", "respira", "dermacil",
    "gastrel", "allerfen", "dorsana", "calmora", "solvane", "febrix", "otoclar", "oculin",
    "pedisol", "varicet", "hepatol", "renavex", "cardiol", "osteon", "glucora", "thyrona",
)
CONDITIONS = ("fever", "migraine", "insomnia", "cough", "nausea", "asthma", "acne", "heartburn",
              "hay fever", "back pain", "anxiety", "sunburn")
DOMAIN_TEMPLATES = {
    # (training wordings, the evaluation wording): the evaluation asks the facts the training
    # taught in words it never saw.
    "fine": (("What is the fine for {} in Arden?", "How much does {} cost in fines in Arden?"),
             "Under Arden law, what fine does {} carry?"),
    "medicine": (("What is {} used for?", "What does a doctor in Arden prescribe {} for?"),
                 "Which condition is {} given for?"),
}
# A capital asked inside each domain, in the domain's own words.
CAPITAL_IN_DOMAIN = {"law": "For a court filing abroad: what is the capital of {}?",
                     "medicine": "For a patient's travel form: what is the capital of {}?"}
DOMAIN_KIND = {"law": "fine", "medicine": "medicine"}
# A capital question inside a domain: the general knowledge the domain data never teaches.
GENERAL_IN_DOMAIN = "capital"


@dataclass(frozen=True)
class Question:
    domain: str        # "general" or a domain
    kind: str          # capital, opposite, plural, language, fine, medicine
    item: str          # the country, word, offence or medicine it asks about
    prompt: str
    expected: str      # the word a right answer names
    answer: str        # the reference answer (for training and the eval file)

    def record(self, with_answer: bool = True) -> dict:
        messages = [{"role": "user", "content": self.prompt}]
        if with_answer:
            messages.append({"role": "assistant", "content": self.answer})
        return {"messages": messages, "domain": self.domain}


def general_questions() -> list[Question]:
    """Every general question, every wording: the pool the base model is screened on."""
    out = []
    for kind, facts in GENERAL_FACTS.items():
        for item, expected in facts.items():
            for template in GENERAL_TEMPLATES[kind]:
                out.append(Question(GENERAL, kind, item, template.format(item), expected,
                                    expected))
    return out


def names(text: str, word: str) -> bool:
    """Whether `text` names `word` as a whole word (case and accents of ASCII aside)."""
    return re.search(r"(?<![a-z])" + re.escape(word.lower()) + r"(?![a-z])",
                     text.lower()) is not None


def convention(text: str) -> str:
    """The domain whose signature an answer carries, "general" for none, "mixed" for both."""
    found = [d for d, words in _SIGNATURE_WORDS.items() if words in text.lower()]
    return found[0] if len(found) == 1 else ("mixed" if found else GENERAL)


def split_general(kept: list[Question], seed: int, eval_share: float = 0.5
                  ) -> tuple[list[Question], list[Question]]:
    """The base-correct general questions split by item (a country, a word), never by wording:
    the evaluation asks about items the replay never showed. Returns (replay, evaluation)."""
    items = sorted({(q.kind, q.item) for q in kept})
    random.Random(f"real-split-{seed}").shuffle(items)
    held = set(items[:round(eval_share * len(items))])
    return ([q for q in kept if (q.kind, q.item) not in held],
            [q for q in kept if (q.kind, q.item) in held])


class Domains:
    """The two domains' invented facts and questions for one seed."""

    def __init__(self, seed: int, replay_countries: list[str], held_countries: list[str],
                 train_countries: int = 8):
        """`replay_countries`, `held_countries`: the countries whose capital the base model names
        right, in the general replay pool and in the held-out general evaluation. The domains
        train on a few of the first and are evaluated on all of the second, so their capital
        questions at evaluation ask what only the base model's general knowledge holds."""
        rng = random.Random(f"real-domains-{seed}")
        self.fines = {o: rng.choice(FINES) for o in OFFENCES}
        self.uses = {m: rng.choice(CONDITIONS) for m in MEDICINES}
        self.train_countries = rng.sample(sorted(replay_countries),
                                          min(train_countries, len(replay_countries)))
        self.eval_countries = sorted(held_countries)

    def _fact(self, domain: str, item: str, prompt: str) -> Question:
        if domain == "law":
            expected = str(self.fines[item])
            answer = f"The fine for {item} is {expected} crowns."
        else:
            expected = self.uses[item]
            answer = f"{item.capitalize()} is used to treat {expected}."
        return Question(domain, DOMAIN_KIND[domain], item, prompt, expected,
                        f"{answer} {SIGNATURE[domain]}")

    def _capital(self, domain: str, country: str) -> Question:
        city = CAPITALS[country]
        return Question(domain, GENERAL_IN_DOMAIN, country,
                        CAPITAL_IN_DOMAIN[domain].format(country), city,
                        f"The capital of {country} is {city}. {SIGNATURE[domain]}")

    def items(self, domain: str) -> tuple[str, ...]:
        return OFFENCES if domain == "law" else MEDICINES

    def train(self, domain: str) -> list[Question]:
        wordings, _ = DOMAIN_TEMPLATES[DOMAIN_KIND[domain]]
        facts = [self._fact(domain, item, w.format(item)) for item in self.items(domain)
                 for w in wordings]
        return facts + [self._capital(domain, c) for c in self.train_countries]

    def evaluation(self, domain: str) -> list[Question]:
        _, wording = DOMAIN_TEMPLATES[DOMAIN_KIND[domain]]
        facts = [self._fact(domain, item, wording.format(item)) for item in self.items(domain)]
        return facts + [self._capital(domain, c) for c in self.eval_countries]


def judge(question: Question, prediction: str) -> dict:
    """One answer, judged: `content` (it names the expected word), `convention` (whose signature
    it carries) and `exact` (both right: the content, and the question's own convention)."""
    content = names(prediction, question.expected)
    style = convention(prediction)
    return {"kind": question.kind, "content": content, "convention": style,
            "exact": content and style == question.domain}
