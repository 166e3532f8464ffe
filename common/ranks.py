"""Work split over the ranks of a launcher (torchrun, deepspeed): which rank this process is, how many there are,
and for 04_decode.py the row files each rank writes and their merge into one output in prompt order.

Decoding: every rank decodes every world-th prompt into its own shard (OUTPUT.shardR-of-W.jsonl; one process
writes OUTPUT.partial); the first rank merges them into OUTPUT once every rank is done. A resume counts the rows
of every row file an earlier run left, whatever its number of ranks."""
import datetime
import glob
import os

from common.io import DataError, read_jsonl, write_jsonl


def launcher_rank():
    """This process's rank under a launcher (RANK), 0 without one."""
    return int(os.environ.get("RANK", "0"))


def launcher_world():
    """How many processes the launcher started (WORLD_SIZE), 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Ranks wait for the slowest at the end (CBS, CARDS and --resume give them unequal work): hours, not the ten
# minutes after which a collective gives up by default
RANK_WAIT = datetime.timedelta(days=7)


def distributed():
    """(rank, world) under torchrun. The ranks only wait for each other at the end, over gloo (a CPU barrier,
    also between GPU ranks: no tensor crosses, and NCCL's watchdog would end a long wait)."""
    rank, world = launcher_rank(), launcher_world()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=RANK_WAIT)
    return rank, world


def wait_for_every_rank(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def leave_ranks(world):
    """The last meeting of the ranks: every one waits for the others, then the group ends."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def shard_path(output, rank, world):
    """The row file a rank appends to until OUTPUT is complete."""
    return f"{output}.partial" if world == 1 else f"{output}.shard{rank}-of-{world}.jsonl"


def row_files(output):
    """The row files that runs of OUTPUT leave until it is complete: OUTPUT.partial (one process) and a shard
    per rank (OUTPUT.shardR-of-W.jsonl, of any world size W)."""
    base = glob.escape(output)
    return sorted(glob.glob(base + ".partial") + glob.glob(base + ".shard*-of-*.jsonl"))


def check_resumable(path, prompts, expected):
    """Refuse to continue a file whose rows were made with another method, settings, policy, RM or prompts."""
    if not os.path.exists(path):
        return
    by_id = {p["id"]: p for p in prompts}
    for lineno, row in read_jsonl(path, on_error="skip"):
        made = {k: row.get(k) for k in expected}
        differs = [f"{k}: {made[k]!r} then, {expected[k]!r} now" for k in expected if made[k] != expected[k]]
        prompt = by_id.get(row.get("id"))
        if prompt is None:
            differs.append(f"id {row.get('id')!r} is not in this prompt set")
        elif row.get("prompt") != prompt["prompt"]:
            differs.append(f"the prompt of id {row.get('id')!r} changed")
        if differs:
            raise DataError(f"{path}:{lineno}: made by another run ({'; '.join(differs)}); "
                            "rerun without --resume to start over")


def rows_done(paths, prompts, expected):
    """The ids that the row files of an earlier run of OUTPUT hold (each checked as `check_resumable`)."""
    done = set()
    for path in paths:
        check_resumable(path, prompts, expected)
        done |= {row.get("id") for _, row in read_jsonl(path, on_error="skip")}
    return done


def remove_row_files(paths):
    """Row files and the lock files that killed runs left beside them."""
    for path in paths:
        for leftover in (path, path + ".lock"):
            if os.path.exists(leftover):
                os.remove(leftover)


def merge_rows(output, paths, prompts):
    """Write OUTPUT from row files in prompt order, each row once, then remove them (and their lock files)."""
    rows = {}
    for path in paths:
        rows.update({row["id"]: row for _, row in read_jsonl(path, on_error="skip")})
    write_jsonl(output, [rows[p["id"]] for p in prompts if p["id"] in rows])
    remove_row_files(paths)
    return len(rows)


def finish_output(output, world, earlier, resumed, prompts):
    """On the first rank once every shard is complete: merge this run's shards (and, resumed, the earlier run's
    row files) into OUTPUT, and remove the row files of an earlier run that was not resumed."""
    shards = [shard_path(output, r, world) for r in range(world)]
    kept = [p for p in earlier if p not in shards] if resumed else []
    n = merge_rows(output, kept + shards, prompts)
    remove_row_files(sorted(set(row_files(output)) - set(shards)))
    return n


def earlier_rows(output, world, resume, prompts, expected):
    """(the row files an earlier run of OUTPUT left, the ids they hold that count as done). With --resume every
    row file counts, whatever its world size (a shard of another split holds other ids), and a finished OUTPUT
    resumed on one process counts as its rows; without it they are stale (nothing done) and go when the output
    is complete (`finish_output`)."""
    import shutil

    earlier = row_files(output)
    if not resume:
        return earlier, set()
    if world == 1 and not earlier and os.path.exists(output):
        shutil.copyfile(output, shard_path(output, 0, 1))
        earlier = [shard_path(output, 0, 1)]
    return earlier, rows_done(earlier, prompts, expected)
