"""Reward tasks for the mock environment: what to ask, and how to score an answer.

In: a spec "module:function" or "path/to/file.py:function" (`rl_training.mock.task`, `eval.task`). Out: a `Task`
whose `prompt(rng)` draws one chat prompt (a list of messages) for training, whose `eval_prompts` are held-out
prompts that `prompt` never draws, and whose `reward(sample)` scores one completion in [0, 1]. A multi-turn task
also has `respond(sample)`: the environment's messages after each model turn (a tool result, a hint), or None to
end the episode; its reward scores the last turn, whose `sample.prompt` holds the whole conversation before it
(envs/episodes.py plays the turns). The function is called without arguments and returns the Task (a module
attribute that already is a Task works too), so a user task is a plain function in any module
(examples/arithmetic_task.py is a worked one):

    def my_task() -> Task:
        return Task(name="yes", prompt=lambda rng: [{"role": "user", "content": "Say yes."}],
                    reward=lambda s: float(s.finish_reason == "stop" and s.text.strip().lower() == "yes"))

A module is found on sys.path, or else in the current directory (as `python -m` would find it: a console script
like `paraloop` does not put the current directory on sys.path), or by its file path.

Built in (each evaluates on categories, topics or prompts it never trains on):
- `one_word` (SmolLM2-135M-Instruct): "Name a {category}. Answer with one word only." 0.5 for stopping with EOS
  after exactly one word, 1 when that word is also in the category's list.
- `short_description` (SmolLM2-135M-Instruct): "Describe {topic} in at most five words." 0.5 for stopping with EOS
  after 1-5 words, 1 when one of them is also a word of the topic's list.
- `capitals` (the tests' tiny random model): the fraction of completion tokens with a capital letter.
- `calculator` (multi-turn, envs/calculator.py): arithmetic with a calculator tool called in a `<tool_call>` block;
  the environment answers each call with a `tool` message; full reward for the right final answer.

Format-only rewards get hacked at 135M (the policy collapses to one random word), so the SmolLM2 tasks give the
format only half the reward and the other half for content checked against word lists embedded here (small, fixed,
easy to read in a diff): a policy that only learned the format plateaus at 0.5, one that answers well reaches 1.
"""

import importlib
import importlib.util
import os
import random
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    """One completion as a reward function sees it."""

    prompt: Messages  # the chat messages it answers
    text: str  # the completion's text (the EOS token is not in it)
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "abort"
    tokens: list[int] = field(
        default_factory=list
    )  # completion token ids; ends with the EOS token when it stopped on it
    pieces: list[str] = field(default_factory=list)  # each text token decoded on its own (the final EOS left out)
    turn: int = 1  # which model turn of a multi-turn episode this is


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[[random.Random], Messages]  # one chat prompt per call, drawn from rng
    reward: Callable[[Sample], float]  # in [0, 1]
    description: str = ""
    respond: Callable[[Sample], Messages | None] | None = None  # multi-turn: the environment's reply, None: done
    eval_prompts: Sequence[Messages] = ()  # held-out prompts (`prompt` never draws them), in a fixed order


