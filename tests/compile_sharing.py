"""One compile per program in a multi-process test job: process 0 compiles (or loads from XLA's persistent cache)
every program that spans processes and hands the executable to the others, which would otherwise compile the same
program again on the same two CPU cores.

  python tests/compile_sharing.py MODULE [ARGS...]   # runs ``python -m MODULE ARGS...`` with sharing on

``cli.two_process_job`` starts every ``python -m ...`` job this way, and ``multihost_driver.py`` calls
``share_compiles`` itself. The persistent cache is the test run's own (``JAX_COMPILATION_CACHE_DIR``, conftest.py).

JAX's own ``jax_share_binary_between_hosts`` does not work here unchanged, for two reasons this module patches:

- JAX keys a compiled program partly by the devices' topology fingerprint, and on the CPU backend that fingerprint
  differs between the processes of one job (each describes its own host): process 1 would wait for a key that
  process 0 never writes (and, without sharing, never finds process 0's cache entries). Multi-process CPU programs
  are keyed by the global device list instead, which every process sees alike.
- When process 0 finds a program in the persistent cache it returns it without sharing, while process 1, which
  looked a moment earlier (or before another test's job wrote the entry), waits for process 0's executable until the
  share timeout. Here process 1 never reads the cache for a multi-process program: it always takes process 0's
  executable, and process 0 hands out the cache entry it loaded (its bytes, as written) as well as what it compiled.
- Since jaxlib 0.12.1 a program process 0 compiled and the same program deserialised in process 1 deadlock in their
  first cross-process all-reduce (both wait in gloo). Process 0 therefore runs the bytes it handed out, deserialised
  like everyone else's. For the same reason ldm_jax keeps the persistent cache off in multi-process CPU jobs
  (``jax_setup.cache_refusal``); this module, where every process runs the same loaded bytes, lifts that.

Single-process programs (each process's own devices) keep JAX's key and path. A process that traced a different
program than process 0 waits for an executable that never comes and fails at the share timeout: the job's
processes must run the same programs, which is what multi-host training needs anyway.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import runpy
import sys


def _spans_processes(devices) -> bool:
    return len({d.process_index for d in devices}) > 1


def share_compiles() -> None:
    """Patches this process's JAX as the module docstring says; call it before anything compiles. Fails loudly
    (AttributeError) if a JAX release renames what it patches."""
    import jax
    from jax._src import cache_key, compilation_cache, compiler, distributed

    from ldm_jax import jax_setup

    original_hash = cache_key._hash_accelerator_config
    original_read = compiler._cache_read
    shared = compiler._compile_and_share_module.modules_cache  # keys process 0 already handed out by compiling
    published = set()
    taken = []  # keys this process took from process 0 instead of compiling

    def hash_accelerators(hash_obj, accelerators):
        devices = list(accelerators.flat)
        if devices[0].platform != "cpu" or not _spans_processes(devices):
            return original_hash(hash_obj, accelerators)
        described = ";".join(f"{d.platform}:{d.id}:{d.process_index}" for d in devices)
        hash_obj.update(hashlib.sha256(described.encode()).digest())

    def cache_read(module_name, key, compile_options, backend, executable_devices, host_callbacks):
        devices = list(executable_devices)
        client = distributed.global_state.client
        if client is None or not _spans_processes(devices):
            return original_read(module_name, key, compile_options, backend, executable_devices, host_callbacks)
        first = min(devices, key=lambda d: d.id).process_index  # the process JAX's share path compiles on
        if distributed.global_state.process_id != first:
            taken.append(key)
            return None, None  # a miss: JAX's share path then waits for the first process's executable
        executable, compile_time = original_read(
            module_name, key, compile_options, backend, executable_devices, host_callbacks
        )
        if executable is not None and key not in published and key not in shared:
            # The entry's own bytes: XLA:CPU serialises an executable it deserialised without its compiled
            # functions (process 1 then fails with "Function ... not found"), so never re-serialise the loaded one.
            entry = compilation_cache.decompress_executable(compilation_cache._get_cache(backend).get(key))
            serialized, _ = compilation_cache.extract_executable_and_time(entry)
            client.key_value_set_bytes(key, compilation_cache.compress_executable(serialized))
            published.add(key)
        return executable, compile_time

    original_share = compiler._compile_and_share_module

    def compile_and_share(backend, computation, executable_devices, compile_options, host_callbacks, client, *rest):
        module_name, key, first_process = rest
        compiled_here = key not in shared and distributed.global_state.process_id == first_process
        executable = original_share(
            backend, computation, executable_devices, compile_options, host_callbacks, client, *rest
        )
        if compiled_here:
            # Run the bytes the others run. Since jaxlib 0.12.1 an XLA:CPU executable as compiled and the same one
            # deserialised deadlock in their first cross-process all-reduce (both sides wait in gloo); two
            # deserialised copies, or two compiled ones, do not.
            serialized = compilation_cache.decompress_executable(client.blocking_key_value_get_bytes(key, 60_000))
            executable = backend.deserialize_executable(serialized, executable_devices, compile_options, host_callbacks)
            shared[key] = executable
        return executable

    compile_and_share.modules_cache = shared  # JAX's function reads its memo through the module's global name
    # ldm_jax turns the persistent cache off in multi-process CPU jobs because their processes would mix loaded and
    # compiled programs; here every process of a multi-process program runs the same loaded bytes.
    jax_setup.cache_refusal = lambda: None
    cache_key._hash_accelerator_config = hash_accelerators
    compiler._cache_read = cache_read
    compiler._compile_and_share_module = compile_and_share
    jax.config.update("jax_share_binary_between_hosts", True)
    # Longer than any one compile of the suite on a busy 2-core machine; a process left waiting fails its test.
    jax.config.update("jax_share_binary_between_hosts_timeout_ms", 600_000)
    # Tests read this line from process 1's log: sharing took effect.
    atexit.register(lambda: print(f"compile_sharing: {len(taken)} programs from process 0", file=sys.stderr))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/compile_sharing.py MODULE [ARGS...]")
    module = sys.argv[1]
    share_compiles()
    sys.argv = [module, *sys.argv[2:]]
    sys.path[0] = os.getcwd()  # as ``python -m`` has it (configs/ importable from the repository root), not tests/
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
