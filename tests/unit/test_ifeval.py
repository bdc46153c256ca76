"""IFEval evaluator: known pass/fail answers, the canonical metrics, offline Punkt, prompt files, the cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nightly_train.identity import ModelIdentity
from nightly_train.ifeval import (
    DEMO_PROMPTS,
    GREEDY_EVAL_DECODING,
    PROJECT_PROMPTS,
    IFEvalPrompt,
    IFEvalResult,
    ResultCache,
    ensure_punkt,
    evaluate,
    load_prompts,
    prompt_set_fingerprint,
    score,
)
from foundation.errors import ConfigError, GateError

GOOGLE_IFEVAL = Path("/work/shared/data/ifeval/input_data.jsonl")


@pytest.fixture(scope="module", autouse=True)
def punkt_dir(tmp_path_factory) -> Path:
    """Punkt materialized into a temporary NLTK data root; later `score` calls reuse it."""
    return ensure_punkt(tmp_path_factory.mktemp("nltk_data"))


def P(key: int, *instructions: tuple[str, dict], prompt: str = "Answer the question.") -> IFEvalPrompt:
    return IFEvalPrompt(key, prompt, tuple(i for i, _ in instructions), tuple(k for _, k in instructions))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ checkers
def test_punkt_is_written_offline_and_loads(tmp_path, monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download must never run")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = ensure_punkt(tmp_path / "nltk")
    files = sorted(p.name for p in (root / "tokenizers" / "punkt_tab" / "english").iterdir())
    assert files == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    assert str(root) in nltk.data.path
    # "Dr." is a known abbreviation of the English model: a naive split on periods would give 4.
    assert len(nltk.data.load("tokenizers/punkt/english.pickle").tokenize("Dr. Smith came. He sat. Fine!")) == 3


def test_sentence_count_instruction_is_really_checked():
    less_than_3 = P(1, ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}))
    at_least_3 = P(2, ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}))
    three, one = "It rains. The street is wet. We stay in.", "It rains today."
    r = score([less_than_3, less_than_3, at_least_3, at_least_3], [three, one, three, one])
    assert r.per_prompt_strict == (False, True, True, False)
    assert r.by_instruction["length_constraints:number_sentences"].strict_passed == 2


def test_known_passes_and_failures_strict_and_loose():
    prompts = [
        P(1, ("punctuation:no_comma", {})),
        P(2, ("punctuation:no_comma", {})),
        P(3, ("change_case:english_lowercase", {})),
        P(4, ("detectable_format:title", {})),
        P(5, ("detectable_format:json_format", {})),
        P(6, ("startend:quotation", {})),
        P(7, ("startend:end_checker", {"end_phrase": "That is all."})),
    ]
    responses = [
        "Apples are red and sweet.",
        "Apples are red, and sweet.",
        "this answer is written in plain english words without any capital letters.",
        "A story without a title.",
        '```json\n{"colour": "red"}\n```',
        'Sure, here it is:\n"Paris is the capital of France."',  # only the loose variant drops the first line
        "The moon is bright tonight. That is all.",
    ]
    r = score(prompts, responses)
    assert r.per_prompt_strict == (True, False, True, False, True, False, True)
    assert r.per_prompt_loose == (True, False, True, False, True, True, True)
    assert r.prompt_strict == pytest.approx(4 / 7)
    assert r.prompt_loose == pytest.approx(5 / 7)
    assert r.keys == (1, 2, 3, 4, 5, 6, 7)
    assert r.n_prompts == 7
    assert r.n_instructions == 7


def test_instruction_level_pools_all_instructions_not_a_mean_of_prompts():
    one_instruction = P(1, ("punctuation:no_comma", {}))
    three_instructions = P(2, ("punctuation:no_comma", {}), ("detectable_format:title", {}),
                           ("keywords:existence", {"keywords": ["garden"]}))
    r = score([one_instruction, three_instructions], ["No commas here.", "Red, green, blue."])
    # Instruction level: 1 passed of 4 = 0.25; a mean of per-prompt fractions would say (1/1 + 0/3) / 2 = 0.5.
    assert r.instruction_strict == pytest.approx(0.25)
    assert r.instruction_loose == pytest.approx(0.25)
    assert r.prompt_strict == pytest.approx(0.5)
    tally = r.by_instruction["punctuation:no_comma"]
    assert (tally.strict_passed, tally.loose_passed, tally.total) == (1, 1, 2)
    assert r.by_instruction["detectable_format:title"].total == 1


def test_empty_answer_fails_every_instruction_and_still_counts():
    prompts = [P(1, ("punctuation:no_comma", {}), ("detectable_format:title", {})), P(2, ("startend:quotation", {}))]
    r = score(prompts, ["", '"quoted"'])
    assert r.n_instructions == 3
    assert r.instruction_strict == pytest.approx(1 / 3)
    assert r.per_prompt_strict == (False, True)
    assert r.per_prompt_loose == (False, True)


def test_score_is_deterministic_and_leaves_the_callers_random_stream_alone():
    prompts = [P(1, ("language:response_language", {"language": "fr"})), P(2, ("punctuation:no_comma", {}))]
    answers = ["Bonjour, je suis content de vous voir aujourd'hui.", "ok"]
    random.seed(123)
    expected = random.random()
    random.seed(123)
    first = score(prompts, answers)
    assert random.random() == expected
    assert score(prompts, answers) == first
    assert first.per_prompt_strict == (True, True)


def test_score_refuses_mismatched_or_non_string_responses():
    prompts = [P(1, ("punctuation:no_comma", {}))]
    with pytest.raises(GateError, match="1 prompts but 2 responses"):
        score(prompts, ["a", "b"])
    with pytest.raises(GateError, match="not strings"):
        score(prompts, [None])


def test_evaluate_generates_once_for_all_prompts_in_order():
    prompts = [P(1, ("punctuation:no_comma", {}), prompt="first"), P(2, ("punctuation:no_comma", {}), prompt="second")]
    calls = []

    def generate(texts: list[str]) -> list[str]:
        calls.append(texts)
        return ["fine", "not, fine"]

    r = evaluate(prompts, generate)
    assert calls == [["first", "second"]]
    assert r.per_prompt_strict == (True, False)
    assert GREEDY_EVAL_DECODING.temperature == 0.0
    assert GREEDY_EVAL_DECODING.max_tokens == 256


# ------------------------------------------------------------------------------------------ prompt files
DEMO_ANSWERS = {
    1: "the sea is wide and blue\nthe waves sing soft and low\nthe gulls fly over me",
    2: "My favourite fruit is the mango. It is sweet and juicy. I like to eat it in summer.",
    3: "A rainbow is an arc of colours in the sky. Sunlight bends inside raindrops and splits into colours.",
    4: "* Drink water every day.\n* Sleep eight hours.\n* Walk for thirty minutes.",
    5: "<<The Brave Cat>>\nOnce there was a cat who climbed the tallest tree in town.",
    6: "The moon has no air. Is there anything else I can help with?",
    7: '```json\n["red", "orange", "yellow", "green", "blue", "indigo", "violet"]\n```',
    8: "A dog is a loyal animal. It is a true friend to people.",
    9: '"The capital of France is Paris."',
    10: "Hi Sam, the weekend was fun and I hope to see you soon.\nP.S. I still have your book.",
    11: "The sun is bright. The sky is clear.",
    12: "Books teach us new things. They make us think. They also help us relax.",
    13: "My answer is yes.",
    14: "Dear [name], please come to dinner at [place] on Friday.",
    15: "*Boil the water* first. Then *steep the tea* for three minutes.",
    16: "We walked in the park and fed the ducks.\n***\nLater we had ice cream by the lake.",
    17: "THE OCEAN IS DEEP AND BLUE. IT COVERS MOST OF THE EARTH.",
    18: "SECTION 1\nPack sandwiches and juice.\nSECTION 2\nFind a shady spot in the park.",
    19: "Birds fly high in the sky. The sky is their home.",
    20: "The forest is quiet and full of moss, ferns and birds.",
    21: "Happy birthday! Best wishes from a big bunch of friends.",
    22: "Bonjour, je m'appelle Sam et je suis un assistant. Je suis content de vous rencontrer aujourd'hui.",
    23: "Max\n******\nBuddy",
    24: "Write one sentence about summer. Summer is the warmest season of the year.",
    25: "You CAN do it. Study hard and NEVER give up.",
    26: "It is sunny and warm today with a light breeze.",
    27: "We climbed the mountain early in the morning.\n\nthen we rested at the top and looked at the view.",
    28: "A computer is a machine that follows instructions called programs. It can store information, do "
        "calculations very quickly, show pictures and videos, play music, and connect to other computers through "
        "the internet so that people can work and talk together.",
    29: "cows pigs and sheep live on a farm",
    30: "<<Snow>>\nWhite snow falls softly\ncold wind whispers through the night\nThat is all.",
    31: "My ideal house is small and bright with a big garden full of flowers.",
    32: "* Arrive early.\n* Dress neatly.\n* Listen carefully.\n* Ask good questions.",
    33: '{"name": "Anna", "age": 30}',
    34: "Thank you for teaching me so much this year.\nP.P.S You are the best teacher.",
    35: '"Bees make honey and wax."',
    36: "This bicycle is light and strong and rides smoothly on any road. Any other questions?",
    37: "People need rest to stay healthy. Sleep gives the body and mind the rest they need.",
    38: "THIS SONG MAKES ME HAPPY EVERY TIME I HEAR IT.",
    39: "The city *glows with lights* at night. People walk and talk.",
    40: "Buenos días, vecino, espero que tengas un día maravilloso.",
}


def test_demo_set_is_valid_and_every_prompt_can_be_satisfied():
    prompts = load_prompts(DEMO_PROMPTS)  # validated against the checker package: ids known, kwargs complete
    assert [p.key for p in prompts] == list(range(1, 41))
    assert [p.key for p in prompts if len(p.prompt) >= 400] == []
    good = score(prompts, [DEMO_ANSWERS[p.key] for p in prompts])
    assert good.prompt_strict == 1.0
    assert good.instruction_strict == 1.0
    assert good.n_instructions == 49
    assert len(good.by_instruction) >= 20
    wrong = score(prompts, [DEMO_ANSWERS[(p.key % 40) + 1] for p in prompts])  # each answer to another prompt
    assert wrong.prompt_strict < 0.5


def test_subset_is_seeded_and_sorted_by_key():
    a = load_prompts(subset=10, seed=0)
    assert a == load_prompts(subset=10, seed=0)
    assert [p.key for p in a] == sorted(p.key for p in a)
    assert len({p.key for p in a}) == 10
    assert [p.key for p in load_prompts(subset=10, seed=1)] != [p.key for p in a]
    assert prompt_set_fingerprint(a) != prompt_set_fingerprint(load_prompts(subset=10, seed=1))
    for bad in (0, 241):
        with pytest.raises(ConfigError, match=f"subset={bad}"):
            load_prompts(subset=bad)


@pytest.mark.parametrize("ids, kwargs, message", [
    (["keywords:no_such_check"], [{}], "unknown instruction id 'keywords:no_such_check'"),
    (["length_constraints:number_words"], [{"num_words": 50}], r"miss \['relation'\]"),
    (["punctuation:no_comma"], [{"letter": "a"}], "rejects kwargs"),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "about"}], "rejects kwargs"),
    (["punctuation:no_comma", "detectable_format:title"], [{}], "2 instruction ids but 1 kwargs"),
])
def test_invalid_prompt_rows_are_refused(tmp_path, ids, kwargs, message):
    row = {"key": 7, "prompt": "Hi.", "instruction_id_list": ids, "kwargs": kwargs}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(ConfigError, match=message):
        load_prompts(path)


def test_duplicate_keys_and_bad_json_are_refused(tmp_path):
    row = {"key": 1, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    with pytest.raises(ConfigError, match=r"repeats keys \[1\]"):
        load_prompts(write_jsonl(tmp_path / "dup.jsonl", [row, row]))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1: invalid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


def test_hub_loader_reads_a_local_dataset_and_drops_none_kwargs(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [{"key": 2, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"key": 1, "prompt": "Be brief.", "instruction_id_list": ["length_constraints:number_words"],
             "kwargs": [{"num_words": 10, "relation": "less than"}]}]
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", rows)
    prompts = load_prompts(f"hub:{tmp_path / 'ds'}")  # the columnar copy gives row 2 num_words=None etc.
    assert [p.key for p in prompts] == [1, 2]
    assert prompts[1].kwargs == ({},)
    assert prompts[0].kwargs == ({"num_words": 10, "relation": "less than"},)


@pytest.mark.skipif(not GOOGLE_IFEVAL.exists(), reason=f"{GOOGLE_IFEVAL} not present")
def test_google_ifeval_file_has_541_prompts_and_834_instructions():
    prompts = load_prompts(GOOGLE_IFEVAL)
    assert len(prompts) == 541
    assert sum(len(p.instruction_id_list) for p in prompts) == 834
    r = score(prompts, [""] * 541)  # every instruction counted, none passed
    assert r.n_instructions == 834
    assert r.instruction_loose == 0.0
    assert len(r.by_instruction) == 25
    assert r.by_instruction["punctuation:no_comma"].total == 66
    assert r.by_instruction["length_constraints:number_sentences"].total == 52


# ------------------------------------------------------------------------------------------ results, cache
def _result() -> IFEvalResult:
    prompts = [P(1, ("punctuation:no_comma", {})), P(2, ("startend:quotation", {}), ("punctuation:no_comma", {}))]
    return score(prompts, ["fine", 'Here:\n"x, y"'])  # loosely, dropping the last line drops the comma


def test_result_dict_round_trips_through_json():
    r = _result()
    data = json.loads(json.dumps(r.to_dict()))
    assert data["n_prompts"] == 2
    assert data["n_instructions"] == 3
    assert data["by_instruction"]["punctuation:no_comma"] == {"strict_passed": 1, "loose_passed": 2, "total": 2}
    assert IFEvalResult.from_dict(data) == r
    assert set(r.metrics()) == {"ifeval.prompt_strict", "ifeval.prompt_loose", "ifeval.instruction_strict",
                                "ifeval.instruction_loose"}


BASE = ModelIdentity("student-drop8-21", "b" * 64, None)
TRAINED = ModelIdentity("student-drop8-21", "b" * 64, "a" * 64)


def test_cache_is_keyed_by_model_identity_prompt_set_and_decoding(tmp_path):
    cache, r = ResultCache(tmp_path / "cache"), _result()
    assert cache.get(TRAINED, r.prompt_set) is None
    cache.put(TRAINED, r)
    assert cache.get(TRAINED, r.prompt_set) == r
    assert cache.get(BASE, r.prompt_set) is None
    assert cache.get(ModelIdentity("student-drop8-21", "c" * 64, "a" * 64), r.prompt_set) is None  # base rebuilt
    assert cache.get(ModelIdentity("student-drop8-21", "b" * 64, "d" * 64), r.prompt_set) is None  # other adapter
    assert cache.get(TRAINED, "another-prompt-set") is None
    assert cache.get(TRAINED, r.prompt_set, {**GREEDY_EVAL_DECODING.model_dump(), "max_tokens": 512}) is None
    assert cache.get(TRAINED, r.prompt_set, GREEDY_EVAL_DECODING.model_dump()) == r


def test_cache_refuses_names_instead_of_identities(tmp_path):
    with pytest.raises(TypeError, match="ModelIdentity"):
        ResultCache(tmp_path).get("base", "f0")


def test_get_or_evaluate_generates_only_on_a_miss(tmp_path):
    cache, prompts, calls = ResultCache(tmp_path), load_prompts(subset=5, seed=3), []

    def generate(texts):
        calls.append(len(texts))
        return ["ok"] * len(texts)

    first = cache.get_or_evaluate(BASE, prompts, generate)
    assert cache.get_or_evaluate(BASE, prompts, generate) == first
    assert calls == [5]
    cache.get_or_evaluate(TRAINED, prompts, generate)
    assert calls == [5, 5]
    for entry in tmp_path.glob("*.json"):
        entry.write_text("{corrupt")  # an unreadable entry is a miss, then rewritten
    assert cache.get_or_evaluate(BASE, prompts, generate) == first
    assert calls == [5, 5, 5]
    assert cache.get(BASE, first.prompt_set) == first


# ------------------------------------------------------------------------------------------ the project's set
def _builder():
    """The generator script beside the file, imported from its path (it is a script, not a package module)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("build_if_project", PROJECT_PROMPTS.with_name("build_if_project.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project_build():
    return _builder().build()


def test_the_default_set_is_the_project_set_with_240_prompts_over_all_25_types():
    prompts = load_prompts()
    assert len(prompts) == 240
    assert [p.key for p in prompts] == list(range(1, 241))
    assert len({i for p in prompts for i in p.instruction_id_list}) == 25
    assert sum(len(p.instruction_id_list) for p in prompts) == 299


def test_the_project_set_is_exactly_what_its_script_builds(project_build):
    rows, _ = project_build
    assert PROJECT_PROMPTS.read_text(encoding="utf-8") == _builder().render_jsonl(rows)


def test_every_row_names_its_source():
    rows = [json.loads(line) for line in PROJECT_PROMPTS.read_text(encoding="utf-8").splitlines()]
    sources = {r["key"]: r["source"] for r in rows}
    assert {sources[k] for k in range(1, 41)} == {"hand-written (if_demo.jsonl)"}
    assert all(sources[k].startswith("generated by build_if_project.py") for k in range(41, 241))


def test_every_composed_prompt_is_satisfied_by_its_reference_answer(project_build):
    rows, refs = project_build
    prompts = {p.key: p for p in load_prompts()}
    composed = [prompts[k] for k in sorted(refs)]
    result = score(composed, [refs[p.key] for p in composed])
    assert len(composed) == 200
    assert result.prompt_strict == 1.0
    assert result.instruction_strict == 1.0


def test_composed_prompts_fail_another_prompts_reference(project_build):
    _, refs = project_build
    prompts = {p.key: p for p in load_prompts()}
    keys = sorted(refs)
    swapped = score([prompts[k] for k in keys], [refs[keys[(i + 1) % len(keys)]] for i in range(len(keys))])
    assert swapped.prompt_strict < 0.5  # the instructions are really checked, not passed by any text


@pytest.mark.skipif(not GOOGLE_IFEVAL.exists(), reason=f"{GOOGLE_IFEVAL} not present")
def test_no_project_prompt_comes_from_the_public_set():
    import re

    public = [json.loads(line)["prompt"] for line in GOOGLE_IFEVAL.read_text(encoding="utf-8").splitlines()]
    ours = load_prompts()

    def grams(text: str) -> set[tuple[str, ...]]:
        w = re.findall(r"\w+", text.lower())
        return {tuple(w[i:i + 6]) for i in range(len(w) - 5)}

    public_text, public_grams = " ".join(p.lower() for p in public), [grams(p) for p in public]
    first = {p.key: re.split(r"(?<=[.?!])\s", p.prompt.strip(), maxsplit=1)[0].lower() for p in ours}
    assert not {p.prompt.strip().lower() for p in ours} & {p.strip().lower() for p in public}
    assert [k for k, task in first.items() if task in public_text] == []  # no task sentence is a public one
    overlap = max(len(grams(p.prompt) & g) / len(grams(p.prompt)) for p in ours if p.key > 40 for g in public_grams)
    assert overlap < 0.5  # composed prompts share at most a stock instruction phrase
