"""torchrun on one node and on two, a killed worker restarted by --max-restarts, and the labeled
gradient averaged over ranks before the finite-difference step is taken."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mgssl.train.metrics import read_metrics

# Several processes on one machine run on the CPU with gloo, chosen here: with train.device=auto on a
# one-GPU machine rank 1 would ask for cuda:1, and NCCL refuses two ranks on one GPU.
SETTINGS = ("train.eval_every=10", "train.checkpoint_every=5", "train.log_every=5", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def train_cmd(out, steps) -> list[str]:
    return ["-m", "mgssl.train", "digits", "--out", str(out), "--set", f"train.steps={steps}", *SETTINGS]


def wait_until_step(proc, out, step: int, timeout_s: float = 300) -> None:
    """Wait until the run in `out` has logged `step`, failing with its output if it died first."""
    deadline = time.monotonic() + timeout_s
    while not any(r["step"] >= step for r in read_metrics(out, "train")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def assert_ranks_agree_and_experiment_unchanged(out, steps, world_size):
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == world_size and final["steps"] == steps
    assert len(final["weights_sha256_per_rank"]) == world_size
    assert len(set(final["weights_sha256_per_rank"])) == 1  # every rank holds the same weights
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    from mgssl.train.checkpoint import fingerprint

    assert fingerprint(state["model"]) == final["weights_sha256"]  # ... and they are the ones saved
    # The global batch stays 32 whatever the process count: as many unlabeled images per step as one process.
    split = json.loads((out / "labeled_split.json").read_text())
    assert final["epochs"] == pytest.approx(steps * 32 / (split["train_size"] - split["num_labeled"]), abs=1e-4)
    assert len(state["rng"]) == world_size
    # Each rank tests its share; the counts are summed, so every test image is counted once.
    from mgssl.pipelines.sources import load_digits_arrays

    test_size = len(load_digits_arrays().test_labels)
    assert {r["test_images"] for r in read_metrics(out, "eval")} == {test_size}


@pytest.mark.slow
def test_torchrun_two_processes_survive_a_killed_worker_and_end_with_equal_weights(tmp_path, subprocess_env):
    out, steps = tmp_path / "run", 60
    cmd = torchrun("--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.2",
                   f"--master-port={free_port()}", *train_cmd(out, steps))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_until_step(proc, out, 10)
        worker = json.loads((out / "runs.jsonl").read_text().splitlines()[0])["pid"]
        os.kill(worker, signal.SIGKILL)  # rank 0 dies; torchrun restarts both workers
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    starts = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [s["restart"] for s in starts] == [0, 1]
    assert 5 <= starts[1]["resumed_from_step"] < steps
    assert [r["step"] for r in read_metrics(out, "train")] == list(range(5, steps + 1, 5))  # no step lost or doubled
    assert_ranks_agree_and_experiment_unchanged(out, steps, 2)


@pytest.mark.slow
def test_torchrun_sigterm_stops_both_ranks_at_one_step_and_the_resume_is_bit_identical(tmp_path, subprocess_env):
    """The scheduler's SIGTERM goes to torchrun, which forwards it to both workers: they finish the step,
    agree where to stop, rank 0 saves, and the same command plus --resume ends as a straight run."""
    stopped, straight, steps = tmp_path / "stopped", tmp_path / "straight", 20

    def launch(out, total, *extra):
        return torchrun("--nproc_per_node=2", f"--master-port={free_port()}",
                        *train_cmd(out, total), *extra)

    # Asked for far more steps so that it is certainly running when stopped; resumed with the real total.
    proc = subprocess.Popen(launch(stopped, 100000), cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    reference = subprocess.Popen(launch(straight, steps), cwd=tmp_path, env=subprocess_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_step(proc, stopped, 10)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    at = state["step"]
    assert 10 <= at < steps and len(state["rng"]) == 2, log[-3000:]
    assert f"stopped by SIGTERM at step {at} of 100000" in log and "--resume" in log, log[-3000:]
    assert "Traceback" not in log.split("stopped by SIGTERM")[0], log[-3000:]

    resumed = subprocess.run(launch(stopped, steps, "--resume"), cwd=tmp_path, env=subprocess_env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((out / "final.json").read_text()) for out in (straight, stopped))
    assert a["weights_sha256_per_rank"] == b["weights_sha256_per_rank"] and a["test_error"] == b["test_error"]
    assert [r["step"] for r in read_metrics(stopped, "train")] == list(range(5, steps + 1, 5))


@pytest.mark.slow
def test_two_nodes_on_localhost_meet_at_one_rendezvous(tmp_path, subprocess_env):
    out, steps, port = tmp_path / "run", 20, free_port()
    node = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=two-nodes", *train_cmd(out, steps))
    procs = [subprocess.Popen(node, cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(log[-2000:] for log in logs)
    assert_ranks_agree_and_experiment_unchanged(out, steps, 2)


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from mgssl.model import build_model
    from mgssl.train import distributed as D
    from mgssl.train.meta import meta_targets

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).double().eval()
    x_l, y_l, x_u = torch.randn(8, 1, 8, 8).double(), torch.randint(0, 10, (8,)), torch.randn(6, 1, 8, 8).double()
    mine = slice(4 * rank, 4 * rank + 4)
    saved = {}
    for estimator in ("fd", "jvp"):
        for name, reducer in (("blocking", D.average_grads), ("overlapped", D.start_average_grads)):
            out = meta_targets(net, x_l[mine], y_l[mine], x_u, estimator=estimator, eps=0.01,
                               reduce_grad=lambda g: reducer(g, 2))
            saved[f"{estimator}-{name}"] = {"jg": out.jg, "grad_norm": out.grad_norm, "p": out.pseudo_labels}
    torch.save(saved, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_the_labeled_gradient_is_averaged_over_ranks_before_epsilon(tmp_path, subprocess_env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(subprocess_env, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]

    from mgssl.model import build_model
    from mgssl.train.meta import meta_targets

    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).double().eval()
    x_l, y_l, x_u = torch.randn(8, 1, 8, 8).double(), torch.randint(0, 10, (8,)), torch.randn(6, 1, 8, 8).double()
    whole = meta_targets(net, x_l, y_l, x_u, estimator="fd", eps=0.01)  # g of the global labeled batch
    half = meta_targets(net, x_l[:4], y_l[:4], x_u, estimator="fd", eps=0.01)  # what a rank alone would use
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["fd-blocking"]["grad_norm"], whole.grad_norm, rtol=1e-10)
        assert torch.allclose(got["fd-blocking"]["jg"], whole.jg, rtol=1e-6, atol=1e-9)
        for estimator in ("fd", "jvp"):  # g's all-reduce started early and waited for late: the same numbers
            for key, value in got[f"{estimator}-blocking"].items():
                assert torch.equal(value, got[f"{estimator}-overlapped"][key]), (estimator, key)
    assert not torch.allclose(half.jg, whole.jg, rtol=1e-2)  # a per-rank g would be told apart


def test_workers_of_a_restart_agree_on_a_fresh_name_despite_a_stale_one(tmp_path):
    """Ranks 1 and 2 start before rank 0 and first read the name a dead attempt left in the store."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from mgssl.train.distributed import agree_on_attempt

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    server.set("mgssl/attempt", "dead-attempt")
    server.set("mgssl/dead-attempt/go/anything", "1")
    names, errors = {}, []

    def worker(rank):
        try:
            client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=60))
            names[rank] = agree_on_attempt(client, rank, 3, timeout=timedelta(seconds=60),
                                           retry=timedelta(milliseconds=200))
        except Exception as e:  # reported below, with the rank
            errors.append((rank, e))

    threads = {r: threading.Thread(target=worker, args=(r,)) for r in range(3)}
    threads[1].start()
    threads[2].start()
    time.sleep(0.5)  # both have read the stale name and are waiting for a confirmation that never comes
    threads[0].start()
    for t in threads.values():
        t.join(timeout=120)
    assert not errors, errors
    assert len(set(names.values())) == 1 and names[0] != "dead-attempt" and len(names) == 3


