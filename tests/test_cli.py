import json

from densessl.cli import main


def test_bad_key_exits_2_with_the_message(capsys, tmp_path):
    code = main(["pretrain", "byol-scenes", "optim.lrr=1", f"run_dir={tmp_path}"])
    assert code == 2
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in capsys.readouterr().err


def test_eval_knn_random_writes_metrics(tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["eval", "knn", "random", "model.width=8", "data.size=32", "num_train=60", "num_test=30", "k=5",
                 f"out={out}"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["backbone"].startswith("random-init resnet18_small")
    assert 0.0 <= result["knn"]["knn_top1"] <= 1.0 and result["knn"]["settings"]["k"] == 5
    assert "knn_top1" in capsys.readouterr().out


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
