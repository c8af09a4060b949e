"""Reward tasks: `module:function` resolution with clear errors, prompts drawn from a seeded rng, and rewards that
pay for content, not just format."""

import random
import sys
import types

import pytest

from paraloop.envs.tasks import (
    BUILTIN_TASKS,
    CATEGORIES,
    TOPICS,
    Sample,
    Task,
    capitals,
    load_task,
    one_word,
    short_description,
)


def sample(prompt: str, text: str, finish_reason: str = "stop", pieces: list[str] | None = None) -> Sample:
    return Sample(
        prompt=[{"role": "user", "content": prompt}],
        text=text,
        finish_reason=finish_reason,
        pieces=pieces or [],
    )


def test_every_builtin_task_resolves_to_a_task_named_after_its_function():
    for spec in BUILTIN_TASKS:
        task = load_task(spec)
        assert isinstance(task, Task)
        assert task.name == spec.rsplit(":", 1)[1]


def test_a_user_module_may_export_a_task_function_or_a_task(monkeypatch):
    module = types.ModuleType("user_tasks")
    yes = Task(name="yes", prompt=lambda rng: [{"role": "user", "content": "Say yes."}], reward=lambda s: 1.0)
    module.make = lambda: yes
    module.ready = yes
    monkeypatch.setitem(sys.modules, "user_tasks", module)
    assert load_task("user_tasks:make") is yes
    assert load_task("user_tasks:ready") is yes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("one_word", "expected 'module:function'"),
        ("paraloop.envs.tasks:", "expected 'module:function'"),
        ("paraloop.envs.no_such_module:one_word", "cannot import module 'paraloop.envs.no_such_module'"),
        ("paraloop.envs.tasks:no_such_task", "has no attribute 'no_such_task'"),
        ("paraloop.envs.tasks:words", "calling words() failed"),  # it needs an argument
        ("paraloop.envs.tasks:in_list", "calling in_list() failed"),
        ("paraloop.envs.tasks:CATEGORIES", "expected a Task or a function returning one, got dict"),
        ("paraloop.envs.tasks:capitals_reward", "calling capitals_reward() failed"),
    ],
)
def test_bad_specs_are_value_errors_naming_the_spec(spec, message):
    with pytest.raises(ValueError) as err:
        load_task(spec)
    assert repr(spec) in str(err.value)
    assert message in str(err.value)


def test_prompts_are_chat_messages_drawn_reproducibly_from_the_rng():
    for task in (one_word(), short_description(), capitals()):
        first = [task.prompt(random.Random(3)) for _ in range(2)]
        assert first[0] == first[1]
        messages = first[0]
        assert isinstance(messages, list) and messages[-1]["role"] == "user" and messages[-1]["content"]
        drawn = {task.prompt(random.Random(seed))[-1]["content"] for seed in range(200)}
        assert len(drawn) > 1


def test_one_word_prompts_cover_every_category_with_the_right_article():
    drawn = {one_word().prompt(random.Random(seed))[-1]["content"] for seed in range(400)}
    assert len(drawn) == len(CATEGORIES)
    assert "Name an animal. Answer with one word only." in drawn
    assert "Name a fruit. Answer with one word only." in drawn


@pytest.mark.parametrize(
    "category, text, finish_reason, expected",
    [
        ("fruit", "Apple.", "stop", 1.0),
        ("fruit", "apples", "stop", 1.0),  # regular plural
        ("fruit", "Cherries!", "stop", 1.0),
        ("color", "**Red**", "stop", 1.0),  # markdown and case ignored
        ("animal", "The elephant.", "stop", 1.0),  # a leading article is not a second word
        ("color", "Melon", "stop", 0.5),  # one word, but not a color: format only
        ("fruit", "fruit", "stop", 0.5),  # naming the category is not an answer
        ("fruit", "Apple", "length", 0.0),  # did not stop by itself
        ("fruit", "I like apples.", "stop", 0.0),
        ("animal", "a big elephant", "stop", 0.0),
        ("fruit", "", "stop", 0.0),
        ("fruit", "...", "stop", 0.0),
    ],
)
def test_one_word_pays_half_for_the_format_and_all_for_a_word_of_the_category(category, text, finish_reason, expected):
    article = "an" if category[0] in "aeiou" else "a"
    prompt = f"Name {article} {category}. Answer with one word only."
    assert one_word().reward(sample(prompt, text, finish_reason)) == expected