def _import_file(path: Path) -> ModuleType:
    name = f"paraloop_task_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import(module_name: str) -> ModuleType:
    """A module by name, else from the current directory (what `python -m` allows), or a .py file by path."""
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ImportError(f"no such file: {path}")
        return _import_file(path)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        here = Path.cwd()
        missing_is_the_module = e.name is not None and module_name.startswith(e.name)
        if not missing_is_the_module or not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
            raise
        sys.path.append(str(here))  # appended: never shadows an installed module of the same name
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def load_task(spec: str) -> Task:
    """Resolve "package.module:function" (or "path/to/file.py:function") to a Task; ValueError naming the spec
    when it cannot be."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task {spec!r}: expected 'module:function', e.g. 'paraloop.envs.tasks:one_word'")
    try:
        module = _import(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raised while importing
        raise ValueError(f"task {spec!r}: cannot import module {module_name!r}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}")
    task = obj
    if not isinstance(obj, Task) and callable(obj):
        try:
            task = obj()
        except Exception as e:
            raise ValueError(f"task {spec!r}: calling {attr}() failed: {e!r}") from e
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r}: expected a Task or a function returning one, got {type(task).__name__}")
    return task


# --- text helpers -------------------------------------------------------------------------------------------------

_STRIP = string.punctuation + "“”‘’«»…–—"  # noqa: RUF001  (typographic quotes and dashes models emit)


def words(text: str) -> list[str]:
    """Lowercased words, punctuation and markdown stripped from their ends; pure punctuation is not a word."""
    out = []
    for raw in text.split():
        word = raw.strip(_STRIP).lower()
        if any(c.isalnum() for c in word):
            out.append(word)
    return out


def in_list(word: str, vocabulary: frozenset[str]) -> bool:
    """Membership allowing a regular plural ("apples", "peaches", "cherries")."""
    candidates = {word}
    if word.endswith("ies"):
        candidates.add(word[:-3] + "y")
    if word.endswith("es"):
        candidates.add(word[:-2])
    if word.endswith("s"):
        candidates.add(word[:-1])
    return not candidates.isdisjoint(vocabulary)


ARTICLES = frozenset({"a", "an", "the"})


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


# --- one_word -----------------------------------------------------------------------------------------------------

CATEGORIES: dict[str, frozenset[str]] = {
    name: frozenset(members.split())
    for name, members in {
        "fruit": "apple banana orange mango grape grapes pear peach plum cherry strawberry blueberry raspberry "
        "blackberry watermelon melon cantaloupe kiwi pineapple lemon lime grapefruit apricot papaya guava fig date "
        "pomegranate coconut lychee nectarine tangerine clementine mandarin cranberry avocado persimmon quince "
        "passionfruit dragonfruit durian jackfruit gooseberry currant olive tomato",
        "animal": "dog cat horse cow pig sheep goat lion tiger bear wolf fox rabbit mouse rat elephant giraffe "
        "zebra monkey gorilla chimpanzee kangaroo koala panda deer moose camel hippo hippopotamus rhino rhinoceros "
        "dolphin whale shark octopus squirrel hedgehog otter beaver bat owl eagle penguin parrot snake lizard "
        "turtle frog crocodile alligator cheetah leopard jaguar hyena donkey mule llama alpaca raccoon skunk "
        "badger sloth bison buffalo ox hamster ferret chicken duck goose swan crow lamb puppy kitten bird fish",
        "color": "red orange yellow green blue indigo violet purple pink brown black white gray grey cyan "
        "magenta turquoise teal navy maroon beige tan gold silver crimson scarlet lavender lilac amber coral "
        "ivory khaki olive emerald azure burgundy chartreuse ochre sepia mauve fuchsia aqua cream charcoal",
        "vegetable": "carrot potato tomato onion garlic cabbage lettuce spinach broccoli cauliflower cucumber "
        "pepper celery pea peas bean beans corn pumpkin squash zucchini eggplant aubergine radish turnip beet "
        "beetroot kale leek asparagus artichoke parsnip yam okra chard sprout sprouts shallot rutabaga arugula",
        "country": "france germany italy spain portugal england britain scotland ireland wales japan china "
        "india russia canada mexico brazil argentina chile peru colombia egypt kenya nigeria ghana morocco "
        "ethiopia australia usa america greece turkey poland sweden norway denmark finland iceland netherlands "
        "holland belgium switzerland austria hungary ukraine iran iraq israel pakistan vietnam thailand "
        "indonesia philippines malaysia singapore korea nepal cuba jamaica venezuela uruguay",
        "musical instrument": "piano guitar violin viola cello bass drum drums flute clarinet oboe bassoon "
        "saxophone trumpet trombone tuba harp harmonica accordion banjo ukulele mandolin xylophone organ "
        "keyboard synthesizer tambourine triangle cymbal cymbals bagpipes sitar recorder piccolo marimba bongo",
        "sport": "athletics weightlifting football soccer basketball baseball tennis golf hockey rugby cricket "
        "volleyball swimming "
        "boxing wrestling cycling running skiing snowboarding surfing skateboarding badminton archery fencing "
        "rowing sailing gymnastics karate judo taekwondo polo lacrosse handball bowling climbing diving "
        "softball squash marathon triathlon curling",
        "flower": "rose tulip daisy lily sunflower orchid daffodil carnation lavender violet poppy marigold "
        "jasmine peony iris lotus hibiscus magnolia dahlia chrysanthemum geranium petunia begonia azalea "
        "camellia gardenia lilac zinnia aster bluebell buttercup dandelion snowdrop primrose crocus",
        "bird": "eagle hawk falcon owl sparrow robin crow raven pigeon dove parrot penguin ostrich emu flamingo "
        "swan duck goose pelican seagull gull heron stork crane peacock turkey chicken hummingbird woodpecker "
        "kingfisher cardinal bluejay jay finch canary starling swallow vulture condor albatross puffin magpie",
        "tree": "oak maple pine birch willow elm ash cedar spruce fir redwood sequoia cypress palm beech "
        "poplar sycamore chestnut walnut cherry apple magnolia baobab eucalyptus acacia bamboo juniper yew "
        "hemlock larch alder aspen hickory mahogany teak olive banyan",
        "metal": "iron gold silver copper aluminum aluminium zinc tin lead nickel platinum titanium steel brass "
        "bronze mercury cobalt chromium tungsten magnesium lithium sodium potassium calcium uranium palladium",
        "vehicle": "car bus truck bicycle bike motorcycle scooter train tram van taxi airplane plane aeroplane "
        "helicopter boat ship ferry yacht submarine tractor ambulance jeep limousine wagon rocket sled canoe "
        "kayak skateboard lorry minivan sedan",
    }.items()
}


# Held out: one_word never trains on these categories; its eval split asks for them.
EVAL_CATEGORIES: dict[str, frozenset[str]] = {
    name: frozenset(members.split())
    for name, members in {
        "insect": "ant bee bumblebee honeybee beetle butterfly moth fly mosquito wasp hornet ladybug ladybird "
        "grasshopper cricket cockroach termite dragonfly damselfly flea louse lice caterpillar firefly locust aphid "
        "mantis cicada weevil earwig gnat midge katydid",
        "drink": "water tea coffee milk juice lemonade soda cola beer wine whiskey whisky vodka rum gin cocoa "
        "smoothie milkshake champagne cider kombucha espresso latte cappuccino brandy tequila sake punch eggnog "
        "mocha chai lassi kefir",
        "piece of furniture": "chair table sofa couch bed desk shelf shelves bookshelf cabinet dresser wardrobe "
        "stool bench armchair ottoman cupboard bookcase nightstand recliner futon sideboard chest drawer drawers "
        "cot crib hammock loveseat divan",
        "shape": "circle square triangle rectangle oval pentagon hexagon octagon heptagon diamond star heart "
        "sphere cube cone cylinder pyramid rhombus trapezoid ellipse parallelogram crescent prism polygon",
        "body part": "hand arm leg foot feet head eye ear nose mouth finger toe knee elbow shoulder neck heart "
        "brain lung liver stomach back chest hip wrist ankle lip tongue tooth teeth skin hair thumb face chin "
        "cheek forehead eyebrow kidney spine",
        "dessert": "cake pie cookie brownie pudding cupcake tart cheesecake donut doughnut muffin pastry mousse "
        "custard sorbet gelato fudge macaron eclair tiramisu trifle cobbler crumble parfait flan souffle baklava "
        "cannoli strudel",
        "planet": "mercury venus earth mars jupiter saturn uranus neptune pluto",
        "profession": "doctor teacher nurse lawyer engineer chef farmer pilot firefighter dentist accountant "
        "architect artist baker banker butcher carpenter cashier electrician journalist judge librarian mechanic "
        "musician painter pharmacist photographer plumber programmer scientist secretary singer soldier surgeon "
        "tailor veterinarian waiter writer actor athlete cook driver",
        "piece of clothing": "shirt pants trousers jeans dress skirt jacket coat sweater hat cap scarf glove "
        "gloves sock socks shoe shoes boot boots shorts hoodie blouse vest tie belt suit",
        "kitchen utensil": "spoon fork knife spatula whisk ladle tongs pan pot peeler grater colander sieve "
        "strainer skillet wok cleaver",
    }.items()
}


def _one_word_content(category: str) -> str:
    return f"Name {_article(category)} {category}. Answer with one word only."


def _one_word_prompt(rng: random.Random) -> Messages:
    return [{"role": "user", "content": _one_word_content(rng.choice(sorted(CATEGORIES)))}]


def _category_of(prompt: Messages) -> frozenset[str]:
    content = prompt[-1]["content"]
    for lists in (CATEGORIES, EVAL_CATEGORIES):
        for category, members in lists.items():
            if content.startswith(f"Name {_article(category)} {category}."):
                return members
    raise ValueError(f"not a one_word prompt: {content!r}")


def one_word_reward(sample: Sample) -> float:
    """0.5 for stopping by itself after exactly one word (a leading article aside: "The elephant."); 1 when that
    word is also in the category's list (case and punctuation ignored, regular plurals accepted)."""
    answer = words(sample.text)
    if len(answer) == 2 and answer[0] in ARTICLES:
        answer = answer[1:]
    if sample.finish_reason != "stop" or len(answer) != 1:
        return 0.0
    return 1.0 if in_list(answer[0], _category_of(sample.prompt)) else 0.5


