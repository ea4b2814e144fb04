"""The fleet worker's request protocol (tests/fleetworker.py): requests answered by id, a failed
request answered as an error without ending the worker, and the worker ending when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.fleetworker import WorkerError, open_workers


async def test_a_worker_answers_errors_by_id_goes_on_and_ends_when_asked(tmp_path: Path) -> None:
    async with open_workers(tmp_path, 1, ()) as (worker,):
        with trio.fail_after(60):
            with pytest.raises(WorkerError, match="unknown op 'fly'"):
                await worker.ask("fly")
            with pytest.raises(WorkerError, match="KeyError"):
                await worker.ask("invite", device="nobody")
            assert await worker.ask("state") == {"devices": {}}
            # side by side: each answer reaches its own request
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(worker.ask, "state")
            await worker.ask("exit")
            with pytest.raises(WorkerError, match="ended"):
                while True:  # the reader sees the end of the output, then asking fails
                    await worker.ask("state")
                    await trio.sleep(0.05)
    assert worker.process.returncode == 0
