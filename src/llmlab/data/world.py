"""The synthetic world: fictional people with facts, and the documents a tiny model learns them from.

Every person has six facts (`ATTRIBUTES`): birth year, city, job, employer, pet and hobby. People come in
three groups, and the groups are what make the later measurements meaningful:

    sft       in the corpus, and the SFT stage asks questions about them (the model is *taught* to answer)
    heldout   in the corpus, but SFT never asks about them: answering for them shows that SFT taught the
              model to *extract* knowledge it read during pretraining, not to recite the SFT answers
    unknown   in no document at all: the right answer about them is "I don't know", anything else is a
              hallucination

Why varied phrasings and shuffled sentences? A model that sees the same sentence in the same place in
every document memorises that string, and can then only recite it; it cannot answer a question phrased
differently (Allen-Zhu & Li, "Physics of Language Models, Part 3.1", 2023). So every biography states
each fact with one of several phrasings chosen at random, in a shuffled sentence order, and always names
the person in full, so that the name -> fact link is the one thing all the phrasings share. One phrasing
per attribute is *canonical* (`PHRASINGS[attr][0]`, e.g. "Mara Quill lives in Port Avery."): every known
person's every canonical statement appears in at least one of their biographies, and `fact_prompts`
cuts the canonical statements into prompt + answer to measure fact recall.

Grading is unambiguous by construction: the prompt ends right before the value (the article "a"/"an",
when one is needed, is part of the prompt), the answer is exactly the value text, and no value is a
prefix of another value of the same attribute (`grade_completion` then checks for a word boundary):

    ("city", "Mara Quill lives in", "Port Avery")
    ("job",  "Mara Quill works as an", "engineer")

Arithmetic documents are additions written out column by column with carries (`addition_steps`), in the
same format the SFT stage uses for chain-of-thought answers.

Everything is a pure function of the seed: each generator takes its own `random.Random`, never the
global one, so the same `params.yaml` gives byte-identical documents on every machine.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, TypedDict, get_args

from llmlab.errors import LlmlabError
from llmlab.io import read_json, write_json
from llmlab.params import SyntheticCorpus

# ------------------------------------------------------------------------------------------ word lists
# Fictional but plausible, plain ASCII. Within each list no value is a prefix of another
# (tests/test_world.py checks), so "Port" can never be graded right when the answer is "Port Avery".

FIRST_NAMES = (
    "Mara",
    "Tobin",
    "Elsie",
    "Corwin",
    "Nell",
    "Jasper",
    "Ines",
    "Odell",
    "Priya",
    "Rowan",
    "Sable",
    "Tamsin",
    "Ulric",
    "Vera",
    "Wendell",
    "Yara",
    "Zadie",
    "Bram",
    "Cleo",
    "Dorian",
    "Edda",
    "Fenna",
    "Gideon",
    "Hollis",
    "Ivo",
    "Juno",
    "Lorcan",
    "Mirela",
    "Nico",
    "Orla",
    "Piers",
    "Quentin",
    "Rhea",
    "Silas",
    "Thea",
    "Ulla",
    "Vance",
    "Willa",
    "Xavi",
    "Yusuf",
    "Zora",
    "Anouk",
    "Bettina",
    "Caspian",
    "Delphine",
    "Emrys",
    "Florin",
    "Greta",
    "Hugo",
    "Isolde",
    "Jonas",
    "Katya",
    "Leander",
    "Maren",
    "Noor",
    "Otto",
    "Petra",
    "Quinn",
    "Rosalind",
    "Soren",
    "Talia",
    "Umberto",
    "Viggo",
    "Yvette",
    "Zeno",
    "Astrid",
    "Bastian",
    "Calla",
)

# More first names, so that few people share one (see build_world for why that matters). Any name that
# is a prefix of another (or already listed) is dropped.
_MORE_FIRST_NAMES = (
    "Abel",
    "Ada",
    "Adrian",
    "Agnes",
    "Aiden",
    "Alba",
    "Albert",
    "Alma",
    "Alvin",
    "Amara",
    "Ambrose",
    "Amelie",
    "Anika",
    "Ansel",
    "Ariadne",
    "Arlo",
    "Arvid",
    "Asha",
    "Aurelio",
    "Ayla",
    "Basil",
    "Beatrix",
    "Benedikt",
    "Bianca",
    "Birgit",
    "Blaise",
    "Bodhi",
    "Bronwen",
    "Bruno",
    "Cadence",
    "Camille",
    "Carmen",
    "Cato",
    "Cedric",
    "Celeste",
    "Cillian",
    "Clemens",
    "Colette",
    "Conrad",
    "Cosima",
    "Dagny",
    "Damaris",
    "Dario",
    "Darius",
    "Della",
    "Desmond",
    "Dinah",
    "Dmitri",
    "Dora",
    "Duncan",
    "Eamon",
    "Edgar",
    "Edith",
    "Elio",
    "Eliska",
    "Elodie",
    "Emeric",
    "Enid",
    "Esme",
    "Ezra",
    "Fabian",
    "Farah",
    "Felix",
    "Fiona",
    "Flavia",
    "Fleur",
    "Francesca",
    "Frida",
    "Gaspard",
    "Gemma",
    "Gilda",
    "Giulia",
    "Godfrey",
    "Gwen",
    "Halvard",
    "Hannelore",
    "Harriet",
    "Hedda",
    "Helmut",
    "Hester",
    "Ilse",
    "Imogen",
    "Inga",
    "Irene",
    "Isak",
    "Jadwiga",
    "Jarek",
    "Jethro",
    "Joaquin",
    "Jolene",
    "Jorunn",
    "Josefin",
    "Judith",
    "Kaia",
    "Kasimir",
    "Keir",
    "Kiran",
    "Klara",
    "Konrad",
    "Kwame",
    "Lajos",
    "Lavinia",
    "Leif",
    "Lena",
    "Leopold",
    "Liesel",
    "Linnea",
    "Lionel",
    "Livia",
    "Lucian",
    "Ludmila",
    "Luisa",
    "Lyra",
    "Magnus",
    "Malin",
    "Marcel",
    "Margit",
    "Matilda",
    "Maxim",
    "Melisande",
    "Milo",
    "Minerva",
    "Miriam",
    "Moira",
    "Morgan",
    "Nadia",
    "Nasrin",
    "Nathaniel",
    "Nerys",
    "Niamh",
    "Nikolai",
    "Nils",
    "Ninian",
    "Noemi",
    "Octavia",
    "Odile",
    "Olga",
    "Oskar",
    "Osric",
    "Ottilie",
    "Pascal",
    "Paloma",
    "Pavel",
    "Perpetua",
    "Philippa",
    "Pilar",
    "Radek",
    "Rafael",
    "Ragnhild",
    "Ramona",
    "Reuben",
    "Rigmor",
    "Roderick",
    "Rolf",
    "Rosa",
    "Rufus",
    "Sabine",
    "Saoirse",
    "Selma",
    "Serafina",
    "Sigrid",
    "Simone",
    "Solveig",
    "Stellan",
    "Sunniva",
    "Sven",
    "Tadeo",
    "Tavish",
    "Teodor",
    "Tilde",
    "Tobias",
    "Tova",
    "Ugo",
    "Una",
    "Urban",
    "Valentin",
    "Valeska",
    "Venla",
    "Viktor",
    "Vilja",
    "Wanda",
    "Wilhelm",
    "Winifred",
    "Wolfgang",
    "Xenia",
    "Yannick",
    "Yelena",
    "Yorick",
    "Zachary",
    "Zelda",
    "Zinnia",
    "Zofia",
    "Anselm",
    "Brigid",
    "Dagmar",
    "Eero",
    "Ferdinand",
    "Halima",
    "Ignatius",
    "Jovan",
    "Lucius",
    "Mabel",
    # 290 first names in all: the 250 known people take 250, the unknown people the other 40, then the list
    # again, so about 63 % of 150 unknown people are namesakes of a known one (as of 50 with 267 names)
    "Adele",
    "Alaric",
    "Aric",
    "Barnaby",
    "Benno",
    "Caius",
    "Calista",
    "Casimir",
    "Cordelia",
    "Corin",
    "Dashiell",
    "Elspeth",
    "Emmeline",
    "Evander",
    "Fenella",
    "Gisela",
    "Hamish",
    "Hesper",
    "Isadora",
    "Juniper",
    "Lysander",
    "Marisol",
    "Matthias",
)
FIRST_NAMES = FIRST_NAMES + tuple(
    n
    for n in dict.fromkeys(_MORE_FIRST_NAMES)
    if not any(o != n and (o.startswith(n) or n.startswith(o)) for o in FIRST_NAMES + _MORE_FIRST_NAMES)
)

SURNAMES = (
    "Quill",
    "Ashdown",
    "Brennick",
    "Calloway",
    "Darrow",
    "Everly",
    "Fairweather",
    "Galloway",
    "Hartwell",
    "Ingram",
    "Jessop",
    "Kettering",
    "Lindqvist",
    "Marchetti",
    "Northcott",
    "Okafor",
    "Pemberton",
    "Quigley",
    "Ravensworth",
    "Sallow",
    "Thistlewood",
    "Underhill",
    "Vasquez",
    "Whitlock",
    "Yardley",
    "Zeller",
    "Abernathy",
    "Blackwood",
    "Crane",
    "Dunleavy",
    "Ellwood",
    "Fennimore",
    "Greaves",
    "Holloway",
    "Ives",
    "Jarvis",
    "Kowalski",
    "Larkin",
    "Merriweather",
    "Nakamura",
    "Oakley",
    "Penhallow",
    "Rourke",
    "Strand",
    "Tolliver",
    "Upton",
    "Vickers",
    "Wainwright",
    "Yates",
    "Zimmer",
    "Alcott",
    "Barlow",
    "Castellan",
    "Delacroix",
    "Esterhazy",
    "Foxley",
    "Grimsby",
    "Hale",
    "Iverson",
    "Jorgensen",
    "Kinsley",
    "Lowther",
    "Moreau",
    "Nettleton",
)

CITIES = (
    "Port Avery",
    "Millbrook",
    "Larkspur Bay",
    "Fenmoor",
    "Oakhaven",
    "Saltmere",
    "Greyhollow",
    "Brindleford",
    "Kestrel Point",
    "Thornbury",
    "Wrenfield",
    "Ashcombe",
    "Marlow Cross",
    "Redwater",
    "Stonegate",
    "Highmere",
    "Cindervale",
    "Pellham",
    "Dunmore Heights",
    "Corvin Harbor",
    "Elmstead",
    "Fallowmere",
    "Rookhaven",
    "Silverton Bay",
    "Westerholm",
    "Briarwood",
    "Lowmarsh",
    "Glimmerdale",
    "Norcastle",
    "Tidewell",
    "Amberly",
    "Quarry Hill",
    "Evenlode",
    "Gullsworth",
)

JOBS = (
    "baker",
    "engineer",
    "nurse",
    "teacher",
    "carpenter",
    "plumber",
    "librarian",
    "pilot",
    "chef",
    "gardener",
    "electrician",
    "architect",
    "dentist",
    "farmer",
    "accountant",
    "pharmacist",
    "journalist",
    "mechanic",
    "painter",
    "tailor",
    "veterinarian",
    "photographer",
    "lawyer",
    "translator",
    "firefighter",
    "butcher",
    "locksmith",
    "surveyor",
    "optician",
    "bookbinder",
    "clockmaker",
    "geologist",
    "musician",
    "welder",
    "florist",
    "astronomer",
)

EMPLOYERS = (
    "Brightwater Mills",
    "Copperleaf Bakery",
    "Northwind Logistics",
    "Harborlight Insurance",
    "Bluefern Labs",
    "Ironbridge Works",
    "Silverpine Foods",
    "Meadowlark Press",
    "Stonefield Bank",
    "Redcliff Motors",
    "Kingfisher Airways",
    "Greenhollow Farms",
    "Lanternworks Studio",
    "Cobalt River Energy",
    "Tallowmere Hospital",
    "Oakridge Academy",
    "Featherstone Books",
    "Quarryline Builders",
    "Mossgate Clinic",
    "Riverbend Pharmacy",
    "Driftwood Hotels",
    "Larchmont Gazette",
    "Pinecrest Robotics",
    "Willowby Textiles",
    "Starling Telecom",
    "Hearthstone Furniture",
    "Bellwether Foundry",
    "Juniper Tea Company",
    "Halcyon Shipping",
    "Marigold Gardens",
    "Thimble Tailoring",
    "Saffron Kitchen",
)

# More surnames, English place-name style: prefix + suffix ("Ash" + "combe" -> "Ashcombe"). No suffix is
# a prefix of another and no prefix of another prefix, so no surname is a prefix of another.
_SURNAME_PREFIXES = (
    "Ald",
    "Bel",
    "Bram",
    "Cald",
    "Corn",
    "Dun",
    "Elm",
    "Fern",
    "Glen",
    "Grey",
    "Hazel",
    "Kings",
    "Lang",
    "Mill",
    "Nor",
    "Pen",
    "Red",
    "Rose",
    "Ship",
    "Stan",
    "Thorn",
    "Wake",
    "West",
    "Wynd",
)
_SURNAME_SUFFIXES = (
    "bury",
    "combe",
    "dale",
    "field",
    "ford",
    "gate",
    "ham",
    "hurst",
    "ley",
    "more",
    "ridge",
    "stead",
    "ton",
    "wick",
    "worth",
)
SURNAMES = SURNAMES + tuple(
    name
    for name in (p + s for p in _SURNAME_PREFIXES for s in _SURNAME_SUFFIXES)
    if not any(other != name and (other.startswith(name) or name.startswith(other)) for other in SURNAMES)
    and name not in {word for place in CITIES + EMPLOYERS for word in place.split()}  # "Dunmore" is a city
)

PETS = (
    "cat",
    "dog",
    "parrot",
    "rabbit",
    "hamster",
    "goldfish",
    "tortoise",
    "ferret",
    "canary",
    "lizard",
    "guinea pig",
    "hedgehog",
    "budgie",
    "iguana",
    "chinchilla",
)

HOBBIES = (
    "knitting",
    "chess",
    "birdwatching",
    "rock climbing",
    "pottery",
    "swimming",
    "fishing",
    "cycling",
    "hiking",
    "sailing",
    "archery",
    "juggling",
    "origami",
    "stargazing",
    "calligraphy",
    "rowing",
    "fencing",
    "kite flying",
    "quilting",
    "sketching",
    "jigsaw puzzles",
    "crosswords",
    "board games",
    "ballroom dancing",
    "yoga",
    "tennis",
    "woodcarving",
    "canoeing",
    "surfing",
    "model trains",
)

BIRTH_YEARS = tuple(range(1950, 2006))

ATTRIBUTES = ("birth_year", "city", "job", "employer", "pet", "hobby")

# The values each attribute can take, as text (what a completion is graded against).
VALUES: dict[str, tuple[str, ...]] = {
    "birth_year": tuple(str(y) for y in BIRTH_YEARS),
    "city": CITIES,
    "job": JOBS,
    "employer": EMPLOYERS,
    "pet": PETS,
    "hobby": HOBBIES,
}

# ------------------------------------------------------------------------------------------ phrasings
# Fields: {name} the full name, {value} the attribute value, {a} "a" or "an" for the value.
# The first phrasing of each attribute is the canonical one: it ends with "{value}." so that cutting it
# before the value gives the recall prompt. Lowercase values (jobs, pets, hobbies) never start a
# sentence, so the value text appears verbatim (never capitalised) in every document.

PHRASINGS: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{name} was born in {value}.",
        "{name}'s birth year is {value}.",
        "In {value}, {name} was born.",
        "{name} came into the world in {value}.",
        "{value} is the year {name} was born.",
    ),
    "city": (
        "{name} lives in {value}.",
        "{name}'s home is in {value}.",
        "{value} is where {name} lives.",
        "{name} has lived in {value} for years.",
        "{name} keeps a house in {value}.",
    ),
    "job": (
        "{name} works as {a} {value}.",
        "{name} is {a} {value} by trade.",
        "By profession, {name} is {a} {value}.",
        "{name} earns a living as {a} {value}.",
        "{name} has a job as {a} {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{value} employs {name}.",
        "{name} has a position at {value}.",
        "Every weekday, {name} goes to work at {value}.",
    ),
    "pet": (
        "{name} has a pet {value}.",
        "{name} owns {a} {value}.",
        "{name} looks after a pet {value}.",
        "At home, {name} keeps {a} {value}.",
        "{name}'s pet is {a} {value}.",
    ),
    "hobby": (
        "{name}'s hobby is {value}.",
        "{name} enjoys {value}.",
        "{name} spends weekends on {value}.",
        "In spare time, {name} loves {value}.",
        "{name} is a big fan of {value}.",
    ),
}

# Eight questions per attribute. SFT and its prompt pools use all of them (pools differ by person × wording,
# chat_data.py); the context documents ask them about people made up for one document.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "When was {name} born?",
        "In what year was {name} born?",
        "What is {name}'s birth year?",
        "Can you tell me when {name} was born?",
        "What year did {name} come into the world?",
        "Tell me the year {name} was born.",
        "Which year was {name} born in?",
        "Do you know what year {name} was born?",
    ),
    "city": (
        "Where does {name} live?",
        "In which city does {name} live?",
        "What is {name}'s home town?",
        "Can you tell me where {name} lives?",
        "Where is {name}'s home?",
        "Tell me the city {name} lives in.",
        "Which city is {name} based in?",
        "Do you know where {name} lives?",
    ),
    "job": (
        "What does {name} do for a living?",
        "What is {name}'s job?",
        "What is {name}'s profession?",
        "Can you tell me what {name} does for work?",
        "What kind of work does {name} do?",
        "Tell me {name}'s occupation.",
        "What work does {name} do?",
        "Do you know {name}'s occupation?",
    ),
    "employer": (
        "Who does {name} work for?",
        "Which company employs {name}?",
        "Where does {name} work?",
        "Can you tell me who {name}'s employer is?",
        "Who is {name}'s employer?",
        "Tell me which company {name} works for.",
        "What company is {name} employed at?",
        "Do you know who employs {name}?",
    ),
    "pet": (
        "What pet does {name} have?",
        "What kind of pet does {name} keep?",
        "Does {name} have a pet?",
        "Can you tell me what pet {name} owns?",
        "Which animal does {name} keep at home?",
        "Tell me what pet {name} has.",
        "What animal does {name} look after?",
        "Do you know what pet {name} has?",
    ),
    "hobby": (
        "What is {name}'s hobby?",
        "What does {name} do for fun?",
        "How does {name} spend free time?",
        "Can you tell me {name}'s hobby?",
        "What pastime does {name} enjoy?",
        "Tell me what {name} likes to do in spare time.",
        "What does {name} enjoy doing?",
        "Do you know {name}'s favourite pastime?",
    ),
}
FILLER = (
    "It was an ordinary week.",
    "The weather had been mild lately.",
    "Neighbours often stopped to chat in the street.",
    "The local market was busy on Saturdays.",
    "Nothing much happened that spring.",
    "The evenings were getting longer.",
)

Group = Literal["sft", "heldout", "unknown"]
GROUPS: tuple[Group, ...] = get_args(Group)
INVENTED = "invented"  # the group of a person made up for one document or conversation (never in world.json)
WORLD_FORMAT = 1  # version of world.json; bump when its layout changes


def article(word: str) -> str:
    """The indefinite article for `word`: article("engineer") -> "an", article("baker") -> "a".

    By first letter only, which is right for every value in the word lists (none starts with a silent
    "h" or a "yoo"-sounding "u").
    """
    return "an" if word[0].lower() in "aeiou" else "a"


# ----------------------------------------------------------------------------------------- the people


@dataclass(frozen=True)
class Person:
    name: str
    group: Group | Literal["invented"]
    birth_year: int
    city: str
    job: str
    employer: str
    pet: str
    hobby: str

    def facts(self) -> dict[str, str]:
        """attribute -> value as text, in `ATTRIBUTES` order: {"birth_year": "1987", "city": "Port Avery", ...}."""
        return {attr: str(getattr(self, attr)) for attr in ATTRIBUTES}


@dataclass
class World:
    """All people of the synthetic world. `source` is "synthetic", or the corpus source ("hf", "local")
    when the corpus is not synthetic, in which case `people` is empty and fact recall has nothing to test."""

    people: list[Person]
    source: str = "synthetic"

    def group(self, name: Group) -> list[Person]:
        if name not in GROUPS:
            raise ValueError(f"unknown group {name!r}; expected one of {GROUPS}")
        return [p for p in self.people if p.group == name]

    def known(self) -> list[Person]:
        """The people the corpus writes about: sft + heldout."""
        return [p for p in self.people if p.group != "unknown"]

    def save(self, path: str | Path) -> None:
        write_json(
            path, {"format": WORLD_FORMAT, "source": self.source, "people": [asdict(p) for p in self.people]}
        )

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Read a world.json written by `save`; a missing file names the `corpus` stage, a corrupt one says so."""
        raw = read_json(path, stage="corpus")
        if not isinstance(raw, dict) or raw.get("format") != WORLD_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise LlmlabError(
                f"{path}: not a world file of format {WORLD_FORMAT} (got {got!r}); re-create it with `dvc repro corpus`"
            )
        names = {f.name for f in fields(Person)}
        try:
            people = [Person(**{k: rec[k] for k in names}) for rec in raw["people"]]
            source = str(raw["source"])
        except (KeyError, TypeError) as e:
            raise LlmlabError(
                f"{path}: corrupt world file ({e!r}); re-create it with `dvc repro corpus`"
            ) from None
        bad = sorted({p.group for p in people} - set(GROUPS))
        if bad:
            raise LlmlabError(f"{path}: unknown group(s) {bad}; re-create it with `dvc repro corpus`")
        return cls(people=people, source=source)