def _ddp_steps(rank: int, store_path: str, path: str, out: str) -> None:
    """Three meta+mixup steps of digits_cnn on 2 ranks (gloo), each rank on its own batch; rank 0 saves
    the weights (and, compiled, how many graphs were compiled). `path`: "before" is the wrapping the
    engine used before (SeparateForwards inside DDP, DDP's default switches); "engine" is
    engine.training_forwards; "compiled" the same with train.compile=default, captured by AOT autograd
    (inductor's code generation takes minutes on the CPU) and with small buckets, so that DDP's
    graph split has several buckets to split at."""
    import torch.distributed as dist

    from mgssl.model import build_model
    from mgssl.train import engine
    from mgssl.train.config import MethodConfig, load_config
    from mgssl.train.distributed import Dist, average_grads
    from mgssl.train.step import SeparateForwards, StepParts, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    graphs = []
    try:
        torch.manual_seed(0)
        net = build_model("digits_cnn", 10, 1)
        if path == "before":
            forwards = torch.nn.parallel.DistributedDataParallel(SeparateForwards(net))
        else:
            cfg = load_config("digits", ("train.compile=default",) if path == "compiled" else ())
            if path == "compiled":
                from torch._dynamo.backends.debugging import aot_eager

                def counted(gm, inputs):
                    graphs.append(gm)
                    return aot_eager(gm, inputs)

                real_compile, real_options = torch.compile, engine.ddp_options
                torch.compile = lambda fn, mode=None, **kwargs: real_compile(fn, backend=counted)
                engine.ddp_options = lambda cfg: {**real_options(cfg), "bucket_cap_mb": 0.02}
                dist._DEFAULT_FIRST_BUCKET_BYTES = 8192  # the first bucket (1 MB) would hold the whole network
            forwards = engine.training_forwards(net, cfg, Dist(rank, 2))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        parts = StepParts(forwards, net, optimizer, 10, reduce_grad=lambda g: average_grads(g, 2), world_size=2)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        torch.manual_seed(10 + rank)  # and its own mixup draws
        for _ in range(3):  # under static_graph DDP fixes its buckets after the first step
            batch = (torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen),
                     torch.randn(4, 1, 8, 8, generator=gen))
            train_step(parts, batch, method=MethodConfig(), lr=0.1, consistency_weight=1.0)
        if rank == 0:
            torch.save({"weights": net.state_dict(), "graphs": len(graphs)}, out)
    finally:
        dist.destroy_process_group()


