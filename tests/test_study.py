"""`densessl study` and `densessl report` end to end on a tiny grid: killed mid-run and rerun,
every row is in the table once, and the page's numbers are the table's."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import stdev

import pytest
import yaml

from conftest import TINY
from densessl.cli import main
from densessl.report import interval, verdict, welch
from densessl.study import Claim, append_row, flat_metrics, load_study, read_table, row_key, run_study

PRETRAIN = [o for o in TINY if not o.startswith("method.")] + ["train.log_every=1"]
FROZEN = ["num_train=40", "num_test=20", "epochs=2", "k=5", "data.size=32", "data.num_scenes=64"]
DENSE = ["model.width=8", "data.size=32", "data.num_workers=0", "num_train=16", "num_test=8",
         "retrieval.stages=[c4]", "retrieval.memory_size=128", "retrieval.fractions=[1.0]", "k=5"]


def tiny_study(tmp_path: Path, name: str = "tiny") -> Path:
    study = {
        "name": name, "seeds": [0, 1], "pretrain_overrides": PRETRAIN,
        "random": {"seeds": [0, 1], "overrides": ["model.backbone=resnet18_small", "model.width=8"]},
        "protocols": [{"name": "frozen", "eval": "knn", "overrides": FROZEN},
                      {"name": "dense", "eval": "retrieval", "overrides": DENSE}],
        "runs": [{"recipe": "byol-scenes", "epochs": 1, "overrides": ["method.proj_hidden_dim=32", "method.proj_dim=16",
                                                                       "method.pred_hidden_dim=32"]}],
        "claims": [{"claim": "BYOL > random on kNN", "protocol": "frozen", "metric": "knn_top1",
                    "better": "byol-scenes", "worse": "random"}],
        "report": [{"protocol": "frozen", "metric": "knn_top1", "label": "kNN"},
                   {"protocol": "dense", "metric": "retrieval.mIoU.c4.1", "label": "retrieval"}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.slow
def test_a_study_killed_mid_run_and_rerun_has_each_row_once_and_the_report_matches_the_table(tmp_path):
    path = tiny_study(tmp_path)
    table, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    cmd = [sys.executable, "-m", "densessl", "study", str(path), "--table", str(table), "--runs", str(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = runs / "byol-scenes" / "seed0" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # during the first pretraining: the random rows are in, seed 0 is not
    proc.wait()
    before = read_table(table)
    assert {(r["run"], r["seed"]) for r in before} <= {("random", 0), ("random", 1)}
    assert len(before) == 4  # both random seeds x both protocols, written before the first pretraining
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "4 already in" in rerun.stdout and "4 rows written" in rerun.stdout
    rows = read_table(table)
    keys = [(r["run"], r["seed"], r["protocol"]) for r in rows]
    assert sorted(keys) == sorted({(run, s, p) for run in ("random", "byol-scenes") for s in (0, 1)
                                   for p in ("frozen", "dense")})  # each once
    assert all(r["config_hash"] for r in rows if r["run"] != "random")
    assert len({r["config_hash"] for r in rows if r["run"] == "byol-scenes" and r["seed"] == 0}) == 1
    # a third run writes nothing
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert "0 rows written, 8 already in" in third.stdout
    # the report's numbers are the table's
    out = tmp_path / "results.md"
    assert main(["report", str(path), "--table", str(table), "--out", str(out)]) == 0
    page = out.read_text()
    assert (tmp_path / "results.png").stat().st_size > 0
    knn = [r["metrics"]["knn_top1"] for r in sorted(rows, key=lambda r: r["seed"])
           if r["run"] == "byol-scenes" and r["protocol"] == "frozen"]
    m, h = interval(knn)
    line = next(ln for ln in page.splitlines() if ln.startswith("| byol-scenes |"))
    assert f"{100 * m:.1f} ± {100 * h:.1f} (n=2)" in line
    rnd = [r["metrics"]["knn_top1"] for r in rows if r["run"] == "random" and r["protocol"] == "frozen"]
    line = next(ln for ln in page.splitlines() if ln.startswith("| random |"))
    assert f"{100 * min(rnd):.1f}-{100 * max(rnd):.1f} (n=2)" in line
    assert "Progress: 8 of 8 rows, every declared row measured." in page


def test_rows_already_in_the_table_are_skipped_and_a_cut_line_is_ignored(tmp_path):
    study = load_study(str(tiny_study(tmp_path)))
    study.runs = []  # the random baseline only: evaluations, no pretraining
    study.protocols = study.protocols[:1]
    table = tmp_path / "t.jsonl"
    assert run_study(study, table, tmp_path / "runs", log=lambda *a: None) == {"written": 2, "skipped": 0}
    with open(table, "a") as f:
        f.write('{"run": "random", "seed"')  # a row cut by a kill mid-write
    assert len(read_table(table)) == 2
    append_row(table, {"run": "x", "seed": 0, "protocol": "p"})
    assert [r["run"] for r in read_table(table)] == ["random", "random", "x"]  # the new row is whole
    assert run_study(study, table, tmp_path / "runs", log=lambda *a: None) == {"written": 0, "skipped": 2}


def test_flat_metrics_keep_the_summary_numbers_and_drop_per_class_detail():
    frozen = {"backbone": "b", "model": {"width": 8}, "knn": {"knn_top1": 0.5, "settings": {"k": 5}, "seconds": 1.0}}
    assert flat_metrics(frozen, "frozen") == {"knn_top1": 0.5}
    dense = {"retrieval": {"mIoU": {"c4": {"1": 0.25}}, "results": {"c4": {"1": {"mIoU": 0.25, "x": 1}}},
                           "seconds": 3.0},
             "region": {"acc": {"c4": {"linear": 0.5, "knn": 0.4}}, "settings": {"k": 5}}}
    assert flat_metrics(dense, "dense") == {"retrieval.mIoU.c4.1": 0.25, "region.acc.c4.linear": 0.5,
                                            "region.acc.c4.knn": 0.4}


def test_intervals_and_verdicts_by_hand():
    m, h = interval([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(h, 4.302652729911275 * 1.0 / math.sqrt(3))  # t(0.975, 2) x s / sqrt(n)
    d, lo, hi = welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert d == 0 and lo < 0 < hi
    rows = [{"run": run, "seed": s, "protocol": "p", "metrics": {"m": v}}
            for run, vals in (("a", [0.50, 0.52, 0.51]), ("b", [0.30, 0.31, 0.29])) for s, v in enumerate(vals)]
    claim = Claim("a > b", "p", "m", "a", "b")
    assert verdict(rows, claim)["verdict"] == "holds"
    assert verdict(rows, Claim("b > a", "p", "m", "b", "a"))["verdict"].startswith("does not hold")
    assert verdict(rows[:4], claim)["verdict"].startswith("inconclusive (seeds: 3 vs 1")


def test_a_study_naming_an_undeclared_run_is_one_clear_error(tmp_path, capsys):
    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["claims"][0]["worse"] = "mocov2-scenes"
    path.write_text(yaml.safe_dump(data))
    assert main(["study", str(path), "--table", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densessl: error: ") and "worse='mocov2-scenes'" in err and err.count("\n") == 1


def test_fine_tuning_rows_keep_their_units_and_the_page_scales_them(tmp_path):
    from densessl.report import render
    from densessl.study import ReportMetric, Study, StudyProtocol, StudyRun

    result = {"backbone": "b", "detection": {"AP": 17.8, "AP50": 37.3, "settings": {"iterations": 800},
                                             "seconds": 390.0}}
    assert flat_metrics(result, "detection") == {"AP": 17.8, "AP50": 37.3}
    study = Study(name="s", runs=[StudyRun(recipe="pixpro-scenes")],
                  protocols=[StudyProtocol(name="det", eval="detection")],
                  report=[ReportMetric(protocol="det", metric="AP", label="AP", scale=1.0)])
    rows = [{"run": run, "seed": s, "protocol": "det", "metrics": {"AP": ap}, "epochs": 4, "pretrain_minutes": 0,
             "eval_minutes": 1, "machine": "m", "densessl": "0"}
            for run, aps in (("random", [18.0, 18.2]), ("pixpro-scenes", [19.0, 19.4])) for s, ap in enumerate(aps)]
    page = render(study, rows, tmp_path / "t.jsonl", None)
    assert "| random | 4 | 18.0-18.2 (n=2) |" in page
    # sd of (19.0, 19.4) is 0.2 sqrt(2); half-width t(0.975, 1) x sd / sqrt(2) = 12.706 x 0.2
    assert f"| pixpro-scenes | 4 | 19.2 ± {12.706204736174707 * 0.2:.1f} (n=2) > |" in page


def test_units_already_pretrained_come_first(tmp_path):
    from densessl.study import PRETRAINED, unit_dir, units, work_order

    study = load_study(str(tiny_study(tmp_path)))
    study.runs.append(type(study.runs[0])(recipe="pixpro-scenes", epochs=1))
    declared = [(u.run, u.seed) for u in units(study)]
    assert [(u.run, u.seed) for u in work_order(study, tmp_path)] == declared
    done = units(study)[-1]  # pixpro-scenes seed 1, pretrained in an earlier session
    unit_dir(tmp_path, done).mkdir(parents=True)
    (unit_dir(tmp_path, done) / PRETRAINED).write_text('{"minutes": 1.0}')
    order = [(u.run, u.seed) for u in work_order(study, tmp_path)]
    assert order == [("pixpro-scenes", 1)] + [k for k in declared if k != ("pixpro-scenes", 1)]


def test_a_finished_unit_is_not_trained_again_and_a_changed_config_is_refused(tmp_path):
    from densessl.common.errors import ConfigError
    from densessl.study import PRETRAINED, unit_dir, units

    study = load_study(str(tiny_study(tmp_path)))
    study.protocols = study.protocols[:1]
    study.random.seeds = []
    study.runs[0].seeds = [0]
    table, runs = tmp_path / "t.jsonl", tmp_path / "runs"
    run_study(study, table, runs, log=lambda *a: None)
    unit = units(study)[0]
    ckpt = unit_dir(runs, unit) / "checkpoints" / "last.pt"
    stamp = ckpt.stat().st_mtime_ns
    table.write_text("")  # the rows are gone, the pretraining is not: only evaluation runs again
    assert run_study(study, table, runs, log=lambda *a: None)["written"] == 1
    assert ckpt.stat().st_mtime_ns == stamp  # not rewritten: no Trainer was built
    # a key densessl added since the unit was pretrained (its hash differs) is no change: the run had its default
    marker = unit_dir(runs, unit) / PRETRAINED
    done = json.loads(marker.read_text())
    marker.write_text(json.dumps({**done, "config_hash": "an-older-key-set"}))
    saved = unit_dir(runs, unit) / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    del tree["data"]["decode_on"]
    saved.write_text(yaml.safe_dump(tree))
    table.write_text("")
    assert run_study(study, table, runs, log=lambda *a: None)["written"] == 1
    assert ckpt.stat().st_mtime_ns == stamp and read_table(table)[0]["config_hash"] == "an-older-key-set"
    table.write_text("")
    study.runs[0].overrides = [*study.runs[0].overrides, "optim.lr=0.5"]
    with pytest.raises(ConfigError, match=r"pretrained with another config .*\(optim.lr: "):
        run_study(study, table, runs, log=lambda *a: None)
    assert (unit_dir(runs, unit) / PRETRAINED).exists()


def test_only_and_protocols_restrict_the_work_and_unknown_names_are_one_clear_error(tmp_path, capsys):
    study = load_study(str(tiny_study(tmp_path)))
    study.runs = []  # the random baseline: evaluations only
    table = tmp_path / "t.jsonl"
    quiet = dict(log=lambda *a: None)
    assert run_study(study, table, tmp_path / "runs", protocols=["frozen"], **quiet)["written"] == 2
    assert {r["protocol"] for r in read_table(table)} == {"frozen"}
    assert run_study(study, table, tmp_path / "runs", protocols=["dense"], only=["random"], **quiet) == \
        {"written": 2, "skipped": 0}
    assert sorted(row_key(r) for r in read_table(table)) == sorted(
        ("random", s, p) for s in (0, 1) for p in ("frozen", "dense"))
    path = tiny_study(tmp_path)
    assert main(["study", str(path), "--table", str(table), "--protocols", "detection"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densessl: error: --protocols detection: not declared") and err.count("\n") == 1
    assert main(["study", str(path), "--table", str(table), "--only", "mocov2-scenes"]) == 2
    assert "--only mocov2-scenes" in capsys.readouterr().err
    assert main(["study", str(path), "--table", str(table), "--seeds", "7"]) == 2
    assert capsys.readouterr().err.startswith("densessl: error: --seeds 7: not declared")


def test_seeds_restricts_the_work_to_those_seeds(tmp_path):
    study = load_study(str(tiny_study(tmp_path)))
    study.runs = []  # the random baseline at weight seeds 0 and 1: evaluations only
    table = tmp_path / "t.jsonl"
    assert run_study(study, table, tmp_path / "runs", protocols=["frozen"], seeds=[1], log=lambda *a: None) == \
        {"written": 1, "skipped": 0}
    assert [row_key(r) for r in read_table(table)] == [("random", 1, "frozen")]


def test_the_readme_headline_block_quotes_the_page_cell_for_cell(tmp_path):
    from densessl.report import README_END, update_readme

    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["headline"] = {"run": "byol-scenes", "metrics": ["kNN"]}
    path.write_text(yaml.safe_dump(data))
    study = load_study(str(path))
    rows = [{"run": run, "seed": s, "epochs": e, "protocol": "frozen", "metrics": {"knn_top1": v}}
            for run, e, vals in (("byol-scenes", 1, [0.40, 0.44]), ("random", 0, [0.20, 0.25])) for s, v in enumerate(vals)]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- generated by densessl report tiny --readme: the headline -->\nold\n"
                      f"{README_END}\nrest\n")
    update_readme(study, rows, readme, "docs/results.md")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nrest\n") and "old" not in text
    assert "| byol-scenes | 42.0 ± 25.4 (n=2) > |" in text  # t(0.975, 1) = 12.706 x sd 0.0283 / sqrt(2)
    assert "| random | 20.0-25.0 (n=2) |" in text and "(1 epochs, 2 pretraining seeds)" in text
    update_readme(study, rows, readme, "docs/results.md")
    assert readme.read_text() == text  # idempotent
    data["headline"]["metrics"] = ["retrieval mIoU"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="headline names run 'byol-scenes'"):
        load_study(str(path))


def test_the_committed_results_page_and_readme_are_what_the_committed_table_generates():
    """docs/results.md and README's headline are regenerated, never edited: after a study adds rows,
    `densessl report claims --table docs/results/claims.jsonl --readme README.md` before committing."""
    from densessl.report import README_BEGIN, README_END, headline_block, render

    root = Path(__file__).resolve().parents[1]

    def committed(path: str) -> str:  # HEAD's file (a running study appends to the working copy), else the file
        proc = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else (root / path).read_text()

    study = load_study("claims")
    table = Path("docs/results/claims.jsonl")
    rows = [json.loads(line) for line in committed(str(table)).splitlines() if line.strip()]
    rows = [r for r in rows if r.get("study") == "claims"]
    assert committed("docs/results.md") == render(study, rows, table, "results.png") + "\n"
    readme = committed("README.md")
    block = readme[readme.index(README_BEGIN.format(name="claims")):readme.index(README_END) + len(README_END)]
    assert block == headline_block(study, rows, "docs/results.md")


def test_the_time_left_is_the_tables_pace_times_what_is_missing(tmp_path):
    from densessl.report import minutes_left

    study = load_study(str(tiny_study(tmp_path)))  # random x2 seeds, byol-scenes (1 epoch) x2; frozen, dense
    row = dict(recipe="byol-scenes", epochs=1)
    rows = [{"run": "byol-scenes", "seed": 0, "protocol": "frozen", "pretrain_minutes": 10.0, "eval_minutes": 2.0,
             **row},
            {"run": "random", "seed": 0, "protocol": "frozen", "recipe": None, "epochs": 0, "pretrain_minutes": 0.0,
             "eval_minutes": 1.0},
            {"run": "random", "seed": 0, "protocol": "dense", "recipe": None, "epochs": 0, "pretrain_minutes": 0.0,
             "eval_minutes": 5.0}]
    pretrain, evaluation = minutes_left(study, rows)
    assert pretrain == 10.0  # byol seed 1: one epoch at 10 min/epoch; seed 0 is pretrained (it has a row)
    # missing: random 1 frozen + dense (1.5 + 5), byol 0 dense (5), byol 1 frozen + dense (1.5 + 5)
    assert evaluation == 1.5 + 5.0 + 5.0 + 1.5 + 5.0


def test_which_protocols_separate_counts_runs_whose_every_seed_clears_the_random_range(tmp_path):
    from densessl.report import discrimination

    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["runs"].append({"recipe": "byol-scenes", "name": "other", "epochs": 1})
    path.write_text(yaml.safe_dump(data))
    study = load_study(str(path))
    rows = [{"run": run, "seed": s, "protocol": "frozen", "metrics": {"knn_top1": v}}
            for run, vals in (("random", [0.20, 0.25]), ("byol-scenes", [0.30, 0.34]), ("other", [0.22, 0.40]))
            for s, v in enumerate(vals)]
    d = discrimination(study, rows, study.report[0])
    assert d["measured"] == 2 and d["above"] == ["byol-scenes"] and d["below"] == []
    # seed sd: byol 0.0283, other 0.1273; their median (the mean of two), in points
    assert math.isclose(d["seed_sd"], 100 * (stdev([0.30, 0.34]) + stdev([0.22, 0.40])) / 2)


def test_shards_of_a_study_split_its_units_without_overlap(tmp_path, capsys):
    study = load_study(str(tiny_study(tmp_path)))
    study.runs = []  # the random baseline: two units, evaluations only
    quiet = dict(log=lambda *a: None)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run_study(study, a, tmp_path / "runs", shard=(0, 2), **quiet)["written"] == 2
    assert run_study(study, b, tmp_path / "runs", shard=(1, 2), **quiet)["written"] == 2
    assert {r["seed"] for r in read_table(a)} == {0} and {r["seed"] for r in read_table(b)} == {1}
    whole = tmp_path / "whole.jsonl"
    run_study(study, whole, tmp_path / "runs2", **quiet)
    metrics = lambda rows: sorted((r["seed"], r["protocol"], json.dumps(r["metrics"], sort_keys=True)) for r in rows)
    assert metrics(read_table(a) + read_table(b)) == metrics(read_table(whole))  # the same rows, split
    assert main(["study", str(tiny_study(tmp_path, "t2")), "--table", str(a), "--shard", "2/2"]) == 2
    assert "--shard 2/2: expected k/n with 0 <= k < n" in capsys.readouterr().err


def test_clears_says_whether_every_seed_lies_above_the_random_range(tmp_path):
    from densessl.report import clears_lines

    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["clears"] = [{"run": "byol-scenes", "paper": "linear", "protocol": "frozen", "metric": "knn_top1"}]
    path.write_text(yaml.safe_dump(data))
    study = load_study(str(path))
    rows = lambda byol: [{"run": run, "seed": s, "protocol": "frozen", "metrics": {"knn_top1": v}}
                         for run, vals in (("random", [0.20, 0.25]), ("byol-scenes", byol)) for s, v in enumerate(vals)]
    assert clears_lines(study, rows([0.30, 0.26]))[-2].endswith("| clears (every seed above the range) |")
    assert clears_lines(study, rows([0.30, 0.24]))[-2].endswith("| inside the range |")
    assert clears_lines(study, rows([0.10, 0.12]))[-2].endswith("| below the range (every seed) |")
    assert clears_lines(study, rows([]))[-2].endswith("| not measured yet |")
    assert clears_lines(study, rows([0.30]))[-2].endswith(
        "| clears (every seed above the range) so far (1 of 2 seeds) |")  # not yet a verdict
    data["clears"][0]["run"] = "mocov2-scenes"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="clears entry names run 'mocov2-scenes'"):
        load_study(str(path))


def test_per_method_line_groups_variants_by_recipe_and_names_the_best_when_none_clears(tmp_path):
    from densessl.report import method_lines

    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["runs"].append({"recipe": "byol-scenes", "name": "byol-hue", "epochs": 1})
    data["clears"] = [{"run": "byol-scenes", "paper": "linear", "protocol": "frozen", "metric": "knn_top1",
                       "why": "methods/byol.md#at-this-scale"},
                      {"run": "byol-hue", "paper": "linear", "protocol": "frozen", "metric": "knn_top1"}]
    path.write_text(yaml.safe_dump(data))
    study = load_study(str(path))
    table = {"random": ([0.20, 0.25], [0.10, 0.11]), "byol-scenes": ([0.22, 0.26], [0.11, 0.13]),
             "byol-hue": ([0.24, 0.28], [0.15, 0.20])}
    rows = lambda t: [{"run": run, "seed": s, "protocol": p, "metrics": {m: v}}
                      for run, (knn, retr) in t.items() for p, m, vals in (("frozen", "knn_top1", knn),
                                                                          ("dense", "retrieval.mIoU.c4.1", retr))
                      for s, v in enumerate(vals)]
    (line,) = [x for x in method_lines(study, rows(table)) if x.startswith("- ")]
    # neither clears kNN; byol-hue has the higher mean (26.0); on retrieval only byol-hue has every seed above 11.0
    assert line == ("- `byol-scenes`: no variant clears linear; the best, byol-hue, 26.0 ± 25.4 (n=2) ~ against the "
                    "random 20.0-25.0 (n=2); every seed above the random range on: retrieval: byol-hue; why the "
                    "recipe does not: [methods/byol.md](methods/byol.md#at-this-scale).")
    table["byol-hue"] = ([0.26, 0.30], [0.15, 0.20])
    (line,) = [x for x in method_lines(study, rows(table)) if x.startswith("- ")]
    assert line.startswith("- `byol-scenes`: clears: byol-hue (not the declared recipe, byol-scenes); why the recipe "
                           "does not: [methods/byol.md")
    del table["byol-hue"]
    (line,) = [x for x in method_lines(study, rows(table)) if x.startswith("- ")]
    assert line.endswith("(n=2); no headline metric has every seed of a variant above the random range; why the "
                         "recipe does not: [methods/byol.md](methods/byol.md#at-this-scale) "
                         "(not measured yet: byol-hue).")
    # one of byol-hue's two seeds, above the range: not yet a verdict
    table["byol-hue"] = ([0.26], [0.15])
    (line,) = [x for x in method_lines(study, rows(table)) if x.startswith("- ")]
    assert line.startswith("- `byol-scenes`: no variant clears linear; the best, byol-hue, 26.0 (n=1) >")
    assert line.endswith("(not measured yet: byol-hue: 1 of 2 seeds).")


def test_the_progress_line_names_each_machine_quoted_with_its_rows(tmp_path):
    from densessl.report import _provenance

    study = load_study(str(tiny_study(tmp_path)))
    row = dict(seed=0, protocol="frozen", epochs=1, pretrain_minutes=1.0, eval_minutes=1.0, densessl="0")
    rows = [{**row, "run": "random", "machine": "AMD EPYC; 1 threads"},
            {**row, "run": "random", "seed": 1, "machine": "AMD EPYC; 1 threads"},
            {**row, "run": "byol-scenes", "machine": "Xeon; 1 threads"}]
    line = _provenance(study, rows)[0]
    assert "Machines: `AMD EPYC; 1 threads` (2 rows), `Xeon; 1 threads` (1 row)." in line
    assert line.startswith("Progress: 3 of 8 rows (5 still to run, about ")  # the tiny study declares 8
