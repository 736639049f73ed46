"""Structure the code must keep: no import cycles in the package, callers that ask the task instead of branching on
its name, every task kind answering the Task protocol, and every config section declared by a dataclass."""

import ast
import os

import pytest
from cli import ROOT

from ldm_jax import config_lib
from ldm_jax.tasks import TASKS, build_task
from ldm_jax.tasks.protocol import EvaluableTask, GenerativeTask, Task

PACKAGE = os.path.join(ROOT, "ldm_jax")
# The task-agnostic callers: they may dispatch only through the task's interface.
CALLERS = ("training/loop.py", "sample.py", "evaluate.py")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _runtime_nodes(tree):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only, never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
            else:
                todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions (a lazy import still ties
    the two modules together), read from the source."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                modules[_module_name(path)] = path
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from a import b`` imports the module a.b when it is one, else a name of a.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "ldm_jax.tasks.latent_diffusion" in graph["ldm_jax.tasks"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("caller", CALLERS)
def test_callers_do_not_branch_on_the_task(caller):
    """No task names compared, no getattr / isinstance probing: the loop, sample and evaluate ask the task."""
    with open(os.path.join(PACKAGE, caller), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "isinstance"):
            found.append(f"line {node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Compare):
            names = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in TASKS]
            if names:
                found.append(f"line {node.lineno}: compares with {names}")
    assert found == []


def test_every_task_kind_answers_the_protocol(txt2img_config):
    """Each kind of ``config.task`` builds a task with the methods the loop, sample and evaluate call."""
    import copy

    from configs import autoencoder_kl, class_cond, inpainting, superres, unconditional

    configs = {"autoencoder": autoencoder_kl.get_config("tiny"), "txt2img": txt2img_config}
    for module in (class_cond, unconditional, inpainting, superres):
        c = module.get_config("tiny")
        c.data, c.first_stage = copy.deepcopy(txt2img_config.data), copy.deepcopy(txt2img_config.first_stage)
        configs[c.task] = c
    assert sorted(configs) == sorted(TASKS)
    for name, config in configs.items():
        task = build_task(config)
        assert isinstance(task, Task) and isinstance(task, EvaluableTask), name
        assert isinstance(task, GenerativeTask) == bool(TASKS[name].parts), name


def test_sections_refuse_unknown_and_missing_fields():
    from ldm_jax.training.optim import OptimConfig, optim_section

    section = optim_section(lr=1e-3, warmup_steps=0, ema_decay=0.9)
    assert OptimConfig.from_config(section, "optim.").lr == 1e-3
    with pytest.raises(ValueError, match="optim.lr=-1.0: must be > 0"):
        OptimConfig.from_config(dict(section, lr=-1.0), "optim.")
    with pytest.raises(ValueError, match="optim.momentum: unknown field"):
        OptimConfig.from_config(dict(section, momentum=0.9), "optim.")
    partial = dict(section)
    del partial["b2"]
    with pytest.raises(ValueError, match="optim.b2: missing"):
        OptimConfig.from_config(partial, "optim.")
    with pytest.raises(TypeError, match="field 'lr' has no default"):
        OptimConfig.defaults()
    assert isinstance(OptimConfig(lr=1.0, warmup_steps=0, ema_decay=0.5), config_lib.Section)


def test_sample_flags_a_task_does_not_read_are_refused():
    from ldm_jax.tasks import check_sample_flags

    check_sample_flags("txt2img", {"prompt", "negative_prompt", "init_image", "mask_image", "strength"})
    check_sample_flags("superres", {"low_res_image", "noise_level"})
    with pytest.raises(ValueError, match="--class_label needs a class-conditional run; this is a txt2img run"):
        check_sample_flags("txt2img", {"prompt", "class_label"})
    with pytest.raises(ValueError, match="--low_res_image needs a superres run; this is a class_cond run"):
        check_sample_flags("class_cond", {"class_label", "low_res_image"})
    with pytest.raises(ValueError, match="--init_image, --mask_image and --strength need a model that takes whole"):
        check_sample_flags("superres", {"low_res_image", "init_image"})
    with pytest.raises(ValueError, match="--prompt, --prompts_file and --negative_prompt need a text-conditioned"):
        check_sample_flags("autoencoder", {"prompt"})
