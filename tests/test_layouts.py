"""Local copies in the layouts of the public downloads: the GLUE distribution's TSV folders (every GLUE task, GLUE's
own headers and label strings, quote characters literal) and AdvGLUE's dev.json, their label ids, the errors of a
copy that does not match, and both end to end: training through `uegr-train`, scoring through `uegr-eval`."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import TINY_MODELS
from uegr_dist.config import DataConfig
from uegr_dist.data import DataError, get_task, load_raw_task, load_task_splits

# Texts with the quote characters GLUE's files hold: an unbalanced leading quote breaks a reader that treats `"` as
# CSV quoting (it swallows the following lines into one field).
QUOTED = ['" the witness " , he said', 'it \'s "great"', '"unbalanced', "plain words", 'a "b" c "d']


def _text(i: int, which: str = "a") -> str:
    return f"{QUOTED[i % len(QUOTED)]} {which}{i}"


# task -> (header or None, row(i, text, pair, label) -> line, the file's label strings, the registry label name of
# each). Headers are GLUE's own (MRPC's with the byte-order mark the GLUE script copies from the MSR file).
MNLI_TRAIN = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV = MNLI_TRAIN.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
STSB = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
GLUE = {
    "cola": (
        None,  # CoLA's train/dev: no header row; source, label, original judgement, sentence
        lambda i, t, p, y: f"gj04\t{y}\t{'' if y == '1' else '*'}\t{t}",
        ["0", "1"],
        ["unacceptable", "acceptable"],
    ),
    "sst2": ("sentence\tlabel", lambda i, t, p, y: f"{t}\t{y}", ["0", "1"], ["negative", "positive"]),
    "mrpc": (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        lambda i, t, p, y: f"{y}\t{700 + i}\t{900 + i}\t{t}\t{p}",
        ["0", "1"],
        ["not_equivalent", "equivalent"],
    ),
    "stsb": (
        STSB,
        lambda i, t, p, y: f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{t}\t{p}\t{y}",
        ["0.000", "3.800", "5.000"],
        None,
    ),  # fmt: skip
    "qqp": (
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        lambda i, t, p, y: f"{i}\t{2 * i}\t{2 * i + 1}\t{t}\t{p}\t{y}",
        ["0", "1"],
        ["not_duplicate", "duplicate"],
    ),
    "mnli": (
        MNLI_TRAIN,
        lambda i, t, p, y: f"{i}\t{i}\t{i}n\tfiction\t( {t} )\t( {p} )\t(ROOT {t})\t(ROOT {p})\t{t}\t{p}\t{y}\t{y}",
        ["entailment", "neutral", "contradiction"],
        ["entailment", "neutral", "contradiction"],
    ),
    "qnli": (
        "index\tquestion\tsentence\tlabel",
        lambda i, t, p, y: f"{i}\t{t}\t{p}\t{y}",
        ["not_entailment", "entailment"],
        ["not_entailment", "entailment"],
    ),
    "rte": (
        "index\tsentence1\tsentence2\tlabel",
        lambda i, t, p, y: f"{i}\t{t}\t{p}\t{y}",
        ["not_entailment", "entailment"],
        ["not_entailment", "entailment"],
    ),
    "wnli": (
        "index\tsentence1\tsentence2\tlabel",
        lambda i, t, p, y: f"{i}\t{t}\t{p}\t{y}",
        ["0", "1"],
        ["not_entailment", "entailment"],
    ),
}
FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}  # fmt: skip


def glue_rows(task: str, n: int, offset: int = 0) -> list[tuple[str, str, str]]:
    """(text, pair, file label) of n rows."""
    labels = GLUE[task][2]
    return [(_text(i, "a"), _text(i, "b"), labels[i % len(labels)]) for i in range(offset, offset + n)]


def write_glue_file(path, task, rows, header=True, test=False):
    head, row, _, _ = GLUE[task]
    lines = []
    if test:  # GLUE's test files: index and the texts, no label column
        lines.append("index\tsentence" if task in ("cola", "sst2") else "index\tsentence1\tsentence2")
        lines += [f"{i}\t{t}" if task in ("cola", "sst2") else f"{i}\t{t}\t{p}" for i, (t, p, _) in enumerate(rows)]
    else:
        if head is not None and header:
            lines.append(MNLI_DEV if (task == "mnli" and "dev" in path.name) else head)
        for i, (t, p, y) in enumerate(rows):
            line = row(i, t, p, y)
            if task == "mnli" and "dev" in path.name:
                line = line.replace(f"\t{y}\t{y}", f"\t{y}\t{y}\t{y}\t{y}\t{y}\t{y}")
            lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_glue_folder(root, task, n_train=24, n_dev=8):
    """root/<GLUE folder>/ with train, dev (MNLI: dev_matched, dev_mismatched) and GLUE's unlabelled test file."""
    folder = root / FOLDERS[task]
    write_glue_file(folder / "train.tsv", task, glue_rows(task, n_train))
    devs = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "mnli" else ["dev.tsv"]
    for k, name in enumerate(devs):
        write_glue_file(folder / name, task, glue_rows(task, n_dev, offset=1000 * (k + 1)))
    test = "test_matched.tsv" if task == "mnli" else "test.tsv"
    write_glue_file(folder / test, task, glue_rows(task, 5, offset=5000), test=True)
    return folder