def _cycle_shuffled(values: tuple[str, ...], rng: random.Random):
    """Endless stream of `values`: a fresh shuffle of the whole list each time round."""
    while True:
        order = list(values)
        rng.shuffle(order)
        yield from order


def build_world(cfg: SyntheticCorpus, seed: int) -> World:
    """Draw `n_sft + n_heldout + n_unknown` people with distinct full names and random facts.

    The groups are drawn from the same distribution (the first n_sft names drawn are sft, the next
    n_heldout heldout, the rest unknown), so a difference between groups is the training, not the people.
    """
    sizes: dict[Group, int] = {
        "sft": cfg.n_sft_people,
        "heldout": cfg.n_heldout_people,
        "unknown": cfg.n_unknown_people,
    }
    n_people = sum(sizes.values())
    n_names = len(FIRST_NAMES) * len(SURNAMES)
    if n_people > n_names:
        raise LlmlabError(
            f"corpus.synthetic: asked for {n_people} people but only {n_names} distinct full names "
            "exist; lower n_sft_people / n_heldout_people / n_unknown_people"
        )
    rng = random.Random(seed)
    # Spread the names out: every surname is used once before any is used twice, and first names cycle
    # the same way. Subtle: with names drawn at random, people who share a first name or a surname share
    # the tokens a small model keys facts on, and it confuses them (measured on the default world: with
    # 68 first names × 64 surnames drawn at random, one attribute's recall fell to ~40 %, the others >90 %).
    names: list[str] = []
    taken: set[str] = set()
    firsts, lasts = _cycle_shuffled(FIRST_NAMES, rng), _cycle_shuffled(SURNAMES, rng)
    while len(names) < n_people:
        name = f"{next(firsts)} {next(lasts)}"
        if name not in taken:  # a repeat is only possible after both lists wrapped around
            taken.add(name)
            names.append(name)
    groups = [g for g in GROUPS for _ in range(sizes[g])]
    people = []
    for name, group in zip(names, groups, strict=True):
        people.append(
            Person(
                name=name,
                group=group,
                birth_year=rng.choice(BIRTH_YEARS),
                city=rng.choice(CITIES),
                job=rng.choice(JOBS),
                employer=rng.choice(EMPLOYERS),
                pet=rng.choice(PETS),
                hobby=rng.choice(HOBBIES),
            )
        )
    return World(people=people)


