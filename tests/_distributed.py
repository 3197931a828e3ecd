"""Helpers of the multi-process tests (tests/test_sharding.py, tests/test_deepspeed.py): a free port, and a run whose
rank 1 stalls so that the test can kill it or leave it hanging and time how long rank 0 takes to give up."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

STALL_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    trainer = Trainer(from_dict(TrainConfig, json.loads(sys.argv[1])), progress=False)
    trainer.setup()
    if trainer.rank == 0 and trainer.sharding == "deepspeed":  # the timeout of DeepSpeed's own process group
        import torch
        from deepspeed.utils import groups
        backend = groups._WORLD_GROUP._get_backend(torch.device("cpu"))
        open(sys.argv[2] + ".timeout", "w").write(str(backend.options._timeout.total_seconds()))
    step = trainer.train_step
    def stalling_step():
        if trainer.rank == 1:
            open(sys.argv[2], "w").close()
            time.sleep(3600)  # stalls (the test then stops or kills it)
        return step()
    trainer.train_step = stalling_step
    trainer.train()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stall_one_rank(tmp_path: Path, config: dict, fate: str, timeout: float) -> float:
    """Run ``config`` on two processes; once rank 1 reaches its first step it is killed (``fate='killed'``, SIGKILL) or
    stopped (``'hung'``, SIGSTOP).  Checks that rank 0 then fails with an error naming distributed_timeout_s, within
    the timeout (plus slack for a loaded machine; a hung peer: not before the timeout), and returns how long it took."""
    script = tmp_path / "stall_driver.py"
    script.write_text(STALL_DRIVER)
    marker = tmp_path / "rank1-stalled"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(config), str(marker)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    rank0, rank1 = procs
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert rank0.poll() is None and rank1.poll() is None, rank0.stderr.read()[-3000:] if rank0.poll() else ""
            assert time.monotonic() < deadline, "rank 1 never reached its first step"
            time.sleep(0.2)
        stalled = time.monotonic()
        os.kill(rank1.pid, signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
        _, err = rank0.communicate(timeout=timeout + 90)
        waited = time.monotonic() - stalled
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert rank0.returncode not in (0, None)
    assert "distributed_timeout_s" in err, err[-3000:]
    if fate == "hung":  # nothing tells rank 0 that its peer is gone: only the timeout ends the wait
        assert timeout - 1 <= waited <= timeout + 45, waited
    else:
        assert waited <= timeout + 45, waited
    return waited