def expected_labels(task, rows):
    spec = get_task(task)
    if spec.regression:
        return [float(y) for _, _, y in rows]
    names = dict(zip(GLUE[task][2], GLUE[task][3]))  # the file's label string -> the registry name it means
    return [spec.label_names.index(names[y]) for _, _, y in rows]


@pytest.mark.parametrize("task", list(GLUE))
def test_every_glue_task_reads_its_glue_folder_with_the_registry_columns_and_label_ids(task, tmp_path):
    spec = get_task(task)
    folder = write_glue_folder(tmp_path, task)
    splits = load_task_splits(spec, str(folder), [r for r in spec.splits if r != "test"])
    files = {"train": ("train.tsv", 0, 24), "validation": ("dev.tsv", 1000, 8), "mismatched": (None, 2000, 8)}
    if task == "mnli":
        files["validation"] = ("dev_matched.tsv", 1000, 8)
    for role, ds in splits.items():
        _, offset, n = files[role]
        rows = glue_rows(task, n, offset)
        assert len(ds) == n, role
        assert set(ds.column_names) == {c for c in (spec.text_column, spec.text_pair_column, "label", "idx") if c}
        assert ds[spec.text_column] == [t for t, _, _ in rows]  # quote characters survive, rows stay separate
        if spec.text_pair_column:
            assert ds[spec.text_pair_column] == [p for _, p, _ in rows]
        if spec.regression:
            assert ds["label"] == pytest.approx(expected_labels(task, rows))
        else:
            assert ds["label"] == expected_labels(task, rows)
            assert ds.features["label"].names == list(spec.label_names)

    with pytest.raises(DataError, match=r"test(_matched)?\.tsv has no labels \(GLUE hides its test labels.*never"):
        load_task_splits(spec, str(folder), ["test"])
    labelled = "test_matched_labeled.tsv" if task == "mnli" else "test_labeled.tsv"
    rows = glue_rows(task, 6, 7000)
    write_glue_file(folder / labelled, task, rows)
    test = load_task_splits(spec, str(folder), ["test"])["test"]
    assert test[spec.text_column] == [t for t, _, _ in rows]
    assert test["label"] == pytest.approx(expected_labels(task, rows))


def test_the_folder_holding_the_glue_download_and_training_through_load_raw_task(tmp_path):
    write_glue_folder(tmp_path / "glue_data", "mrpc")
    write_glue_folder(tmp_path / "glue_data", "mnli")
    raw = load_raw_task(DataConfig(task="mrpc", task_path=str(tmp_path / "glue_data")), seed=0)
    assert (len(raw.train), len(raw.validation), raw.text_pair_column) == (24, 8, "sentence2")
    assert raw.label_names == ["not_equivalent", "equivalent"]
    raw = load_raw_task(DataConfig(task="mnli", task_path=str(tmp_path / "glue_data" / "MNLI")), seed=0)
    assert (len(raw.train), len(raw.validation), list(raw.extra)) == (24, 8, ["mismatched"])
    assert raw.extra["mismatched"]["premise"][0] == _text(2000)
    # MRPC's labelled MSR test file is the test split
    msr = write_glue_file(tmp_path / "glue_data" / "MRPC" / "msr_paraphrase_test.txt", "mrpc", glue_rows("mrpc", 4))
    test = load_task_splits(get_task("mrpc"), str(msr.parent), ["test"])["test"]
    assert test["label"] == expected_labels("mrpc", glue_rows("mrpc", 4))


