"""The layering, read from the source: data flows one way (`jobs` → `spark` → `ray_jobs` → MLflow →
`dagster_project`), the four jobs are siblings that never import each other, no private name crosses
a module, the training loop sits beneath the Ray layer, and no module of `ray_jobs/` takes part in an
import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"ray_jobs.train", "ray_jobs.align", "ray_jobs.evaluate", "ray_jobs.recommend"}
# package -> the project packages its modules may import at module level (jobs/cli.py, the command line,
# reaches every layer inside its commands)
ALLOWED = {"jobs": {"jobs"}, "spark": {"jobs", "spark"}, "ray_jobs": {"jobs", "ray_jobs"},
           "dagster_project": {"jobs", "spark", "dagster_project"}}


def modules() -> dict[str, Path]:
    out = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names taken) of a file; with `top_level_only`, not those inside functions."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_data_flows_one_way_and_jobs_stay_siblings():
    bad = []
    for name, path in modules().items():
        package = name.split(".")[0]
        for target, names in imports(path, top_level_only=name != "jobs.cli"):
            top = target.split(".")[0]
            if top in ALLOWED and top not in ALLOWED[package] and name != "jobs.cli":
                bad.append(f"{name} imports {target}")
            if name in JOBS and target in JOBS and target != name:
                bad.append(f"job {name} imports job {target}")
            bad += [f"{name} takes private {n} from {target}" for n in names
                    if n.startswith("_") and top in ALLOWED and not n.startswith("__")]
    assert not bad, bad


def test_the_training_loop_sits_beneath_the_ray_layer():
    """The loop reaches collectives and DeepSpeed through `ray_jobs.distributed`; the Ray layer
    (`runtime`), the registry's entry point and the jobs are above it."""
    above = {"ray", "ray_jobs.runtime", "ray_jobs.entrypoint", "ray_jobs.tracking", "ray_jobs.serving"} | JOBS
    for name in ("ray_jobs.loop", "ray_jobs.distributed", "ray_jobs.losses", "ray_jobs.checkpoint"):
        taken = {t for t, _ in imports(modules()[name], top_level_only=False)}
        assert not {t for t in taken if t in above or t.startswith("ray.")}, (name, taken & above)


def test_no_import_cycle_in_ray_jobs():
    mods = {n: p for n, p in modules().items() if n.startswith("ray_jobs")}
    edges = {n: {t for t, _ in imports(p, top_level_only=False) if t in mods and t != n} for n, p in mods.items()}
    for package in {n.rsplit(".", 1)[0] for n in mods if "." in n}:  # `from ray_jobs.x import y` of a package
        edges.setdefault(package, set())
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [start])
            assert cycle is None, " -> ".join(cycle)


def test_bench_scripts_import_the_installed_project():
    """Benchmarks are clients of the package: no `sys.path` edits, no script imported from another."""
    bad = []
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("insert", "append") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "path":
                bad.append(f"{path.name}:{node.lineno} edits sys.path")
        bad += [f"{path.name} imports the script {t}" for t, _ in imports(path, top_level_only=False) if t in scripts]
    assert not bad, bad