def _train_on_two_ranks(tmp_path, path: str) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path / f"{path}.pt"
    mp.spawn(_ddp_steps, args=(str(tmp_path / f"{path}.store"), path, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_the_engine_ddp_wrapping_and_switches_train_to_the_weights_of_plain_ddp(tmp_path):
    """DDP inside the compiled module, static_graph, bucket views and no buffer broadcast under SyncBN
    change how the gradients travel, not what they are."""
    from mgssl.model import build_model
    from mgssl.train.config import load_config
    from mgssl.train.engine import ddp_options

    assert ddp_options(load_config("digits"))["static_graph"]
    before, engine = (_train_on_two_ranks(tmp_path, path)["weights"] for path in ("before", "engine"))
    torch.manual_seed(0)
    start = build_model("digits_cnn", 10, 1).state_dict()
    for key, value in before.items():
        assert torch.equal(value, engine[key]), key
    assert any(not torch.equal(engine[k], v) for k, v in start.items())  # the steps trained


@pytest.mark.slow
def test_compiled_ddp_is_split_at_its_buckets_and_trains_to_the_weights_of_plain_ddp(tmp_path):
    before, compiled = (_train_on_two_ranks(tmp_path, path) for path in ("before", "compiled"))
    # The forwards' graph in pieces at the buckets' boundaries; unsplit, the two forwards of a step
    # would be one graph (the meta part is not compiled here).
    assert compiled["graphs"] >= 3
    for key, value in before["weights"].items():
        assert torch.allclose(value, compiled["weights"][key], rtol=1e-5, atol=1e-7), key


def _rank_grads(rank: int) -> list:
    gen = torch.Generator().manual_seed(rank)
    return [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen) * 1e-3]


def _average_both_ways(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from mgssl.train.distributed import average_grads

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        mine = _rank_grads(rank)
        fp32 = average_grads([g.clone() for g in mine], 2)
        bf16 = average_grads([g.clone() for g in mine], 2, torch.bfloat16)
        if rank == 0:
            torch.save({"fp32": fp32, "bf16": bf16}, out)
    finally:
        dist.destroy_process_group()


def test_g_reduced_in_bf16_is_the_mean_rounded_to_bf16(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "g.pt"
    mp.spawn(_average_both_ways, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for exact, wire, a, b in zip(got["fp32"], got["bf16"], _rank_grads(0), _rank_grads(1)):
        assert torch.allclose(exact, (a + b) / 2, rtol=1e-6, atol=0)
        assert wire.dtype == torch.float32 and wire.shape == exact.shape  # back in g's own type
        # bf16 keeps 8 significant bits: each term and the sum rounded once, relative to the terms' size
        assert ((wire - exact).abs() <= 2 ** -8 * (a.abs() + b.abs())).all()
        assert not torch.equal(wire, exact)  # it really travelled in bf16
