"""Counting compilations of a task's generation programs."""

from __future__ import annotations


def count_generate_traces(task) -> list[str]:
    """Wraps ``task.generate_fn``; returns a list that gets the sampler name each time jax traces (and so compiles)
    one of the generation programs."""
    traces = []
    make = task.generate_fn

    def counting_generate_fn(options, *args):
        fn = make(options, *args)

        def traced(*a):
            traces.append(options.name)  # runs only while jax traces the function
            return fn(*a)

        return traced

    task.generate_fn = counting_generate_fn
    return traces
