
import pytest
import torch

from densessl.common.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic


def test_atomic_save_round_trip_leaves_no_temporary(tmp_path):
    state = {"format": FORMAT, "step": 3, "w": torch.arange(4.0)}
    save_atomic(state, tmp_path / "ckpt" / "last.pt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.pt"]
    back = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert back["step"] == 3 and torch.equal(back["w"], state["w"])


def test_truncated_file_gives_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"format": FORMAT, "w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*last.pt"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_foreign_pickle_never_runs_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_non_densessl_file_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a densessl checkpoint"):
        load_checkpoint(path)