def test_a_test_tsv_with_the_label_column_is_the_test_split(tmp_path):
    """A labelled copy saved under GLUE's name test.tsv is read (GLUE's own, without labels, is refused above)."""
    folder = write_glue_folder(tmp_path, "sst2")
    write_glue_file(folder / "test.tsv", "sst2", glue_rows("sst2", 3))
    assert load_task_splits(get_task("sst2"), str(folder), ["test"])["test"]["label"] == [0, 1, 0]


def test_malformed_rows_are_skipped_with_a_warning_naming_their_lines(tmp_path, caplog):
    folder = write_glue_folder(tmp_path, "qqp", n_train=300)
    lines = (folder / "train.tsv").read_text().splitlines()
    lines.insert(11, "123\t4\t5\ta question cut by a newline")  # line 12: 4 fields
    lines.insert(21, "124\t6\t7\tq\tq2\t0\textra")  # line 22: 7 fields
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="uegr_dist.data.layouts"):
        train = load_task_splits(get_task("qqp"), str(folder), ["train"])["train"]
    assert len(train) == 300 and train["question1"][11] == _text(11)
    assert "2 of 302 rows of" in caplog.text and "train.tsv" in caplog.text and "(lines 12, 22)" in caplog.text

    lines[30:30] = ["bad\tline"] * 5  # 7 of 307: more than 1%
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"7 of 307 rows of .*train.tsv do not have the header's 6 .*not the GLUE QQP"):
        load_task_splits(get_task("qqp"), str(folder), ["train"])