def one_word() -> Task:
    return Task(
        name="one_word",
        prompt=_one_word_prompt,
        reward=one_word_reward,
        description="Name a member of a category in one word; full reward only for a word of the category's list.",
        eval_prompts=tuple([{"role": "user", "content": _one_word_content(c)}] for c in EVAL_CATEGORIES),
    )


# --- short_description ------------------------------------------------------------------------------------------

TOPICS: dict[str, frozenset[str]] = {
    name: frozenset(members.split())
    for name, members in {
        "the ocean": "vast deep blue water salty salt waves wave sea endless wide huge immense tides tide "
        "mysterious dark wet cold beautiful powerful calm fish life marine waters horizon currents",
        "a cat": "furry fluffy soft cute curious playful independent lazy agile graceful purring purrs "
        "whiskers paws claws pet feline sleepy clever small cuddly meows meowing hunter mouse sleek",
        "the sun": "bright hot warm yellow star burning shining shines light sunlight golden huge blazing "
        "radiant fiery glowing heat energy sky daylight gas giant center",
        "winter": "cold snow snowy icy ice frozen freezing chilly frosty frost white dark winds wind "
        "cozy holidays christmas season long short days nights",
        "a forest": "green trees tree leafy dense wild lush quiet peaceful shady dark wood woods wooded "
        "animals birds nature moss tall ancient mysterious serene",
        "a city": "busy crowded noisy loud bustling urban buildings skyscrapers streets traffic lights "
        "people tall vibrant lively concrete cars big huge dense",
        "coffee": "hot bitter dark strong warm rich aromatic black caffeine energizing energy morning "
        "brewed beans bean cup drink roasted delicious bold smooth",
        "the moon": "bright white pale silver round night glowing shining lunar craters crater rock rocky "
        "cold distant full luminous satellite orbit gray grey dusty",
        "a dog": "loyal friendly furry playful faithful happy cute fluffy energetic pet companion barks "
        "barking tail wagging loving protective smart best friend canine",
        "rain": "wet water drops droplets falling cool cold grey gray cloudy clouds storm stormy refreshing "
        "soft gentle heavy pouring puddles showers drizzle",
        "fire": "hot burning flames flame bright warm red orange smoke smoky dangerous heat glowing blazing "
        "crackling fierce wild light ashes embers",
        "a mountain": "tall high huge massive rocky rock steep peak peaks summit snow snowy majestic towering "
        "giant stone cliffs climb lofty grand",
        "summer": "hot warm sunny sun bright long days beach vacation holidays heat humid sunshine "
        "swimming relaxing lazy fun outdoor",
        "music": "melody melodic rhythm harmony sound sounds beautiful notes song songs emotional "
        "art soothing loud joyful lyrics beat beats",
        "a library": "books book quiet silent reading shelves knowledge learning study peaceful calm "
        "stories quietly information literature",
        "snow": "white cold soft fluffy frozen icy flakes snowflakes winter powdery crisp wet quiet "
        "sparkling blanket pure",
    }.items()
}