@pytest.mark.parametrize(
    "topic, text, finish_reason, expected",
    [
        ("the ocean", "Vast, deep and blue.", "stop", 1.0),
        ("the ocean", "The ocean is salty.", "stop", 1.0),
        ("a cat", "Furry.", "stop", 1.0),
        ("the ocean", "The ocean.", "stop", 0.5),  # restating the topic earns only the format half
        ("a cat", "I am a dry towel.", "stop", 0.5),
        ("the ocean", "Vast deep blue salty water everywhere", "stop", 0.0),  # six words
        ("the ocean", "Vast and deep", "length", 0.0),
        ("the ocean", "", "stop", 0.0),
    ],
)
def test_short_description_pays_half_for_five_words_and_all_for_a_related_word(topic, text, finish_reason, expected):
    prompt = f"Describe {topic} in at most five words."
    assert short_description().reward(sample(prompt, text, finish_reason)) == expected


def test_every_topic_list_has_related_words_besides_the_topic_itself():
    for topic, related in TOPICS.items():
        assert len(related - set(topic.split())) >= 10, topic


def test_rewards_reject_prompts_of_another_task():
    with pytest.raises(ValueError, match="not a one_word prompt"):
        one_word().reward(sample("Describe the sun in at most five words.", "Hot."))
    with pytest.raises(ValueError, match="not a short_description prompt"):
        short_description().reward(sample("Name a fruit. Answer with one word only.", "Apple"))


def test_capitals_is_the_fraction_of_tokens_with_a_capital_letter():
    reward = capitals().reward
    assert reward(sample("Say something.", "The cat Sat", pieces=["The", " cat", " Sat"])) == pytest.approx(2 / 3)
    assert reward(sample("Say something.", "ABC", pieces=["ABC"])) == 1.0
    assert reward(sample("Say something.", "abc", pieces=["a", "bc"])) == 0.0
    assert reward(sample("Say something.", "", pieces=[])) == 0.0


# --- eval splits and user tasks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", BUILTIN_TASKS)
def test_every_builtin_task_has_a_held_out_eval_split(spec):
    task = load_task(spec)
    held_out = [p[-1]["content"] for p in task.eval_prompts]
    assert len(held_out) >= 8 and len(set(held_out)) == len(held_out)
    rng = random.Random(0)
    trained = {task.prompt(rng)[-1]["content"] for _ in range(2000)}
    assert trained.isdisjoint(held_out), "training never draws an eval prompt"


def test_held_out_prompts_are_scored_like_training_ones():
    assert one_word().reward(sample("Name an insect. Answer with one word only.", "Bee.")) == 1.0
    assert one_word().reward(sample("Name a piece of furniture. Answer with one word only.", "Banana")) == 0.5
    assert short_description().reward(sample("Describe the desert in at most five words.", "Hot and dry.")) == 1.0
    assert short_description().reward(sample("Describe a river in at most five words.", "A river.")) == 0.5


def test_a_task_module_in_the_current_directory_loads_without_pythonpath(tmp_path, monkeypatch):
    """A console script puts its own bin/ on sys.path, not the current directory: the task must load anyway."""
    (tmp_path / "my_cwd_tasks.py").write_text(
        "from paraloop.envs.tasks import Task\n"
        "def hello():\n"
        "    return Task(name='hello', prompt=lambda rng: [{'role': 'user', 'content': 'Hi.'}], reward=lambda s: 1.0)\n"
    )
    (tmp_path / "pkg_here").mkdir()
    (tmp_path / "pkg_here" / "__init__.py").write_text("")
    (tmp_path / "pkg_here" / "tasks.py").write_text("from my_cwd_tasks import hello as again\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert load_task("my_cwd_tasks:hello").name == "hello"
    assert load_task("pkg_here.tasks:again").name == "hello"
    assert load_task(str(tmp_path / "my_cwd_tasks.py") + ":hello").name == "hello"
    with pytest.raises(ValueError, match="cannot import module 'still_missing'"):
        load_task("still_missing:hello")
    (tmp_path / "broken_tasks.py").write_text("import no_such_dependency_here\n")
    with pytest.raises(ValueError, match="no_such_dependency_here"):
        load_task("broken_tasks:anything")


def no_eval_split() -> Task:  # for test_eval: a task without held-out prompts
    return Task(name="bare", prompt=lambda rng: [{"role": "user", "content": "Hi."}], reward=lambda s: 1.0)
