"""Robustness evaluation on a tiny model trained in the test: every attack lowers accuracy on some examples, stays
within its budgets on every example, reports counts that match its JSONL rows, and is deterministic; the batched
greedy search equals a one-candidate-per-forward reference; PGD at eps = 0 is clean accuracy and never rises."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM

from tests.conftest import NEGATIVE_WORDS, POSITIVE_WORDS, TINY_MODELS, write_easy_task
from uegr_dist.config import ConfigError
from uegr_dist.data.text_classification import DataError
from uegr_dist.robustness import evaluate_robustness, load_examples
from uegr_dist.robustness.candidates import CharEdits, MaskedLMCandidates, SynonymCandidates
from uegr_dist.robustness.config import EvalDataConfig
from uegr_dist.robustness.examples import Example
from uegr_dist.robustness.metrics import summarize_text_attack
from uegr_dist.robustness.search import SearchBudget, attack_examples, greedy_attack, score_requests
from uegr_dist.robustness.stopwords import is_stop_word
from uegr_dist.robustness.text_edits import (
    EDIT_KINDS,
    KEYBOARD_NEIGHBOURS,
    char_candidates,
    edit_distance,
    replace_words,
    single_edits,
    word_spans,
)
from uegr_dist.robustness.victim import Victim, load_victim

STOP = "the"


def write_eval_file(path: Path, n: int, seed: int) -> Path:
    """Easy-task rows with a stop word in front (it must never be edited)."""
    rows = [json.loads(line) for line in write_easy_task(path, n, seed).read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "text": f"{STOP} {r['text']}"}) + "\n" for r in rows), encoding="utf-8")
    return path


# One torch thread, as the launched processes use: the 1- vs 2-process comparisons are exact only then.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    return write_eval_file(tmp_path_factory.mktemp("eval") / "eval.jsonl", 32, seed=7)


@pytest.fixture(scope="module")
def mlm_dir(victim_dir, tmp_path_factory) -> Path:
    """A tiny random BERT masked LM sharing the victim's word-level vocabulary."""
    out = tmp_path_factory.mktemp("mlm")
    tokenizer = AutoTokenizer.from_pretrained(victim_dir)
    torch.manual_seed(0)
    config = BertConfig(**TINY_MODELS["bert"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def synonym_file(tmp_path_factory) -> Path:
    """Each cue word's 'synonyms' are cue words of the other class (so substitutions can flip the label)."""
    path = tmp_path_factory.mktemp("syn") / "synonyms.txt"
    lines = [f"{p} {n} {NEGATIVE_WORDS[(i + 1) % 20]}" for i, (p, n) in enumerate(zip(POSITIVE_WORDS, NEGATIVE_WORDS))]
    lines += [f"{n} {p}" for p, n in zip(POSITIVE_WORDS, NEGATIVE_WORDS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(victim_dir, eval_file, mlm_dir, synonym_file, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("run") / "out"
    summary = evaluate_robustness(
        {
            "model": str(victim_dir),
            "data": {"file": str(eval_file)},
            "attacks": ["char", "word-mlm", "word-synonym", "pgd"],
            "output_dir": str(out),
            "progress": False,
            "word_mlm": {"model": str(mlm_dir)},
            "word_synonym": {"file": str(synonym_file)},
            "pgd": {"eps_l2": [0.0, 0.1, 0.3, 1.0, 3.0], "eps_linf": [0.0, 0.01, 0.03, 0.1], "steps": 5},
        }
    )
    return summary, out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- text edits


def _reference_distance(a: str, b: str) -> int:
    """Optimal string alignment distance by plain recursion (slow, obvious)."""
    if not a or not b:
        return len(a) + len(b)
    best = min(
        _reference_distance(a[1:], b) + 1,
        _reference_distance(a, b[1:]) + 1,
        _reference_distance(a[1:], b[1:]) + (a[0] != b[0]),
    )
    if len(a) > 1 and len(b) > 1 and a[0] == b[1] and a[1] == b[0]:
        best = min(best, _reference_distance(a[2:], b[2:]) + 1)
    return best


def test_edit_distance_matches_reference_and_counts_a_swap_as_one():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("form", "from") == 1
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
        assert edit_distance(a, b) == _reference_distance(a, b), (a, b)


def test_single_edits_of_each_kind():
    assert single_edits("abc", ["swap"]) == ["bac", "acb"]
    assert single_edits("abc", ["delete"]) == ["bc", "ac", "ab"]
    assert len(single_edits("ab", ["insert"])) == len(
        {w[:i] + c + w[i:] for w in ["ab"] for i in range(3) for c in "abcdefghijklmnopqrstuvwxyz"} - {"ab"}
    )
    assert set(single_edits("q", ["keyboard"])) == set(KEYBOARD_NEIGHBOURS["q"]) == {"1", "2", "w", "a", "s"}
    assert "xbc" not in single_edits("Abc", ["substitute"]) and "Xbc" in single_edits("Abc", ["substitute"])


@pytest.mark.parametrize("max_edits", [1, 2])
def test_char_candidates_stay_within_budget_and_are_seeded(max_edits):
    first = char_candidates(
        "robust", ["swap", "substitute", "delete", "insert", "keyboard"], max_edits, 40, random.Random(3)
    )
    again = char_candidates(
        "robust", ["swap", "substitute", "delete", "insert", "keyboard"], max_edits, 40, random.Random(3)
    )
    assert first == again and len(first) == 40
    assert all(1 <= edit_distance("robust", c) <= max_edits for c in first)
    if max_edits == 2:
        assert any(edit_distance("robust", c) == 2 for c in first)


def test_words_are_replaced_in_place_keeping_punctuation():
    text = "Hello, world!  It's fine."
    spans = word_spans(text)
    assert [s.text for s in spans] == ["Hello", "world", "It", "s", "fine"]
    assert replace_words(text, spans, {1: "wrld", 4: "fyne"}) == "Hello, wrld!  It's fyne."


def test_synonym_file_and_word_vectors(tmp_path):
    table = tmp_path / "syn.txt"
    table.write_text("good great fine good\nbad awful\n", encoding="utf-8")
    source = SynonymCandidates(str(table), 0.5, 10)
    assert source.neighbours("Good") == ["great", "fine"]
    assert source.candidates(word_spans("Good"), 0, random.Random(0)) == ["Great", "Fine"]
    vectors = tmp_path / "vec.txt"
    vectors.write_text("3 2\ngood 1 0\ngreat 0.9 0.1\nbad -1 0\n", encoding="utf-8")
    near = SynonymCandidates(str(vectors), 0.5, 10)
    assert near.neighbours("good") == ["great"] and near.neighbours("bad") == []
    assert SynonymCandidates(str(vectors), -1.0, 10).neighbours("good") == ["great", "bad"]
    vectors.write_text("good 1 0\ngreat 0.9\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a word and 2 numbers"):
        SynonymCandidates(str(vectors), 0.5, 10)


# ---------------------------------------------------------------- fast path vs reference


def chunk_end(n: int, total: int) -> int:
    """How many of `total` candidates are scored when the first flip is candidate n: chunks of 4, 4, 8, 16, ..."""
    end = 4
    while end <= n:
        end *= 2
    return min(end, total)


def reference_greedy(
    model, tokenizer, text: str, label: int, kinds, max_candidates: int, fraction: float, seed: int, first_flip: bool
):
    """The char attack written the slow, obvious way: one forward per model input. first_flip: a word's candidates
    are tried in order and the first that flips the prediction ends the search (its chunk still counts as queries)."""

    def prob(t: str) -> torch.Tensor:
        with torch.no_grad():
            return model(**tokenizer(t, return_tensors="pt")).logits.float().softmax(-1)[0]

    queries = 1
    p0 = prob(text)
    spans = word_spans(text)
    editable = [i for i, s in enumerate(spans) if not is_stop_word(s.text)]
    importance = {}
    for i in editable:
        importance[i] = float(p0[label]) - float(prob(replace_words(text, spans, {i: ""}))[label])
        queries += 1
    rng = random.Random(seed)
    current, current_p, current_text = {}, float(p0[label]), text
    for i in sorted(editable, key=lambda i: (-importance[i], i)):
        if len(current) >= math.floor(fraction * len(spans) + 1e-9):
            break
        best = None
        candidates = char_candidates(spans[i].text, kinds, 1, max_candidates, rng)
        for n, cand in enumerate(candidates):
            t = replace_words(text, spans, {**current, i: cand})
            p = prob(t)
            queries += 1
            key = (int(p.argmax()) == label, float(p[label]))
            if first_flip and not key[0]:
                best = (key, cand, t)
                queries += chunk_end(n, len(candidates)) - (n + 1)
                break
            if best is None or key < best[0]:
                best = (key, cand, t)
        if best is None or (best[0][0] and best[0][1] >= current_p):
            continue
        current[i], current_p, current_text = best[1], best[0][1], best[2]
        if not best[0][0]:
            break
    return current_text, queries


@pytest.mark.parametrize("first_flip", [False, True])
def test_batched_greedy_search_equals_one_forward_per_candidate_reference(victim_dir, eval_file, first_flip):
    model = AutoModelForSequenceClassification.from_pretrained(victim_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(victim_dir)
    victim = Victim(model, tokenizer, batch_size=16, max_length=64)
    kinds = ["swap", "substitute", "delete"]
    label2id = model.config.label2id
    examples = load_examples(EvalDataConfig(file=str(eval_file), max_examples=8), label2id, 2)
    clean = victim.probabilities([ex.text for ex in examples])
    statuses = set()
    # Two word budgets, so that both outcomes (flipped, budget exhausted) are compared.
    for fraction in (0.3, 0.5):
        budget = SearchBudget(max_word_fraction=fraction, query_budget=10_000)
        rngs = [random.Random(ex.index) for ex in examples]
        rows = attack_examples(victim, examples, clean, CharEdits(kinds, 1, 256), budget, rngs, "auto", first_flip)
        for ex, row in zip(examples, rows):
            if row["status"] == "skipped":
                continue
            args = (ex.text, ex.label, kinds, 256, fraction, ex.index, first_flip)
            assert (row["adversarial_text"], row["queries"]) == reference_greedy(model, tokenizer, *args)
            statuses.add(row["status"])
    assert statuses == {"success", "failed"}


def attack_setting(setting: str, victim_dir: Path, eval_file: Path, mlm_dir: Path, synonym_file: Path):
    """(examples, source, budget, target) of one setting of the exactness tests; each has successes and failures."""
    examples = load_examples(EvalDataConfig(file=str(eval_file), max_examples=24), {"neg": 0, "pos": 1}, 2)
    budget = SearchBudget(max_word_fraction=0.5, query_budget=2000, max_total_edits=30)
    source, target = CharEdits(list(EDIT_KINDS), 1, 64), "auto"
    if setting == "char-budgets":
        # 2 edits per word but 3 per text (the edit filter decides), 16 candidates, queries run out mid-word.
        source, budget = CharEdits(list(EDIT_KINDS), 2, 16), SearchBudget(0.5, 40, True, 3)
    elif setting.startswith("pairs"):
        # Pairs (a short first text, the file's text second); auto edits the second text, "pairs-first" the first.
        examples = [Example(e.index, f"p{e.index % 20} n{e.index % 7}", e.text, e.label) for e in examples]
        target = "text" if setting == "pairs-first" else "auto"
    elif setting == "word-mlm":
        source, budget = MaskedLMCandidates(str(mlm_dir), 16), SearchBudget(0.3, 2000)
    elif setting == "word-synonym":
        source, budget = SynonymCandidates(str(synonym_file), 0.5, 50), SearchBudget(0.3, 2000)
    return examples, source, budget, target


SETTINGS = ["char", "char-budgets", "pairs", "pairs-first", "word-mlm", "word-synonym"]


def clean_probabilities(victim: Victim, examples: list[Example]) -> torch.Tensor:
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    return victim.probabilities([e.text for e in examples], pairs)


@pytest.mark.parametrize("setting", SETTINGS)
def test_attack_examples_gives_the_rows_of_the_one_example_search(
    setting, victim_dir, eval_file, mlm_dir, synonym_file
):
    """stop_at_first_flip=False: exactly the rows of `greedy_attack` (the search before attack_examples), although
    the examples share forwards of rows grouped by length (batch size 8: every forward mixes examples)."""
    examples, source, budget, target = attack_setting(setting, victim_dir, eval_file, mlm_dir, synonym_file)
    reference = load_victim(str(victim_dir), 32, 64)
    clean = clean_probabilities(reference, examples)
    expected = [
        greedy_attack(reference, e, c, source, budget, random.Random(e.index), target) for e, c in zip(examples, clean)
    ]
    fast = load_victim(str(victim_dir), 8, 64)
    rngs = [random.Random(e.index) for e in examples]
    rows = attack_examples(fast, examples, clean, source, budget, rngs, target, stop_at_first_flip=False)
    assert rows == expected
    assert {r["status"] for r in rows} >= {"success", "failed"}
    # Queries count every candidate scored, as before; a search computes a repeated model input once.
    assert fast.queries <= sum(r["queries"] - 1 for r in rows)


@pytest.mark.parametrize("setting", SETTINGS)
def test_first_flip_search_has_the_same_outcome_on_every_example(setting, victim_dir, eval_file, mlm_dir, synonym_file):
    """stop_at_first_flip=True vs False: the same status, words and replacements on every example, except the last
    replacement of a success (the first flipping candidate instead of the most confident one); never more queries.
    So the attacked accuracy and success rate are the same."""
    examples, source, budget, target = attack_setting(setting, victim_dir, eval_file, mlm_dir, synonym_file)
    victim = load_victim(str(victim_dir), 8, 64)
    clean = clean_probabilities(victim, examples)

    def run(first_flip: bool) -> list[dict]:
        rngs = [random.Random(e.index) for e in examples]
        return attack_examples(victim, examples, clean, source, budget, rngs, target, first_flip)

    exhaustive, first = run(False), run(True)
    for a, b in zip(first, exhaustive):
        assert a["status"] == b["status"] and a["queries"] <= b["queries"]
        assert [c["word"] for c in a["changes"]] == [c["word"] for c in b["changes"]]
        differ = [c for c, d in zip(a["changes"], b["changes"]) if c != d]
        if a["status"] != "success":
            assert a == b
        else:
            assert len(differ) <= 1 and a["adversarial_prediction"] != a["label"]
    assert summarize_text_attack(first)["attacked_accuracy"] == summarize_text_attack(exhaustive)["attacked_accuracy"]
    if setting.startswith("char"):  # 16 or 64 candidates per word (word-synonym has 1-2, fewer than a chunk)
        assert sum(a["queries"] for a in first) < sum(b["queries"] for b in exhaustive)


def test_requests_scored_together_equal_each_request_scored_alone(victim_dir, eval_file):
    """score_requests (rows of all requests sorted by length, each distinct model input of a search computed once)
    vs the plain per-request scoring; a repeated input (here: unknown words, all [UNK]) gets the very same numbers."""
    victim = load_victim(str(victim_dir), 4, 64)
    texts = [json.loads(line)["text"] for line in eval_file.read_text().splitlines()][:12]
    requests = [
        ([" ".join(t.split()[: 2 + k % 7]) for t in texts[k : k + 3]] + ["the zzz p1", "the qqq p1"], None)
        for k in range(0, 12, 3)
    ]
    requests.append((["p1 n2", "n3"], ["n4 p5", "zzz"]))  # pairs go in forwards of their own
    known = [{} for _ in requests]
    answers = score_requests(victim, requests, known)
    for (texts_r, pairs_r), answer in zip(requests, answers):
        torch.testing.assert_close(answer, victim.probabilities(texts_r, pairs_r), rtol=0, atol=1e-6)
    assert all(torch.equal(a[-1], a[-2]) for a in answers[:-1])  # "zzz" and "qqq" are the same model input
    computed = victim.queries
    victim.queries = 0
    again = score_requests(victim, requests, known)  # all known: nothing computed
    assert victim.queries == 0 and all(torch.equal(a, b) for a, b in zip(again, answers))
    assert computed == 2 * sum(len(t) for t, _ in requests) - 4  # scored alone + together minus the 4 repeats


# ---------------------------------------------------------------- the attacks on a trained model


def test_summary_matches_jsonl_rows_and_files(full_run):
    summary, out = full_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["attacks"]) == {"char", "word-mlm", "word-synonym", "pgd_l2", "pgd_linf"}
    assert summary["n_examples"] == 32 and summary["clean"]["accuracy"] >= 0.75
    report = (out / "report.md").read_text()
    for name in ("char", "word-mlm", "word-synonym", "pgd_l2", "pgd_linf"):
        rows = read_rows(out / f"examples_{name}.jsonl")
        assert [r["index"] for r in rows] == list(range(32))
        assert name in report
        if name.startswith("pgd"):
            continue
        m = summary["attacks"][name]
        assert summarize_text_attack(rows) == m
        assert m["n_success"] + m["n_failed"] + m["n_skipped"] == 32
        assert m["clean_accuracy"] == summary["clean"]["accuracy"]
        assert m["attacked_accuracy"] == pytest.approx(m["n_failed"] / 32)
        assert m["attack_success_rate"] == pytest.approx(m["n_success"] / (m["n_success"] + m["n_failed"]))
        assert f"| {name} | {m['clean_accuracy']:.4f} | {m['attacked_accuracy']:.4f} |" in report


@pytest.mark.parametrize("name", ["char", "word-mlm", "word-synonym"])
def test_text_attack_lowers_accuracy_within_budget_on_every_example(full_run, victim_dir, name):
    summary, out = full_run
    m = summary["attacks"][name]
    assert m["n_success"] > 0 and m["attacked_accuracy"] < m["clean_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(victim_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(victim_dir)
    rows = read_rows(out / f"examples_{name}.jsonl")
    successes = [r for r in rows if r["status"] == "success"]
    with torch.no_grad():
        enc = tokenizer([r["adversarial_text"] for r in successes], return_tensors="pt", padding=True)
        predictions = model(**enc).logits.argmax(-1).tolist()
    # A success really fools the saved model.
    assert all(p != r["label"] for p, r in zip(predictions, successes))
    for r in rows:
        before, after = word_spans(r["text"]), word_spans(r["adversarial_text"])
        assert len(before) == len(after) == r["num_words"]
        changed = [(a.text, b.text) for a, b in zip(before, after) if a.text != b.text]
        assert len(changed) == r["words_changed"] <= math.floor(0.3 * len(before) + 1e-9)
        assert before[0].text == after[0].text == STOP  # stop words are protected
        assert r["queries"] <= 2000
        if r["status"] == "skipped":
            assert r["adversarial_text"] == r["text"] and r["queries"] == 1
        if name == "char":
            assert all(edit_distance(a, b) == 1 for a, b in changed)
            assert r["edit_distance"] == len(changed) <= 30


def test_pgd_curve_starts_at_clean_accuracy_and_never_rises(full_run):
    summary, out = full_run
    for name in ("pgd_l2", "pgd_linf"):
        curve = summary["attacks"][name]["curve"]
        accuracies = [p["accuracy"] for p in curve]
        assert curve[0]["eps"] == 0 and accuracies[0] == summary["clean"]["accuracy"]
        assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), accuracies
        assert accuracies[-1] < accuracies[0]
        rows = read_rows(out / f"examples_{name}.jsonl")
        assert [sum(r["correct"][j] for r in rows) / len(rows) for j in range(len(curve))] == accuracies


def test_same_seed_same_adversarial_examples(victim_dir, eval_file, tmp_path):
    def run(seed: int) -> list[dict]:
        cfg = {
            "model": str(victim_dir),
            "data": {"file": str(eval_file), "max_examples": 12},
            "attacks": ["char"],
            "output_dir": str(tmp_path / f"s{seed}-{len(list(tmp_path.iterdir()))}"),
            "progress": False,
            "seed": seed,
            "char": {"max_candidates_per_word": 8},
        }
        evaluate_robustness(cfg)
        return read_rows(Path(cfg["output_dir"]) / "examples_char.jsonl")

    first = run(0)
    assert run(0) == first
    assert run(1) != first  # the seed decides which 8 candidates of each word are tried


def test_pair_inputs_edit_only_the_second_text(victim_dir, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("premise,hypothesis,label\np1 p2 p3,n1 n2 n3 n4,neg\nn5 n6,p7 p8 p9 p10,pos\n", encoding="utf-8")
    summary = evaluate_robustness(
        {
            "model": str(victim_dir),
            "attacks": ["char"],
            "progress": False,
            "output_dir": str(tmp_path / "out"),
            "data": {"file": str(path), "text_column": "premise", "text_pair_column": "hypothesis"},
        }
    )
    rows = read_rows(tmp_path / "out" / "examples_char.jsonl")
    assert summary["n_examples"] == 2
    assert [r["text"] for r in rows] == ["p1 p2 p3", "n5 n6"] and {r["attacked_field"] for r in rows} == {"text_pair"}
    assert all(r["words_changed"] <= 1 and r["num_words"] == 4 for r in rows)


# ---------------------------------------------------------------- bad input


def test_labels_map_through_the_models_label2id(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": 0}\n', encoding="utf-8")
    examples = load_examples(EvalDataConfig(file=str(path)), {"neg": 0, "pos": 1}, 2)
    assert examples == [Example(0, "a", None, 1), Example(1, "b", None, 0)]
    path.write_text('{"text": "a", "label": "maybe"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 0: label 'maybe' is not one of the model's labels \('neg', 'pos'\)"):
        load_examples(EvalDataConfig(file=str(path)), {"neg": 0, "pos": 1}, 2)
    path.write_text('{"text": "a", "label": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match="label id 5 is outside the model's 2 classes"):
        load_examples(EvalDataConfig(file=str(path)), {"neg": 0, "pos": 1}, 2)
    with pytest.raises(DataError, match="missing column 'sentence'"):
        load_examples(EvalDataConfig(file=str(path), text_column="sentence"), {}, 2)


def test_regression_model_is_refused(tmp_path, victim_dir):
    config = BertConfig(**TINY_MODELS["bert"], vocab_size=64, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "reg")
    AutoTokenizer.from_pretrained(victim_dir).save_pretrained(tmp_path / "reg")
    with pytest.raises(ConfigError, match="regression model .* need a classification model"):
        load_victim(str(tmp_path / "reg"), 8, 32)
    with pytest.raises(ConfigError, match="no config.json"):
        load_victim(str(tmp_path), 8, 32)


def test_shipped_eval_config_holds_the_defaults():
    from dataclasses import asdict

    from uegr_dist.robustness import EvalConfig, load_eval_config

    shipped = load_eval_config(Path(__file__).resolve().parents[1] / "configs" / "eval-robustness.yaml", {"model": "m"})
    assert asdict(shipped) == asdict(EvalConfig(model="m"))


def test_masked_lm_candidates_skip_mid_word_pieces_of_byte_level_bpe(tmp_path):
    """RoBERTa-style vocabularies: only word-initial pieces (marked 'Ġ') become replacement words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

    from uegr_dist.robustness.candidates import MaskedLMCandidates

    texts = ["the cat sat on the mat", "a dog ran to the park", "the story was quite smart and fresh"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
    )
    RobertaForMaskedLM(config).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    source = MaskedLMCandidates(str(tmp_path), top_k=len(fast))
    text = "the cat sat on the mat"
    spans = word_spans(text)
    source.prepare(text, spans)
    found = [c for i in range(len(spans)) for c in source.candidates(spans, i, random.Random(0))]
    word_initial = {t[1:] for t in fast.get_vocab() if t.startswith("\u0120") and t[1:].isalnum()}
    mid_word = {t for t in fast.get_vocab() if t.isalnum()} - word_initial
    assert found and set(found) <= word_initial and not set(found) & mid_word