# Held out: short_description never trains on these topics; its eval split asks for them.
EVAL_TOPICS: dict[str, frozenset[str]] = {
    name: frozenset(members.split())
    for name, members in {
        "a river": "flowing water wet long winding fast slow blue cold clear fish banks current stream calm "
        "rushing deep wide muddy peaceful",
        "a garden": "green flowers plants trees grass colorful colourful beautiful peaceful quiet fresh "
        "blooming lush bees vegetables soil sunny",
        "the desert": "hot dry sandy sand vast empty barren arid dunes sun cactus harsh endless lonely golden dusty",
        "a train": "fast long loud noisy metal railway rails tracks carriages passengers engine steam speedy "
        "moving travel station",
        "chocolate": "sweet brown dark delicious rich creamy tasty smooth sugary milk bitter cocoa treat "
        "dessert yummy melting",
        "a storm": "dark loud windy rain rainy thunder lightning wild violent stormy wet powerful heavy "
        "clouds scary fierce",
        "the night": "dark quiet black calm cold stars starry moon moonlit peaceful silent still sleepy "
        "mysterious late",
        "an island": "tropical sandy sand beach palm palms small remote isolated sunny ocean sea surrounded "
        "paradise green",
    }.items()
}


def _description_content(topic: str) -> str:
    return f"Describe {topic} in at most five words."


