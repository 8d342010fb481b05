"""The core never imports a plugin distribution: in-tree plugins are built like third parties'."""

from __future__ import annotations

import ast
from pathlib import Path

import lmport

CORE = Path(lmport.__file__).resolve().parent
PLUGIN_PACKAGES = {"lmport_cuda", "lmport_rocm", "lmport_gaudi", "lmport_neuron", "lmport_fake_vendor"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return names


def test_no_core_module_imports_a_plugin_package():
    offenders = {
        str(path.relative_to(CORE)): sorted(m for m in imported_modules(path) if m.split(".")[0] in PLUGIN_PACKAGES)
        for path in CORE.rglob("*.py")
    }
    offenders = {path: mods for path, mods in offenders.items() if mods}
    assert not offenders, f"core modules import plugin packages: {offenders}"


def test_the_scan_sees_every_import_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import lmport_cuda.plugin\nfrom lmport_rocm import plugin\n"
        "import importlib\nimportlib.import_module('lmport_gaudi.plugin')\n__import__('lmport_neuron')\n"
    )
    assert imported_modules(sample) >= {"lmport_cuda.plugin", "lmport_rocm", "lmport_gaudi.plugin", "lmport_neuron"}


def test_the_types_a_backend_receives_import_nothing_from_the_engine():
    """hookspecs and the modules of the types a backend implements or receives (executor, step
    plan, graph runner, device runtime, distributed) load without ``lmport.engine``, and so does
    the CUDA plugin's graph runner: a backend does not depend on the scheduler's package."""
    import subprocess
    import sys

    code = (
        "import sys, lmport.hookspecs, lmport.plan, lmport.executor, lmport.graphs, lmport.runtime, lmport.distributed\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('lmport_cuda'): import lmport_cuda.graphs\n"
        "print(sorted(m for m in sys.modules if m.startswith('lmport.engine')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_step_plan_is_plain_picklable_data():
    import pickle

    import numpy as np

    from lmport.engine.api import SamplingParams
    from lmport.engine.block_manager import BlockManager
    from lmport.engine.limits import EngineLimits
    from lmport.engine.scheduler import Scheduler
    from lmport.engine.sequence import Sequence
    from lmport.plan import StepPlan

    limits = EngineLimits(
        max_concurrent_requests=8, max_input_tokens=64, max_total_tokens=96, max_batch_prefill_tokens=64,
        max_batch_total_tokens=256, max_batch_size=8, waiting_served_ratio=0.0, max_waiting_tokens=20,
        block_size=4, num_blocks=64, enable_prefix_caching=False,
    )
    sched = Scheduler(limits, BlockManager(64, 4, False))
    seqs = [Sequence(i, f"r{i}", 0, list(range(3, 3 + 5 + i)), SamplingParams(max_new_tokens=4), 0.0, seed=i) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    step = sched.schedule()
    plan = pickle.loads(pickle.dumps(step.plan()))
    assert isinstance(plan, StepPlan) and [n.seq_id for n in plan.new] == [0, 1] and plan.new[1].seed == 1
    assert [e.token_ids for e in plan.entries] == [s.prompt_token_ids for s in seqs]
    assert [e.sample_position for e in plan.entries] == [4, 5]
    assert np.array_equal(plan.block_table(1), seqs[1].block_table)
    for e in step.entries:  # the engine's bookkeeping after the step
        e.seq.num_computed_tokens = e.start + e.num_new_tokens
        e.seq.append_token(7)
    sched.finish(seqs[0])
    plan = sched.schedule().plan()
    assert plan.new == [] and plan.finished_seq_ids == [0] and [e.token_ids for e in plan.entries] == [[7]]
    assert not plan.entries[0].is_prefill