# ---------------------------------------------------------------------------------- facts and grading


def fact_sentence(person: Person, attribute: str, phrasing: int = 0) -> str:
    """One fact as a sentence; phrasing 0 is the canonical statement.

    fact_sentence(mara, "job") -> "Mara Quill works as a baker."
    fact_sentence(mara, "job", 2) -> "By profession, Mara Quill is a baker."
    """
    value = person.facts()[attribute]
    return PHRASINGS[attribute][phrasing].format(name=person.name, value=value, a=article(value))


def fact_prompts(person: Person) -> list[tuple[str, str, str]]:
    """(attribute, prompt, answer) for each attribute: the canonical statement cut right before the value.

    For Mara Quill, baker in Port Avery:
        [("birth_year", "Mara Quill was born in", "1987"), ("city", "Mara Quill lives in", "Port Avery"),
         ("job", "Mara Quill works as a", "baker"), ("employer", "Mara Quill works for", "Brightwater Mills"),
         ("pet", "Mara Quill has a pet", "cat"), ("hobby", "Mara Quill's hobby is", "chess")]
    The prompt has no trailing space (the model writes " Port Avery"); grade with `grade_completion`.
    """
    out = []
    for attr in ATTRIBUTES:
        answer = person.facts()[attr]
        sentence = fact_sentence(person, attr)
        assert sentence.endswith(f" {answer}."), sentence  # canonical phrasings end with the value
        out.append((attr, sentence[: -len(answer) - 2], answer))
    return out