def _description_prompt(rng: random.Random) -> Messages:
    return [{"role": "user", "content": _description_content(rng.choice(sorted(TOPICS)))}]


def _topic_of(prompt: Messages) -> tuple[str, frozenset[str]]:
    content = prompt[-1]["content"]
    for lists in (TOPICS, EVAL_TOPICS):
        for topic, members in lists.items():
            if content == _description_content(topic):
                return topic, members
    raise ValueError(f"not a short_description prompt: {content!r}")


def short_description_reward(sample: Sample) -> float:
    """0.5 for stopping by itself after 1-5 words; 1 when one of those words is in the topic's list (the topic's
    own words do not count, so "A cat." earns only the format half)."""
    answer = words(sample.text)
    if sample.finish_reason != "stop" or not 1 <= len(answer) <= 5:
        return 0.0
    topic, members = _topic_of(sample.prompt)
    related = members - set(words(topic))
    return 1.0 if any(in_list(w, related) for w in answer) else 0.5


def short_description() -> Task:
    return Task(
        name="short_description",
        prompt=_description_prompt,
        reward=short_description_reward,
        description="Describe a topic in at most five words; full reward only for words related to the topic.",
        eval_prompts=tuple([{"role": "user", "content": _description_content(t)}] for t in EVAL_TOPICS),
    )


# --- capitals (tiny random model) ---------------------------------------------------------------------------------

TINY_PROMPTS = (
    "Say something.",
    "Tell me about the river.",
    "What is the weather like?",
    "Write a short sentence.",
    "Describe the market.",
    "What did the children count?",
    "Tell me a story.",
    "Where is Paris?",
)


TINY_EVAL_PROMPTS = (  # held out from TINY_PROMPTS
    "Name a city.",
    "What time is it?",
    "Describe a painting.",
    "Tell me about London.",
    "Count the stars.",
    "What is your name?",
    "Describe the harbour.",
    "Write a title.",
)


def _tiny_prompt(rng: random.Random) -> Messages:
    return [{"role": "user", "content": rng.choice(TINY_PROMPTS)}]


def capitals_reward(sample: Sample) -> float:
    """The fraction of the completion's tokens whose text contains a capital letter (0 for an empty answer)."""
    if not sample.pieces:
        return 0.0
    return sum(any(c.isupper() for c in piece) for piece in sample.pieces) / len(sample.pieces)


def capitals() -> Task:
    """For tests on the tiny random model: dense, and a random policy gets ~0.1 (~10% of its vocabulary has a
    capital letter). Its logits span only ~2.6 nats (random N(0, 0.02) tied embeddings of width 128), so no reward
    is learnable at temperature 1: train it at temperature <= 0.25."""
    return Task(
        name="capitals",
        prompt=_tiny_prompt,
        reward=capitals_reward,
        description="Use tokens with capital letters (for the tiny test model).",
        eval_prompts=tuple([{"role": "user", "content": p}] for p in TINY_EVAL_PROMPTS),
    )


BUILTIN_TASKS = (  # for docs and --help
    "paraloop.envs.tasks:one_word",
    "paraloop.envs.tasks:short_description",
    "paraloop.envs.tasks:capitals",
    "paraloop.envs.calculator:calculator",
)
