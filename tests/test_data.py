"""Local data files: label mapping, seeded validation split, stable sample ids, clear errors."""

import json
import re

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
    with pytest.raises(DataError, match="no data: set data.task .* or data.train_file"):
        load_text_classification(DataConfig(), tokenizer, 0)


# --- every file format, end to end through uegr-train -------------------------------------------------------------

FORMAT_ROWS = [
    {"review": f"{'p1 p2' if i % 2 else 'n1 n2'} w{i % 7}", "stars": "good" if i % 2 else "bad"} for i in range(40)
]


def _write_format(path, rows):
    import pandas as pd

    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        _write_jsonl(path, rows)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_each_format_trains_through_the_cli_and_saves_the_label_names(suffix, tmp_path, one_thread):
    from transformers import AutoConfig

    from tests.conftest import TINY_MODELS
    from uegr_dist.cli.train import main

    train_file = _write_format(tmp_path / f"train{suffix}", FORMAT_ROWS)
    out = tmp_path / "run"
    argv = ["--train-file", str(train_file), "--data.text_column", "review", "--data.label_column", "stars"]
    argv += ["--model.init", "random", "--model.architecture", "bert", "--model.tokenizer", "word_level"]
    argv += [f"--model.config.{k}={v}" for k, v in TINY_MODELS["bert"].items()]
    argv += ["--method.name", "vanilla", "--train.max_steps", "2", "--train.batch_size", "8", "--train.output_dir"]
    argv += [str(out), "--train.tracker", "none", "--train.progress", "false", "--data.validation_ratio", "0.25"]
    if suffix == ".parquet":
        argv += ["--data.group_by_length", "true"]
    assert main(argv) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "bad", 1: "good"} and config.label2id == {"bad": 0, "good": 1}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["main_metric"] == "accuracy" and 0.0 <= metrics["final"]["accuracy"] <= 1.0
    assert metrics["train"]["steps"] == 2


# --- bad data: one clear message naming file, row or column; nothing written ---------------------------------------


def _load(tmp_path, tokenizer, rows=None, raw=None, name="bad.jsonl", **cfg):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        _write_jsonl(path, rows)
    return load_text_classification(DataConfig(train_file=str(path), **cfg), tokenizer, 0)


def test_empty_split_is_refused(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"empty.csv: no rows"):
        _load(tmp_path, tokenizer, raw=b"text,label\n", name="empty.csv")
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}] * 3)
    empty_val = tmp_path / "val.csv"
    empty_val.write_text("text,label\n")
    with pytest.raises(DataError, match=r"val.csv: no rows"):
        load_text_classification(DataConfig(train_file=str(good), validation_file=str(empty_val)), tokenizer, 0)


def test_label_outside_num_labels_names_the_row(tmp_path, tokenizer):
    rows = [{"text": "a b", "label": i % 2} for i in range(8)] + [{"text": "c", "label": 3}]
    with pytest.raises(
        DataError, match=r"bad.jsonl: row 8: label 3 in column 'label' is outside 0..1 \(num_labels = 2"
    ):
        _load(tmp_path, tokenizer, rows, num_labels=2, validation_ratio=0.1)
    named = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "meh"}] * 3
    with pytest.raises(
        DataError, match=r"row (\d+): label 'meh' in column 'label' is not among the labels \('neg', 'pos'"
    ) as err:
        _load(tmp_path, tokenizer, named, label_names=["neg", "pos"])
    assert named[int(re.search(r"row (\d+)", str(err.value)).group(1))]["label"] == "meh"  # the file's row number
    with pytest.raises(DataError, match=r"3 distinct labels in column 'label' but data.num_labels = 2"):
        _load(tmp_path, tokenizer, named, num_labels=2)


