"""The task registry: consistent entries, the Hub loading path (on local data with the Hub datasets' exact features,
no network), local copies, matched/mismatched evaluation and the errors of a copy shaped differently."""

from __future__ import annotations

import json
import random

import datasets
import pytest

from tests.conftest import NEGATIVE_WORDS, POSITIVE_WORDS, TINY_MODELS
from uegr_dist.config import DataConfig
from uegr_dist.data import ROBUSTNESS_SETS, SUITES, TASKS, DataError, get_task, load_raw_task
from uegr_dist.data.tasks import METRICS

NLI = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])


def _sentence(rng, label):
    own = POSITIVE_WORDS if label == 0 else NEGATIVE_WORDS
    return " ".join(rng.choice(own) for _ in range(rng.randint(3, 8)))


def glue_mnli(n=48, seed=0):
    """Rows with the features of nyu-mll/glue, config mnli (premise, hypothesis, label, idx), its five splits."""
    rng = random.Random(seed)
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": NLI,
            "idx": datasets.Value("int32"),
        }
    )

    def split(size, labelled=True):
        labels = [rng.randrange(3) if labelled else -1 for _ in range(size)]
        rows = {
            "premise": [_sentence(rng, max(y, 0) % 2) for y in labels],
            "hypothesis": [_sentence(rng, max(y, 0) % 2) for y in labels],
            "label": labels,
            "idx": list(range(size)),
        }
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict(
        {
            "train": split(n),
            "validation_matched": split(n // 4),
            "validation_mismatched": split(n // 4),
            "test_matched": split(8, labelled=False),
            "test_mismatched": split(8, labelled=False),
        }
    )


def glue_sst2(n=40, seed=0):
    """Rows with the features of nyu-mll/glue, config sst2 (sentence, label, idx)."""
    rng = random.Random(seed)
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )

    def split(size, labelled=True):
        labels = [rng.randrange(2) if labelled else -1 for _ in range(size)]
        rows = {"sentence": [_sentence(rng, 1 - y) for y in labels], "label": labels, "idx": list(range(size))}
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict({"train": split(n), "validation": split(n // 4), "test": split(6, labelled=False)})


def test_registry_entries_are_consistent():
    for name, spec in TASKS.items():
        assert spec.name == name and spec.metrics and set(spec.metrics) <= set(METRICS), name
        assert spec.regression == (spec.label_names is None), name
        if spec.regression:
            assert spec.main_metric in ("pearson", "spearman"), name
        else:
            assert len(spec.label_names) >= 2 and len(set(spec.label_names)) == len(spec.label_names), name
            assert {"pearson", "spearman", "mse"}.isdisjoint(spec.metrics), name
        assert "train" in spec.splits or "validation" in spec.splits, name
        assert spec.text_column and spec.hub_id.count("/") == 1, name
        if spec.eval_only:  # AdvGLUE / HANS: scored with the model of a trainable task
            base = TASKS[spec.train_task]
            assert not base.eval_only and base.text_pair_column is not None or spec.text_pair_column is None, name
            if spec.prediction_map is None:
                assert spec.label_names == base.label_names, name
            else:
                assert len(spec.prediction_map) == base.num_labels, name
                assert set(spec.prediction_map) <= set(range(spec.num_labels)), name
    glue = [t for t in TASKS.values() if t.hub_id == "nyu-mll/glue"]
    assert sorted(t.name for t in glue) == sorted(
        ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    )
    assert {t.name for t in TASKS.values() if t.group == "advglue"} == {
        "adv_sst2", "adv_qqp", "adv_mnli", "adv_mnli_mismatched", "adv_qnli", "adv_rte"
    }  # fmt: skip
    assert {"anli_r1", "anli_r2", "anli_r3", "imdb", "ag_news", "paws", "hans"} <= set(TASKS)
    suite = SUITES["uegr13"]
    assert len(suite) == len(set(suite)) == 13 and all(not TASKS[t].eval_only for t in suite)
    for train_task, sets in ROBUSTNESS_SETS.items():
        assert train_task in suite
        for name in sets:
            spec = TASKS[name]
            assert spec.train_task in (None, train_task) and spec.num_labels <= TASKS[train_task].num_labels


def test_hub_path_calls_load_dataset_with_the_registry_id(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return glue_sst2()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = load_raw_task(DataConfig(task="sst2"), seed=0)
    assert calls == [("nyu-mll/glue", "sst2")]
    assert (raw.text_column, raw.label_names) == ("sentence", ["negative", "positive"])
    assert len(raw.train) == 40 and len(raw.validation) == 10  # the labelled splits; the test split is not read

    def offline(path, name=None, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"task sst2: could not load nyu-mll/glue \(sst2\) .* --data.task_path DIR"):
        load_raw_task(DataConfig(task="sst2"), seed=0)


def test_local_copy_with_other_features_is_refused(tmp_path):
    copy = glue_sst2()
    copy = copy.cast_column("label", datasets.ClassLabel(names=["bad", "good"]))
    copy.save_to_disk(tmp_path / "sst2")
    with pytest.raises(DataError, match=r"task sst2: .*\[train\] labels \['bad', 'good'\] differ from .*'negative'"):
        load_raw_task(DataConfig(task="sst2", task_path=str(tmp_path / "sst2")), seed=0)
    glue_sst2().rename_column("sentence", "text").save_to_disk(tmp_path / "renamed")
    with pytest.raises(DataError, match=r"has no column 'sentence' \(columns: text, label, idx\)"):
        load_raw_task(DataConfig(task="sst2", task_path=str(tmp_path / "renamed")), seed=0)
    with pytest.raises(DataError, match=r"task adv_sst2 is evaluation-only .* fine-tune on sst2"):
        load_raw_task(DataConfig(task="adv_sst2"), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_raw_task(DataConfig(task="sst2", task_path=str(tmp_path / "nowhere")), seed=0)


def test_label_outside_the_task_labels_names_split_and_row(tmp_path):
    copy = glue_sst2()
    bad = copy["validation"].to_dict()
    bad["label"][3] = -1  # a hidden test label slipped into a labelled split
    copy["validation"] = datasets.Dataset.from_dict(bad, features=copy["train"].features)
    copy.save_to_disk(tmp_path / "sst2")
    from uegr_dist.data import prepare_task
    from uegr_dist.modeling import build_word_level_tokenizer

    cfg = DataConfig(task="sst2", task_path=str(tmp_path / "sst2"))
    raw = load_raw_task(cfg, seed=0)
    with pytest.raises(DataError, match=r"sst2\[validation\]: row 3: label -1 in column 'label' is outside 0..1"):
        prepare_task(raw, cfg, build_word_level_tokenizer(raw.texts(), 100))


def test_regression_anli_and_held_out_validation_read_their_splits(tmp_path):
    rng = random.Random(0)
    pair = {"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string")}
    stsb = datasets.Dataset.from_dict(
        {"sentence1": ["a b"] * 8, "sentence2": ["c d"] * 8, "label": [rng.uniform(0, 5) for _ in range(8)],
         "idx": list(range(8))},
        features=datasets.Features({**pair, "label": datasets.Value("float32"), "idx": datasets.Value("int32")}),
    )  # fmt: skip
    datasets.DatasetDict({"train": stsb, "validation": stsb, "test": stsb}).save_to_disk(tmp_path / "stsb")
    raw = load_raw_task(DataConfig(task="stsb", task_path=str(tmp_path / "stsb")), seed=0)
    assert raw.regression and raw.label_names is None and raw.text_pair_column == "sentence2"

    nli = datasets.Features(
        {"uid": datasets.Value("string"), "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
         "label": NLI, "reason": datasets.Value("string")}
    )  # fmt: skip
    rows = {"uid": ["u"] * 6, "premise": ["p"] * 6, "hypothesis": ["h"] * 6, "label": [0, 1, 2] * 2, "reason": [""] * 6}
    anli = datasets.DatasetDict(
        {
            f"{s}_r{r}": datasets.Dataset.from_dict(rows, features=nli)
            for s in ("train", "dev", "test")
            for r in (1, 2, 3)
        }
    )
    anli.save_to_disk(tmp_path / "anli")
    raw = load_raw_task(DataConfig(task="anli_r2", task_path=str(tmp_path / "anli")), seed=0)
    assert raw.sources["train"].endswith("[train_r2]") and raw.sources["validation"].endswith("[dev_r2]")

    imdb_features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    imdb_rows = {"text": [f"w{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
    imdb = datasets.Dataset.from_dict(imdb_rows, features=imdb_features)
    datasets.DatasetDict({"train": imdb, "test": imdb}).save_to_disk(tmp_path / "imdb")
    raw = load_raw_task(DataConfig(task="imdb", task_path=str(tmp_path / "imdb"), validation_ratio=0.25), seed=0)
    assert (len(raw.train), len(raw.validation)) == (15, 5)  # held out of train; the test split is kept apart


def test_mnli_trains_from_a_local_copy_and_reports_matched_and_mismatched(tmp_path, one_thread):
    from transformers import AutoConfig

    from uegr_dist.cli.train import main

    glue_mnli().save_to_disk(tmp_path / "mnli")
    out = tmp_path / "run"
    argv = ["--task", "mnli", "--data.task_path", str(tmp_path / "mnli"), "--model.init", "random"]
    argv += ["--model.architecture", "bert", "--model.tokenizer", "word_level", "--method.name", "vanilla"]
    argv += [f"--model.config.{k}={v}" for k, v in TINY_MODELS["bert"].items()]
    argv += ["--train.max_steps", "3", "--train.batch_size", "8", "--train.output_dir", str(out)]
    argv += ["--train.tracker", "none", "--train.progress", "false"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "mnli" and metrics["main_metric"] == "accuracy"
    final = metrics["final"]
    assert {"accuracy", "f1", "mcc", "mismatched_accuracy", "mismatched_f1"} <= set(final)
    assert AutoConfig.from_pretrained(out).id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}


def test_get_task_lists_the_known_names():
    assert get_task("rte").text_pair_column == "sentence2"
    with pytest.raises(DataError, match=r"unknown task 'sst3'; known tasks: cola, sst2"):
        get_task("sst3")
