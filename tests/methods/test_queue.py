import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densessl.methods.momentum import KeyQueue


def test_queue_starts_normalised_and_enqueued_columns_equal_the_keys():
    torch.manual_seed(0)
    q = KeyQueue(8, {"a": 3})
    assert q["a"].shape == (3, 8) and torch.allclose(q["a"].norm(dim=0), torch.ones(8))
    k = torch.randn(4, 3)
    q.enqueue(a=k)
    assert torch.equal(q["a"][:, :4], k.t()) and int(q.ptr) == 4
    k2 = torch.randn(4, 3)
    q.enqueue(a=k2)
    assert torch.equal(q["a"][:, 4:], k2.t()) and int(q.ptr) == 0  # wrapped modulo K


def test_pointer_wraps_modulo_k_and_overwrites_the_oldest_keys():
    q = KeyQueue(6, {"a": 2})
    batches = [torch.full((2, 2), float(i)) for i in range(5)]
    for b in batches:
        q.enqueue(a=b)
    assert int(q.ptr) == (5 * 2) % 6 == 4
    # columns 0-1 hold batch 3, 2-3 batch 4 (both newer than batch 2 in columns 4-5)
    assert q["a"][0].tolist() == [3.0, 3.0, 4.0, 4.0, 2.0, 2.0]


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    q = KeyQueue(10, {"a": 2})
    with pytest.raises(ValueError, match=r"method.queue_size=10 must be a multiple of the keys enqueued per step \(4"):
        q.enqueue(a=torch.randn(4, 2))


def test_named_queues_share_one_pointer_and_must_be_written_together():
    q = KeyQueue(8, {"g": 3, "h": 5})
    kg, kh = torch.randn(4, 3), torch.randn(4, 5)
    q.enqueue(g=kg, h=kh)
    assert torch.equal(q["g"][:, :4], kg.t()) and torch.equal(q["h"][:, :4], kh.t())
    with pytest.raises(ValueError, match="keys for every queue"):
        q.enqueue(g=kg)
    with pytest.raises(ValueError, match="same number of keys"):
        q.enqueue(g=kg, h=kh[:2])


def test_queue_is_saved_in_the_state_dict():
    q = KeyQueue(4, {"a": 2})
    q.enqueue(a=torch.ones(2, 2))
    state = q.state_dict()
    assert set(state) == {"queue_a", "ptr"}
    r = KeyQueue(4, {"a": 2})
    r.load_state_dict(state)
    assert torch.equal(r["a"], q["a"]) and int(r.ptr) == 2


# ---------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from densessl.methods.momentum import check_per_rank_bn, shuffled_forward
        from densessl.common.distributed import AllReduceBatchNorm

        g = torch.Generator().manual_seed(0)
        keys = [torch.randn(8, 3, generator=g) for _ in range(3)]  # three global batches of 8
        torch.manual_seed(1)
        q = KeyQueue(16, {"g": 3, "h": 3})
        for k in keys:
            mine = k[rank * 4:(rank + 1) * 4]  # this rank's half of the global batch
            q.enqueue(g=mine, h=2 * mine)
        x = torch.arange(8.0).view(8, 1)[rank * 4:(rank + 1) * 4]
        seen = []
        back = shuffled_forward(lambda t: (seen.append(t.clone()) or t * 10, t), x, step=3)
        refused = False
        try:
            check_per_rank_bn(AllReduceBatchNorm(2), "mocov2")
        except ValueError as e:
            refused = "train.sync_bn=false" in str(e)
        torch.save({"queue": q.state_dict(), "back": back, "x": x, "seen": seen[0], "refused": refused},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_enqueue_the_same_queue_as_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(8, 3, generator=g) for _ in range(3)]
    torch.manual_seed(1)
    ref = KeyQueue(16, {"g": 3, "h": 3})
    for k in keys:
        ref.enqueue(g=k, h=2 * k)
    for r in (r0, r1):
        for name, v in ref.state_dict().items():
            assert torch.equal(r["queue"][name], v), name
        # shuffle across ranks, then unshuffle: each rank gets back its own samples, in order
        assert torch.equal(r["back"][0], r["x"] * 10) and torch.equal(r["back"][1], r["x"])
        assert r["refused"]
    # the key pass saw a shuffled global batch: every sample once, not all on their own rank
    seen = torch.cat([r0["seen"], r1["seen"]]).flatten()
    assert sorted(seen.tolist()) == list(range(8)) and seen.tolist() != list(range(8))


def test_targets_updated_for_the_next_step_start_as_exact_copies():
    """MoCo's placement skips the official update at step 0; that is exact only if every target
    then equals its online network bit for bit (lerp between equal tensors returns them)."""
    from densessl.common.ema import ema_update_
    from densessl.methods.cgh import CGH, CGHConfig
    from densessl.methods.densecl import DenseCL, DenseCLConfig
    from densessl.methods.moco import MoCo, MoCoConfig
    from densessl.methods.pixpro import PixPro
    from densessl.methods.pixpro_core import PixProConfig
    from densessl.models.backbones import build_backbone

    small = dict(proj_hidden_dim=32, proj_dim=16)
    methods = [MoCo(MoCoConfig(queue_size=64, **small), build_backbone("resnet18_small", 8)),
               DenseCL(DenseCLConfig(queue_size=64, **small), build_backbone("resnet18_small", 8)),
               CGH(CGHConfig(queue_size=64, **small), build_backbone("resnet18_small", 8)),
               PixPro(PixProConfig(pred_hidden_dim=32, ins_loss_weight=1.0, **small), build_backbone("resnet18_small", 8))]
    for m in methods:
        assert m.update_for_next_step
        pairs = m.momentum_pairs()
        assert len(pairs) >= 2
        for target, online in pairs:
            tp, op = list(target.parameters()), list(online.parameters())
            assert len(tp) == len(op) > 0 and all(torch.equal(t, o) for t, o in zip(tp, op))
            # the update the official code makes before step 0 leaves such a target unchanged, bitwise
            before = [t.clone() for t in tp]
            ema_update_(target, online, m.momentum_schedule.at(0, 10))
            assert all(torch.equal(t, b) for t, b in zip(tp, before))
