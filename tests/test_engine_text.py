"""Streaming text of a row: deltas add up to the decoded completion, stop strings are cut however split."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
from paraloop.engine.text import IncrementalDetokenizer, StopStrings
from paraloop.model import load_model


def feed_all(stops: StopStrings, pieces: list[str]) -> str:
    out = []
    for piece in pieces:
        out.append(stops.feed(piece))
        if stops.stopped:
            break
    return "".join(out)


def test_a_stop_string_split_across_pieces_is_found_and_excluded():
    stops = StopStrings(["o w"])
    assert feed_all(stops, ["Hel", "lo", " w", "orld"]) == "Hell"
    assert stops.stopped


def test_text_that_may_start_a_stop_string_is_held_back_until_settled():
    stops = StopStrings(["<end>"])
    assert stops.feed("abc<e") == "abc"
    assert stops.feed("x") == "<ex"
    assert stops.feed("<en") == ""
    assert stops.flush() == "<en"  # the row ended otherwise: held text was no stop string
    assert not stops.stopped


def test_the_earliest_of_several_stop_strings_wins():
    stops = StopStrings(["b", "xyz", "cd"])
    assert stops.feed("a xyzcd b") == "a "
    assert stops.stopped


def test_without_stop_strings_text_passes_through():
    stops = StopStrings([])
    assert stops.feed("anything") == "anything" and stops.flush() == ""


def test_deltas_add_up_to_the_completion_text_including_multibyte_characters(tiny_model_path):
    _, tokenizer, _, _ = load_model(tiny_model_path)
    prompt = tokenizer.encode("The answer is")
    completion = tokenizer.encode(" café ✓ naïve 12 + 7 = 19", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in completion]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(prompt + completion)[len(tokenizer.decode(prompt)) :]
    assert "".join(deltas).startswith(" café")  # the first word keeps its leading space
    assert "" in deltas  # some tokens are partial UTF-8 sequences, held until complete
    assert all("\ufffd" not in d for d in deltas)
