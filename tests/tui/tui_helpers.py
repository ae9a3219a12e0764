"""Helpers for the TUI tests: the recorded run and waiting on what workers post.

The recorded run in fixtures/run is a finished sampling + training + compare run:
events.jsonl (78 events), pairs.jsonl (12 pairs), compare/answers.jsonl (4 prompts).
"""

import asyncio
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED_RUN = FIXTURES / "run"
REPO_ROOT = Path(__file__).parents[2]


async def wait_for(pilot, condition, timeout: float = 10.0) -> None:
    """Let the app run until `condition()` holds; workers post their messages meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {condition.__doc__ or condition}")
        await pilot.pause(0.05)


def recorded_lines(name: str) -> list[str]:
    return RECORDED_RUN.joinpath(name).read_text(encoding="utf-8").splitlines(keepends=True)
