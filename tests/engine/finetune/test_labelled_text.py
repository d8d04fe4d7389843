"""GLUE task folders as distributed, and plain CSV / JSONL tables."""

from __future__ import annotations

import json

import pytest

from d2v2.engine.finetune.labelled_text import glue_task_of, read_glue, read_table


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_glue_single_sentence_pair_and_regression_tasks(tmp_path):
    cola = tmp_path / "CoLA"
    cola.mkdir()
    write(cola / "train.tsv", ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks.", "gj04\t0\t*\tThe more books I ask."])
    ex = read_glue(cola, glue_task_of(cola))
    assert ex.texts[1] == "The more books I ask." and ex.labels == [1, 0] and ex.text_pairs is None
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"  # fmt: skip
    write(mnli / "dev_matched.tsv", [header, "0\t1\t1e\tgov\t(\t(\t(\t(\tA man eats.\tSomeone eats.\tentailment\tentailment"])
    ex = read_glue(mnli, "mnli", "dev")
    assert ex.text_pairs == ["Someone eats."] and ex.labels == [1] and ex.classes[1] == "entailment"
    sts = tmp_path / "STS-B"
    sts.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    write(sts / "train.tsv", [header, "0\tmain\tf\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t5"])
    ex = read_glue(sts, glue_task_of(sts))
    assert ex.labels == [5.0] and ex.classes is None  # a regression target even with a whole number


def test_glue_errors_name_file_line_and_fix(tmp_path):
    rte = tmp_path / "RTE"
    rte.mkdir()
    with pytest.raises(FileNotFoundError, match="RTE folder as GLUE distributes it holds train.tsv and dev.tsv"):
        read_glue(rte, "rte")
    write(rte / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tentailment", "1\tC."])
    with pytest.raises(ValueError, match=r"train.tsv:3: 2 fields, the task needs 4"):
        read_glue(rte, "rte")
    write(rte / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tmaybe"])
    with pytest.raises(ValueError, match="label\\(s\\) maybe are not among the task's classes"):
        read_glue(rte, "rte")


def test_csv_and_jsonl_tables(tmp_path):
    csv_file = write(tmp_path / "train.csv", ["text,text_pair,label", "a cat,a dog,same", "a cat,a car,other"])
    ex = read_table(csv_file)
    assert ex.classes == ["other", "same"] and ex.labels == [1, 0] and ex.text_pairs == ["a dog", "a car"]
    jsonl = write(tmp_path / "train.jsonl", [json.dumps({"text": "x", "label": 0.5}), json.dumps({"text": "y", "label": 2})])
    ex = read_table(jsonl)
    assert ex.labels == [0.5, 2.0] and ex.classes is None
    bad = write(tmp_path / "bad.jsonl", [json.dumps({"text": "x", "label": "a"}), "{oops"])
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        read_table(bad)
    missing = write(tmp_path / "m.csv", ["text,label", "hello,"])
    with pytest.raises(ValueError, match="m.csv:2: no label"):
        read_table(missing)
    with pytest.raises(ValueError, match="give a .csv"):
        read_table(write(tmp_path / "t.txt", ["x"]))