def test_fixed_label_names_accept_names_and_ids(tmp_path, tokenizer):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": 0}] * 4
    with pytest.raises(DataError, match="mixes label types"):
        _load(tmp_path, tokenizer, rows)
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}] * 4
    task = _load(tmp_path, tokenizer, rows, label_names=["pos", "neg"])
    assert task.id2label == {0: "pos", 1: "neg"}
    assert sorted(set(task.train["labels"])) == [0, 1]


def _parquet_bytes(rows):
    import io

    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf)
    return buf.getvalue()


def test_nan_regression_target_names_the_row(tmp_path, tokenizer):
    raw = b"text,score\na b,0.5\nc d,\ne f,1.5\n"
    with pytest.raises(DataError, match=r"nan.csv: row 1: regression target None in column 'score' is not a number"):
        _load(tmp_path, tokenizer, raw=raw, name="nan.csv", label_column="score", regression=True)
    rows = [{"text": "a", "score": 0.5}, {"text": "b", "score": float("nan")}, {"text": "c", "score": 1.0}]
    with pytest.raises(
        DataError, match=r"nan.parquet: row 1: regression target (nan|None) in column 'score' is not a number"
    ):
        _load(tmp_path, tokenizer, raw=_parquet_bytes(rows), name="nan.parquet", label_column="score", regression=True)


def test_mixed_and_empty_labels_name_the_row(tmp_path, tokenizer):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": 2}]
    with pytest.raises(DataError, match=r"bad.jsonl.*: column 'label' mixes label types \(row 2: 2\)"):
        _load(tmp_path, tokenizer, rows)
    with pytest.raises(DataError, match=r"gap.csv: row 1: empty label in column 'label'"):
        _load(tmp_path, tokenizer, raw=b"text,label\na,0\nb,\nc,1\n", name="gap.csv")
    with pytest.raises(DataError, match=r"frac.csv.*: row 0: label 0.5 .* set data.regression true"):
        _load(tmp_path, tokenizer, raw=b"text,label\na,0.5\nb,1\n", name="frac.csv")
    with pytest.raises(DataError, match=r"notext.jsonl: row 1: empty text in column 'text'"):
        _load(tmp_path, tokenizer, [{"text": "a", "label": 0}, {"text": None, "label": 1}] * 3, name="notext.jsonl")


def test_non_utf8_file_names_line_and_byte(tmp_path, tokenizer):
    raw = b"text,label\ngood movie,1\n" + "caf\xe9 ok,0\n".encode("latin-1")
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text \(line 3, byte 27: .*iconv"):
        _load(tmp_path, tokenizer, raw=raw, name="latin.csv")


def test_bad_data_from_the_cli_exits_2_and_writes_nothing(tmp_path):
    from uegr_dist.cli.train import main

    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [{"text": "a", "label": "x"}, {"text": "b", "label": 1}])
    out = tmp_path / "never"
    argv = ["--train-file", str(bad), "--model.init", "random", "--model.architecture", "bert"]
    assert main([*argv, "--model.tokenizer", "word_level", "--train.output_dir", str(out)]) == 2
    assert not out.exists()


# --- tokenization cache ------------------------------------------------------------------------------------------


def test_tokenization_is_cached_and_redone_when_tokenizer_or_length_change(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"a b c {i}", "label": i % 2} for i in range(20)])
    cfg = DataConfig(train_file=str(path), max_length=16)
    first = load_text_classification(cfg, tokenizer, 0).train
    again = load_text_classification(cfg, tokenizer, 0).train
    assert again._fingerprint == first._fingerprint
    assert again.cache_files and again.cache_files == first.cache_files  # read back, not recomputed
    shorter = load_text_classification(DataConfig(train_file=str(path), max_length=8), tokenizer, 0).train
    other_tok = build_word_level_tokenizer(["a b c d e"], vocab_size=40)
    retok = load_text_classification(cfg, other_tok, 0).train
    assert len({first._fingerprint, shorter._fingerprint, retok._fingerprint}) == 3