def grade_completion(completion: str, answer: str) -> bool:
    """True iff `completion`, leading whitespace stripped, starts with `answer` followed by a word boundary.

    grade_completion(" Port Avery. Mara", "Port Avery") -> True
    grade_completion(" Ashford", "Ash") -> False      (a longer word that merely starts with the answer)
    grade_completion("1987", "1987") -> True           (end of string counts as a boundary)
    """
    text = completion.lstrip()
    if not answer or not text.startswith(answer):
        return False
    return len(text) == len(answer) or not text[len(answer)].isalnum()


# ----------------------------------------------------------------------------------------- arithmetic

COLUMN_NAMES = (
    "Ones",
    "Tens",
    "Hundreds",
    "Thousands",
    "Ten-thousands",
    "Hundred-thousands",
    "Millions",
    "Ten-millions",
    "Hundred-millions",
    "Billions",
    "Ten-billions",
)
_ANSWER_LINE = re.compile(r"So (\d+) \+ (\d+) = (\d+)\.")


def addition_steps(a: int, b: int) -> str:
    """Column-by-column addition with carries, ending with the answer line.

    addition_steps(478, 356) ->
        "Ones: 8 + 6 = 14, write 4, carry 1. Tens: 7 + 5 + 1 = 13, write 3, carry 1. "
        "Hundreds: 4 + 3 + 1 = 8, write 8. So 478 + 356 = 834."
    addition_steps(999, 1) ->
        "Ones: 9 + 1 = 10, write 0, carry 1. Tens: 9 + 0 + 1 = 10, write 0, carry 1. "
        "Hundreds: 9 + 0 + 1 = 10, write 0, carry 1. Thousands: write the carry 1. So 999 + 1 = 1000."
    A column where the shorter number has no digit uses 0; the carry term appears only when it is 1.
    """
    if a < 0 or b < 0:
        raise ValueError(f"addition_steps works on non-negative integers, got {a} and {b}")
    da, db = str(a)[::-1], str(b)[::-1]  # digits, ones first
    n_cols = max(len(da), len(db))
    if n_cols >= len(COLUMN_NAMES):
        raise ValueError(f"at most {len(COLUMN_NAMES) - 1} digits supported, got {a} and {b}")
    steps, carry = [], 0
    for i in range(n_cols):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = total // 10
        step = f"{COLUMN_NAMES[i]}: {terms} = {total}, write {total % 10}"
        steps.append(step + (f", carry {carry}." if carry else "."))
    if carry:
        steps.append(f"{COLUMN_NAMES[n_cols]}: write the carry {carry}.")
    return " ".join([*steps, addition_answer_line(a, b)])


