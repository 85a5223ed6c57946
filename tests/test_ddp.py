"""torchrun: 2-rank gloo jobs on the CPU running tests/ddp/train.py (quickstart, unchanged from a
single-process script) and tests/ddp/custom.py (a loop of its own). Each job takes ~10 s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import onthefly

HERE = Path(__file__).parent / "ddp"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS_PER_EPOCH = 16  # 1001 samples over 2 ranks: 501 each (one repeated by the sampler's padding), batches of 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(tmp: Path, script: str = "train.py", *, nodes: int = 1, args: tuple[str, ...] = (),
             check: bool = True, exchange_seconds: str = "0", **env: Any) -> subprocess.CompletedProcess[str]:
    """Run ``script`` on 2 ranks; env values are given as DDP_<NAME> (JSON for non-strings).
    Commands are exchanged at every step boundary unless ``exchange_seconds`` says otherwise, so
    that a command requested after step S applies at S + 2, the steps the tests expect."""
    environ = {**os.environ, "ONTHEFLY_HOME": str(tmp / "home"), "DDP_OUT": str(tmp / "out"),
               "OMP_NUM_THREADS": "1", "ONTHEFLY_DASHBOARD": "0", "ONTHEFLY_DDP_EXCHANGE_SECONDS": exchange_seconds}
    environ.update({f"DDP_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in env.items()})
    if nodes == 1:
        commands = [[*TORCHRUN, "--standalone", "--nproc-per-node", "2", *args, str(HERE / script)]]
    else:  # two "nodes" on localhost, one rank each, meeting at a rendezvous endpoint
        endpoint = f"127.0.0.1:{free_port()}"
        commands = [[*TORCHRUN, "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1", "--rdzv-backend",
                     "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "onthefly-test", *args, str(HERE / script)]
                    for n in range(2)]
    processes = [subprocess.Popen(c, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=420)[0] for p in processes]
    result = subprocess.CompletedProcess(commands[0], max(p.returncode for p in processes), "\n".join(outputs))
    if check and result.returncode != 0:
        ARTIFACTS.mkdir(exist_ok=True)
        log = ARTIFACTS / f"ddp-{tmp.parent.name}-{tmp.name}.log"
        log.write_text(result.stdout)  # every rank's whole output, for the failure's cause
        raise AssertionError(f"torchrun failed (rc {result.returncode}; whole output in {log}):\n"
                             f"{result.stdout[-6000:]}")
    return result


def outputs(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads((tmp / f"out.rank{r}.json").read_text()) for r in range(2)]


def sessions(tmp: Path) -> tuple[Any, Any]:
    (folder,) = (tmp / "home" / "sessions").iterdir()
    return onthefly.open_session(folder), onthefly.open_session(folder / "ranks" / "rank-1")


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The uninterrupted 2-epoch job (rank 0 serving the dashboard) the other tests compare with."""
    folder = tmp_path_factory.mktemp("whole")
    return folder, torchrun(folder, epochs="2", dashboard="1")