# --- length-grouped batching -------------------------------------------------------------------------------------


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    import random

    from uegr_dist.data import LengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.randint(4, 128) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=1)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(epoch0) == list(range(1000)) and epoch0 != epoch1
    assert LengthGroupedSampler(lengths, 16, seed=1).order(0) == epoch0

    def padded(order):  # tokens after padding every batch of 16 to its longest row
        return sum(16 * max(lengths[i] for i in order[j : j + 16]) for j in range(0, len(order), 16))

    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    assert padded(epoch0) < 0.7 * padded(shuffled)
    assert max(lengths[i] for i in epoch0[:16]) == max(lengths)  # the longest batch comes first
    batches = [epoch0[j : j + 16] for j in range(0, 1000, 16)]  # as the DataLoader cuts them: each from one group
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sorted(spread)[len(spread) // 2] <= 4


# --- data.max_train_samples: a seeded slice of train --------------------------------------------------------------


def _raw(path, seed=0, validation=None, **cfg):
    from uegr_dist.data import load_raw_task

    data = DataConfig(train_file=str(path), validation_file=validation and str(validation), **cfg)
    return load_raw_task(data, seed)


def test_max_train_samples_is_a_seeded_slice_shared_by_training_seeds(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": f"w{i}", "label": i % 2} for i in range(200)])
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": f"v{i}", "label": i % 2} for i in range(20)])
    full = _raw(train, validation=val)
    sliced = _raw(train, validation=val, max_train_samples=40)
    texts = sliced.train["text"]
    assert len(texts) == 40 and set(texts) < set(full.train["text"])
    assert texts != full.train["text"][:40]  # a random slice, not the head of the file
    assert sliced.validation["text"] == full.validation["text"]
    assert _raw(train, seed=7, validation=val, max_train_samples=40).train["text"] == texts  # any train.seed
    assert set(_raw(train, validation=val, max_train_samples=10).train["text"]) < set(texts)  # nested
    other = _raw(train, validation=val, max_train_samples=40, max_train_samples_seed=1).train["text"]
    assert len(other) == 40 and other != texts
    assert len(_raw(train, validation=val, max_train_samples=500).train) == 200  # at most all rows


def test_max_train_samples_is_drawn_after_the_held_out_validation(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"text": f"w{i}", "label": i % 2} for i in range(200)])
    full = _raw(path, seed=3, validation_ratio=0.25)
    sliced = _raw(path, seed=3, validation_ratio=0.25, max_train_samples=60)
    assert sliced.validation["text"] == full.validation["text"]  # validation does not change with the slice
    assert len(sliced.train) == 60 and set(sliced.train["text"]) < set(full.train["text"])
    assert _raw(path, seed=3, validation_ratio=0.25, max_train_samples=60).train["text"] == sliced.train["text"]
    # another train.seed holds out other rows; the slice still follows the same seeded order of the file's rows
    other = _raw(path, seed=4, validation_ratio=0.25, max_train_samples=60).train["text"]
    assert len(other) == 60 and len(set(other) & set(sliced.train["text"])) >= 35


def test_max_train_samples_must_be_a_positive_integer():
    from uegr_dist.config import ConfigError, load_config

    for value, message in ((0, r"data.max_train_samples = 0: must be in \[1, inf"),
                           ("4k", r"data.max_train_samples = '4k': expected an integer"),
                           (-3, r"data.max_train_samples = -3: must be in \[1, inf")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, {"data": {"task": "sst2", "max_train_samples": value}})
    with pytest.raises(ConfigError, match=r"data.max_train_samples_seed = -1: must be in \[0, 4294967295\]"):
        load_config(None, {"data": {"task": "sst2", "max_train_samples_seed": -1}})
    cfg = load_config(None, {"data": {"task": "sst2", "max_train_samples": 4000}})
    assert (cfg.data.max_train_samples, cfg.data.max_train_samples_seed) == (4000, 0)