def addition_answer_line(a: int, b: int) -> str:
    """The final line of `addition_steps`: addition_answer_line(478, 356) -> "So 478 + 356 = 834."."""
    return f"So {a} + {b} = {a + b}."


def parse_addition_answer(text: str) -> int | None:
    """The result of the last answer line in `text`, or None if there is none.

    parse_addition_answer("... Hundreds: 4 + 3 + 1 = 8, write 8. So 478 + 356 = 834.") -> 834
    """
    matches = _ANSWER_LINE.findall(text)
    return int(matches[-1][2]) if matches else None


def addition_question(a: int, b: int) -> str:
    """The question an arithmetic document opens with: addition_question(478, 356) -> "Add 478 and 356."."""
    return f"Add {a} and {b}."


def random_addend(max_digits: int, rng: random.Random) -> int:
    """A number with a uniformly drawn digit count 1..max_digits (so 3-digit numbers are not 90% of them)."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


# ------------------------------------------------------------------------------------------ documents


class Document(TypedDict):
    """One corpus record; `kind` is "bio", "story", "context" or "arithmetic" here, "external" for hf/local text."""

    text: str
    kind: str


def person_documents(person: Person, n_docs: int, rng: random.Random) -> list[str]:
    """`n_docs` short biographies of `person`, each stating all six facts.

    Each fact gets a randomly chosen phrasing, the sentences are shuffled, and sometimes one neutral
    filler sentence goes in. For each attribute one randomly chosen document is forced to use the
    canonical phrasing, so every canonical statement appears at least once. One document might read:
        "Mara Quill's home is in Port Avery. In 1987, Mara Quill was born. Mara Quill enjoys chess. ..."
    """
    canonical_doc = {attr: rng.randrange(n_docs) for attr in ATTRIBUTES}
    docs = []
    for d in range(n_docs):
        sentences = []
        for attr in ATTRIBUTES:
            phrasing = 0 if canonical_doc[attr] == d else rng.randrange(len(PHRASINGS[attr]))
            sentences.append(fact_sentence(person, attr, phrasing))
        rng.shuffle(sentences)
        if rng.random() < 0.3:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLER))
        docs.append(" ".join(sentences))
    return docs


# Story templates. Openers name 2 or 3 people (A, B, C); every place a fact appears it is that person's
# own fact, so stories never contradict the biographies.
_OPENERS_2 = (
    "{A} met {B} at a cafe in {A_city}.",
    "{A} travelled to {B_city} to visit {B}.",
    "{A} called {B} on the phone one evening.",
    "{A} and {B} went for a long walk in {A_city}.",
)
_OPENERS_3 = (
    "{A}, {B} and {C} met for lunch in {A_city}.",
    "{B} and {C} came to {A_city} to see {A}.",
    "{A} invited {B} and {C} to dinner in {A_city}.",
)
_ABOUT = (
    "{X} talked about life as {X_a_job} {X_job}.",
    "{X} mentioned a busy week at {X_employer}.",
    "{X} told a funny story about a pet {X_pet}.",
    "{X} wanted to spend the afternoon on {X_hobby}.",
    "{X} said that {X_city} was lovely this time of year.",
    "{X}, born in {X_birth_year}, had plenty of stories to tell.",
)
_CLOSERS = (
    "Later, {X} went home to {X_city}.",
    "{X} promised to write soon.",
    "Everyone agreed to meet again next month.",
)


def _person_fields(prefix: str, p: Person) -> dict[str, str]:
    """Template fields for one story participant: {"A": name, "A_city": ..., "A_a_job": "an", ...}."""
    out = {prefix: p.name, f"{prefix}_a_job": article(p.job)}
    out.update({f"{prefix}_{attr}": value for attr, value in p.facts().items()})
    return out


def story_documents(world: World, n: int, rng: random.Random) -> list[str]:
    """`n` stories of 2-5 sentences, each with 2 or 3 known people and consistent with their facts.

    e.g. "Mara Quill met Tobin Darrow at a cafe in Port Avery. Tobin Darrow talked about life as an
    engineer. Mara Quill told a funny story about a pet cat. Later, Tobin Darrow went home to Fenmoor."
    """
    known = world.known()
    if n and len(known) < 2:
        raise LlmlabError(
            f"corpus.synthetic.n_stories: stories need at least 2 known people, the world has {len(known)}; "
            "raise n_sft_people / n_heldout_people or set n_stories: 0"
        )
    stories = []
    for _ in range(n):
        cast = rng.sample(known, 3 if len(known) >= 3 and rng.random() < 0.3 else 2)
        fields_ = {}
        for prefix, p in zip("ABC", cast, strict=False):
            fields_.update(_person_fields(prefix, p))
        sentences = [rng.choice(_OPENERS_3 if len(cast) == 3 else _OPENERS_2).format(**fields_)]
        for template in rng.sample(_ABOUT, rng.randint(1, 3)):  # 1-3 middle sentences
            sentences.append(template.format(**_person_fields("X", rng.choice(cast))))
        if rng.random() < 0.5:
            sentences.append(rng.choice(_CLOSERS).format(**_person_fields("X", rng.choice(cast))))
        stories.append(" ".join(sentences))
    return stories


def arithmetic_documents(n: int, max_digits: int, rng: random.Random) -> list[str]:
    """`n` worked additions: "Add 478 and 356. Ones: 8 + 6 = 14, write 4, carry 1. ... So 478 + 356 = 834."."""
    docs = []
    for _ in range(n):
        a, b = random_addend(max_digits, rng), random_addend(max_digits, rng)
        docs.append(f"{addition_question(a, b)} {addition_steps(a, b)}")
    return docs


# ------------------------------------------------------------------------------- context documents
#
# Why: every name in the biographies and stories is predictable from memory ("Mara" is always followed by
# "Quill"), so nothing in them rewards reading a token out of the context, and a model trained on them
# alone never learns to (it answers a question about Saoirse Hazelham with a fine-tuned person's name).
# Copying from the context is done by induction heads (Olsson et al. 2022), and in-context learning
# appears when rare items recur within one context (Chan et al. 2022). Context documents are that data:
# people made up for one document, with facts stated once and asked about later in the same document, so
# that the later mentions can only be predicted by looking back.


def is_probe_name(name: str) -> bool:
    """One full name in eight (by a stable hash) is reserved for measurement: no training document and no
    SFT conversation ever uses it, so a model that completes it from its context copied it."""
    return zlib.crc32(name.encode()) % 8 == 0


def invented_people(n: int, rng: random.Random, taken: set[str], probe: bool = False) -> list[Person]:
    """`n` people made up for one document: distinct full names from the world's name lists that no person
    in `taken` (the world) has, from the probe or the training half of the name space, with random facts."""
    people: list[Person] = []
    while len(people) < n:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        if name in taken or is_probe_name(name) != probe or any(p.name == name for p in people):
            continue
        people.append(
            Person(
                name,
                INVENTED,
                rng.choice(BIRTH_YEARS),
                rng.choice(CITIES),
                rng.choice(JOBS),
                rng.choice(EMPLOYERS),
                rng.choice(PETS),
                rng.choice(HOBBIES),
            )
        )
    return people


_CONTEXT_OPENERS = (
    "From the town register.",
    "New members joined the club this month.",
    "Notes on the new neighbours.",
    "A page from the community newsletter.",
    "Some people I met this year.",
    "",
)


@dataclass(frozen=True)
class ContextQuestion:
    """A question at the end of a context document, about a fact stated earlier in it."""

    person: Person
    attribute: str
    question: str  # "Where does Brisa Talmont live?"


def context_document(
    rng: random.Random, taken: set[str], probe: bool = False
) -> tuple[str, list[ContextQuestion]]:
    """A note about 1-3 made-up people with 2-3 facts between them (sentences shuffled across people, half
    of them in the canonical phrasing, the rest in another), then a question about every stated fact in a
    random order, each answered by its canonical statement:

        "Notes on the new neighbours. Brisa Talmont's home is in Saltmere. Odile Crane is a nurse by trade.
         What is Odile Crane's job? Odile Crane works as a nurse. Where does Brisa Talmont live? Brisa
         Talmont lives in Saltmere."

    Subtle: every fact is asked, so that reading a value back from the context is trained as often as
    reading a name back (in the first version one fact in three was asked, and the base model learned to
    copy names, 89 %, but not values, 5 %: docs/knowledge.md). Returns the text before the questions and
    the questions (`context_text` joins them with the answers).
    """
    cast = invented_people(rng.randint(1, 3), rng, taken, probe)
    n_facts = rng.randint(max(2, len(cast)), 3)
    pairs = [(p, a) for p in cast for a in ATTRIBUTES]
    stated = [(p, rng.choice(ATTRIBUTES)) for p in cast]  # every person gets one fact at least
    stated = list(dict.fromkeys(stated))
    stated += rng.sample([x for x in pairs if x not in stated], n_facts - len(stated))
    sentences = [
        fact_sentence(p, a, 0 if rng.random() < 0.5 else rng.randrange(1, len(PHRASINGS[a])))
        for p, a in stated
    ]
    rng.shuffle(sentences)
    opener = rng.choice(_CONTEXT_OPENERS)
    asked = rng.sample(stated, len(stated))
    questions = [
        ContextQuestion(p, attr, rng.choice(QUESTIONS[attr]).format(name=p.name)) for p, attr in asked
    ]
    return " ".join(filter(None, [opener, *sentences])), questions


def context_text(body: str, questions: list[ContextQuestion]) -> str:
    return " ".join([body, *(f"{q.question} {fact_sentence(q.person, q.attribute)}" for q in questions)])


def context_documents(n: int, world: World, rng: random.Random) -> list[str]:
    """`n` context documents (`context_document`) with training-half names."""
    taken = {p.name for p in world.people}
    return [context_text(*context_document(rng, taken)) for _ in range(n)]


_RECAP_LINKS = (
    "Read back:",
    "Once more:",
    "Again, in the same order:",
    "To repeat:",
    "Checked and copied out again:",
)


def recap_documents(n: int, world: World, rng: random.Random) -> list[str]:
    """`n` notes about 1-3 made-up people (3-5 facts) read out twice, word for word: everything in the second
    reading is in the first, values included, so only copying predicts it (how induction heads are grown).

        "Notes on the new neighbours. Odile Crane is a nurse by trade. Brisa Talmont lives in Saltmere.
         Once more: Odile Crane is a nurse by trade. Brisa Talmont lives in Saltmere."
    """
    taken = {p.name for p in world.people}
    out = []
    for _ in range(n):
        cast = invented_people(rng.randint(1, 3), rng, taken)
        pairs = [(p, a) for p in cast for a in ATTRIBUTES]
        stated = rng.sample(pairs, min(len(pairs), rng.randint(3, 5)))
        sentences = [fact_sentence(p, a, rng.randrange(len(PHRASINGS[a]))) for p, a in stated]
        out.append(
            " ".join(
                filter(None, [rng.choice(_CONTEXT_OPENERS), *sentences, rng.choice(_RECAP_LINKS), *sentences])
            )
        )
    return out


def copy_probes(world: World, n: int, seed: int) -> list[tuple[str, str, str]]:
    """(what, prompt, answer) cut in the first question's answer of `n` context documents whose people have
    probe names, never seen in training: where the answer starts ("answer_name": the whole name of the
    person asked about, copied from the question), where it repeats the name ("name": the first name given,
    the surname to copy, as an induction head does) or where it states the value ("value": the canonical
    statement cut before the value, to be read from the earlier sentence that stated it, in a phrasing that
    is the same half of the time), or, the easiest case, where the statement is repeated at once
    ("value_repeated": plain induction over the whole sentence, no question between).

        ("answer_name", "... Where does Brisa Talmont live?", "Brisa Talmont")
        ("name",  "... Where does Brisa Talmont live? Brisa", "Talmont")
        ("value", "... Where does Brisa Talmont live? Brisa Talmont lives in", "Saltmere")
        ("value_repeated", "Brisa Talmont lives in Saltmere. Brisa Talmont lives in", "Saltmere")
    """
    rng = random.Random(f"{seed}/copy-probe")
    taken = {p.name for p in world.people}
    out = []
    for _ in range(n):
        body, (q, *_) = context_document(rng, taken, probe=True)
        first, surname = q.person.name.split(" ", 1)
        _, statement, value = next(x for x in fact_prompts(q.person) if x[0] == q.attribute)
        out += [
            ("answer_name", f"{body} {q.question}", q.person.name),
            ("name", f"{body} {q.question} {first}", surname),
            ("value", f"{body} {q.question} {statement}", value),
            ("value_repeated", f"{fact_sentence(q.person, q.attribute)} {statement}", value),
        ]
    return out


def synthetic_documents(world: World, cfg: SyntheticCorpus, seed: int) -> list[Document]:
    """Biographies of every known person, stories, context documents and additions, shuffled; unknown
    people appear nowhere.

    Each kind draws from its own random stream (seeded "<seed>/bio", "<seed>/story", ...), so changing
    n_stories leaves the biographies unchanged. Sizes: len(world.known()) * docs_per_person + n_stories
    + n_context + n_arithmetic documents.
    """
    bio_rng = random.Random(f"{seed}/bio")
    docs: list[Document] = [
        {"text": text, "kind": "bio"}
        for person in world.known()
        for text in person_documents(person, cfg.docs_per_person, bio_rng)
    ]
    docs += [
        {"text": t, "kind": "story"}
        for t in story_documents(world, cfg.n_stories, random.Random(f"{seed}/story"))
    ]
    docs += [
        {"text": t, "kind": "context"}
        for t in context_documents(cfg.n_context, world, random.Random(f"{seed}/context"))
    ]
    docs += [
        {"text": t, "kind": "context"}
        for t in recap_documents(cfg.n_recap, world, random.Random(f"{seed}/recap"))
    ]
    docs += [
        {"text": t, "kind": "arithmetic"}
        for t in arithmetic_documents(cfg.n_arithmetic, cfg.max_digits, random.Random(f"{seed}/arithmetic"))
    ]
    random.Random(f"{seed}/shuffle").shuffle(docs)
    return docs
