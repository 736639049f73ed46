"""Output shards written by independent workers (``prepare_data``, ``cache_latents``): naming, atomic completion and
the plan of which source records each shard holds.

Output shard j holds source records [j * K, (j + 1) * K) (K records per shard); worker i of N writes shards i, i + N,
... . A shard is written to a temporary file and renamed, then its statistics file is written the same way: a shard
counts as complete once ``<shard>.json`` exists, so a killed job reruns, skips the complete shards and redoes the
others, and the shards' contents do not depend on the number of workers.
"""

from __future__ import annotations

import json
import os

SHARD_SUFFIX = ".array_record"


def shard_name(j: int, n: int) -> str:
    return f"shard-{j:05d}-of-{n:05d}{SHARD_SUFFIX}"


def num_shards(num_records: int, per_shard: int) -> int:
    return -(-num_records // per_shard)


def record_range(j: int, per_shard: int, num_records: int) -> range:
    """The source records of output shard ``j``."""
    return range(j * per_shard, min((j + 1) * per_shard, num_records))


def check_local_out(out: str) -> None:
    """Shards are written and later read as local files (ArrayRecord readers, ``data.source``): a URL would be
    written as a local folder named "gs:"."""
    if "://" in out:
        raise ValueError(
            f"--out={out!r}: a URL; shards are written to a local or mounted path (a bucket mounted with gcsfuse), "
            "which training then reads"
        )


def check_worker(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"--process_index={process_index}: must be in [0, --process_count={process_count})")


def stats_path(out: str, j: int, n: int) -> str:
    return os.path.join(out, shard_name(j, n) + ".json")


def is_complete(out: str, j: int, n: int) -> bool:
    return os.path.exists(stats_path(out, j, n))


def temporary_path(out: str, j: int, n: int) -> str:
    """Where shard j is written before it is renamed into place (per process: two workers never share one)."""
    return os.path.join(out, f"{shard_name(j, n)}.tmp-{os.getpid()}")


def commit(out: str, j: int, n: int, tmp: str, stats: dict) -> None:
    """Renames the written shard into place, then writes its statistics (which mark it complete)."""
    path = os.path.join(out, shard_name(j, n))
    os.replace(tmp, path)
    write_json_atomic(stats_path(out, j, n), stats)


def all_stats(out: str, n: int) -> list[dict] | None:
    """Every shard's statistics, or None while any shard is incomplete."""
    paths = [stats_path(out, j, n) for j in range(n)]
    if not all(os.path.exists(p) for p in paths):
        return None
    out_stats = []
    for p in paths:
        with open(p) as f:
            out_stats.append(json.load(f))
    return out_stats


def write_json_atomic(path: str, value, **dump_kw) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, **dump_kw)
    os.replace(tmp, path)


LATER_KEYS = ("source", "source_records", "data_dir", "image_key", "caption_key", "label_key")


def check_settings(out: str, settings: dict, what: str, name: str = "settings.json") -> None:
    """The first worker records the job's settings in ``out``; every later worker and rerun must use the same, so
    that shards made with other settings are never mixed into one output (``what`` names them in the error)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        write_json_atomic(path, settings, indent=2, sort_keys=True)
    with open(path) as f:
        recorded = json.load(f)
    # Keys recorded only since 2026-12 (the source and its size): a folder written before them is compared on the
    # rest, so that rerunning an older preparation or cache continues instead of being refused.
    changed = sorted(
        k
        for k in set(recorded) | set(settings)
        if recorded.get(k) != settings.get(k) and not (k in LATER_KEYS and k not in recorded)
    )
    if changed:
        k = changed[0]
        raise ValueError(
            f"--out={out!r} holds {what} made with {k}={recorded.get(k)!r}, not {settings.get(k)!r} (differing: "
            f"{changed}); use another --out, or delete it to start again"
        )


def listed_paths(folder: str, info: dict, spec: str) -> list[str]:
    """The shard files ``info`` (a complete job's dataset_info.json) names, in order: a folder may also hold shards
    of another shard count, which are not this dataset's. Raises ValueError naming ``spec`` for a missing one."""
    paths = [os.path.join(folder, shard_name(j, info["shards"])) for j in range(info["shards"])]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"data.source={spec!r}: {folder}/dataset_info.json names {info['shards']} shards, and "
            f"{len(missing)} are missing (e.g. {missing[0]}); prepare the folder again"
        )
    return paths
