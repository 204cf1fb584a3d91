"""`uegr-eval` end to end: models saved by `uegr-train` (any method, any architecture) are evaluated as they are;
bad input exits 2 with a message naming the problem and writes nothing; a finished evaluation is never overwritten
silently; a 2-process `accelerate launch` gives the same summary and rows as one process."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.conftest import run_reaped, train_victim
from tests.test_robustness import read_rows, write_eval_file
from uegr_dist.cli.eval import main

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


# One torch thread, as the launched processes use: the 1- vs 2-process comparisons are exact only then.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    return write_eval_file(tmp_path_factory.mktemp("eval") / "eval.jsonl", 16, seed=7)


def run_cli(*args: str) -> int:
    return main([*args, "--no-progress"])


@pytest.mark.parametrize(("arch", "method"), [("roberta", "vanilla"), ("deberta-v2", "vanilla")])
def test_models_saved_by_uegr_train_are_accepted_as_is(arch, method, eval_file, tmp_path, one_thread):
    model = train_victim(tmp_path, arch, method, epochs=2)
    out = tmp_path / "out"
    code = run_cli(
        "--model",
        str(model),
        "--file",
        str(eval_file),
        "--attack",
        "char,pgd",
        "--output-dir",
        str(out),
        "--max-examples",
        "8",
        "--pgd-eps-l2",
        "0,1",
        "--pgd-norms",
        "l2",
        "--pgd-steps",
        "2",
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == 8 and set(summary["attacks"]) == {"char", "pgd_l2"}
    assert summary["attacks"]["pgd_l2"]["curve"][0]["accuracy"] == summary["clean"]["accuracy"]
    assert len(read_rows(out / "examples_char.jsonl")) == 8
    # The results join the model's card (written by uegr-train), loadable by the Hub client.
    card = ModelCard.load(model / "README.md")
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got["Accuracy under char attack"] == pytest.approx(summary["attacks"]["char"]["attacked_accuracy"])
    assert "## Robustness (uegr-eval)" in card.text


def test_cli_refuses_to_overwrite_a_finished_evaluation(victim_dir, eval_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "--model",
        str(victim_dir),
        "--file",
        str(eval_file),
        "--attack",
        "char",
        "--output-dir",
        str(out),
        "--max-examples",
        "4",
    ]
    assert run_cli(*args) == 0
    assert "done:" in capsys.readouterr().out
    before = (out / "summary.json").read_bytes()
    assert run_cli(*args, "--seed", "3") == 2
    assert "already holds an evaluation (summary.json)" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert run_cli(*args, "--seed", "3", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "char,typo"], "attacks: unknown attack 'typo' (allowed: char, word-mlm, word-synonym, pgd)"),
        (["--attack", "word-mlm"], "word_mlm.model = None: the word-mlm attack needs a masked LM"),
        (["--attack", "word-synonym", "--synonym-file", "nope.txt"], "word_synonym.file = 'nope.txt': file not found"),
        (["--max-word-fraction", "1.5"], "search.max_word_fraction = 1.5: must be in (0.0, 1.0]"),
        (["--pgd-eps-l2", "0,x"], "--pgd-eps-l2 = '0,x'"),
        (["--char-edits", "swap,flip"], "char.edits: unknown edit 'flip'"),
        (["--char.max_candidates", "3"], "unknown key char.max_candidates"),
        (["--label-column", "gold"], "missing column 'gold'"),
        (["--model", "/no/such/model"], "model = '/no/such/model': directory not found"),
        (["--file", "missing.csv"], "missing.csv: file not found"),
        (["--output-dir="], "output_dir = '': "),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    extra, message, victim_dir, eval_file, tmp_path, capsys
):
    out = tmp_path / "out"
    code = run_cli("--model", str(victim_dir), "--file", str(eval_file), "--output-dir", str(out), *extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_needs_an_output_dir(victim_dir, eval_file, capsys):
    assert run_cli("--model", str(victim_dir), "--file", str(eval_file)) == 2
    assert "output_dir = None: give --output-dir" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_give_the_same_summary_and_rows_as_one(victim_dir, eval_file, tmp_path):
    args = [
        "--model",
        str(victim_dir),
        "--file",
        str(eval_file),
        "--attack",
        "char,pgd",
        "--max-examples",
        "12",
        "--batch-size",
        "4",
        "--max-word-fraction",
        "0.5",
        "--pgd-eps-l2",
        "0,0.3,1",
        "--pgd-eps-linf",
        "0,0.03",
        "--pgd-steps",
        "3",
        "--no-progress",
    ]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = run_reaped(
        [
            str(ACCELERATE),
            "launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu-2proc-ddp.yaml"),
            "--main_process_port",
            str(free_port()),
            "-m",
            "uegr_dist.cli.eval",
            *args,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["timing"]["num_processes"] == 2 and one["timing"]["num_processes"] == 1
    for summary in (one, two):
        del summary["timing"], summary["config"]["output_dir"]
    assert one == two
    assert one["attacks"]["char"]["n_success"] > 0
    for name in ("char", "pgd_l2", "pgd_linf"):
        assert read_rows(tmp_path / "one" / f"examples_{name}.jsonl") == read_rows(
            tmp_path / "two" / f"examples_{name}.jsonl"
        )


def test_registry_task_and_prediction_map(tmp_path, one_thread):
    """--task reads a registered task's split (here a local copy shaped like the Hub dataset); HANS is scored with a
    3-class MNLI model, neutral and contradiction probabilities summed into non-entailment."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.conftest import TINY_MODELS
    from uegr_dist.config import ModelConfig
    from uegr_dist.modeling import build_word_level_tokenizer, load_model

    texts = ["the doctor saw the lawyer", "the lawyer saw the doctor", "a b c d", "if the actor slept"]
    tokenizer = build_word_level_tokenizer(texts, 100)
    labels3 = {0: "entailment", 1: "neutral", 2: "contradiction"}
    cfg = ModelConfig(init="random", architecture="bert", config=dict(TINY_MODELS["bert"]), tokenizer="word_level")
    model = load_model(cfg, tokenizer, 3, labels3, seed=0)
    model.save_pretrained(tmp_path / "mnli_model")
    tokenizer.save_pretrained(tmp_path / "mnli_model")

    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "non-entailment"]),
            "parse_premise": datasets.Value("string"),
        }
    )
    rows = {"premise": texts * 3, "hypothesis": texts[::-1] * 3, "label": [0, 1] * 6, "parse_premise": [""] * 12}
    hans = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": hans, "validation": hans}).save_to_disk(tmp_path / "hans")

    out = tmp_path / "eval"
    args = ["--model", str(tmp_path / "mnli_model"), "--task", "hans", "--task-path", str(tmp_path / "hans")]
    assert run_cli(*args, "--attack", "none", "--output-dir", str(out), "--max-examples", "10") == 0
    summary = json.loads((out / "summary.json").read_text())

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mnli_model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "mnli_model")
    with torch.no_grad():
        probs = reloaded(**tok(rows["premise"][:10], rows["hypothesis"][:10], return_tensors="pt", padding=True))
    p = probs.logits.softmax(-1)
    predicted = (p[:, 1] + p[:, 2] > p[:, 0]).long()  # the obvious reference of the prediction map
    expected = float((predicted == torch.tensor(rows["label"][:10])).float().mean())
    assert summary["n_examples"] == 10 and summary["clean"]["accuracy"] == pytest.approx(expected)
    assert summary["attacks"] == {}

    assert run_cli(*args, "--attack", "pgd", "--output-dir", str(tmp_path / "e2"), "--max-examples", "4") == 2
    assert (
        run_cli(
            *args[:2], "--task", "sst2", "--task-path", str(tmp_path / "hans"), "--output-dir", str(tmp_path / "e3")
        )
        == 2
    )
