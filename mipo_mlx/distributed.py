"""One run across several processes or Macs: the ranks of mx.distributed, how work is split and put back together.

    mlx.launch -n 2 -- mipo-mlx train recipes/quickstart.yaml               # two ranks on this machine
    mlx.launch --hostfile hosts.json -- mipo-mlx train recipes/quickstart.yaml   # one rank per Mac (README)

Started by mlx.launch (ring backend over TCP or Thunderbolt; MPI or JACCL as MLX offers),
every rank runs the same command on its own copy of the model, recipe and data files;
started alone, there is one rank and every function here is the identity. Rank 0 alone
writes the run directory and the event log and prints; the other ranks get what it reads
there (pairs, checkpoints) from it (`from_main`, `arrays_from_main`), so a run directory
on rank 0's disk is enough.

Work is split so that results do not depend on the number of ranks:
- `share(items)`: rank r takes items[r::size] (mlx-lm's pattern), for the pairs of one
  optimizer step; gradients and metrics are then summed over ranks (`sum_arrays`,
  `sum_values`), each rank's weighted by its share of the pairs;
- `split_work(items, fn, chunk)`: whole chunks of `chunk` items go round the ranks and the
  results come back in order on every rank, so a scoring pass whose numbers depend on its
  batch (scoring.SCORING_ROWS rows) runs on the same rows however many ranks there are.

A rank that ends stops the others: mlx.launch sends them SIGTERM, and a collective whose
peer is gone fails; either way the rank says so in one line (RankLost, exit status 1) and
what rank 0 wrote stays, so the run resumes from its last checkpoint. A mistake found at
the start on any rank (`agree`) is printed once, by the lowest rank that found it; the
others end quietly with the same exit status.
"""

import atexit
import functools
import json
import logging
import os
import signal
import sys
import threading
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mipo_mlx.errors import EXIT_USER_ERROR, UserError
from mipo_mlx.rundir import Pair

logger = logging.getLogger("mipo_mlx")
# How long a rank that leaves an error to rank 0 waits for it (mlx.launch ends it sooner when rank 0 ends).
QUIET_WAIT_SECONDS = 10
LOST = ("rank {rank} of {size} stopped: another rank of this run ended or cannot be reached; what rank 0 wrote is "
        "kept: run the same command again (train with --resume) to continue from its last checkpoint")


class RankLost(UserError):
    """Another rank of the run ended, so this one stops: one line, exit status 1."""

    exit_status = 1


class QuietExit(SystemExit):
    """This rank ends without a word: another rank printed why."""


@functools.cache
def group() -> mx.distributed.Group:
    """The group of every rank (a group of one when the process was not started by mlx.launch)."""
    try:
        world = mx.distributed.init()
    except RuntimeError as error:  # mlx.launch writes MLX_HOSTFILE; one set by hand may not read
        failed = UserError(f"mx.distributed cannot start ({' '.join(str(error).split())[:200]}); start the ranks "
                           "with mlx.launch (-n N or --hostfile FILE) rather than with MLX_HOSTFILE set by hand",
                           key=f"MLX_HOSTFILE={os.environ.get('MLX_HOSTFILE', '')}")
        failed.say_here = True
        raise failed from None
    if world.size() > 1:
        _watch(world)
    return world


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_main() -> bool:
    return rank() == 0


def _watch(world) -> None:
    """SIGTERM (mlx.launch ending the ranks after one ended) becomes RankLost; other ranks log warnings only."""
    if world.rank() != 0:
        logger.setLevel(logging.WARNING)

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if _ending["quiet"]:
            os._exit(EXIT_USER_ERROR)
        if not _ending["lost"]:  # else this rank is already on its way out, saying why
            raise lost(LOST.format(rank=world.rank(), size=world.size()))

    signal.signal(signal.SIGTERM, stop)
    if not os.environ.get("MLX_RING_VERBOSE"):
        _drop_ring_messages()