def test_every_sample_is_recorded_once_per_epoch_and_the_ranks_agree(
        whole: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    folder, result = whole
    first, second = outputs(folder)
    assert first["summary"]["steps"] == second["summary"]["steps"] == 2 * STEPS_PER_EPOCH
    assert first["summary"]["train_loss"] == second["summary"]["train_loss"]  # the epoch mean over both ranks
    assert first["weights"] == second["weights"]
    main, rank1 = sessions(folder)
    rows = main.samples(1).to_pandas()
    for epoch in (0, 1):
        indices = rows[rows.epoch == epoch]["index"]
        assert len(indices) == 1001 and indices.nunique() == 1001  # once each, by the rank that trained it
    assert main.complete_epochs(1) == [0, 1]
    config = main.runs()[0]["config"]
    assert (json.loads(config) if isinstance(config, str) else config)["world_size"] == 2
    assert rank1.samples(1).num_rows > 0 and rank1.samples(1).num_rows < 1001 * 2  # its own share, in its folder
    assert "Traceback" not in result.stdout
    # Only rank 0 serves the dashboard.
    served = [line for line in result.stdout.splitlines() if "On The Fly dashboard: http://127.0.0.1:" in line]
    assert len(served) == 1, result.stdout[-3000:]
    # Exported and imported elsewhere: every rank's rows and checkpoints go with it.
    from onthefly.store.archive import export_session, import_session

    export_session(main.dir, tmp_path / "job.otf")
    copy = onthefly.open_session(import_session(tmp_path / "job.otf", home=tmp_path / "elsewhere"))
    assert copy.samples(1).to_pandas().groupby("epoch")["index"].nunique().tolist() == [1001, 1001]
    assert any((copy.dir / "ranks" / "rank-1" / "checkpoints").rglob("state.pt"))


def test_an_epoch_is_announced_once_every_rank_wrote_its_rows_and_no_rank_waits_for_a_disk(tmp_path: Path) -> None:
    # Rank 1's disk takes 0.5 s a part: rank 0 announces each epoch (its writer thread waits for
    # rank 1's rows) only when the session holds every sample of it; training never waited for it.
    torchrun(tmp_path, epochs="2", slow_writes="0.5", announced=str(tmp_path / "announced.json"))
    announced = json.loads((tmp_path / "announced.json").read_text())
    assert announced == {"0": 1001, "1": 1001}
    first, second = outputs(tmp_path)
    assert first["weights"] == second["weights"]


COMMANDS = {"5": ["set_lr", {"lr": 0.01}], "8": ["pause", {}], "12": ["checkpoint", {}],
            "20": ["train_more", {"epochs": 1}], "40": ["stop", {}]}


def test_commands_apply_at_the_same_step_on_every_rank_with_one_collective_a_step(tmp_path: Path) -> None:
    torchrun(tmp_path, commands=COMMANDS, count=str(tmp_path / "count"))
    main, rank1 = sessions(tmp_path)

    def applied(reader: Any) -> list[tuple[str, int]]:
        return [(e["payload"]["command"], e["step"]) for e in reader.events(1, kind="command_applied")]

    # Requested after step S on rank 0, taken at its boundary, applied at the next one (S + 2) everywhere.
    expected = [("set_lr", 7), ("pause", 10), ("resume", 10), ("checkpoint", 14), ("train_more", 22), ("stop", 42)]
    assert applied(main) == applied(rank1) == expected
    statuses = [e["payload"]["status"] for e in rank1.events(1, kind="status")]
    assert statuses[:3] == ["running", "paused", "running"] and statuses[-1] == "stopped"
    first, second = outputs(tmp_path)
    assert first["summary"]["status"] == second["summary"]["status"] == "stopped"
    assert first["summary"]["steps"] == 42 and first["weights"] == second["weights"]
    # The collective budget: On The Fly's Python collectives between one step's end and the next.
    counts = [json.loads((tmp_path / f"count.rank{r}.json").read_text()) for r in range(2)]
    assert counts[0] == counts[1]
    # counts[j]: the total after step j + 1; the collectives of step j + 2 are counts[j + 1] - counts[j].
    per_step = {j + 2: now - before for j, (before, now) in enumerate(zip(counts[0][:-1], counts[0][1:], strict=True))}
    around_commands = {step for _, step in expected} | {step + 1 for _, step in expected}
    epoch_starts = {e * STEPS_PER_EPOCH + 1 for e in range(1, 4)}
    quiet = {s: n for s, n in per_step.items() if s not in around_commands | epoch_starts}
    assert len(quiet) > 20 and set(quiet.values()) == {1}, per_step


def test_commands_are_exchanged_every_few_steps_when_steps_are_fast_and_still_apply_at_the_same_step(
        tmp_path: Path) -> None:
    # The default schedule: exchanges about 50 ms apart, not at every boundary (a gloo broadcast
    # at every 11 ms step cost 4 % of it; tests/test_exchange_schedule.py checks the schedule
    # exactly). A command still applies at one step, the same on both ranks.
    torchrun(tmp_path, commands={"2": ["set_lr", {"lr": 0.01}], "24": ["pause", {}]}, count=str(tmp_path / "count"),
             epochs="4", exchange_seconds="0.05")
    main, rank1 = sessions(tmp_path)

    def applied(reader: Any) -> list[tuple[str, int]]:
        return [(e["payload"]["command"], e["step"]) for e in reader.events(1, kind="command_applied")]

    assert applied(main) == applied(rank1)
    (set_lr, lr_step), (pause, paused_at), (resume, resumed_at) = applied(main)
    assert (set_lr, pause, resume) == ("set_lr", "pause", "resume")
    assert 4 <= lr_step < 24 < paused_at == resumed_at <= 4 * STEPS_PER_EPOCH  # both ranks waited there
    statuses = [e["payload"]["status"] for e in rank1.events(1, kind="status")]
    assert statuses[:3] == ["running", "paused", "running"]
    first, second = outputs(tmp_path)
    assert first["weights"] == second["weights"]
    counts = [json.loads((tmp_path / f"count.rank{r}.json").read_text()) for r in range(2)]
    assert counts[0] == counts[1]
    per_step = [now - before for before, now in zip(counts[0][:-1], counts[0][1:], strict=True)]
    # Boundaries that send nothing (steps here take well under 25 ms); none sends more than the
    # word and the command's JSON, with the epoch end's reduction.
    assert per_step.count(0) > 0 and max(per_step) <= 3, per_step


FORK = {"step": 20, "slice": {"kind": "quantile_band", "low": 0.8},
        "card": {"kind": "fork", "name": "hard specialist", "run_id": 1, "slice": "hard", "mix": "slice",
                 "lr": 0.05, "budget": 1, "budget_unit": "epochs", "seed": 0}}


def test_a_fork_trains_on_every_rank_and_the_parent_goes_on_exactly(
        whole: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    from onthefly.store.checkpoints import read_checkpoint

    compare = ["compare", {"runs": [1, 2, 3], "reference": 3, "sets": ["hard", "val"]}]
    torchrun(tmp_path, epochs="2", plan=FORK, commands={"26": compare})
    main, rank1 = sessions(tmp_path)
    (plan,) = main.plans()
    assert plan["status"] == "done", plan
    assert plan["runs"] == [2, 3] and plan["result"]["verdict"]["met"] in (True, False)
    assert {(e["child"], e["kind"], e["step"]) for e in main.lineage()["edges"]} == {(2, "fork", 22),
                                                                                     (3, "control", 22)}
    # The card was carried out at the same step on both ranks, with the same outcome.
    for reader in (main, rank1):
        (applied,) = [e for e in reader.events(1, kind="command_applied") if e["payload"]["command"] == "execute_plan"]
        assert applied["step"] == 22 and applied["payload"]["result"]["runs"] == [2, 3]
    # The specialist's one epoch drew every sample of the slice once, shared between the ranks.
    hard = set(main.slice_indices(main.slice("hard")).tolist())
    rows = main.samples(2).to_pandas()
    assert len(rows) == len(hard) and set(rows["index"]) == hard
    assert 0 < rank1.samples(2).num_rows < len(hard)  # rank 1 trained its share
    # Each child ended with the same weights on both ranks, and the parent went on as if never left.
    for child in (2, 3):
        ends = [read_checkpoint(r.checkpoints(child)[-1]["path"])[0] for r in (main, rank1)]
        assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    first, second = outputs(tmp_path)
    assert first["weights"] == second["weights"] == outputs(whole[0])[0]["weights"]
    # The comparison was made by rank 0 (its session holds the slice) and named on both ranks.
    for reader in (main, rank1):
        (compared,) = [e for e in reader.events(1, kind="command_applied") if e["payload"]["command"] == "compare"]
        assert compared["step"] == 28
    assert len(main.comparisons()) == 2  # the card's judging and the compare command


def test_a_curation_card_weighs_the_slice_on_every_rank_from_the_same_step(
        whole: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    drop = {**FORK, "card": {"kind": "curate", "run_id": 1, "slice": "hard", "action": "drop"}}
    torchrun(tmp_path, epochs="2", plan=drop)
    main, rank1 = sessions(tmp_path)
    assert [p["status"] for p in main.plans()] == ["done"]
    marks = [[(e["step"], e["payload"]["weight"]) for e in r.events(1, kind="curation_applied")] for r in (main, rank1)]
    assert marks[0] == marks[1] == [(22, 0.0)]  # the card approved after step 20 takes effect at 22 everywhere
    first, second = outputs(tmp_path)
    assert first["weights"] == second["weights"] != outputs(whole[0])[0]["weights"]


def test_a_health_check_up_finds_ranks_whose_weights_differ(tmp_path: Path) -> None:
    torchrun(tmp_path, epochs="1", nudge_step="6", commands={"3": ["health_check", {}], "8": ["health_check", {}]})
    for reader in sessions(tmp_path):
        before, after = reader.events(1, kind="health")
        assert "ranks_differ" not in {c["check"] for c in before["payload"]["cards"]}
        (found,) = [c for c in after["payload"]["cards"] if c["check"] == "ranks_differ"]
        assert found["severity"] == "error" and len(set(found["evidence"]["hashes"])) == 2


def test_kept_alive_by_rank_zero_every_rank_idles_and_trains_more(tmp_path: Path) -> None:
    torchrun(tmp_path, epochs="2", idle="1")  # rank 1 is not kept alive by itself: rank 0 decides
    first, second = outputs(tmp_path)
    assert first["summary"]["status"] == second["summary"]["status"] == "stopped"
    assert first["summary"]["steps"] == second["summary"]["steps"] == 3 * STEPS_PER_EPOCH
    assert first["weights"] == second["weights"]
    _, rank1 = sessions(tmp_path)
    assert [e["payload"]["status"] for e in rank1.events(1, kind="status")].count("idle") == 2


def test_a_resume_is_bit_identical_to_the_uninterrupted_run(
        whole: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    torchrun(tmp_path / "parts", epochs="2", commands={"24": ["stop", {}]})  # stops at step 26, mid-epoch
    torchrun(tmp_path / "parts", epochs="2", resume="last")
    parts = outputs(tmp_path / "parts")
    assert parts[0]["summary"]["steps"] == 2 * STEPS_PER_EPOCH
    assert parts[0]["weights"] == parts[1]["weights"] == outputs(whole[0])[0]["weights"]
    main, rank1 = sessions(tmp_path / "parts")
    (synced,) = main.events(kind="ranks_in_sync")  # checked after the resume
    assert synced["payload"]["ranks"] == 2 and synced["step"] == 26
    assert [e["step"] for e in rank1.events(kind="resumed_from_checkpoint")] == [26]


def test_a_resume_with_another_world_size_is_refused(tmp_path: Path) -> None:
    torchrun(tmp_path, epochs="1", commands={"10": ["stop", {}]})
    environ = {**os.environ, "ONTHEFLY_HOME": str(tmp_path / "home"), "RANK": "0", "WORLD_SIZE": "1",
               "DDP_RESUME": "last", "ONTHEFLY_DASHBOARD": "0"}
    single = subprocess.run([sys.executable, str(HERE / "train.py")], env=environ, capture_output=True, text=True,
                            timeout=120)
    assert single.returncode != 0
    assert "saved by 2 rank(s) and this run has 1" in single.stderr and "--nproc-per-node 2" in single.stderr


def test_a_crashing_rank_ends_the_job_within_seconds_naming_it(tmp_path: Path) -> None:
    started = time.monotonic()
    result = torchrun(tmp_path, check=False, crash_rank="1", crash_step="5", epochs="3")
    took = time.monotonic() - started
    assert result.returncode != 0
    assert "planted crash on rank 1 at step 5" in result.stdout
    assert "local_rank: 1" in result.stdout or "rank: 1" in result.stdout
    assert took < 60, f"the job took {took:.0f} s to end after a rank crashed"


def test_a_torchrun_restart_resumes_from_the_last_checkpoint(
        whole: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    # More restarts than the one crash needs: on a loaded machine torchrun's own re-rendezvous can
    # fail to connect the new workers' gloo mesh (seen here: "connectFullMesh failed ... Connection
    # refused" before any of our code ran); every attempt resumes from the same last checkpoint.
    restarted = torchrun(tmp_path / "crash", epochs="2", checkpoint_at="18", crash_rank="1", crash_step="21",
                         args=("--max-restarts", "3"))
    assert "planted crash on rank 1 at step 21" in restarted.stdout
    assert outputs(tmp_path / "crash")[0]["weights"] == outputs(whole[0])[0]["weights"]
    main, _ = sessions(tmp_path / "crash")
    resumed = main.events(kind="resumed_from_checkpoint")
    assert resumed and {e["step"] for e in resumed} == {18}


def test_two_nodes_on_localhost_train_like_one(whole: tuple[Path, subprocess.CompletedProcess[str]],
                                               tmp_path: Path) -> None:
    torchrun(tmp_path / "two", nodes=2, epochs="2")
    assert outputs(tmp_path / "two")[0]["weights"] == outputs(whole[0])[0]["weights"]
    main, _ = sessions(tmp_path / "two")
    assert main.samples(1).to_pandas()["index"].nunique() == 1001


def test_a_loop_of_its_own_with_its_ddp_model_records_every_sample_once(tmp_path: Path) -> None:
    torchrun(tmp_path, "custom.py")
    main, _ = sessions(tmp_path)
    rows = main.samples(1).to_pandas()
    assert [len(rows[rows.epoch == e]) for e in (0, 1)] == [600, 600]
    assert rows.groupby("epoch")["index"].nunique().tolist() == [600, 600]


def test_a_loop_of_its_own_with_an_unwrapped_model_is_told_to_wrap_it(tmp_path: Path) -> None:
    result = torchrun(tmp_path, "custom.py", check=False, unwrapped="1")
    assert result.returncode != 0
    assert "DistributedDataParallel(model)" in result.stdout


def test_the_shares_of_a_padded_epoch_are_recorded_once() -> None:
    from torch.utils.data import DistributedSampler

    from onthefly.engine.distributed import real_samples

    class Loader:  # what real_samples reads of a DataLoader
        def __init__(self, rank: int) -> None:
            self.sampler = DistributedSampler(range(1001), num_replicas=2, rank=rank, shuffle=False)
            self.batch_sampler = None

    assert [real_samples(Loader(r)) for r in range(2)] == [None, 500]  # rank 1's 501st sample is padding
