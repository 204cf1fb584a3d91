"""Local data files: label mapping, seeded validation split, stable sample ids, clear errors."""

import json

import pytest

from uegr_dist.config import DataConfig
from uegr_dist.data import DataError, PaddingCollator, load_text_classification
from uegr_dist.modeling import build_word_level_tokenizer


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def tokenizer():
    return build_word_level_tokenizer(["a b c good bad movie"], vocab_size=50)


def test_string_labels_sorted_split_seeded_and_sample_ids(tmp_path, tokenizer):
    rows = [{"text": f"a b {i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(30)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train_file=str(path), validation_ratio=0.2)
    task = load_text_classification(cfg, tokenizer, seed=3)
    again = load_text_classification(cfg, tokenizer, seed=3)
    assert task.num_labels == 3 and task.id2label == {0: "mid", 1: "neg", 2: "pos"}
    assert (len(task.train), len(task.validation)) == (24, 6)
    assert task.validation["input_ids"] == again.validation["input_ids"]
    assert task.train["sample_id"] == list(range(24))
    batch = PaddingCollator(tokenizer, regression=False)([task.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["sample_id"].tolist() == [0, 1, 2, 3]
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    fixed = PaddingCollator(tokenizer, regression=False, max_length=16)([task.train[i] for i in range(4)])
    assert fixed["input_ids"].shape == (4, 16) and fixed["attention_mask"][:, 5:].sum() == 0


def test_csv_and_regression(tmp_path, tokenizer):
    path = tmp_path / "r.csv"
    path.write_text("sentence,score\n" + "".join(f"a b {i},{i / 10}\n" for i in range(10)))
    cfg = DataConfig(train_file=str(path), text_column="sentence", label_column="score", regression=True)
    task = load_text_classification(cfg, tokenizer, seed=0)
    assert task.num_labels == 1 and task.regression
    batch = PaddingCollator(tokenizer, regression=True)([task.train[0]])
    assert batch["labels"].dtype.is_floating_point


def test_errors_name_file_and_problem(tmp_path, tokenizer):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}] * 5)
    missing = _write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a", "y": 1}] * 4)
    with pytest.raises(DataError, match=r"nolabel.jsonl: missing column 'label' \(columns: text, y\)"):
        load_text_classification(DataConfig(train_file=str(missing)), tokenizer, 0)
    unseen = _write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "z"}])
    with pytest.raises(DataError, match=r"val.jsonl: row 0: label 'z' in column 'label' is not among"):
        load_text_classification(DataConfig(train_file=str(good), validation_file=str(unseen)), tokenizer, 0)
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_text_classification(DataConfig(train_file=str(tmp_path / "x.txt")), tokenizer, 0)
    with pytest.raises(DataError, match="data.train_file is not set"):
        load_text_classification(DataConfig(), tokenizer, 0)