def _drop_ring_messages() -> None:
    """Leave the ring backend's own lines out of stderr: on a lost peer it writes a dozen, and RankLost says it in one."""
    read, write = os.pipe()
    terminal = os.dup(2)
    os.dup2(write, 2)
    os.close(write)

    def forward():
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not line.startswith(b"[ring]"):
                    os.write(terminal, line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()

    def restore():
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last writer closes: forward() ends after the last line
        thread.join(timeout=5)

    atexit.register(restore)


# How this rank is ending: quietly (another rank says why) or because it lost another rank (it says so once).
_ending = {"quiet": False, "lost": False}


def lost(message: str) -> RankLost:
    _ending["lost"] = True
    return RankLost(message)


def quiet_exit() -> QuietExit:
    _ending["quiet"] = True
    return QuietExit(EXIT_USER_ERROR)


def _collective(array: mx.array, op) -> mx.array:
    """op(array) across the ranks, evaluated here, where a lost peer is caught."""
    try:
        result = op(array, stream=mx.cpu)
        mx.eval(result)
        return result
    except RuntimeError as error:
        if "[ring]" not in str(error) and "peer" not in str(error):
            raise
        raise lost(LOST.format(rank=rank(), size=size())) from None


def per_rank(value: float, dtype=mx.float32) -> list:
    """Every rank's `value`, by rank."""
    if size() == 1:
        return [value]
    slots = mx.zeros((size(),), dtype=dtype)
    slots[rank()] = value
    return _collective(slots, mx.distributed.all_sum).tolist()


def any_rank(flag: bool) -> bool:
    return any(per_rank(float(flag)))


def _exchange_bytes(data: bytes) -> list[bytes]:
    """Every rank's bytes, by rank."""
    lengths = per_rank(len(data), mx.int64)
    padded = np.zeros(max(lengths) or 1, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    gathered = np.array(_collective(mx.array(padded), mx.distributed.all_gather)).tobytes()
    width = len(gathered) // size()
    return [gathered[r * width : r * width + n] for r, n in enumerate(lengths)]


def exchange(value) -> list:
    """Every rank's JSON-able `value`, by rank."""
    if size() == 1:
        return [value]
    return [json.loads(data) for data in _exchange_bytes(json.dumps(value).encode())]


def from_main(read):
    """read() on rank 0, its JSON-able result on every rank; if it fails there, rank 0 raises and the others end quietly."""
    if size() == 1:
        return read()
    failure = None
    if is_main():
        try:
            value = read()
        except BaseException as error:  # the others must not wait for a value that never comes
            failure, value = error, None
        sent = json.dumps({"failed": failure is not None, "value": value}).encode()
    else:
        sent = b""
    message = json.loads(_exchange_bytes(sent)[0])
    if failure is not None:
        raise failure
    if message["failed"]:
        raise quiet_exit()
    return message["value"]


def pairs_from_main(read) -> list[Pair]:
    """read() on rank 0 (rundir.Pair records of its run directory) on every rank."""
    return [Pair.from_json(record) for record in from_main(lambda: [pair.to_json() for pair in read()])]


def says(error: UserError) -> bool:
    """Whether this rank prints `error`: rank 0 does, and a rank that found a mistake at the start or lost its peers.

    Other ranks meet the same mistakes as rank 0 at the same point of the same run: they wait
    for rank 0 to say it and end (mlx.launch then ends them, quietly), and say it themselves
    only if rank 0 is still running after QUIET_WAIT_SECONDS (a mistake of theirs alone).
    """
    if isinstance(error, RankLost) or getattr(error, "say_here", False) or size() == 1 or is_main():
        return True
    _ending["quiet"] = True
    time.sleep(QUIET_WAIT_SECONDS)
    _ending["quiet"] = False
    return True


def agree(start):
    """start() on every rank; a UserError on any rank is raised by the lowest such rank alone, the others end quietly."""
    try:
        value, error = start(), None
    except UserError as raised:
        value, error = None, raised
    if size() > 1:
        failed = per_rank(float(error is not None))
        if any(failed) and failed.index(1.0) != rank():
            raise quiet_exit()
        if error is not None:
            error.say_here = True
    if error is not None:
        raise error
    return value


def share(items: list) -> list:
    """This rank's part of the items of one step: items[rank::size]."""
    return items[rank() :: size()]


def split_work(items: list, work, chunk: int = 1) -> list:
    """work(items) (one JSON-able result per item), each rank doing whole chunks of `chunk` items; in order, on every rank."""
    if size() == 1:
        return work(items)
    chunks = [items[start : start + chunk] for start in range(0, len(items), chunk)]
    mine = [item for part in chunks[rank() :: size()] for item in part]
    results = exchange(work(mine) if mine else [])
    done, cursor = [], [0] * size()
    for index, part in enumerate(chunks):
        owner = index % size()
        done += results[owner][cursor[owner] : cursor[owner] + len(part)]
        cursor[owner] += len(part)
    return done


def sum_arrays(tree):
    """The tree's arrays summed over the ranks (the same tree on every rank)."""
    if size() == 1:
        return tree
    flat = tree_flatten(tree)
    if not flat:
        return tree
    joined = mx.concatenate([value.reshape(-1).astype(mx.float32) for _, value in flat])
    summed = _collective(joined, mx.distributed.all_sum)
    parts, start = [], 0
    for name, value in flat:
        parts.append((name, summed[start : start + value.size].reshape(value.shape).astype(value.dtype)))
        start += value.size
    return tree_unflatten(parts)


def sum_values(values: dict) -> dict:
    """{name: number} summed over the ranks, names any rank has (in double precision, as JSON carries them)."""
    total = {}
    for part in exchange({k: float(v) for k, v in values.items()}):
        for name, value in part.items():
            total[name] = total.get(name, 0.0) + value
    return total


def arrays_from_main(arrays: dict) -> dict:
    """Rank 0's {name: array} on every rank, bit for bit; `arrays` on the others is only a placeholder."""
    if size() == 1:
        return arrays
    layout = from_main(lambda: {name: [list(a.shape), str(a.dtype).split(".")[-1]] for name, a in arrays.items()})
    received = {}
    for name, (shape, dtype) in layout.items():
        mine = arrays[name] if is_main() else mx.zeros(shape, dtype=getattr(mx, dtype))
        if mine.dtype in (mx.float32, mx.float16, mx.bfloat16):
            # Adding zeros keeps every float exact, but not the sign of a zero: send the bits.
            bits = {mx.float32: mx.uint32}.get(mine.dtype, mx.uint16)
            received[name] = _collective(mine.view(bits), mx.distributed.all_sum).view(mine.dtype)
        else:
            received[name] = _collective(mine, mx.distributed.all_sum)
    return received


def per_rank_rates(tokens: list[int], seconds: float) -> dict:
    """The fields a progress or metrics event adds on several ranks: their number and each one's tokens/s."""
    if len(tokens) == 1:
        return {}
    return {"ranks": len(tokens), "rank_tokens_per_second": [n / max(seconds, 1e-9) for n in tokens]}