def test_glue_folder_errors_name_path_file_and_what_was_expected(tmp_path):
    spec = get_task("sst2")
    folder = write_glue_folder(tmp_path, "sst2")
    (folder / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"SST-2 has no dev.tsv \(the validation split .*: train.tsv, dev.tsv; the "
                       r"folder has: test.tsv, train.tsv\)"):  # fmt: skip
        load_raw_task(DataConfig(task="sst2", task_path=str(folder)), seed=0)

    (folder / "dev.tsv").write_text("text\tlabel\na b\t0\n")
    with pytest.raises(DataError, match=r"dev.tsv: no column 'sentence' in the header \(text, label\); the GLUE SST-2 "
                       r"layout needs the columns sentence, label"):  # fmt: skip
        load_task_splits(spec, str(folder), ["validation"])
    (folder / "dev.tsv").write_text("sentence\tlabel\na b\t0\nc d\t2\n")
    with pytest.raises(DataError, match=r"dev.tsv: line 3: label '2' in column 'label' is not one of 0 \(negative\), "
                       r"1 \(positive\)"):  # fmt: skip
        load_task_splits(spec, str(folder), ["validation"])
    (folder / "dev.tsv").write_text("")
    with pytest.raises(DataError, match=r"dev.tsv: empty file \(expected the GLUE SST-2 header row\)"):
        load_task_splits(spec, str(folder), ["validation"])
    (folder / "dev.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(DataError, match=r"dev.tsv: not UTF-8 text \(line 2: .*iconv"):
        load_task_splits(spec, str(folder), ["validation"])
    (folder / "dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match=r"dev.tsv: no rows"):
        load_task_splits(spec, str(folder), ["validation"])

    rte = write_glue_folder(tmp_path, "rte")
    write_glue_file(rte / "dev.tsv", "rte", [("a", "b", "entailment"), ("c", "d", "entailed")])
    with pytest.raises(DataError, match=r"RTE/dev.tsv: line 3: label 'entailed' in column 'label' is not one of "
                       r"entailment, not_entailment"):  # fmt: skip
        load_task_splits(get_task("rte"), str(rte), ["validation"])

    cola = write_glue_folder(tmp_path, "cola")
    (cola / "dev.tsv").write_text("source\tlabel\tjudgement\tsentence\ngj04\t1\t\ta b\n")
    with pytest.raises(DataError, match=r"line 1: label 'label' .* \(CoLA's dev.tsv has no header row: columns source"):
        load_task_splits(get_task("cola"), str(cola), ["validation"])
    stsb = write_glue_folder(tmp_path, "stsb")
    write_glue_file(stsb / "dev.tsv", "stsb", [("a", "b", "4.2"), ("c", "d", "nan")])
    with pytest.raises(DataError, match=r"line 3: label 'nan' in column 'score' is not a finite number"):
        load_task_splits(get_task("stsb"), str(stsb), ["validation"])

    with pytest.raises(DataError, match=r"a file; task sst2 takes .*the GLUE download's SST-2 folder"):
        load_task_splits(spec, str(folder / "train.tsv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"not a readable copy of nyu-mll/glue.*GLUE download's SST-2 folder"):
        load_task_splits(spec, str(empty))


def test_a_changed_file_is_read_again_not_taken_from_the_cache(tmp_path):
    spec = get_task("sst2")
    folder = write_glue_folder(tmp_path, "sst2")
    write_glue_file(folder / "dev.tsv", "sst2", [("a b", "", "0"), ("c d", "", "1")])
    first = load_task_splits(spec, str(folder), ["validation"])["validation"]
    assert first["label"] == [0, 1] and first.cache_files  # on disk: tokenization is cached like other sources
    write_glue_file(folder / "dev.tsv", "sst2", [("a b", "", "1"), ("c d", "", "1")])
    assert load_task_splits(spec, str(folder), ["validation"])["validation"]["label"] == [1, 1]


# --- AdvGLUE dev.json ----------------------------------------------------------------------------------------------

ADV_FIELDS = {
    "sst2": ("adv_sst2", ["sentence"], 2),
    "qqp": ("adv_qqp", ["question1", "question2"], 2),
    "mnli": ("adv_mnli", ["premise", "hypothesis"], 3),
    "mnli-mm": ("adv_mnli_mismatched", ["premise", "hypothesis"], 3),
    "qnli": ("adv_qnli", ["question", "sentence"], 2),
    "rte": ("adv_rte", ["sentence1", "sentence2"], 2),
}


def advglue_json(n=5):
    """AdvGLUE's dev.json shape: task key -> items with idx, label (GLUE's ids) and the task's text fields."""
    return {
        key: [
            {"idx": 10 + i, "label": i % k, **{f: f"{_text(i, f)} {key}" for f in fields}} for i in range(n + len(key))
        ]
        for key, (_, fields, k) in ADV_FIELDS.items()
    }


def test_advglue_dev_json_gives_every_adv_task_from_the_file_or_its_folder(tmp_path):
    data = advglue_json()
    path = tmp_path / "adv" / "dev.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    for key, (task, fields, k) in ADV_FIELDS.items():
        spec = get_task(task)
        for where in (path, path.parent):
            ds = load_task_splits(spec, str(where))["validation"]
            assert len(ds) == len(data[key]) and ds.column_names == [*fields, "label", "idx"], task
            assert [spec.text_column, spec.text_pair_column or fields[0]] == [fields[0], fields[-1]]
            assert ds[fields[0]] == [item[fields[0]] for item in data[key]]
            assert ds["label"] == [i % k for i in range(len(data[key]))] and ds["idx"][0] == 10
            assert ds.features["label"].names == list(spec.label_names)
    with pytest.raises(DataError, match=r"no column 'sentence' \(columns: sst2, qqp, .*task_path takes .*GLUE"):
        load_task_splits(get_task("sst2"), str(path.parent), ["validation"])  # AdvGLUE's folder given for the GLUE task


def test_advglue_errors_name_the_file_the_key_and_the_item(tmp_path):
    spec = get_task("adv_qnli")
    path = tmp_path / "dev.json"
    data = advglue_json()
    del data["qnli"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dev.json: no key 'qnli' for task adv_qnli \(keys: sst2, qqp, mnli, mnli-mm,"):
        load_task_splits(spec, str(tmp_path))
    data = advglue_json()
    del data["qnli"][2]["sentence"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dev.json\['qnli'\]\[2\]: no field 'sentence' \(fields: idx, label, question;"
                       r" task adv_qnli expects question, sentence, label\)"):  # fmt: skip
        load_task_splits(spec, str(path))
    data = advglue_json()
    data["qnli"][1]["label"] = "entailment"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\['qnli'\]\[1\]: label 'entailment' is not one of GLUE's label ids for qnli:"
                       r" 0 \(entailment\), 1 \(not_entailment\)"):  # fmt: skip
        load_task_splits(spec, str(path))
    path.write_text(json.dumps([data["qnli"]]))
    with pytest.raises(DataError, match=r"not AdvGLUE's dev.json \(expected one JSON object keyed by task.*a list\)"):
        load_task_splits(spec, str(path))
    path.write_text("{")
    with pytest.raises(DataError, match=r"dev.json: not AdvGLUE's dev.json \(not a UTF-8 JSON document"):
        load_task_splits(spec, str(path))
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(DataError, match=r"not a readable copy of AI-Secure/adv_glue.*AdvGLUE's dev.json"):
        load_task_splits(spec, str(other))


# --- end to end ----------------------------------------------------------------------------------------------------


def test_uegr_train_on_a_glue_folder_with_a_slice_of_train(tmp_path, one_thread):
    from transformers import AutoConfig

    from uegr_dist.cli.train import main

    write_glue_folder(tmp_path / "glue_data", "rte", n_train=40, n_dev=8)
    out = tmp_path / "run"
    argv = ["--task", "rte", "--data.task_path", str(tmp_path / "glue_data"), "--data.max_train_samples", "12"]
    argv += ["--model.init", "random", "--model.architecture", "bert", "--model.tokenizer", "word_level"]
    argv += [f"--model.config.{k}={v}" for k, v in TINY_MODELS["bert"].items()]
    argv += ["--method.name", "vanilla", "--train.epochs", "1", "--train.batch_size", "4", "--train.output_dir"]
    argv += [str(out), "--train.tracker", "none", "--train.progress", "false", "--train.save_every", "0"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "rte" and metrics["train"]["steps"] == 3  # 12 of the 40 rows, 4 per step
    assert 0.0 <= metrics["final"]["accuracy"] <= 1.0
    assert AutoConfig.from_pretrained(out).id2label == {0: "entailment", 1: "not_entailment"}


def _tiny_sst2_model(path, texts):
    from uegr_dist.config import ModelConfig
    from uegr_dist.modeling import build_word_level_tokenizer, load_model

    tokenizer = build_word_level_tokenizer(texts, 200)
    cfg = ModelConfig(init="random", architecture="bert", config=dict(TINY_MODELS["bert"]), tokenizer="word_level")
    model = load_model(cfg, tokenizer, 2, {0: "negative", 1: "positive"}, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _reference_accuracy(model_dir, texts, labels):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        predicted = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1)
    return float((predicted == torch.tensor(labels)).float().mean())


def test_uegr_eval_scores_advglue_dev_json_and_a_labelled_glue_test_file(tmp_path, one_thread, capsys):
    from uegr_dist.cli.eval import main

    data = advglue_json(n=8)
    (tmp_path / "dev.json").write_text(json.dumps(data))
    sst2 = write_glue_folder(tmp_path, "sst2")
    test_rows = glue_rows("sst2", 9, 7000)
    texts = [item["sentence"] for item in data["sst2"]] + [t for t, _, _ in test_rows]
    model = _tiny_sst2_model(tmp_path / "model", texts)

    out = tmp_path / "adv"
    argv = ["--model", str(model), "--task", "adv_sst2", "--task-path", str(tmp_path / "dev.json"), "--attack", "none"]
    assert main([*argv, "--output-dir", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    labels = [item["label"] for item in data["sst2"]]
    assert summary["n_examples"] == len(labels) == 12
    expected = _reference_accuracy(model, [item["sentence"] for item in data["sst2"]], labels)
    assert summary["clean"]["accuracy"] == pytest.approx(expected)

    argv = ["--model", str(model), "--task", "sst2", "--task-path", str(sst2), "--split", "test", "--attack", "none"]
    assert main([*argv, "--output-dir", str(tmp_path / "unlabelled"), "--no-progress"]) == 2
    assert "test.tsv has no labels" in capsys.readouterr().err and not (tmp_path / "unlabelled").exists()
    write_glue_file(sst2 / "test_labeled.tsv", "sst2", test_rows)
    assert main([*argv, "--output-dir", str(tmp_path / "test"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "test" / "summary.json").read_text())
    labels = expected_labels("sst2", test_rows)
    assert summary["n_examples"] == 9
    assert summary["clean"]["accuracy"] == pytest.approx(_reference_accuracy(model, texts[12:], labels))
